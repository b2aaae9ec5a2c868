"""Everything about array backends that the array API does not cover, in one place.

gpulora's array code is written once against the array API standard (``xp = namespace(...)`` at the top
of a function, then only ``xp.*`` and operators), and runs on NumPy, CuPy and any other library that
follows the standard (``array_api_strict``, the standard's minimum, in the tests; PyTorch through
``array_api_compat``). This module holds the few backend-specific leftovers: the namespace probe (without
importing CuPy), dtype conversion between NumPy (host-side planning) and the namespace, host reads,
synchronisation, and :func:`empty`, the one allocator of uninitialised memory, which tests switch to fill
with NaN so an element a kernel forgot to write fails loudly.

Every host read of array data in the library goes through :func:`to_numpy` or :func:`to_float` (or
Python's ``bool()`` of a 0-d array in :mod:`gpulora.validation`); on CuPy each is one synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import os

import array_api_compat
import numpy as np

__all__ = [
    "empty",
    "exp_inplace",
    "host_dtype",
    "multiply_into",
    "namespace_dtype",
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


def is_array(a) -> bool:
    """An array of an array-API-standard library (NumPy, CuPy, ...), not a Python scalar."""
    return array_api_compat.is_array_api_obj(a) and not (isinstance(a, (bool, int, float, complex))
                                                          and not isinstance(a, np.generic))


def namespace(*arrays):
    """The array-API namespace shared by ``arrays`` (NumPy, CuPy, or any array-API-standard library).

    Raises
    ------
    TypeError
        If an argument is not an array, or the arrays come from different libraries.
    """
    for a in arrays:
        if not is_array(a):
            raise TypeError(f"expected arrays that follow the array API standard (NumPy, CuPy, ...), got "
                            f"{type(a).__name__}")
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError:
        kinds = sorted({type(a).__module__.split(".")[0] for a in arrays})
        raise TypeError(f"all arrays of one call must come from the same library, got {' and '.join(kinds)} "
                        "mixed") from None


_DTYPE_NAMES = ("float32", "float64", "float16", "complex64", "complex128", "bool",
                "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def host_dtype(x) -> np.dtype:
    """The NumPy dtype that corresponds to the dtype of array ``x`` (the host side plans in NumPy dtypes).

    Raises ``TypeError`` for a dtype outside the standard's numeric and boolean dtypes.
    """
    if isinstance(x, np.ndarray) or is_cupy(x):
        return np.dtype(x.dtype)
    xp = namespace(x)
    for name in _DTYPE_NAMES:
        if x.dtype == getattr(xp, name, None):
            return np.dtype(name)
    raise TypeError(f"dtype {x.dtype} has no NumPy equivalent")


def namespace_dtype(xp, dtype):
    """``xp``'s dtype object for the NumPy dtype (or dtype name) ``dtype``: the NumPy dtype itself for NumPy
    and CuPy (which share NumPy's dtypes, ml_dtypes' bfloat16 included), ``getattr(xp, name)`` otherwise."""
    dtype = np.dtype(dtype)
    if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp):
        return dtype
    return getattr(xp, dtype.name)


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


def row_dots(xp, a, b):
    """``sum(a * b, axis=-1)`` without the product array where the namespace has ``vecdot`` (the array API
    standard's; NumPy 2: the time of one elementwise pass), the plain form elsewhere. Cost ``O(size)``."""
    vecdot = getattr(xp, "vecdot", None)
    return vecdot(a, b, axis=-1) if vecdot is not None else xp.sum(a * b, axis=-1)


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (CuPy: a device-to-host transfer) or view (NumPy, and CPU arrays through DLPack) of ``x``."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, AttributeError):
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


def exp_inplace(xp, a):
    """``exp(a)`` written into ``a`` where the library allows it (NumPy, CuPy: ``out=``), else a new array.

    ``a`` must be a temporary the caller owns: its values are consumed. Saves one allocation and the page
    faults of a fresh buffer on every large elementwise pass.
    """
    if isinstance(a, np.ndarray):
        return np.exp(a, out=a)
    if is_cupy(a):
        import cupy

        return cupy.exp(a, out=a)
    return xp.exp(a)


@contextlib.contextmanager
def poisoned(on: bool = True):
    """Context manager: make :func:`empty` return NaN-filled arrays while it is active."""
    global _POISON
    old, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = old
