"""Input checks: every bad argument gets a ValueError or TypeError that names it and says what was expected.

Nothing here writes into an argument; checks that need the values (finiteness) read them, on CuPy with one
host read of a boolean. Scalars: wherever a Python ``int``, ``bool`` or ``float`` is accepted, so are the
NumPy scalars of that kind and 0-d real arrays (converted to the Python type).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import backend

__all__ = [
    "METHODS",
    "all_finite",
    "check_alpha",
    "check_key_mask",
    "check_beta",
    "check_bool",
    "check_bound",
    "check_degree",
    "check_finite",
    "check_int",
    "check_method",
    "check_real_array",
    "check_tol",
    "check_fits",
    "compute_dtype",
    "result_dtype",
]

METHODS = ("auto", "exact", "poly")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = ("float16", "bfloat16")  # bfloat16: NumPy arrays of ml_dtypes' dtype
# ndarray subclasses whose arithmetic is that of ndarray (np.memmap); every other subclass is refused:
# np.matrix changes ``*`` and keeps 2 dimensions, masked arrays hide values (NaN under a mask included).
_PLAIN_SUBCLASSES = (np.memmap,)


def _check_array_type(name: str, a) -> None:
    if isinstance(a, np.ndarray):
        if type(a) is np.ndarray or isinstance(a, _PLAIN_SUBCLASSES):
            return
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name} must be a plain NumPy array, got a masked array: its masked entries would "
                            f"be read as numbers; pass {name}.filled(value) or drop the masked rows")
        raise TypeError(f"{name} must be a plain NumPy array, got the ndarray subclass {type(a).__name__} "
                        f"(whose arithmetic differs); pass np.asarray({name})")
    if backend.is_cupy(a):
        return
    try:
        backend.namespace(a)  # any other library that follows the array API standard
    except TypeError:
        raise TypeError(f"{name} must be a NumPy or CuPy array (or another array API standard array), "
                        f"got {type(a).__name__}") from None


def _is_half(dtype) -> bool:
    try:
        return np.dtype(dtype).name in _HALF
    except TypeError:  # another array API library's dtype object: its half types are not supported anyway
        return False


def check_real_array(name: str, a, *, ndim=None, min_ndim=None, finite: bool = True, half: bool = False):
    """Check that ``a`` is a NumPy or CuPy array of float32/float64 with the expected rank and finite values.

    ``half=True`` also accepts float16 and bfloat16 (the latter as ml_dtypes' NumPy dtype); such inputs are
    computed in float32 (:func:`compute_dtype`). NumPy subclasses that change the arithmetic
    (``np.matrix``, masked arrays, ...) are refused with a ``TypeError``; ``np.memmap`` is accepted. Returns
    ``a`` itself (never a copy, never modified).
    """
    _check_array_type(name, a)
    dtype = backend.host_dtype(a)
    if dtype not in _DTYPES and not (half and _is_half(dtype)):
        allowed = "float16, bfloat16, float32 or float64" if half else "float32 or float64"
        raise TypeError(f"{name} must have dtype {allowed}, got {a.dtype}")
    if ndim is not None and a.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(a.shape)}")
    if finite:
        check_finite({name: a})
    return a


def check_finite(arrays: dict) -> None:
    """Raise ``ValueError`` naming the first array of ``{name: array}`` that holds NaN or inf.

    One fused reduction over all the arrays (they share one namespace), so one host read on CuPy; the
    offender is looked up only on failure. Cost ``O(total size)``.
    """
    named = [(n, a) for n, a in arrays.items() if a is not None and a.size]
    if all_finite(*(a for _, a in named)):
        return
    xp = backend.namespace(*(a for _, a in named))
    bad = next(n for n, a in named if not bool(xp.all(xp.isfinite(a))))
    raise ValueError(f"{bad} must contain only finite values (found NaN or inf)")


def all_finite(*arrays) -> bool:
    """True when no array holds NaN or inf: one fused reduction, one host read on CuPy. ``None`` is skipped."""
    arrays = [a for a in arrays if a is not None and a.size]
    if not arrays:
        return True
    xp = backend.namespace(*arrays)
    flags = [xp.all(xp.isfinite(a)) for a in arrays]
    return bool(flags[0] if len(flags) == 1 else xp.all(xp.stack(flags)))


def _is_real_0d(value, kinds) -> bool:
    """A 0-d NumPy/CuPy array (not a NumPy scalar) of one of the dtype ``kinds``."""
    return (getattr(value, "ndim", None) == 0 and hasattr(value, "dtype") and not isinstance(value, np.generic)
            and getattr(value.dtype, "kind", "") in kinds)


def check_bool(name: str, value) -> bool:
    """A flag: ``bool``, ``numpy.bool_`` or a 0-d boolean array."""
    if isinstance(value, (bool, np.bool_)) or _is_real_0d(value, "b"):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")


def check_int(name: str, value, *, minimum=None, maximum=None) -> int:
    """An integer (Python, NumPy, or 0-d integer array; not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, numbers.Integral) or _is_real_0d(value, "iu")):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if maximum is None else f" <= {maximum}"
        raise ValueError(f"{name} must be an int{lo}{' and' if lo and hi else ''}{hi}, got {value}")
    return value


