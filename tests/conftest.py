"""Shared fixtures: the ``xp`` backend fixture (NumPy always, ``array_api_strict`` where installed, CuPy where a
GPU is present), NaN poisoning."""

import numpy as np
import pytest

from gpulora import backend


def _cupy_or_skip():
    if not backend.has_cuda():
        pytest.skip("CuPy backend needs a CUDA device (none found: no driver, no GPU, or CuPy missing)")
    import cupy

    return cupy


@pytest.fixture(params=["numpy", "array_api_strict", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: ``numpy``; ``array_api_strict``, the array API standard's minimum (it
    rejects the NumPy-only idioms that would break on CuPy; skipped when not installed); or ``cupy``
    (skipped without a GPU)."""
    if request.param == "numpy":
        return np
    if request.param == "array_api_strict":
        return pytest.importorskip("array_api_strict", reason="install the test extra: array-api-strict")
    return _cupy_or_skip()


@pytest.fixture(autouse=True)
def poison_empty():
    """Every ``backend.empty`` allocation is NaN-filled in tests, so an unwritten element fails loudly."""
    with backend.poisoned():
        yield
