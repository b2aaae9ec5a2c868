"""Shared fixtures: the ``xp`` backend fixture (NumPy always, CuPy where a GPU is present), NaN poisoning."""

import numpy as np
import pytest

from gpulora import backend


def _cupy_or_skip():
    if not backend.has_cuda():
        pytest.skip("CuPy backend needs a CUDA device (none found: no driver, no GPU, or CuPy missing)")
    import cupy

    return cupy


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: ``numpy``, or ``cupy`` (skipped without a GPU)."""
    return np if request.param == "numpy" else _cupy_or_skip()


@pytest.fixture(autouse=True)
def poison_empty():
    """Every ``backend.empty`` allocation is NaN-filled in tests, so an unwritten element fails loudly."""
    with backend.poisoned():
        yield
