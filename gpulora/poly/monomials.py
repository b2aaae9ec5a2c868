"""Symmetric monomials of degree <= g in d variables: the index table behind the feature maps.

By the multinomial theorem, ``(q . k)^m = sum_{|a| = m} (m! / a!) q^a k^a`` over multi-indices ``a`` of
``d`` non-negative integers summing to ``m``. A polynomial ``p(t) = sum_{m <= g} c_m t^m`` therefore
factors as ``p(q . k) = phi(q) . psi(k)`` with one column per multi-index ``|a| <= g``:
``k = C(d + g, g)`` columns (the symmetric part of the tensor powers; the full Kronecker powers would
have ``sum_m d^m`` columns, about ``g!`` times more).

The table orders monomials by degree and, within a degree, by their last (largest) coordinate, ties in
the order of their parents (graded colex order). Column 0 is the constant monomial. Every other column
``j`` is ``z^a(j) = z^a(parent[j]) * z[coord[j]]`` where ``coord[j]`` is the largest coordinate of ``a(j)``,
so each monomial is produced exactly once and each feature costs one multiply. The monomials of degree
``m`` and last coordinate ``c`` are the degree ``m - 1`` monomials of last coordinate ``<= c`` (a prefix
of that degree's columns) times ``z[c]``: a degree is ``d`` broadcast products of a prefix by one
coordinate, which is how the array reference builds it (:func:`prefix_runs`). ``degree_start[m]`` is the
first column of degree ``m`` (``degree_start[g + 1] == k``): columns of one degree depend only on the
previous degree, which is what the GPU kernel parallelises over. The table of degree ``g`` is a prefix of
that of degree ``g + 1``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

__all__ = ["MonomialTable", "feature_dim", "monomial_table", "prefix_runs", "raise_index"]


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
    last = [-1]  # largest coordinate used (none for the constant, which any coordinate may follow)
    run = [0]  # how many times the last coordinate repeats at the end of the multi-index
    degree_start = [0, 1]
    prev = range(0, 1)
    for m in range(1, g + 1):
        start = len(parent)
        for c in range(d):
            for p in prev:  # sorted by last coordinate: those with last <= c are a prefix
                if last[p] > c:
                    break
                r = run[p] + 1 if coord[p] == c else 1
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


@functools.lru_cache(maxsize=64)
def prefix_runs(d: int, g: int) -> tuple:
    """The columns of degree ``2..g`` of ``monomial_table(d, g)`` as runs ``(c, src, stop, dst)``: columns
    ``dst:dst + stop - src`` are columns ``src:stop`` (a prefix of the previous degree) times ``z[c]``.
    ``d`` runs per degree (fewer where a prefix is empty), ``d (g - 1)`` in all; degree 1 is the coordinates
    themselves, columns ``1:1 + d``. Cached."""
    table = monomial_table(d, g)
    runs = []
    for m in range(2, g + 1):
        j, hi = int(table.degree_start[m]), int(table.degree_start[m + 1])
        src = int(table.degree_start[m - 1])
        while j < hi:
            c = int(table.coord[j])
            stop = j
            while stop < hi and table.coord[stop] == c:
                stop += 1
            if not np.array_equal(table.parent[j:stop], np.arange(src, src + stop - j)):
                raise AssertionError("monomial table: a degree's children of one coordinate must extend a prefix")
            runs.append((c, src, src + stop - j, j))
            j = stop
    return tuple(runs)


@functools.lru_cache(maxsize=64)
def raise_index(d: int, g: int) -> np.ndarray:
    """``up[m, c]``: the column of ``z^(a(m) + e_c)`` in ``monomial_table(d, g + 1)``, for every column ``m``
    of ``monomial_table(d, g)`` and coordinate ``c``; int64, shape ``(C(d + g, g), d)``, read-only, cached.

    So ``z^a(m) * z[c] = z^a(up[m, c])`` exactly: the plain monomials of degree ``<= g + 1`` hold every
    product of a monomial of degree ``<= g`` with a coordinate (the lifted states of
    :mod:`gpulora.poly.chain`). Built degree by degree: for ``c >= last(m)``, ``m + e_c`` is the child of
    ``m`` by ``c`` (column ``first[deg + 1, c]`` plus the offset of ``m`` in its degree); otherwise it is the
    child by ``last(m)`` of ``parent(m) + e_c``. Cost ``O(k d)``.
    """
    small, big = monomial_table(d, g), monomial_table(d, g + 1)
    starts = big.degree_start
    # first[t, c]: the first column of degree t with last coordinate c (t >= 1)
    first = np.stack([starts[t] + np.searchsorted(big.coord[starts[t]:starts[t + 1]], np.arange(d))
                      for t in range(1, g + 2)]).astype(np.int64)
    deg = big.degree.astype(np.int64)
    last = np.maximum(big.coord.astype(np.int64), 0)  # the constant takes any coordinate: "last" 0

    def child(p, c):  # column of a(p) + e_c, for c >= last(p)
        return first[deg[p], c] + p - starts[deg[p]]

    up = np.empty((small.k, d), dtype=np.int64)
    cs = np.arange(d, dtype=np.int64)
    for m in range(g + 1):
        lo, hi = int(small.degree_start[m]), int(small.degree_start[m + 1])
        rows = np.arange(lo, hi, dtype=np.int64)[:, None]
        own = child(rows, np.maximum(cs, last[rows]))  # valid where c >= last(m)
        if m == 0:
            up[lo:hi] = own
            continue
        via = child(up[small.parent[lo:hi].astype(np.int64)], last[rows])  # parent(m) + e_c, then + e_last(m)
        up[lo:hi] = np.where(cs >= last[rows], own, via)
    up.setflags(write=False)
    return up
