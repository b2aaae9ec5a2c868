import importlib

import gpulora


def test_every_public_name_imports():
    for name in gpulora.__all__:
        assert getattr(gpulora, name) is not None, name


def test_kernels_subpackage_is_gpulora_kernels():
    kernels = importlib.import_module("gpulora.kernels")
    assert kernels.__name__ == "gpulora.kernels"
    assert callable(kernels.compile_ptx_all)
