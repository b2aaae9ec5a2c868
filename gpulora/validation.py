"""Input checks: every bad argument gets a ValueError or TypeError that names it and says what was expected.

Nothing here writes into an argument; checks that need the values (finiteness) read them, on CuPy with one
host read of a boolean.
"""

from __future__ import annotations

import math
import numbers

from . import backend

__all__ = [
    "METHODS",
    "check_alpha",
    "check_beta",
    "check_degree",
    "check_method",
    "check_real_array",
    "check_tol",
]

METHODS = ("auto", "exact", "poly")


def check_real_array(name: str, a, *, ndim=None, min_ndim=None, finite: bool = True):
    """Check that ``a`` is an array (NumPy, CuPy, or any array-API-standard library) of float32/float64 with
    the expected rank and finite values.

    Returns ``a`` itself (never a copy, never modified).
    """
    try:
        xp = backend.namespace(a)
    except TypeError:
        raise TypeError(f"{name} must be a NumPy or CuPy array (or another array API standard array), "
                        f"got {type(a).__name__}") from None
    if a.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if ndim is not None and a.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(a.shape)}")
    if finite and math.prod(a.shape):
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
