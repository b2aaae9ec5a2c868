import importlib

import gpulora


def test_every_public_name_imports():
    for name in gpulora.__all__:
        assert getattr(gpulora, name) is not None, name


def test_kernels_subpackage_is_gpulora_kernels():
    kernels = importlib.import_module("gpulora.kernels")
    assert kernels.__name__ == "gpulora.kernels"
    assert callable(kernels.compile_ptx_all)


def test_checkout_root_on_sys_path_does_not_shadow_a_top_level_kernels():
    """From the repository root (``python -m`` puts it on sys.path) ``import kernels`` must not give gpulora's
    kernels: it hands over to the PyPI ``kernels`` distribution when installed (transformers imports it), and
    is empty otherwise; ``gpulora.kernels`` still imports from the checkout."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import kernels, gpulora.kernels as gk; "
            "assert not hasattr(kernels, 'compile_ptx_all'), kernels.__file__; "
            "assert callable(gk.compile_ptx_all) and gk.__name__ == 'gpulora.kernels'")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