def _real_scalar(name, value, *, positive=False):
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, numbers.Real) or _is_real_0d(value, "iuf")):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_alpha(alpha) -> float:
    """LoRA ``alpha``: a finite real number."""
    return _real_scalar("alpha", alpha)


def check_beta(beta) -> float:
    """Inverse temperature ``beta``: a finite real number > 0."""
    return _real_scalar("beta", beta, positive=True)


def check_bound(bound) -> float:
    """A score bound ``M``: a finite real number >= 0."""
    bound = _real_scalar("bound", bound)
    if bound < 0:
        raise ValueError(f"bound must be >= 0, got {bound}")
    return bound


def check_degree(degree) -> int:
    """Polynomial degree: an int >= 1 (at most ``MAX_DEGREE``)."""
    from .poly.coefficients import MAX_DEGREE

    if isinstance(degree, (bool, np.bool_)) or not (isinstance(degree, numbers.Integral) or _is_real_0d(degree, "iu")):
        raise TypeError(f"degree must be an int >= 1, got {type(degree).__name__}")
    if not 1 <= int(degree) <= MAX_DEGREE:
        raise ValueError(f"degree must be an int in [1, {MAX_DEGREE}], got {degree}")
    return int(degree)


def check_tol(tol) -> float:
    """Target relative error: a real number with ``0 < tol < 1``."""
    tol = _real_scalar("tol", tol)
    if not 0 < tol < 1:
        raise ValueError(f"tol must satisfy 0 < tol < 1, got {tol}")
    return tol


def check_method(method: str) -> str:
    """``method``: one of ``"auto"``, ``"exact"``, ``"poly"``."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_key_mask(key_mask, lead: tuple, L: int, name: str = "key_mask"):
    """A boolean array of shape ``lead + (L,)`` (True = attend), from the namespace of the other arrays.

    Returns it unchanged; raises ``TypeError`` for a non-boolean dtype, ``ValueError`` for a wrong shape.
    """
    _check_array_type(name, key_mask)
    if backend.host_dtype(key_mask) != np.bool_:
        raise TypeError(f"{name} must have dtype bool (True = attend), got {key_mask.dtype}")
    want = tuple(lead) + (L,)
    if tuple(key_mask.shape) != want:
        raise ValueError(f"{name} must have shape {want} (the batch shape, then L), got {tuple(key_mask.shape)}")
    return key_mask


def result_dtype(*arrays) -> np.dtype:
    """The dtype results come back in: NumPy's promotion of the inputs' dtypes (``None`` entries skipped).

    float32 with float64 gives float64 (no input is silently downcast); float16 with bfloat16 gives float32.
    """
    return np.result_type(*(backend.host_dtype(a) for a in arrays if a is not None))


def compute_dtype(*arrays) -> np.dtype:
    """The dtype the arithmetic runs in: :func:`result_dtype`, with float16/bfloat16 raised to float32."""
    dtype = result_dtype(*arrays)
    return np.dtype(np.float32) if _is_half(dtype) else dtype


def check_fits(dtype, *arrays) -> None:
    """After results computed in float32 were cast back to a half-precision ``dtype``: raise ``ValueError``
    if any overflowed it (inf), rather than return inf. A no-op (no host read) for float32/float64."""
    if _is_half(dtype) and not all_finite(*arrays):
        raise ValueError(f"a result overflows {np.dtype(dtype).name} (largest {float(np.finfo(dtype).max):.3g}) "
                         f"although it was computed in float32: pass float32 inputs to get it")
