"""README.md: the Quick start has exactly the two CI commands, and its Python examples run."""

import importlib.util
import pathlib
import re

import pytest

from gpulora import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICK_START = [
    "pip install -e . && python -m gpulora demo",
    'pip install -e ".[test]" && python -m pytest',
]


def _section(title):
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def _blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def _python_blocks(gpu):
    """The runnable examples: NumPy ones (``gpu=False``) or the single-GPU CuPy one; the multi-GPU
    dask-cuda example needs several GPUs and is only compiled (:func:`test_multi_gpu_example_compiles`)."""
    return [b for b in _blocks(README, "python") if ("import cupy" in b) == gpu and "dask_cuda" not in b]


def test_quick_start_has_exactly_the_two_commands():
    blocks = _blocks(_section("Quick start"), r"[a-z]*")
    commands = [line.strip() for b in blocks for line in b.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert commands == QUICK_START


def test_readme_sections_in_order():
    order = ["## Quick start", "## Symbols", "## Python API", "### From PEFT", "## Command line",
             "## What the regimes mean", "## Backends"]
    positions = [README.index(h) for h in order]
    assert positions == sorted(positions)
    assert (ROOT / "docs" / "phase.png").is_file() and "](docs/phase.png)" in README


def test_numpy_examples_run(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(gpu=False)
    assert len(blocks) >= 2
    if importlib.util.find_spec("distributed") is None:  # the dask extra is optional
        blocks = [b for b in blocks if "gpulora.distributed" not in b]
    monkeypatch.chdir(tmp_path)  # the np.savez example writes problem.npz
    namespace = {}
    for code in blocks:  # in order, one namespace: later snippets use the objects of the first
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "exact None None" in out and "poly chebyshev" in out and "gpulora diagnosis" in out
    assert (tmp_path / "problem.npz").is_file()


def test_cupy_example_runs(capsys):
    if not backend.has_cuda():
        pytest.skip("the CuPy example needs a CUDA device (none found)")
    (code,) = _python_blocks(gpu=True)
    exec(compile(code, "README.md", "exec"), {})
    assert "poly" in capsys.readouterr().out


def test_multi_gpu_example_compiles():
    (code,) = [b for b in _blocks(README, "python") if "dask_cuda" in b]
    compile(code, "README.md", "exec")
