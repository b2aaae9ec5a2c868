"""Packaging stays as documented: light base dependencies, extras that install together where README
offers them together, a PEP 639 license, one version, an sdist that carries its tests, the kernels'
layout, and the module names. (.ci/run builds the wheel and the sdist and runs the suite from the sdist.)"""

import importlib
import importlib.metadata
import pathlib
import re
import sys

import pytest

import gpulora

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req):
    """``"numba-cuda[cu13]>=0.20"`` -> ``("numba-cuda", {"cu13"})``."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
    return m.group(1).lower(), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def test_base_install_is_numpy_and_array_api_compat_only(project):
    assert sorted(_name(r)[0] for r in project["dependencies"]) == ["array-api-compat", "numpy"]


def test_extras_hold_what_the_docs_say(project):
    extras = {k: {_name(r)[0]: _name(r)[1] for r in v} for k, v in project["optional-dependencies"].items()}
    assert extras["cuda12"]["numba-cuda"] == {"cu12"} and "cupy-cuda12x" in extras["cuda12"]
    assert extras["cuda13"]["numba-cuda"] == {"cu13"} and "cupy-cuda13x" in extras["cuda13"]
    assert extras["ptx"] == {"numba-cuda": {"cu13"}, "numpy": set()}  # numpy<2.5 beside numba-cuda
    assert all("numpy" in extras[e] for e in ("cuda12", "cuda13"))
    assert set(extras["plot"]) == {"matplotlib", "tqdm"}
    assert {"pytest", "hypothesis", "array-api-strict", "ml-dtypes"} <= set(extras["test"])
    # [test] brings no CUDA wheel, so it resolves beside [cuda12] as beside [cuda13] (by construction)
    assert not any(n.startswith(("numba", "cupy", "nvidia", "cuda")) for n in extras["test"])
    assert {"torch", "bench"} <= set(extras)


def test_every_extra_combination_offered_resolves_by_construction(project):
    """No combination the README offers asks for two CUDA flavours of numba-cuda (the one conflict)."""
    extras = project["optional-dependencies"]
    combos = {tuple(c.split(",")) for c in re.findall(r'"\.\[([a-z0-9,]+)\]"', README)}
    combos |= {tuple(c.split(",")) for c in re.findall(r"gpulora\[([a-z0-9,]+)\]", README)}
    assert ("cuda12", "test") in combos and ("cuda13", "test") in combos
    for combo in combos:
        assert set(combo) <= set(extras), combo
        flavours = set()
        for extra in combo:
            for req in extras[extra]:
                name, sub = _name(req)
                if name == "numba-cuda":
                    flavours |= sub
        assert len(flavours) <= 1, (combo, flavours)


def test_license_version_classifiers_urls(project):
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: the expression only
    assert "version" not in project and "version" in project["dynamic"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gpulora.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", gpulora.__version__)
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])


def test_installed_metadata_matches_the_source_version():
    try:
        installed = importlib.metadata.version("gpulora")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gpulora is not installed here (a checkout on sys.path)")
    if installed != gpulora.__version__:
        pytest.skip(f"the installed gpulora {installed} is another copy than this source tree")
    assert installed == gpulora.__version__


def test_sdist_manifest_carries_what_the_tests_need():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for folder in ("tests", "docs", "examples", "asv_bench"):
        assert folder in manifest, folder
    for name in ("LICENSE", "README.md", "BENCHMARKS.md", ".gitignore"):
        assert name in manifest, name


def test_kernels_layout():
    """gpulora.kernels is the top-level kernels/ folder: a symlink in a checkout, a finder in an sdist."""
    link = ROOT / "gpulora" / "kernels"
    if link.is_symlink():
        assert link.resolve() == (ROOT / "kernels").resolve()
    kernels = importlib.import_module("gpulora.kernels")
    assert pathlib.Path(kernels.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert (ROOT / "kernels" / "__init__.py").is_file()


def test_module_names_are_not_shadowed():
    assert callable(gpulora.diagnose)
    diagnosis = importlib.import_module("gpulora.diagnosis")
    assert diagnosis.diagnose is gpulora.diagnose
    io = importlib.import_module("gpulora.io")
    assert callable(io.save_problem) and callable(io.load_problem)


def test_compile_ptx_all_names_the_extra(monkeypatch):
    from gpulora import kernels
    from gpulora.kernels import _api

    monkeypatch.setattr(_api, "_IMPORT_ERROR", ImportError("No module named 'numba'"))
    with pytest.raises(ImportError, match=r"gpulora\[ptx\]"):
        kernels.compile_ptx_all()
    monkeypatch.undo()
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed: pip install 'gpulora[ptx]'")
    if cuda.config.ENABLE_CUDASIM:
        pytest.skip("PTX needs the real numba.cuda, not the simulator")

    def no_nvrtc(*args, **kwargs):
        raise RuntimeError('Failure finding "libnvrtc.so.13 or libnvrtc.so.12": No such file')

    monkeypatch.setattr(cuda, "compile_ptx", no_nvrtc)
    with pytest.raises(ImportError, match=r"NVVM and NVRTC.*gpulora\[ptx\]"):
        kernels.compile_ptx_all()
