"""README.md stays true: the Quick start has exactly the two CI commands, its examples run and print what
their comments say, the demo block is what ``python -m gpulora demo --backend numpy`` prints now, and its
other numbers follow from the code. (The phase figure, CSV and boundary sentence: tests/test_docs.py.)"""

import math
import importlib.util
import pathlib
import re

import numpy as np
import pytest

from gpulora import backend
from gpulora.cli import main
from gpulora.poly.coefficients import choose

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICK_START = [
    "pip install . && python -m gpulora demo",
    'pip install ".[test,plot]" && python -m pytest',
]
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _section(title):
    m = re.search(rf"^#+ {re.escape(title)}.*?\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert m, f"README has no section '{title}'"
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


def test_readme_sections_in_order_and_no_install_warning():
    order = ["## Quick start", "## Symbols", "## Python API", "### From PEFT", "## Command line",
             "## What the regimes mean", "## Backends"]
    positions = [README.index(h) for h in order]
    assert positions == sorted(positions)
    assert "must be editable" not in README and "shadowed" not in README


def test_images_and_links_have_absolute_urls_of_committed_files():
    """PyPI renders README without the repository: every image and link to a file of the project is an
    absolute URL (of the project's repository, pyproject's Source), and names a file that exists."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11 (tomllib)")

    source = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Source"]
    owner_name = source.removeprefix("https://github.com/")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    links = re.findall(r"(?<!!)\[[^\]]*\]\(([^)#][^)]*)\)", README)
    assert images and links
    for url in images:
        assert url.startswith(f"https://raw.githubusercontent.com/{owner_name}/main/"), url
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url
    for url in links:
        assert url.startswith("https://"), url
        if url.startswith(f"{source}/blob/main/"):
            assert (ROOT / url.split("/blob/main/", 1)[1]).is_file(), url


def test_numpy_examples_run_and_print_what_their_comments_say(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(gpu=False)
    assert len(blocks) >= 2
    if importlib.util.find_spec("distributed") is None:  # the dask extra is optional
        blocks = [b for b in blocks if "gpulora.distributed" not in b]
    monkeypatch.chdir(tmp_path)  # the np.savez example writes problem.npz
    namespace = {}
    for code in blocks:  # in order, one namespace: later snippets use the objects of the first
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    expected = [m.strip() for b in blocks for m in re.findall(r"#\s*->\s*(.*)$", b, flags=re.M)]
    assert len(expected) >= 3
    for line in expected:
        assert line in out, (line, out)
    assert any("gpulora diagnosis" in line for line in out)
    assert (tmp_path / "problem.npz").is_file()


def test_cupy_example_runs(capsys):
    if not backend.has_cuda():
        pytest.skip("the CuPy example needs a CUDA device (none found)")
    (code,) = [b for b in _python_blocks(gpu=True) if "dask_cuda" not in b]  # multi-GPU: compiled only
    exec(compile(code, "README.md", "exec"), {})
    assert "poly" in capsys.readouterr().out


def _demo_block():
    text = _section("`python -m gpulora demo`")
    (block,) = [b for b in _blocks(text, "") if b.startswith("gpulora demo:")]
    return block.rstrip("\n").splitlines()


def _timing_free(line):
    """A demo line with its measured times and speedup blanked (they vary with the machine's load)."""
    if line.startswith("speedup"):
        return "speedup"
    parts = line.split()
    if parts[:1] in (["exact"], ["poly"]) and len(parts) == 7:
        parts[5] = "<time>"
    return " ".join(parts)


def _close(a, b, rel):
    """Two lines equal, numbers to ``rel`` relative (the float32 gradient errors move in their last digit
    with the BLAS's summation order)."""
    na, nb = NUMBER.findall(a), NUMBER.findall(b)
    if NUMBER.sub("#", a) != NUMBER.sub("#", b) or len(na) != len(nb):
        return False
    return all(math.isclose(float(x), float(y), rel_tol=rel, abs_tol=1e-12) for x, y in zip(na, nb))


@pytest.fixture(scope="module")
def demo_output():
    """``python -m gpulora demo --backend numpy`` as it prints now (the default problem, L = 16384)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--backend", "numpy"]) == 0
    return buf.getvalue().rstrip("\n").splitlines()


def test_demo_block_is_what_the_demo_prints_now(demo_output):
    readme = _demo_block()
    assert len(readme) == len(demo_output)
    for want, got in zip(readme, demo_output):
        w, g = _timing_free(want), _timing_free(got)
        in_error_table = re.match(r"\s*[qkv]\s+\d", want) is not None
        assert _close(w, g, rel=0.15 if in_error_table else 1e-6), (want, got)


def test_demo_block_speedup_is_its_own_times():
    lines = _demo_block()
    times = {ln.split()[0]: float(ln.split()[5]) for ln in lines if ln.split()[:1] in (["exact"], ["poly"])
             and len(ln.split()) == 7}
    (speedup,) = [ln for ln in lines if ln.startswith("speedup")]
    from gpulora.cli import format_speedup

    assert speedup.endswith(format_speedup(times["exact"], times["poly"]))


def test_numbers_in_the_prose_follow_from_the_code():
    # "Try --bound 4 (degree 11, k = 1365, float64 features)": the demo's default d_head 4, float32 inputs
    choice, compute = choose(4.0, dtype=np.float32)
    assert (choice.degree, choice.features(4), np.dtype(compute).name) == (11, 1365, "float64")
    assert "`--bound 4` (degree 11, `k = 1365`, float64 features)" in README
    with pytest.raises(ValueError):  # "--bound 16: no polynomial of degree <= 40 reaches tol"
        choose(16.0, dtype=np.float32)
    # "--d-head 16 --L 4096 (k = C(16 + 5, 5) = 20349: the diagnosis recommends exact)"
    assert math.comb(16 + 5, 5) == 20349
    from gpulora.testing import make_problem
    import gpulora

    p = make_problem(0, L=4096, d_model=64, d_head=16, d_v=8, r=8, targets="qkv", dtype=np.float32,
                     score_bound=1.0)
    assert gpulora.diagnose(p.head, p.lora, p.x).recommended == "exact"
    # the limits quoted: exact max |S| up to batch H L^2 = 2^26 scores, polynomial degrees up to 40
    from gpulora.diagnosis import EXACT_MAX_SCORE_LIMIT
    from gpulora.poly.coefficients import MAX_DEGREE

    assert EXACT_MAX_SCORE_LIMIT == 2**26 and "`batch H L^2 <= 2^26`" in README
    assert MAX_DEGREE == 40 and README.count("degree <= 40") >= 2
    # the demo's own degree and features, and the feature dimensions of the regimes section
    choice, _ = choose(1.0, dtype=np.float32)
    assert (choice.degree, choice.features(4)) == (5, 126) and "`k = C(4 + 5, 5) = 126`" in README
    table = {(8, 2): 45, (8, 4): 495, (16, 2): 153, (16, 4): 4845, (64, 2): 2145, (64, 3): 47905,
             (128, 2): 8385, (32, 5): 435897}
    for (d, g), k in table.items():
        assert math.comb(d + g, g) == k and str(k) in README


def test_multi_gpu_example_compiles():
    (code,) = [b for b in _blocks(README, "python") if "dask_cuda" in b]
    compile(code, "README.md", "exec")
