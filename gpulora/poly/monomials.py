"""Symmetric monomials of degree <= g in d variables: the index table behind the feature maps.

By the multinomial theorem, ``(q . k)^m = sum_{|a| = m} (m! / a!) q^a k^a`` over multi-indices ``a`` of
``d`` non-negative integers summing to ``m``. A polynomial ``p(t) = sum_{m <= g} c_m t^m`` therefore
factors as ``p(q . k) = phi(q) . psi(k)`` with one column per multi-index ``|a| <= g``:
``k = C(d + g, g)`` columns (the symmetric part of the tensor powers; the full Kronecker powers would
have ``sum_m d^m`` columns, about ``g!`` times more).

The table orders monomials by degree; within a degree, in the order their parents appear. Column 0 is the
constant monomial. Every other column ``j`` is ``z^a(j) = z^a(parent[j]) * z[coord[j]]`` where
``coord[j] >= `` the last coordinate used by the parent, so each monomial is produced exactly once and each
feature costs one multiply. ``degree_start[m]`` is the first column of degree ``m`` (``degree_start[g + 1]
== k``): columns of one degree depend only on the previous degree, which is what the GPU kernel
parallelises over.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

__all__ = ["MonomialTable", "feature_dim", "monomial_table"]


class MonomialTable(NamedTuple):
    """Index table of the symmetric monomials of degree <= ``g`` in ``d`` variables (host NumPy arrays).

    Attributes
    ----------
    d, g : int
        Number of variables and maximal degree.
    parent : int32 array of shape (k,)
        Column of the parent monomial (-1 for the constant column 0).
    coord : int32 array of shape (k,)
        Coordinate multiplied into the parent (-1 for column 0).
    degree : int32 array of shape (k,)
        Total degree ``|a|`` of each column.
    multinomial : float64 array of shape (k,)
        ``|a|! / a!``, the multiplicity of the monomial in ``(q . k)^|a|``.
    degree_start : int64 array of shape (g + 2,)
        ``degree_start[m]`` is the first column of degree ``m``; ``degree_start[g + 1] == k``.
    """

    d: int
    g: int
    parent: np.ndarray
    coord: np.ndarray
    degree: np.ndarray
    multinomial: np.ndarray
    degree_start: np.ndarray

    @property
    def k(self) -> int:
        """Number of columns, ``C(d + g, g)``."""
        return int(self.parent.shape[0])


def feature_dim(d: int, g: int) -> int:
    """Number of symmetric monomials of degree <= ``g`` in ``d`` variables: ``C(d + g, g)``."""
    return math.comb(d + g, g)


@functools.lru_cache(maxsize=64)
def monomial_table(d: int, g: int) -> MonomialTable:
    """The monomial index table for ``d`` variables and degree ``g`` (cached; the arrays are read-only).

    Cost ``O(k)`` with ``k = C(d + g, g)``; refuses ``k > gpulora.poly.budget.MAX_FEATURES`` at once
    (:class:`~gpulora.poly.budget.FeatureBudgetError`).
    """
    if d < 1 or g < 0:
        raise ValueError(f"monomial_table needs d >= 1 and g >= 0, got d={d}, g={g}")
    from .budget import check_budget

    check_budget(d, g, what="the monomial table")  # before building anything: k may be astronomical
    parent = [-1]
    coord = [-1]
    degree = [0]
    multinomial = [1.0]
    last = [0]  # last coordinate used (the constant may be followed by any coordinate)
    run = [0]  # how many times the last coordinate repeats at the end of the multi-index
    degree_start = [0, 1]
    prev = range(0, 1)
    for m in range(1, g + 1):
        start = len(parent)
        for p in prev:
            for c in range(last[p], d):
                same = coord[p] == c
                r = run[p] + 1 if same else 1
                parent.append(p)
                coord.append(c)
                degree.append(m)
                # m!/a! from the parent's (m-1)!/a'!: times m, divided by the new exponent of c.
                multinomial.append(multinomial[p] * m / r)
                last.append(c)
                run.append(r)
        prev = range(start, len(parent))
        degree_start.append(len(parent))
    arrays = (
        np.asarray(parent, dtype=np.int32),
        np.asarray(coord, dtype=np.int32),
        np.asarray(degree, dtype=np.int32),
        np.asarray(multinomial, dtype=np.float64),
        np.asarray(degree_start, dtype=np.int64),
    )
    for a in arrays:
        a.setflags(write=False)
    table = MonomialTable(d, g, *arrays)
    assert table.k == feature_dim(d, g)
    return table
