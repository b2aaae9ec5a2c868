"""Tensor-power (symmetric monomial) feature maps: ``phi(q) . psi(k) = p(q . k)``.

For ``p(t) = sum_m c_m t^m`` and the monomial table of :mod:`gpulora.poly.monomials`, column ``a`` carries
the weight ``w_a = c_|a| * |a|! / a!``, split symmetrically between the two sides:

    psi(k)_a = sqrt(|w_a|) k^a            (key side)
    phi(q)_a = sign(w_a) sqrt(|w_a|) q^a  (query side)

so ``phi(q) . psi(k) = sum_m c_m (q . k)^m = p(q . k)``. For taylor and shifted taylor every ``w_a > 0``
and both sides are the same map. Fold ``beta`` into ``q`` before calling. Cost ``O(L k)`` time and memory,
``k = C(d + g, g)``; memory-bound.

:func:`monomial_features` is the array-API reference of ``gpulora.kernels.feature_map`` (same table, same
scales, same column order): on CuPy arrays it dispatches to the Numba kernel when that is available.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .coefficients import FAMILIES, coefficients
from .monomials import MonomialTable, monomial_table, prefix_runs

__all__ = ["RUNS_MIN_ROWS", "feature_scales", "monomial_features", "monomial_features_reference", "poly_features"]


def feature_scales(coef, d: int, side: str) -> np.ndarray:
    """Per-column scale (float64, shape ``(k,)``) of the ``side`` (``"query"`` or ``"key"``) feature map
    of the polynomial with monomial coefficients ``coef`` (length ``g + 1``) in ``d`` variables."""
    table = monomial_table(d, len(coef) - 1)
    w = np.asarray(coef, dtype=np.float64)[table.degree] * table.multinomial
    scale = np.sqrt(np.abs(w))
    return np.sign(w) * scale if side == "query" else scale


RUNS_MIN_ROWS = 1024  # measured crossover (d_head 8..16, g 2..4): prefix runs win from here on


def monomial_features_reference(z, table: MonomialTable, scale, xp=None):
    """Scaled monomials of the rows of ``z`` (array-API code, NumPy or CuPy).

    Parameters
    ----------
    z : array of shape (..., L, d)
    table : MonomialTable for ``(d, g)``
    scale : array of shape (k,), same namespace and dtype as ``z``, or None
        None: the plain monomials ``z^a`` (the chain applies the scales to its ``k x W`` states instead).
    xp : namespace of ``z``, optional (probed when not given)

    Returns
    -------
    array of shape (..., L, k)
        ``out[..., a] = scale[a] * z^a``. Cost ``O(L k)`` time and memory. Built feature-major,
        ``(..., k, L)``, so that every operation streams contiguous rows of length ``L``; the result is the
        transposed view (matmuls take either layout without a copy). From :data:`RUNS_MIN_ROWS` rows (over
        all leading indices) on, coordinate by coordinate: the monomials of one degree and last coordinate
        ``c`` are a prefix of the previous degree's rows times the row ``z[c]``
        (:func:`gpulora.poly.monomials.prefix_runs`; ``d (g - 1)`` multiplies, each written in place by
        :func:`gpulora.backend.multiply_into`: no gather, no temporary). Below, degree by degree (``g``
        gathers of the parents and coordinates): fewer operations, which short blocks need.
    """
    xp = backend.namespace(z) if xp is None else xp
    lead, L, d = z.shape[:-2], z.shape[-2], z.shape[-1]
    out = backend.empty(lead + (table.k, L), z.dtype, xp)  # [..., k, L]
    out[..., 0, :] = 1
    if table.g >= 1:
        out[..., 1:1 + d, :] = z.mT  # degree 1: the coordinates, C-contiguous rows of z^T
    zt = out[..., 1:1 + d, :]
    if math.prod(lead) * L >= RUNS_MIN_ROWS:
        for c, src, stop, dst in prefix_runs(table.d, table.g):
            backend.multiply_into(out[..., dst:dst + stop - src, :], out[..., src:stop, :], zt[..., c:c + 1, :])
    else:
        starts = table.degree_start
        for m in range(2, table.g + 1):
            lo, hi = int(starts[m]), int(starts[m + 1])
            parent = xp.asarray(table.parent[lo:hi].astype(np.int64))
            coord = xp.asarray(table.coord[lo:hi].astype(np.int64))
            # rows of degree m from those of degree m - 1: one multiply each
            out[..., lo:hi, :] = xp.take(out, parent, axis=-2) * xp.take(zt, coord, axis=-2)
    if scale is not None:
        out *= scale[:, None]  # in place: a second array of L x k would double the peak memory
    return out.mT


def monomial_features(z, table: MonomialTable, scale, xp=None):
    """:func:`monomial_features_reference`, or the Numba CUDA kernel for CuPy arrays where available."""
    if backend.is_cupy(z):
        from .. import kernels

        if kernels.available():
            if scale is None:
                scale = backend.namespace(z).ones((table.k,), dtype=z.dtype)
            return kernels.feature_map(z, table, scale)
    return monomial_features_reference(z, table, scale, xp)


def poly_features(z, degree, *, family="taylor", bound=None, side="key"):
    """The degree-``degree`` tensor-power feature map of the rows of ``z``.

    ``poly_features(beta * q, g, side="query") @ poly_features(k, g).T`` approximates
    ``exp(beta * q @ k.T)`` with the polynomial ``p`` of ``family`` fitted on ``[-bound, bound]``; the
    identity ``phi(q) . psi(k) = p(q . k)`` holds to rounding.

    Parameters
    ----------
    z : array of shape (..., L, d), float32 or float64, NumPy or CuPy
        Rows of ``beta * Q`` (``side="query"``) or of ``K`` (``side="key"``).
    degree : int >= 1
        Polynomial degree ``g``.
    family : {"taylor", "shifted_taylor", "chebyshev"}
        Polynomial family (see :mod:`gpulora.poly.coefficients`); taylor, ``c_m = 1/m!``, by default.
    bound : float, optional
        ``M``, the half-width of the score interval (used by shifted_taylor and chebyshev). Default: the
        square of the largest row norm of ``z``, right when queries and keys have similar norms.
    side : {"key", "query"}
        The query side carries the signs of negative weights (chebyshev only).

    Returns
    -------
    array of shape (..., L, C(d + degree, degree)), same namespace and dtype as ``z``.
        Cost ``O(L k)`` time and memory.

    Examples
    --------
    >>> import numpy as np, gpulora
    >>> rng = np.random.default_rng(0)
    >>> q, k = 0.3 * rng.standard_normal((5, 4)), 0.3 * rng.standard_normal((7, 4))
    >>> phi = gpulora.poly_features(q, 8, side="query")
    >>> psi = gpulora.poly_features(k, 8)
    >>> bool(np.allclose(phi @ psi.T, np.exp(q @ k.T), rtol=1e-6))
    True
    """
    from ..validation import check_bound, check_degree, check_real_array
    from .budget import check_budget

    z = check_real_array("z", z, min_ndim=2)
    degree = check_degree(degree)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if side not in ("query", "key"):
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    if z.shape[-1] < 1:
        raise ValueError(f"z must have at least one coordinate (d >= 1), got shape {tuple(z.shape)}")
    rows = math.prod(z.shape[:-1])
    check_budget(z.shape[-1], degree, nbytes=rows * math.comb(z.shape[-1] + degree, degree) * backend.host_dtype(z).itemsize,
                 what=f"poly_features of z {tuple(z.shape)}")
    xp = backend.namespace(z)
    if bound is None:
        bound = backend.to_float(xp.max(xp.sum(z * z, axis=-1))) if z.shape[-2] else 0.0
        if not math.isfinite(bound):
            raise ValueError("z: the squared row norms overflow its dtype; pass bound= or scale z down")
    else:
        bound = check_bound(bound)
    coef = coefficients(family, degree, bound)
    table = monomial_table(z.shape[-1], int(degree))
    scale = xp.asarray(feature_scales(coef, z.shape[-1], side), dtype=z.dtype)
    return monomial_features(z, table, scale)
