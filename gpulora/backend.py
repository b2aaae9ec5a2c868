"""Everything about array backends that the array API does not cover, in one place.

gpulora's array code is written once against the array API (``xp = namespace(...)`` at the top of a
function, then only ``xp.*`` and operators), and runs on NumPy and CuPy alike. This module holds the few
backend-specific leftovers: the namespace probe (without importing CuPy), host reads, synchronisation,
and :func:`empty`, the one allocator of uninitialised memory, which tests switch to fill with NaN so an
element a kernel forgot to write fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
import os

import array_api_compat
import numpy as np

__all__ = [
    "empty",
    "multiply_into",
    "has_cuda",
    "is_cupy",
    "namespace",
    "poisoned",
    "synchronize",
    "to_float",
    "to_numpy",
]

_POISON = os.environ.get("GPULORA_POISON", "") not in ("", "0")


def is_cupy(x) -> bool:
    """True for a CuPy array; never imports CuPy."""
    return array_api_compat.is_cupy_array(x)


def namespace(*arrays):
    """The array-API namespace shared by ``arrays`` (NumPy or CuPy).

    Raises
    ------
    TypeError
        If the arrays come from different libraries, or from one that gpulora does not support.
    """
    kinds = {"cupy" if is_cupy(a) else "numpy" if isinstance(a, np.ndarray) else type(a).__module__
             for a in arrays}
    unknown = kinds - {"numpy", "cupy"}
    if unknown:
        raise TypeError(f"arrays must be NumPy or CuPy arrays, got arrays from {sorted(unknown)}")
    if len(kinds) > 1:
        raise TypeError("all arrays of one call must come from the same library, got NumPy and CuPy mixed")
    return array_api_compat.array_namespace(*arrays)


def multiply_into(out, a, b) -> None:
    """``out[...] = a * b`` in one pass, without a temporary: the ufunc's ``out=`` on NumPy and CuPy (not
    in the array API), the assignment elsewhere. ``out`` may alias ``a`` or ``b`` element for element."""
    if isinstance(out, np.ndarray):
        np.multiply(a, b, out=out)
    elif is_cupy(out):
        import cupy

        cupy.multiply(a, b, out=out)
    else:
        out[...] = a * b


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (CuPy, a device-to-host transfer) or view (NumPy) of ``x``."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def to_float(x) -> float:
    """A 0-d array as a Python float: on CuPy, one host read (and an implicit synchronisation)."""
    return float(to_numpy(x))


def synchronize() -> None:
    """Wait for the device work queued on CuPy's current stream; a no-op without CuPy or a CUDA device."""
    if has_cuda():
        import cupy

        cupy.cuda.get_current_stream().synchronize()


@functools.lru_cache(maxsize=1)
def has_cuda() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, or a driver too old for the runtime
        return False


def empty(shape, dtype, xp):
    """Uninitialised array: every allocation whose elements gpulora writes itself goes through here.

    Under :func:`poisoned` (or ``GPULORA_POISON=1``) the array is filled with NaN instead, so that an
    element the code forgets to write propagates NaN into the result and the tests catch it.
    """
    if _POISON:
        return xp.full(shape, float("nan"), dtype=dtype)
    return xp.empty(shape, dtype=dtype)


@contextlib.contextmanager
def poisoned(on: bool = True):
    """Context manager: make :func:`empty` return NaN-filled arrays while it is active."""
    global _POISON
    old, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = old
