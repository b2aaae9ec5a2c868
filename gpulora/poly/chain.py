r"""The chained low-rank LoRA gradient of the polynomial method, streamed over blocks of L.

With ``phi = phi(beta q)``, ``psi = psi(k)`` the feature maps of :mod:`gpulora.poly.features`
(``phi_i . psi_j = p(s_ij) ~ exp(s_ij)``), ``D = Phi (Psi^T 1)`` (plus 1 for Softmax_1), ``U = diag(1/D) Phi``
and ``F~ = U Psi^T`` (never formed), per leading index (docs/math.md section 4):

    O~ = U (Psi^T V)                                        O(L k d_v)
    G  = O~ - Y (or the upstream gradient dO),  r_i = g_i . o~_i,  loss = 0.5 ||G||^2 (targets only)
    dV = Psi (U^T G)                                        O(L k d_v)
    dQ = beta [ (U (x) G) . T_K  -  r * (U (Psi^T K)) ],    T_K = Psi^T (V (x) K)   (k, d_v, d_head)
    dK = beta [ (Psi (x) V) . T_Q  -  Psi (U^T (r * Q)) ],  T_Q = U^T (G (x) Q)     (k, d_v, d_head)

This is the paper's chain with every product taken in an order that never forms an ``L x L`` or
``L x k d_v`` array; it equals the exact-gradient formula of docs/math.md section 2 evaluated with ``F~``
for ``F`` to rounding, whatever the degree. With ``G = dO`` given, it is the vector-Jacobian product of the
attention output for any upstream gradient (``r_i = g_i . o~_i`` as well).

**Three passes over blocks of rows.** Everything above is a sum over keys or a sum over queries, so the
chain runs as three streamed passes, each building the features of one block of rows, doing one GEMM
against stacked states, and keeping nothing of size ``L x k``. The states are Kronecker grids, so that a
block's right-hand side is one row-wise Kronecker product and its readout one batched ``(1, p) @ (p, q)``:

1. :func:`key_pass` (key blocks): :class:`KeyState`, ``Psi^T ([1 | V] (x) [1 | K])``, the grid
   ``[[z, S_K], [S_V, T_K]]`` of the sums over keys (``[z, S_V]`` alone when ``dQ`` is not needed), and the
   number of keys.
2. :func:`query_pass` (query blocks, given the summed key states): ``Phi_b`` times that grid gives ``D``,
   ``O~`` and, with ``G``, ``dQ = beta / D ([-r | G] . [U S_K; U T_K])`` row by row; then
   :class:`QueryState`, ``U^T ([r | G] (x) [1 | Q])``, the grid ``[[U^T r, R_Q], [R_G, T_Q]]`` of the sums
   over queries (``R_G = U^T G`` alone when ``dK`` is not needed), the loss, and the smallest normaliser
   ratio of the run-time check.
3. :func:`key_grad_pass` (key blocks, given the summed query states): ``Psi_b`` times that grid gives
   ``dV`` (its ``R_G`` part) and ``dK = beta ([-1 | V] . [R_Q; T_Q])`` row by row.

**Lifted states.** A Kronecker grid ``Z^T (A (x) [1 | z])`` needs no Kronecker product: ``z^a z_c`` is
itself a plain monomial, of degree ``|a| + 1`` (:func:`gpulora.poly.monomials.raise_index`), so the grid is
a gather of the rows of ``Mono^T A``, ``Mono`` the ``k' = C(d + g + 1, g + 1)`` monomials of degree
``<= g + 1``: ``k' (1 + d_v)`` columns of GEMM per row instead of ``k (1 + d_v) (1 + d_head)``, about
``g + 1`` times fewer flops, for ``k' - k`` more monomials per row. Passes 1 and 2 build their states so
where :func:`lift_states` finds it cheaper (on the CPU small ``k``, whose lifted blocks stay in cache, such
as ``d_head = 8, g = 2``; none on the GPU with today's feature-map kernel); the states are the same sums
either way, to rounding.

The features enter as plain monomials; the per-feature scales of the polynomial are applied to the
``k x W`` states, once, instead of to every ``Lb x k`` block. Every block is held feature-major (features
``(k, Lb)``, right-hand sides and products ``(W, Lb)``, as the feature map builds them), so that the
Kronecker products (:func:`gpulora.poly.products.kron_cols`), readouts and row reductions are broadcasts
over long contiguous rows: at ``d_head = 8``, ``g = 2``, float32 this measured 15x faster for the
Kronecker block than ``repeat``/``tile`` in the row layout, and the whole call 1.1-1.5x faster.

The states are associative sums (``+`` adds them; the normaliser ratio takes the minimum), so the passes
shard over tokens: map :func:`key_pass` over key shards, reduce with ``+``, broadcast; map
:func:`query_pass` over query shards, reduce, broadcast; map :func:`key_grad_pass`. :func:`loss_and_grads`
and :func:`output` are the single-process drivers of exactly these functions.

**Masks.** ``key_mask`` (bool, broadcastable to ``(..., L)``, True for a real key): masked keys contribute
nothing (their ``psi`` rows are zeroed) and get zero ``dK``, ``dV``. ``query_mask`` (same form, True for a
real query row): padded rows get zero output, zero ``dQ`` and contribute nothing to the loss or the query
states. A query with no real key attends to nothing: zero output (and ``D = 1`` with Softmax_1).

**Memory.** Each pass holds one block's features ``(Lb, k)`` with the temporaries of their construction
and the block's stacked right-hand sides ``(Lb, W)``, ``W <= (1 + d_v) (1 + d_head)``, plus the states
``(k, W)``. :func:`block_rows` picks ``Lb`` so that these block arrays fit ``budget`` bytes over all leading
indices (default :data:`DEFAULT_BUDGET`, 256 MiB: small beside a GPU's memory, and at least
:data:`MIN_BLOCK_ROWS` rows); on the CPU, blocks are smaller still where that keeps them in cache
(:data:`CACHE_BYTES`, faster). Pass 3 recomputes the key features rather than keeping them from pass 1:
building them costs ``O(L k)`` against the ``O(L k W)`` of the GEMMs, and keeping them (``L x k`` more
memory, read back from RAM) measured 25 % slower at ``d_head = 8``, ``g = 2``, float32. Peak memory is
therefore ``O(budget + lead (k W + L (d_head + d_v)))`` independent of ``L k``: tracemalloc measured a peak of
0.15 GiB at ``k = 4845`` (``d_head = d_v = 16``, ``g = 4``), ``L = 65536``, float64, ``qkv`` (8.7 GiB
before streaming).

**Cost** ``O(batch H L k d_v d_head)`` time (``k = C(d_head + g, g)``).

**Error.** If ``|p(s) - e^s| <= tol e^s`` on ``[-M, M]``, every weight of ``F~`` is within a relative
``2 tol / (1 - tol)`` of ``F``, so ``O~`` is within about ``2 tol`` (relative to ``max|v|``), and ``dQ``,
``dK``, ``dV`` row by row within a small multiple of ``tol`` of the magnitudes they are summed from. The
adapter gradients ``x^T dQ`` etc. sum over tokens, and where the exact sum cancels the error need not:
measured at M = 0.25, tol 1e-3, unit-norm zero-mean ``x``, the relative error of ``dV`` stays 1.2e-4..2.2e-4
for L = 512..8192 while that of ``dW_v`` grows 4.9e-4 -> 3.6e-3, because ``||x^T dV||`` shrinks to 1.4 %
of ``|| |x|^T |dV| ||`` (the error against that magnitude stays 3e-5..5e-5). The tests hold every adapter
gradient to ``10 tol`` relative on bounded problems of a few hundred tokens.

**Run-time checks.** The degree and precision are chosen a priori so that rounding stays within ``tol``
(:mod:`gpulora.poly.coefficients`). Two checks verify it a posteriori and raise :class:`PolynomialFailure`
rather than return a silently wrong gradient: :func:`check_extreme_pairs` compares ``phi . psi`` with
``p(s)`` at the most negative scores of the extreme rows (where cancellation is worst), and the normaliser
check (:func:`check_normaliser`, :func:`check_normaliser_ratio`) verifies every ``D_i >= n_i p_min / 2``
(``p >= p_min > 0`` on ``[-M, M]``, ``n_i`` real keys in row ``i``), accumulated on the device over the
blocks of pass 2 as :attr:`QueryState.worst`. Two host reads per call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .. import backend
from .budget import MAX_FEATURES
from .coefficients import PolyChoice, evaluate
from .features import feature_scales, monomial_features
from .monomials import feature_dim, monomial_table, raise_index
from .products import kron_cols, kron_rows, row_sums, weighted_rows

__all__ = ["DEFAULT_BUDGET", "MIN_BLOCK_ROWS", "KeyState", "PolynomialFailure", "QueryState", "block_rows",
           "check_extreme_pairs", "check_mask", "check_normaliser", "check_normaliser_ratio", "key_grad_pass",
           "key_pass", "loss_and_grads", "output", "peak_bytes", "query_pass", "score_bound"]

DEFAULT_BUDGET = 1 << 28  # bytes for one block's arrays, over all leading indices
MIN_BLOCK_ROWS = 16
# speed: a block's arrays that stay in cache. `python asv_bench/interleaved.py cache` sweeps 1..16 MiB: at
# d_head 8, g 2 (L 65536, float32, qv) 4 MiB was the best (2 MiB 5 % slower, 16 MiB 54 %); at g 4 the
# sweep was flat within the 2-core machine's noise
CACHE_BYTES = 4 << 20
FAST_MIN_ROWS = 1024  # speed: below this the per-block overhead and thin GEMMs cost more than cache misses
FEATURE_TEMPORARIES = 4  # the features plus up to three (Lb, k) temporaries while they are built
RHS_TEMPORARIES = 4  # right-hand side, GEMM result, Kronecker temporaries


class PolynomialFailure(ValueError):
    """The polynomial approximation broke down on this input (normaliser not positive or far too small)."""


def score_bound(q, k, beta) -> float:
    """``M = max over leading indices of beta * max_i |q_i| * max_j |k_j|`` (row norms; ``O(L d)``).

    By Cauchy-Schwarz ``|s_ij| <= M`` for every score. One host read.
    """
    xp = backend.namespace(q, k)
    qn = xp.max(row_sums(q * q), axis=(-2, -1))
    kn = xp.max(row_sums(k * k), axis=(-2, -1))
    return beta * math.sqrt(max(backend.to_float(xp.max(qn * kn)), 0.0))


def block_rows(L: int, lead: int, k: int, width: int, itemsize: int, budget: int = DEFAULT_BUDGET,
               cache_bytes: int | None = CACHE_BYTES) -> int:
    """Rows per block ``Lb`` (at most ``L``).

    Memory: ``lead Lb itemsize (4 k + 4 W) <= budget`` (the features with the temporaries of their
    construction, the right-hand sides, the GEMM result and the Kronecker temporaries of ``W = width``
    columns). Speed (CPU): no more rows than keep ``lead Lb itemsize (k + 3 W)`` within ``cache_bytes``, but
    at least :data:`FAST_MIN_ROWS` (a cache-resident block measured 1.5-3x faster per row than whole-``L``
    arrays at small ``k``; large ``k`` is GEMM-bound either way). ``cache_bytes=None`` (the passes on CuPy:
    no CPU cache to fit, and launches favour few large blocks) fills the budget. Never below
    :data:`MIN_BLOCK_ROWS`.
    """
    rows = budget // max(lead * itemsize * (FEATURE_TEMPORARIES * k + RHS_TEMPORARIES * width), 1)
    if cache_bytes is not None:
        rows = min(rows, max(FAST_MIN_ROWS, cache_bytes // max(lead * itemsize * (k + 3 * width), 1)))
    return max(1, min(L, max(MIN_BLOCK_ROWS, rows)))


def _pass_blocks(xp, like, L: int, lead: tuple, k: int, width: int, dtype, budget: int):
    """The ``(lo, hi)`` blocks of one pass (:func:`block_rows`; no cache rule for CuPy arrays)."""
    cache = None if backend.is_cupy(like) else CACHE_BYTES
    return _blocks(L, block_rows(L, math.prod(lead), k, width, _itemsize(xp, dtype), budget, cache))


def peak_bytes(lead: int, L: int, k: int, d_head: int, d_v: int, itemsize: int, budget: int = DEFAULT_BUDGET) -> int:
    """Estimated peak memory of :func:`loss_and_grads` for ``lead`` problems of ``L`` rows and ``k`` features:
    the blocks (at most ``budget``), three ``(k, W)`` states, and the ``O(L (d_head + d_v))`` rows (the cast
    inputs of the check, the gradients and output). Never ``L k``."""
    width = (1 + d_v) * (1 + d_head)
    rows = budget // max(lead * itemsize * (FEATURE_TEMPORARIES * k + RHS_TEMPORARIES * width), 1)
    rows = min(L, max(MIN_BLOCK_ROWS, rows))
    block = lead * rows * itemsize * (FEATURE_TEMPORARIES * k + RHS_TEMPORARIES * width)
    return block + itemsize * lead * (3 * k * width + L * (3 * d_head + 2 * d_v))


def _blocks(L: int, step: int):
    for lo in range(0, L, step):
        yield lo, min(L, lo + step)


def check_mask(name: str, mask, lead: tuple, L: int):
    """Validate an optional boolean mask broadcastable to ``lead + (L,)``; returns it (or ``None``)."""
    if mask is None:
        return None
    if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
        raise TypeError(f"{name} must be a boolean array or None, got {type(mask).__name__}")
    xp = backend.namespace(mask)
    if mask.dtype != xp.bool:
        raise TypeError(f"{name} must have a boolean dtype (True for a real token), got {mask.dtype}")
    shape = tuple(mask.shape)
    ok = len(shape) >= 1 and shape[-1] == L and len(shape) <= len(lead) + 1 and all(
        a in (1, b) for a, b in zip(reversed(shape[:-1]), reversed(lead)))
    if not ok:
        raise ValueError(f"{name} must have shape broadcastable to {tuple(lead) + (L,)} with last axis {L}, "
                         f"got {shape}")
    return mask


def _stack_add(a, b):
    return None if a is None else a + b


def _grid(data, rows: int, xp=None):
    """``(..., k, rows * cols)`` stacked states as the ``(..., k, rows, cols)`` grid (a view)."""
    if data is None:
        return None
    xp = backend.namespace(data) if xp is None else xp
    return xp.reshape(data, data.shape[:-1] + (rows, data.shape[-1] // rows))


@dataclasses.dataclass(frozen=True)
class KeyState:
    """Sums over keys (pass 1), for one set of leading indices; ``a + b`` sums two shards' states.

    The states are one GEMM's result: ``Psi^T (V' (x) K')`` with ``V' = [1 | V]`` and ``K' = [1 | K]`` (or
    ``[1]`` without ``with_k``), so ``data`` is the ``(1 + d_v) x (1 + d_head)`` grid of ``[[z, S_K],
    [S_V, T_K]]`` per feature, flattened row-major.

    Attributes
    ----------
    count : array of shape ``lead``, float64
        Number of real (unmasked) keys summed.
    data : array of shape ``lead + (k, (1 + d_v) (1 + d_head))`` (``(k, 1 + d_v)`` without ``with_k``)
        ``z = Psi^T 1``, ``S_V = Psi^T V``, ``S_K = Psi^T K``, ``T_K = Psi^T (V (x) K)``: the views
        :attr:`z` ``(..., k)``, :attr:`s_v` ``(..., k, d_v)``, :attr:`s_k` ``(..., k, d_head)``,
        :attr:`t_k` ``(..., k, d_v, d_head)``. Compute dtype.
    d_v, d_head : int
    with_k : bool
        Whether ``S_K`` and ``T_K`` are present (what ``dQ`` needs).
    """

    count: Any
    data: Any
    d_v: int
    d_head: int
    with_k: bool

    @staticmethod
    def width(d_v: int, d_head: int, with_k: bool) -> int:
        """Number of stacked columns ``W``."""
        return (1 + d_v) * (1 + (d_head if with_k else 0))

    @property
    def grid(self):
        """``data`` as ``(..., k, 1 + d_v, 1 + d_head)`` (or ``(..., k, 1 + d_v, 1)``)."""
        return _grid(self.data, 1 + self.d_v)

    @property
    def z(self):
        return self.grid[..., 0, 0]

    @property
    def s_v(self):
        return self.grid[..., 1:, 0]

    @property
    def s_k(self):
        return self.grid[..., 0, 1:] if self.with_k else None

    @property
    def t_k(self):
        return self.grid[..., 1:, 1:] if self.with_k else None

    def stacked(self, with_k: bool):
        """``data`` in the layout for ``with_k`` (dropping ``S_K``, ``T_K`` if present and not wanted)."""
        if with_k and not self.with_k:
            raise ValueError("these key states lack S_K and T_K (built without 'q' in need)")
        return self.data if with_k == self.with_k else self.grid[..., 0]

    def __add__(self, other: KeyState) -> KeyState:
        if (self.d_v, self.d_head, self.with_k) != (other.d_v, other.d_head, other.with_k):
            raise ValueError("cannot add key states of different layouts")
        return dataclasses.replace(self, count=self.count + other.count, data=self.data + other.data)


@dataclasses.dataclass(frozen=True)
class QueryState:
    """Sums over queries (pass 2), for one set of leading indices; ``a + b`` combines two shards' states.

    ``data = U^T (G' (x) Q')`` with ``G' = [r | G]``, ``Q' = [1 | Q]`` when ``with_k`` (the grid
    ``[[U^T r, R_Q], [R_G, T_Q]]``), else ``U^T G``.

    Attributes
    ----------
    data : array of shape ``lead + (k, (1 + d_v) (1 + d_head))`` (``(k, d_v)`` without ``with_k``), or None
        when no ``dK``/``dV`` is needed. ``R_G = U^T G``, ``R_Q = U^T (r Q)``, ``T_Q = U^T (G (x) Q)``: the
        views :attr:`r_g`, :attr:`r_q`, :attr:`t_q` (``(..., k, d_v, d_head)``). Compute dtype.
    loss : 0-d float64 array, or None (output-only or upstream-gradient mode)
        ``0.5 ||O~ - Y||^2`` over the rows summed.
    worst : 0-d float64 array
        ``min_i D_i / (n_i p_min)`` over the real rows with a key (``inf`` when none); ``+`` takes the
        minimum. :func:`check_normaliser_ratio` raises unless it is at least 0.5.
    d_v, d_head : int
    with_k : bool
        Whether ``R_Q`` and ``T_Q`` are present (what ``dK`` needs).
    """

    data: Any
    loss: Any
    worst: Any
    d_v: int
    d_head: int
    with_k: bool

    @staticmethod
    def width(d_v: int, d_head: int, with_k: bool) -> int:
        """Number of stacked columns ``W``."""
        return (1 + d_v) * (1 + d_head) if with_k else d_v

    @property
    def grid(self):
        """``data`` as ``(..., k, 1 + d_v, 1 + d_head)`` (``(..., k, d_v, 1)`` without ``with_k``), or None."""
        return _grid(self.data, 1 + self.d_v if self.with_k else self.d_v)

    @property
    def r_g(self):
        if self.data is None:
            return None
        return self.grid[..., 1:, 0] if self.with_k else self.data

    @property
    def r_q(self):
        return self.grid[..., 0, 1:] if self.with_k and self.data is not None else None

    @property
    def t_q(self):
        return self.grid[..., 1:, 1:] if self.with_k and self.data is not None else None

    def stacked(self, with_k: bool):
        """``data`` in the layout for ``with_k`` (dropping ``R_Q``, ``T_Q`` if present and not wanted)."""
        if self.data is None or (with_k and not self.with_k):
            raise ValueError("these query states lack what dK or dV needs")
        return self.data if with_k == self.with_k else self.r_g

    def __add__(self, other: QueryState) -> QueryState:
        if (self.d_v, self.d_head, self.with_k, self.data is None, self.loss is None) != (
                other.d_v, other.d_head, other.with_k, other.data is None, other.loss is None):
            raise ValueError("cannot add query states of different layouts")
        xp = backend.namespace(self.worst, other.worst)
        return dataclasses.replace(self, data=_stack_add(self.data, other.data),
                                   loss=_stack_add(self.loss, other.loss),
                                   worst=xp.minimum(self.worst, other.worst))


class _Features:
    """The feature map of one polynomial on one side, in one compute dtype (scales placed once).

    Called, it gives the scaled features; :meth:`rows` gives the plain monomials ``z^a`` of a block (the
    passes apply the per-feature ``scale`` to their ``k x W`` states instead: one pass over ``Lb x k``
    fewer per block). ``lift=True`` builds the monomials of degree ``<= g + 1`` instead (``k_built`` of
    them; the first ``k`` are those of degree ``<= g``), for the lifted states (:meth:`lifted`).
    """

    def __init__(self, xp, d: int, choice: PolyChoice, side: str, dtype, lift: bool = False):
        self.table = monomial_table(d, choice.degree)
        self.built = monomial_table(d, choice.degree + 1) if lift else self.table
        self.scale = xp.asarray(feature_scales(choice.coef, d, side), dtype=dtype)
        self.dtype = dtype
        self.xp = xp

    @property
    def k(self) -> int:
        return self.table.k

    @property
    def k_built(self) -> int:
        return self.built.k

    def __call__(self, z):
        return monomial_features(z, self.table, self.scale, self.xp)

    def rows(self, a, lo, hi, factor=None):
        """Rows ``lo:hi`` of ``a`` in the compute dtype, and the plain monomials of those rows times ``factor``,
        feature-major: ``(..., k_built, Lb)`` (the layout they are built in; every pass works on long rows)."""
        z = _cast(self.xp, a[..., lo:hi, :], self.dtype)
        return z, monomial_features(z if factor is None else factor * z, self.built, None, self.xp).mT

    def scaled(self, states):
        """``diag(scale) states`` for ``states (..., k, W)``."""
        return self.scale[:, None] * states

    def lifted(self, states, factor=1.0):
        """The Kronecker grid ``Z^T (A (x) [1 | z])`` of shape ``(..., k, P (1 + d))`` (column ``a (1 + d) + c``)
        from the lifted sums ``states = Mono^T A`` of shape ``(..., k_built, P)``, ``Mono`` the monomials of
        degree ``<= g + 1`` of the rows ``factor * z``: ``z^a(m) z_c = z^a(up[m, c]) / factor``
        (:func:`gpulora.poly.monomials.raise_index`), so the grid is a gather of rows, no arithmetic on
        ``L``. Cost ``O(k d P)``."""
        xp, k, d = self.xp, self.table.k, self.table.d
        cols = np.concatenate([np.arange(k, dtype=np.int64)[:, None], raise_index(d, self.table.g)], axis=1)
        grid = xp.take(states, xp.asarray(cols.reshape(-1)), axis=-2)  # (..., k (1 + d), P)
        grid = xp.reshape(grid, states.shape[:-2] + (k, 1 + d, states.shape[-1])).mT  # (..., k, P, 1 + d)
        if factor != 1.0:
            grid = grid * xp.asarray([1.0] + [1.0 / factor] * d, dtype=states.dtype)
        return xp.reshape(grid, states.shape[:-2] + (k, states.shape[-1] * (1 + d)))


# Elementwise work per feature element written, in GEMM multiply-adds of the same time (measured): numpy 16,
# the 2-core CI machine, 0.25..0.4 ns per monomial written by the prefix runs in cache against about
# 0.015..0.04 ns per multiply-add in the state GEMMs; cupy 200, the H200, the feature-map kernel at about
# 200 GB/s against 22.5 TFLOP/s in the fp32 GEMMs (BENCHMARKS.md, GPU figures).
LIFT_ELEMENTWISE = {"numpy": 16, "cupy": 200}


def lift_states(d: int, g: int, d_v: int, cupy: bool = False, itemsize: int = 4) -> bool:
    """Whether the passes build their Kronecker states lifted (:meth:`_Features.lifted`): one GEMM
    ``Mono^T A`` over the ``k' = C(d + g + 1, g + 1) = k (d + g + 1) / (g + 1)`` monomials of degree
    ``<= g + 1``, ``A`` of ``1 + d_v`` columns, instead of ``Psi^T (A (x) [1 | z])`` over the
    ``W = (1 + d_v) (1 + d)`` Kronecker columns: about ``(g + 1)`` times fewer GEMM flops, for ``k' - k``
    more monomials per row in place of the ``W`` Kronecker products.

    Chosen where that costs less, ``k' (1 + d_v) + rho (k' - k) < k W + rho W`` with ``rho`` from
    :data:`LIFT_ELEMENTWISE`, and, on the CPU, only while a block of :data:`FAST_MIN_ROWS` lifted rows fills
    at most half of :data:`CACHE_BYTES` (the rest of the block's arrays share it): past that every monomial
    costs several times more while the wide Kronecker GEMMs run near the BLAS peak. Measured by
    ``python asv_bench/interleaved.py forms`` (both forms alternating in one process; BENCHMARKS.md): lifted
    wins at ``d = 8, g = 2`` and ``d = 4, g = 2``, ties at ``d = 8, g = 4`` and (within 6 % either way over
    two runs) at ``d = 16, g = 2`` in float32, a lifted block of 3.97 MB, and loses 2x at ``d = 16, g = 4``
    in float64. The GPU, with today's feature-map kernel: never. And only where the table passes the
    feature budget."""
    k, k1 = feature_dim(d, g), feature_dim(d, g + 1)
    if k1 > MAX_FEATURES or (not cupy and 2 * FAST_MIN_ROWS * k1 * itemsize > CACHE_BYTES):
        return False
    rho = LIFT_ELEMENTWISE["cupy" if cupy else "numpy"]
    width = (1 + d_v) * (1 + d)
    return k1 * (1 + d_v) + rho * (k1 - k) < k * width + rho * width


def _itemsize(xp, dtype) -> int:
    return xp.finfo(dtype).bits // 8


def _cast(xp, a, dtype):
    """``a`` in ``dtype``: itself when it already is (the namespace's ``astype`` costs microseconds per block)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _mask_row(xp, mask, lo, hi, dtype):
    """Entries ``lo:hi`` of a mask as a ``(..., 1, Lb)`` 0/1 row in ``dtype``, or None."""
    return None if mask is None else xp.astype(mask[..., lo:hi], dtype)[..., None, :]


class _Columns:
    """``[first | a]`` for the blocks ``a (..., Lb, p)`` of one pass, ``first`` a number or a ``(..., Lb, 1)``
    column: written into one buffer, allocated at the first block's shape, instead of a concatenation per
    block (whose allocations cost more than the copies at small ``p``). The result is a view of the buffer,
    valid until the next call."""

    def __init__(self, xp):
        self.xp, self.buf = xp, None

    def __call__(self, first, a):
        shape = a.shape[:-1] + (1 + a.shape[-1],)
        buf = self.buf
        if buf is None or buf.shape[:-2] != shape[:-2] or buf.shape[-1] != shape[-1] or buf.shape[-2] < shape[-2] \
                or buf.dtype != a.dtype:
            buf = self.buf = backend.empty(shape, a.dtype, self.xp)
        out = buf[..., :shape[-2], :]
        out[..., 0:1] = first
        out[..., 1:] = a
        return out


class _Rows:
    """``[first; a^T]``, shape ``(..., 1 + p, Lb)``, for the blocks ``a (..., Lb, p)`` of one pass: the
    feature-major counterpart of :class:`_Columns` (``first`` a number or a ``(..., 1, Lb)`` row), written
    into one buffer allocated at the first block's shape. The result is a view, valid until the next call."""

    def __init__(self, xp):
        self.xp, self.buf = xp, None

    def __call__(self, first, a):
        shape = a.shape[:-2] + (1 + a.shape[-1], a.shape[-2])
        buf = self.buf
        if buf is None or buf.shape[:-1] != shape[:-1] or buf.shape[-1] < shape[-1] or buf.dtype != a.dtype:
            buf = self.buf = backend.empty(shape, a.dtype, self.xp)
        out = buf[..., :shape[-1]]
        out[..., 0:1, :] = first
        out[..., 1:, :] = a.mT
        return out


def _rebuilt(feat: _Features, k, key_mask, blocks):
    """``(lo, hi, monomials)`` of the key blocks, feature-major ``(..., k, Lb)``, masked keys zeroed, built
    one block at a time."""
    for lo, hi in blocks:
        _, psi = feat.rows(k, lo, hi)
        m = _mask_row(feat.xp, key_mask, lo, hi, feat.dtype)
        yield lo, hi, (psi if m is None else psi * m)


def key_rhs(xp, vb, kb, with_k: bool, cols=None):
    """The right-hand side of pass 1 for a block: ``V' (x) K'`` (``[1 | V]`` and ``[1 | K]``, or ``[1]``),
    shape ``(..., Lb, KeyState.width)``. ``cols``: two :class:`_Columns` buffers of the pass."""
    cv, ck = (_Columns(xp), _Columns(xp)) if cols is None else cols
    v1 = cv(1.0, vb)
    return kron_rows(v1, ck(1.0, kb), xp) if with_k else v1


def query_rhs(xp, g, r, qb, with_k: bool, cols=None):
    """The right-hand side of pass 2's query sums for a block (before the ``1 / D`` row scaling):
    ``[r | G] (x) [1 | Q]`` with ``with_k``, else ``G``. ``cols``: two :class:`_Columns` buffers of the pass."""
    if not with_k:
        return g
    cg, cq = (_Columns(xp), _Columns(xp)) if cols is None else cols
    return kron_rows(cg(r, g), cq(1.0, qb), xp)


def key_pass(k, v, choice: PolyChoice, *, need=("q", "k", "v"), key_mask=None, compute_dtype=None,
             budget: int = DEFAULT_BUDGET) -> KeyState:
    """Pass 1: the sums over the keys of ``k (..., L, d_head)``, ``v (..., L, d_v)`` (any shard of them).

    ``need`` containing ``"q"`` adds ``S_K`` and ``T_K``. ``compute_dtype`` (default ``k.dtype``) is the dtype
    of the features and states. One GEMM ``Psi_b^T (V'_b (x) K'_b)`` per block. Cost ``O(L k W)`` time,
    ``O(budget + k W)`` memory (see :class:`KeyState`).
    """
    xp = backend.namespace(k, v)
    dtype = k.dtype if compute_dtype is None else compute_dtype
    lead, (L, d_head), d_v = k.shape[:-2], k.shape[-2:], v.shape[-1]
    with_k = "q" in need
    lift = with_k and lift_states(d_head, choice.degree, d_v, backend.is_cupy(k), _itemsize(xp, dtype))
    feat = _Features(xp, d_head, choice, "key", dtype, lift=lift)
    width = 1 + d_v if lift or not with_k else KeyState.width(d_v, d_head, with_k)
    data = xp.zeros(lead + (feat.k_built, width), dtype=dtype)
    cv, ck = _Rows(xp), _Rows(xp)
    blocks = _pass_blocks(xp, k, L, lead, feat.k_built, width, dtype, budget)
    for lo, hi, psi in _rebuilt(feat, k, key_mask, blocks):
        v1 = cv(1.0, _cast(xp, v[..., lo:hi, :], dtype))  # [1; V^T], (..., 1 + d_v, Lb)
        rhs = kron_cols(v1, ck(1.0, _cast(xp, k[..., lo:hi, :], dtype)), xp) if with_k and not lift else v1
        data += psi @ rhs.mT  # psi (..., k or k_built, Lb): Psi_b^T (V' (x) K'), or Mono_b^T V' lifted
    if lift:
        data = feat.lifted(data)
    if key_mask is None:
        count = xp.full(lead, float(L), dtype=xp.float64)
    else:
        count = xp.broadcast_to(xp.sum(xp.astype(key_mask, xp.float64), axis=-1), lead)
    return KeyState(count, feat.scaled(data), d_v, d_head, with_k)


def query_pass(q, keys: KeyState, beta, choice: PolyChoice, *, y=None, grad_output=None, query_mask=None,
               softmax_one=False, need=("q", "k", "v"), budget: int = DEFAULT_BUDGET, out_dtype=None):
    """Pass 2: output rows, ``dQ`` rows and the sums over the queries of ``q (..., L, d_head)``.

    Parameters
    ----------
    q : array of shape (..., L, d_head)
        Queries (any shard of them); ``beta`` is folded into their features.
    keys : KeyState
        The key states summed over every key these queries attend to (the compute dtype is theirs).
    y, grad_output : arrays of shape (..., L, d_v), optional, at most one
        ``y``: targets, ``G = O~ - y`` and the loss. ``grad_output``: ``G = dO`` given (vector-Jacobian
        product). Neither: output only (no ``dQ``, no query states).
    query_mask : bool array broadcastable to (..., L), optional
        False rows are padding: zero output and gradient, no part in the loss or the states.
    need : iterable of {"q", "k", "v"}
        ``"q"``: the ``dQ`` rows (``keys.with_k`` required); ``"k"`` / ``"v"``: the query states pass 3 needs.
    out_dtype : dtype, optional
        Dtype of the returned rows (default ``q.dtype``).

    Returns
    -------
    (rows, state)
        ``rows``: dict with ``"o"`` (``(..., L, d_v)``) and, with ``G`` and ``"q"`` needed, ``"dq"``;
        ``state``: :class:`QueryState` (its ``worst`` also in output-only mode). One GEMM
        ``Phi_b [[z, S_K], [S_V, T_K]]`` per block for ``D``, ``O~`` and ``dQ`` (``dQ = beta / D [-r | G] .
        [S_K; T_K]`` row by row), one more for the query sums. Cost ``O(L k W)`` time,
        ``O(budget + k W + L (d_v + d_head))`` memory.
    """
    if y is not None and grad_output is not None:
        raise ValueError("pass either y (targets) or grad_output (upstream gradient), not both")
    xp = backend.namespace(q, keys.data)
    dtype = keys.data.dtype
    out_dtype = q.dtype if out_dtype is None else out_dtype
    lead, (L, d_head), d_v = q.shape[:-2], q.shape[-2:], keys.d_v
    target = y if y is not None else grad_output
    grad = target is not None
    need = set(need) if grad else set()
    if "q" in need and not keys.with_k:
        raise ValueError("dQ needs key states built with 'q' in need")
    with_state = bool(need & {"k", "v"})
    with_k = "k" in need
    lift = with_state and with_k and lift_states(d_head, choice.degree, d_v, backend.is_cupy(q), _itemsize(xp, dtype))
    feat = _Features(xp, d_head, choice, "query", dtype, lift=lift)
    key_states = feat.scaled(keys.data)  # the query scales, once, on k x W
    kw = keys.data.shape[-1]
    qw = QueryState.width(d_v, d_head, with_k)
    width = kw + ((1 + d_v if lift else qw) if with_state else 0)
    rows = {"o": backend.empty(lead + (L, d_v), out_dtype, xp)}
    if "q" in need:
        rows["dq"] = backend.empty(lead + (L, d_head), out_dtype, xp)
    data = None
    if with_state:
        data = xp.zeros(lead + ((feat.k_built, 1 + d_v) if lift else (feat.k, qw)), dtype=dtype)
    loss = xp.zeros((), dtype=xp.float64) if y is not None else None
    min_den = xp.full(lead + (1,), math.inf, dtype=dtype)  # smallest D over the real rows, per leading index
    cols = 1 + d_head if keys.with_k else 1
    if keys.with_k:  # beta on the S_K, T_K columns, once: the dQ rows then need no multiply by it
        key_states = _grid(key_states, 1 + d_v, xp) * xp.asarray([1.0] + [beta] * d_head, dtype=dtype)
        key_states = xp.reshape(key_states, key_states.shape[:-2] + (kw,))
    states_t = key_states.mT  # (..., kw, k): every block's product comes out feature-major, (..., kw, Lb)
    cg, cq = _Rows(xp), _Rows(xp)
    for lo, hi in _pass_blocks(xp, q, L, lead, feat.k_built, width, dtype, budget):
        qb, mono = feat.rows(q, lo, hi, beta)  # mono (..., k_built, Lb)
        phi = mono[..., :feat.k, :] if lift else mono
        x = xp.reshape(states_t @ phi, lead + (1 + d_v, cols, hi - lo))  # [[D, U S_K], [O~, U T_K]] * D
        den = x[..., 0, 0, :]  # [..., Lb]
        m = None if query_mask is None else query_mask[..., lo:hi]
        min_den = xp.minimum(min_den, xp.min(den if m is None else xp.where(m, den, math.inf), axis=-1,
                                             keepdims=True))
        if softmax_one:
            den = den + 1.0
        winv = (1.0 / xp.where(den == 0, 1.0, den))[..., None, :]  # den = 0 only where no key: there O~ = 0
        m = None if m is None else m[..., None, :]
        o = x[..., 1:, 0, :] * winv  # O~^T, (..., d_v, Lb)
        if m is not None:
            o = xp.where(m, o, 0.0)
        rows["o"][..., lo:hi, :] = _cast(xp, o.mT, out_dtype)
        if not grad:
            continue
        g = _cast(xp, target[..., lo:hi, :], dtype).mT
        if y is not None:
            g = o - g
        if m is not None:
            g = xp.where(m, g, 0.0)
        if loss is not None:
            loss = loss + 0.5 * xp.sum(g * g, dtype=xp.float64)
        r = xp.sum(g * o, axis=-2, keepdims=True)  # [..., 1, Lb]
        gm = cg(-r, g.mT) * winv  # [-r; G^T] / D, (..., 1 + d_v, Lb)
        if "q" in need:  # dQ^T = [-r | G] / D . beta [U S_K; U T_K] D (beta is in the states), over the grid rows
            rows["dq"][..., lo:hi, :] = _cast(xp, weighted_rows(gm, x[..., 1:, :], xp).mT, out_dtype)
        if lift:  # Mono^T ([-r | G] / D): the grid of [-r | G] (x) [1 | Q], lifted after the pass
            data += mono @ gm.mT
        elif with_state:  # ([-r | G] (x) [1 | Q]) / D, or G / D
            data += phi @ (kron_cols(gm, cq(1.0, qb), xp) if with_k else gm[..., 1:, :]).mT
    if with_k and data is not None:  # the r row of the grid was summed as -r
        sign = xp.asarray([-1.0] + [1.0] * d_v, dtype=dtype)
        data = feat.lifted(data * sign, beta) if lift else xp.reshape(_grid(data, 1 + d_v, xp) * sign[:, None],
                                                                      data.shape)
    # D_i >= n p_min for every real row, n the keys of its leading index (a row without keys checks nothing)
    count = keys.count[..., None]
    ratio = xp.where(count > 0, xp.astype(min_den, xp.float64) / xp.where(count > 0, count, 1.0), math.inf)
    worst = xp.min(ratio) / choice.min_value if ratio.size else xp.asarray(math.inf, dtype=xp.float64)
    return rows, QueryState(None if data is None else feat.scaled(data), loss, worst, d_v, d_head, with_k)


def key_grad_pass(k, v, queries: QueryState, beta, choice: PolyChoice, *, need=("k", "v"), key_mask=None,
                  budget: int = DEFAULT_BUDGET, out_dtype=None) -> dict:
    """Pass 3: the ``dK`` and ``dV`` rows of the keys ``k (..., L, d_head)``, ``v (..., L, d_v)`` (any shard),
    given the query states summed over every query that attends to them.

    One GEMM ``Psi_b [[U^T r, R_Q], [R_G, T_Q]]`` per block: ``dV`` is its ``R_G`` part and
    ``dK = beta [-1 | V] . [R_Q; T_Q]`` row by row. Returns a dict with ``"dk"`` (``queries.with_k``
    required) and/or ``"dv"`` as ``need`` asks, in ``out_dtype`` (default ``k.dtype``); masked keys get zero
    rows. Cost ``O(L k W)`` time, ``O(budget)`` extra memory.
    """
    need = set(need) & {"k", "v"}
    if queries.data is None or ("k" in need and not queries.with_k):
        raise ValueError("the query states lack what the requested key gradients need")
    xp = backend.namespace(k, v, queries.data)
    dtype = queries.data.dtype
    out_dtype = k.dtype if out_dtype is None else out_dtype
    lead, (L, d_head), d_v = k.shape[:-2], k.shape[-2:], v.shape[-1]
    feat = _Features(xp, d_head, choice, "key", dtype)
    states_t = feat.scaled(queries.data).mT  # (..., qw, k)
    rows_of_grid = 1 + d_v if queries.with_k else d_v
    out = {"d" + t: backend.empty(lead + (L, d_head if t == "k" else d_v), out_dtype, xp) for t in need}
    blocks = _pass_blocks(xp, k, L, lead, feat.k, queries.data.shape[-1], dtype, budget)
    cv = _Rows(xp)
    for lo, hi, psi in _rebuilt(feat, k, key_mask, blocks):
        x = xp.reshape(states_t @ psi, lead + (rows_of_grid, -1, hi - lo))  # [..., rows, cols, Lb]
        if "v" in need:
            dv = x[..., 1:, 0, :] if queries.with_k else x[..., 0, :]
            out["dv"][..., lo:hi, :] = _cast(xp, dv.mT, out_dtype)
        if "k" in need:  # dK^T = beta [-1 | V] . [R_Q; T_Q], summed over the grid rows
            dk = weighted_rows(cv(-1.0, _cast(xp, v[..., lo:hi, :], dtype)), x[..., 1:, :], xp)
            out["dk"][..., lo:hi, :] = _cast(xp, (beta * dk).mT, out_dtype)
    return out


def _pick_rows(xp, a, n, rows):
    """``a[n, rows]`` for ``a (N, L, ...)`` and index arrays ``n``, ``rows``: one ``take`` of the flattened
    rows (the array API's integer-array indexing does not mix with slices)."""
    return xp.take(xp.reshape(a, (-1,) + tuple(a.shape[2:])), n * a.shape[1] + rows, axis=0)


def check_extreme_pairs(qs, k, choice: PolyChoice, *, query_mask=None, key_mask=None, factor: float = 10.0) -> None:
    """Measure the rounding of ``phi . psi`` where it is worst, and raise if it is far past the estimate.

    ``qs = beta q`` and ``k`` in the compute dtype, ``(..., L, d_head)``. The cancellation is largest at the
    most negative scores. For each leading index, take the query row of largest norm ``i*`` and the key row
    of largest norm ``j*`` (they define ``M``), the key most opposed to ``i*`` and the query most opposed to
    ``j*`` (masked rows excluded), build the features of those rows only, and compare ``phi_i . psi_j`` at
    the three pairs with ``p(s_ij)`` evaluated in float64 on the host. A relative deviation above ``factor``
    times the error budget the polynomial was chosen for (``choice.budget``, at least its approximation
    error) raises :class:`PolynomialFailure`. Cost ``O(L d + n k)``, one host read of ``3 n`` pairs
    (``n`` leading indices). This catches what the normaliser bound cannot: rounding garbage that is
    positive (e.g. ``p(-20)`` computed as 4442 in float32 by a degree-40 Taylor polynomial). On token
    shards it may be called per shard (a check of the shard's own extreme rows).
    """
    xp = backend.namespace(qs, k)
    d = qs.shape[-1]
    lead = qs.shape[:-2]
    q2, k2 = xp.reshape(qs, (-1,) + qs.shape[-2:]), xp.reshape(k, (-1,) + k.shape[-2:])
    if q2.shape[-2] == 0 or k2.shape[-2] == 0:
        return
    mq = mk = None
    if query_mask is not None:
        mq = xp.reshape(xp.broadcast_to(query_mask, lead + qs.shape[-2:-1]), q2.shape[:-1])
    if key_mask is not None:
        mk = xp.reshape(xp.broadcast_to(key_mask, lead + k.shape[-2:-1]), k2.shape[:-1])

    def masked(a, m, fill):
        return a if m is None else xp.where(m, a, fill)

    n = xp.arange(q2.shape[0])
    i_star = xp.argmax(masked(row_sums(q2 * q2)[..., 0], mq, -1.0), axis=-1)  # [n]
    j_star = xp.argmax(masked(row_sums(k2 * k2)[..., 0], mk, -1.0), axis=-1)
    j_opp = xp.argmin(masked((k2 @ _pick_rows(xp, q2, n, i_star)[:, :, None])[..., 0], mk, math.inf), axis=-1)
    i_opp = xp.argmin(masked((q2 @ _pick_rows(xp, k2, n, j_star)[:, :, None])[..., 0], mq, math.inf), axis=-1)
    rows = xp.concat([i_star, i_star, i_opp])
    cols = xp.concat([j_star, j_opp, j_star])
    nn = xp.concat([n, n, n])
    qa, ka = _pick_rows(xp, q2, nn, rows), _pick_rows(xp, k2, nn, cols)  # [3 n, d]
    # one row per leading axis: each row's features lie contiguous, so the sum below runs along memory
    fq = _Features(xp, d, choice, "query", qs.dtype)(qa[:, None, :])[:, 0, :]
    fk = _Features(xp, d, choice, "key", qs.dtype)(ka[:, None, :])[:, 0, :]
    got = xp.sum(fq * fk, axis=-1)
    s = xp.sum(qa * ka, axis=-1)
    if mq is not None or mk is not None:  # a leading index without a real query or key checks nothing
        ok = xp.ones(nn.shape, dtype=xp.bool)
        if mq is not None:
            ok = xp.logical_and(ok, _pick_rows(xp, mq, nn, rows))
        if mk is not None:
            ok = xp.logical_and(ok, _pick_rows(xp, mk, nn, cols))
        got, s = xp.where(ok, got, 1.0), xp.where(ok, s, 0.0)
        fix = backend.to_numpy(ok)
    got, s = backend.to_numpy(got).astype(np.float64), backend.to_numpy(s).astype(np.float64)
    want = evaluate(choice.coef, s)
    if mq is not None or mk is not None:
        got = np.where(fix, got, want)
    dev = float(np.max(np.abs(got - want) / np.abs(want))) if want.size else 0.0
    allowed = factor * max(choice.budget, choice.approx_error, 4 * float(xp.finfo(qs.dtype).eps))
    if not dev <= allowed:
        raise PolynomialFailure(
            f"the degree-{choice.degree} {choice.family} polynomial lost its accuracy to rounding in "
            f"{qs.dtype} on this input: phi(q) . psi(k) deviates from p(q . k) by {dev:.3g} (relative) at "
            f"the most negative scores (allowed {allowed:.3g}, bound M = {choice.bound:.3g}, "
            f"{fq.shape[-1]} features of {d} coordinates). Use a smaller bound (normalised inputs), float64, "
            f"or method='exact'"
        )


def check_normaliser_ratio(worst, choice: PolyChoice) -> None:
    """Raise :class:`PolynomialFailure` unless ``worst`` (the smallest ``D_i / (n_i p_min)``, a 0-d array or
    float) is finite and ``>= 0.5``. One host read."""
    worst = backend.to_float(worst) if hasattr(worst, "shape") else float(worst)
    if not worst >= 0.5:  # NaN fails too; inf (no row with a key) passes
        raise PolynomialFailure(
            f"the degree-{choice.degree} {choice.family} polynomial failed on this input: a softmax "
            f"normaliser is {worst:.3g} times its guaranteed lower bound (must be >= 0.5) for the score "
            f"bound M = {choice.bound:.3g}; rounding has swamped the approximation. Use a smaller bound "
            f"(normalised inputs), a float64 input, or method='exact'"
        )


def check_normaliser(den, lower, choice: PolyChoice) -> None:
    """Raise :class:`PolynomialFailure` unless every entry of ``den`` is finite and ``>= lower / 2``."""
    xp = backend.namespace(den)
    worst = xp.min(den / lower) if den.size else 1.0
    check_normaliser_ratio(worst, choice)


def _check_states(xp, q, k, beta, choice, dtype, query_mask, key_mask):
    lead, L = q.shape[:-2], q.shape[-2]
    query_mask = check_mask("query_mask", query_mask, lead, L)
    key_mask = check_mask("key_mask", key_mask, k.shape[:-2], k.shape[-2])
    check_extreme_pairs(beta * xp.astype(q, dtype, copy=False), xp.astype(k, dtype, copy=False), choice,
                        query_mask=query_mask, key_mask=key_mask)
    return query_mask, key_mask


def output(q, k, v, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False, key_mask=None,
           query_mask=None, budget: int = DEFAULT_BUDGET):
    """``O~ = U (Psi^T V)`` of shape ``(..., L, d_v)`` in ``q.dtype`` (passes 1 and 2). Cost ``O(L k d_v)``."""
    xp = backend.namespace(q, k, v)
    query_mask, key_mask = _check_states(xp, q, k, beta, choice, compute_dtype, query_mask, key_mask)
    keys = key_pass(k, v, choice, need=(), key_mask=key_mask, compute_dtype=compute_dtype, budget=budget)
    rows, state = query_pass(q, keys, beta, choice, query_mask=query_mask, softmax_one=softmax_one,
                             budget=budget)
    check_normaliser_ratio(state.worst, choice)
    return rows["o"]


def loss_and_grads(q, k, v, y, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False,
                   need=("q", "k", "v"), grad_output=None, key_mask=None, query_mask=None,
                   budget: int = DEFAULT_BUDGET):
    """Loss and the gradients with respect to ``Q``, ``K``, ``V`` by the three passes above (non-causal).

    Parameters
    ----------
    q, k : arrays of shape (..., L, d_head)
    v : array of shape (..., L, d_v)
    y : array of shape (..., L, d_v), or None with ``grad_output``
        Targets: ``G = O~ - y`` and the loss ``0.5 ||G||^2``.
    beta : float
    choice : PolyChoice
        The polynomial ``p ~ exp`` (:func:`gpulora.poly.coefficients.choose`).
    compute_dtype : dtype
        Dtype of the features, states and products; results come back in ``q.dtype``.
    softmax_one : bool
        Softmax_1: 1 joins every normaliser.
    need : iterable of {"q", "k", "v"}
        Gradients to compute; the states of the others are skipped.
    grad_output : array of shape (..., L, d_v), optional
        The upstream gradient ``dO`` in place of ``y``: the gradients are its vector-Jacobian product and
        the loss is None.
    key_mask, query_mask : bool arrays broadcastable to (..., L), optional
        True for real keys / query rows (see the module docstring, "Masks").
    budget : int
        Bytes for one block's arrays (:func:`block_rows`).

    Returns
    -------
    (loss, dq, dk, dv)
        ``loss`` a 0-d array (summed over leading axes) or None, each gradient shaped like its input or None.

    Raises
    ------
    PolynomialFailure
        From the run-time checks, before any gradient is returned.
    """
    if (y is None) == (grad_output is None):
        raise ValueError("pass exactly one of y (targets) and grad_output (upstream gradient)")
    xp = backend.namespace(q, k, v)
    need = set(need)
    query_mask, key_mask = _check_states(xp, q, k, beta, choice, compute_dtype, query_mask, key_mask)
    keys = key_pass(k, v, choice, need=need, key_mask=key_mask, compute_dtype=compute_dtype, budget=budget)
    rows, state = query_pass(q, keys, beta, choice, y=y, grad_output=grad_output, query_mask=query_mask,
                             softmax_one=softmax_one, need=need, budget=budget)
    check_normaliser_ratio(state.worst, choice)
    grads = {"dq": rows.get("dq")}
    if need & {"k", "v"}:
        grads.update(key_grad_pass(k, v, state, beta, choice, need=need, key_mask=key_mask, budget=budget))
    loss = None if state.loss is None else xp.astype(state.loss, q.dtype)
    return (loss,) + tuple(grads.get("d" + t) for t in "qkv")
