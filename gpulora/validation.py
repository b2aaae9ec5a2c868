"""Input checks: every bad argument gets a ValueError or TypeError that names it and says what was expected.

Nothing here writes into an argument; checks that need the values (finiteness) read them, on CuPy with one
host read of a boolean.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import backend

__all__ = [
    "METHODS",
    "check_alpha",
    "check_bool",
    "check_key_mask",
    "check_beta",
    "check_degree",
    "check_method",
    "check_real_array",
    "check_tol",
    "compute_dtype",
    "result_dtype",
]

METHODS = ("auto", "exact", "poly")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = ("float16", "bfloat16")  # bfloat16: NumPy arrays of ml_dtypes' dtype


def _is_half(dtype) -> bool:
    return np.dtype(dtype).name in _HALF


def check_real_array(name: str, a, *, ndim=None, min_ndim=None, finite: bool = True, half: bool = False):
    """Check that ``a`` is a NumPy or CuPy array of float32/float64 with the expected rank and finite values.

    ``half=True`` also accepts float16 and bfloat16 (the latter as ml_dtypes' NumPy dtype); such inputs are
    computed in float32 (:func:`compute_dtype`). Returns ``a`` itself (never a copy, never modified).
    """
    if not (isinstance(a, np.ndarray) or backend.is_cupy(a)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.dtype not in _DTYPES and not (half and _is_half(a.dtype)):
        allowed = "float16, bfloat16, float32 or float64" if half else "float32 or float64"
        raise TypeError(f"{name} must have dtype {allowed}, got {a.dtype}")
    if ndim is not None and a.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(a.shape)}")
    if finite and a.size:
        xp = backend.namespace(a)
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    return a


def _real_scalar(name, value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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


def check_degree(degree) -> int:
    """Polynomial degree: an int >= 1 (at most ``MAX_DEGREE``)."""
    from .poly.coefficients import MAX_DEGREE

    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral):
        raise TypeError(f"degree must be an int >= 1, got {type(degree).__name__}")
    if not 1 <= degree <= MAX_DEGREE:
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


def check_bool(name: str, value) -> bool:
    """A flag that must be a Python bool (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_key_mask(key_mask, lead: tuple, L: int, name: str = "key_mask"):
    """A boolean array of shape ``lead + (L,)`` (True = attend), from the namespace of the other arrays.

    Returns it unchanged; raises ``TypeError`` for a non-boolean dtype, ``ValueError`` for a wrong shape.
    """
    if not (isinstance(key_mask, np.ndarray) or backend.is_cupy(key_mask)):
        raise TypeError(f"{name} must be a boolean NumPy or CuPy array, got {type(key_mask).__name__}")
    if key_mask.dtype != np.bool_:
        raise TypeError(f"{name} must have dtype bool (True = attend), got {key_mask.dtype}")
    want = tuple(lead) + (L,)
    if tuple(key_mask.shape) != want:
        raise ValueError(f"{name} must have shape {want} (the batch shape, then L), got {tuple(key_mask.shape)}")
    return key_mask


def result_dtype(*arrays) -> np.dtype:
    """The dtype results come back in: NumPy's promotion of the inputs' dtypes (``None`` entries skipped).

    float32 with float64 gives float64 (no input is silently downcast); float16 with bfloat16 gives float32.
    """
    return np.result_type(*(np.dtype(a.dtype) for a in arrays if a is not None))


def compute_dtype(*arrays) -> np.dtype:
    """The dtype the arithmetic runs in: :func:`result_dtype`, with float16/bfloat16 raised to float32."""
    dtype = result_dtype(*arrays)
    return np.dtype(np.float32) if _is_half(dtype) else dtype
