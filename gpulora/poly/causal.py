r"""The causal chained LoRA gradient of the polynomial method, in time almost linear in L.

Same contract as :mod:`gpulora.poly.chain`, with the mask ``j <= i`` (docs/math.md section 5). With
``phi_i = phi(beta q_i)``, ``psi_j = psi(k_j)`` (:mod:`gpulora.poly.features`, ``phi_i . psi_j = p(s_ij)``),
per leading index (batch, head):

    D_i  = phi_i . sum_{j<=i} psi_j   (+1 for Softmax_1),     u_i = phi_i / D_i,   F~_ij = u_i . psi_j  (j <= i)
    o~_i = u_i . sum_{j<=i} psi_j (x) v_j,                    g_i = o~_i - y_i (or dO_i),  r_i = g_i . o~_i
    dQ_i = beta [ (u_i (x) g_i) . sum_{j<=i} psi_j (x) v_j (x) k_j  -  r_i u_i . sum_{j<=i} psi_j (x) k_j ]
    dK_j = beta [ (psi_j (x) v_j) . sum_{i>=j} u_i (x) g_i (x) q_i  -  psi_j . sum_{i>=j} u_i (x) (r_i q_i) ]
    dV_j = psi_j . sum_{i>=j} u_i (x) g_i

which is the exact-gradient formula of docs/math.md section 2 with the causal ``F~ = rownormalise(mask *
p(S))`` in place of ``F``, to rounding, whatever the degree (tested against the dense formula).

**Chunks** (the chunked linear-attention pattern). The rows are cut into chunks of ``C``. Inside a chunk
the masked weights are formed densely, ``A = tril(Phi_c Psi_c^T)`` (``C x C``), and the section-2 formula is
applied to that block: ``F~_c = A / D``, ``P_c = F~_c * (G_c V_c^T - r)``, contributions ``F~_c V_c``,
``beta P_c K_c`` (to dQ), ``beta P_c^T Q_c`` (to dK), ``F~_c^T G_c`` (to dV). Between chunks the prefix
sums over keys, stacked as in :class:`gpulora.poly.chain.KeyState` (``[z | S_V | S_K | T_K]``), are carried
forward (:func:`forward_sweep`: ``D``, ``O~``, ``G``, ``r``, dQ and the in-chunk parts of dK, dV), and the
suffix sums over queries, stacked as in :class:`gpulora.poly.chain.QueryState` (``[R_G | R_Q | T_Q]``),
backward (:func:`backward_sweep`: the rest of dK, dV). A chunk only sees the states of the chunks strictly
before (after) it, so the two parts never overlap. Several chunks are processed at once as a *group*
(per-chunk states in one GEMM, then an exclusive cumulative sum over the group's chunks plus the carried
state), so the number of Python-level steps is ``L / (C m)`` rather than ``L / C``.

**Carried states (token shards).** :func:`forward_sweep` starts from an optional ``prefix`` key state (the
sum over every key before this shard: :func:`gpulora.poly.chain.key_pass` of the earlier shards, added) and
returns the state after its last key; :func:`backward_sweep` starts from an optional ``suffix`` query state
(the sums over every later query) and returns the state before its first query (its own sums plus the
suffix, with the loss and the normaliser ratio). A shard that runs its backward sweep without the suffix
gets the rest of its dK, dV from :func:`gpulora.poly.chain.key_grad_pass` with the suffix afterwards
(the suffix's queries attend to every key of the shard: the non-causal formula).

**Masks.** ``key_mask`` / ``query_mask`` as in :mod:`gpulora.poly.chain`: masked keys contribute nothing,
padded query rows get zero output and gradient; a row with no real key ``j <= i`` gets zero output.

**Chunk size rule.** Per row, the in-chunk work costs about ``C (k + 3 d_v + 2 d_head)`` and the state
work ``4 k d_v d_head``; ``C`` is the power of two nearest ``k d_v d_head / (k + d_v + d_head)`` (so the
in-chunk part stays a fraction of the state part), clipped to ``[16, 512]`` and to ``L``. The group size
``m`` is the largest keeping ``batch H m max(k d_v d_head, C d_v d_head, C k, C^2)`` within
:data:`BLOCK_ELEMENTS` (at least one chunk).

**Cost** ``O(batch H L k d_v d_head + batch H L C (k + d_v + d_head))`` time;
``O(batch H L (d_head + d_v) + batch H m (C k + k d_v d_head + C^2))`` memory: the features are built per
group in each sweep (the backward sweep rebuilds them), only ``D``, ``G``, ``r`` and the gradient rows are
kept per row; never an ``L x L`` or ``L x k`` array.

**Run-time checks.** :func:`gpulora.poly.chain.check_extreme_pairs` measures the rounding of the features
at the most negative scores, as in the non-causal chain. Row ``i`` sums ``n_i`` real keys (``i + 1``
without a mask, plus the prefix's), so ``D_i >= n_i p_min`` with ``p_min`` the minimum of ``p`` on
``[-M, M]``; the smallest ratio is accumulated on the device in the forward sweep and
:func:`gpulora.poly.chain.check_normaliser_ratio` raises :class:`~gpulora.poly.chain.PolynomialFailure`
before any gradient is returned (one host read).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .. import backend
from .chain import (KeyState, PolynomialFailure, QueryState, _Columns, _Features, _grid, check_extreme_pairs,
                    check_mask, check_normaliser_ratio, key_rhs, query_rhs)
from .coefficients import PolyChoice
from .monomials import monomial_table
from .products import kron_apply, row_sums

__all__ = ["BLOCK_ELEMENTS", "CausalForward", "PolynomialFailure", "backward_sweep", "chunk_size",
           "chunked_loss_and_grads", "chunked_output", "forward_sweep", "loss_and_grads", "output", "peak_bytes"]

BLOCK_ELEMENTS = 1 << 17  # 1 MiB of float64 per temporary: cache-sized groups measured fastest
MIN_CHUNK, MAX_CHUNK = 16, 512


def chunk_size(L: int, k: int, d_head: int, d_v: int) -> int:
    """The default chunk size ``C`` (see the module docstring): ``k d_v d_head / (k + d_v + d_head)``
    rounded to a power of two, clipped to ``[16, 512]`` and to ``L``."""
    balance = k * d_v * d_head / (k + d_v + d_head)
    c = 2 ** round(math.log2(max(balance, 1.0)))
    return max(1, min(L, max(MIN_CHUNK, min(MAX_CHUNK, c))))


def _group_size(lead: int, n_chunks: int, c: int, k: int, d_head: int, d_v: int) -> int:
    per_chunk = lead * max(k * d_v * d_head, c * d_v * d_head, c * k, c * c)
    return max(1, min(n_chunks, BLOCK_ELEMENTS // per_chunk))


def peak_bytes(lead: int, L: int, k: int, d_head: int, d_v: int, itemsize: int) -> int:
    """Estimated peak memory of :func:`loss_and_grads`: the per-row arrays kept between the sweeps (padded
    inputs, ``G``, ``r``, ``D``, output, gradients, key counts) and one group's features, states and
    in-chunk blocks (:func:`chunk_size`, :data:`BLOCK_ELEMENTS`). Never ``L k``."""
    c = chunk_size(L, k, d_head, d_v)
    m = _group_size(lead, -(-L // c), c, k, d_head, d_v)
    width = (1 + d_v) * (1 + d_head)
    group = lead * m * (4 * c * k + 3 * k * width + 3 * c * c + 4 * c * width)
    return itemsize * (group + lead * (L + c) * (4 * d_head + 5 * d_v + 4))


def _exclusive(xp, carry, parts, reverse=False):
    """States before each chunk of a group, and the carry past the group.

    ``parts (B, m, ...)`` are per-chunk sums, ``carry (B, ...)`` the state carried from the previous groups.
    ``reverse`` sums the later chunks instead (suffix states). Returns ``(states (B, m, ...), new carry)``.
    """
    if reverse:
        parts = xp.flip(parts, axis=1)
    total = xp.cumulative_sum(parts, axis=1)
    states = xp.concat([xp.zeros_like(parts[:, :1, ...]), total[:, :-1, ...]], axis=1) + carry[:, None, ...]
    return (xp.flip(states, axis=1) if reverse else states), carry + total[:, -1, ...]


class _Layout:
    """The chunked layout of one call: ``(B, n, C, d)`` views of zero-padded rows, masks with the padding."""

    def __init__(self, xp, q, k, v, choice: PolyChoice, dtype, chunk, group, key_mask, query_mask):
        self.xp, self.dtype, self.choice = xp, dtype, choice
        self.lead = q.shape[:-2]
        L, d_head, d_v = q.shape[-2], q.shape[-1], v.shape[-1]
        B = math.prod(self.lead)
        nk = monomial_table(d_head, choice.degree).k
        c = chunk_size(L, nk, d_head, d_v) if chunk is None else max(1, int(chunk))
        n = -(-L // c)
        m = _group_size(B, n, c, nk, d_head, d_v) if group is None else max(1, min(n, int(group)))
        self.L, self.C, self.n, self.m, self.B, self.k = L, c, n, m, B, nk
        self.d_head, self.d_v = d_head, d_v
        self.q, self.k_, self.v = self.padded(q), self.padded(k), self.padded(v)
        rows = xp.reshape(xp.arange(n * c), (n, c, 1)) < L  # [n, C, 1]
        self.key_real = self._mask(key_mask, rows)  # [B, n, C, 1] bool
        self.query_real = self._mask(query_mask, rows)
        self.tril = xp.arange(c)[:, None] >= xp.arange(c)[None, :]  # [C, C]

    def padded(self, a):
        """``lead + (L, d)`` to ``(B, n, C, d)`` in the compute dtype, zero rows past ``L``."""
        xp = self.xp
        lp = self.n * self.C
        a = xp.reshape(xp.astype(a, self.dtype, copy=False), (self.B, self.L, a.shape[-1]))
        if lp > self.L:
            a = xp.concat([a, xp.zeros((self.B, lp - self.L, a.shape[-1]), dtype=self.dtype)], axis=1)
        return xp.reshape(a, (self.B, self.n, self.C, a.shape[-1]))

    def _mask(self, mask, rows):
        xp = self.xp
        if mask is None:
            return xp.broadcast_to(rows, (self.B,) + rows.shape)
        m = xp.reshape(xp.broadcast_to(mask, self.lead + (self.L,)), (self.B, self.L, 1))
        return xp.logical_and(self.padded_bool(m), rows)

    def padded_bool(self, m):
        xp = self.xp
        lp = self.n * self.C
        if lp > self.L:
            m = xp.concat([m, xp.zeros((self.B, lp - self.L, 1), dtype=xp.bool)], axis=1)
        return xp.reshape(m, (self.B, self.n, self.C, 1))

    def groups(self, reverse=False):
        starts = range(0, self.n, self.m)
        for c0 in (reversed(starts) if reverse else starts):
            yield c0, min(self.n, c0 + self.m)

    def unpad(self, a, dtype):
        """``(B, n, C, d)`` back to ``lead + (L, d)`` in ``dtype``."""
        xp = self.xp
        a = xp.reshape(a, (self.B, self.n * self.C, a.shape[-1]))[:, : self.L, ...]
        return xp.astype(xp.reshape(a, self.lead + (self.L, a.shape[-1])), dtype, copy=False)

    def lead_state(self, data):
        """``(B, ...)`` states back to ``lead + (...)``."""
        return self.xp.reshape(data, self.lead + data.shape[1:])

    def flat_state(self, data):
        return self.xp.reshape(data, (self.B,) + data.shape[len(self.lead):])


@dataclasses.dataclass(frozen=True)
class CausalForward:
    """What :func:`forward_sweep` returns: rows in the chunked layout, and the carried key state.

    Attributes
    ----------
    o, dq, dk, dv : arrays of shape (B, n, C, d) or None
        Output; complete ``dQ``; the in-chunk parts of ``dK``, ``dV`` (the backward sweep adds the rest).
        None where not computed (``dq``, ``dk``, ``dv`` need ``G`` and the target in ``need``).
    g, r, den : arrays of shape (B, n, C, d_v), (B, n, C, 1), (B, n, C, 1) or None
        ``G``, ``r`` and the normaliser (with the Softmax_1 one; 1 where no key) the backward sweep needs.
    keys : KeyState
        The prefix state plus this shard's keys: the ``prefix`` of the next shard.
    loss, worst : 0-d float64 arrays
        Loss of this shard's rows (None without targets); smallest normaliser ratio (see ``QueryState``).
    """

    o: Any
    dq: Any
    dk: Any
    dv: Any
    g: Any
    r: Any
    den: Any
    keys: KeyState
    loss: Any
    worst: Any


def forward_sweep(lay: _Layout, beta, choice: PolyChoice, *, target=None, mode=None, prefix: KeyState = None,
                  softmax_one=False, need=()) -> CausalForward:
    """The forward sweep over the groups of ``lay`` (see the module docstring), from the carried ``prefix``.

    ``mode`` is ``"y"`` (``target`` holds targets ``(B, n, C, d_v)``), ``"grad_output"`` (``target`` is
    ``dO``), or None (output only).
    """
    xp, dtype = lay.xp, lay.dtype
    B, n, C, d_v, d_head = lay.B, lay.n, lay.C, lay.d_v, lay.d_head
    need = set(need) if mode is not None else set()
    with_k = "q" in need
    fq = _Features(xp, d_head, choice, "query", dtype)
    fk = _Features(xp, d_head, choice, "key", dtype)
    width = KeyState.width(d_v, d_head, with_k)
    if prefix is None:
        carry = xp.zeros((B, lay.k, width), dtype=dtype)
        count0 = xp.zeros((B,), dtype=xp.float64)
    else:
        if (prefix.d_v, prefix.d_head) != (d_v, d_head):
            raise ValueError("the prefix key state does not match these inputs")
        carry = lay.flat_state(prefix.stacked(with_k))
        count0 = xp.reshape(xp.broadcast_to(prefix.count, lay.lead), (B,))
    # [B, n, C, 1]: real keys j <= i of each row, the prefix's included (float64: exact counts)
    n_keys = xp.reshape(count0[:, None, ...] + xp.cumulative_sum(
        xp.reshape(xp.astype(lay.key_real, xp.float64), (B, n * C)), axis=1), (B, n, C, 1))
    shape = (B, n, C)
    o_all = backend.empty(shape + (d_v,), dtype, xp)
    grad = mode is not None
    saved = {name: backend.empty(shape + (w,), dtype, xp) for name, w in (("g", d_v), ("r", 1), ("den", 1))} \
        if grad else {}
    width_of = {"q": d_head, "k": d_head, "v": d_v}
    parts_out = {t: backend.empty(shape + (width_of[t],), dtype, xp) for t in need}
    loss = xp.zeros((), dtype=xp.float64) if mode == "y" else None
    worst = xp.asarray(math.inf, dtype=xp.float64)
    cols = [_Columns(xp) for _ in range(3)]
    for c0, c1 in lay.groups():
        qb, kb, vb = lay.q[:, c0:c1, ...], lay.k_[:, c0:c1, ...], lay.v[:, c0:c1, ...]
        kr, qr = lay.key_real[:, c0:c1, ...], lay.query_real[:, c0:c1, ...]
        phi = fq(beta * qb)  # [B, m, C, k]
        psi = xp.where(kr, fk(kb), 0.0)
        a = xp.where(lay.tril, phi @ psi.mT, 0.0)  # [B, m, C, C]: in-chunk weights, masked to j <= i
        states, carry = _exclusive(xp, carry, psi.mT @ key_rhs(xp, vb, kb, with_k, cols[:2]))  # [B, m, k, W]
        x = _grid(phi @ states, 1 + d_v, xp)  # [B, m, C, 1 + d_v, 1 + d_head]: [[D, U S_K], [O~, U T_K]] * D
        raw = x[..., 0, 0:1] + row_sums(a, xp)
        nk = n_keys[:, c0:c1, ...]
        real = xp.logical_and(qr, nk > 0)
        ratio = xp.where(real, xp.astype(raw, xp.float64) / xp.where(nk > 0, nk * choice.min_value, 1.0),
                         math.inf)
        worst = xp.minimum(worst, xp.min(ratio))
        den = raw + 1.0 if softmax_one else raw
        den = xp.where(den == 0, 1.0, den)  # no key (or padding): zero output, never 0 / 0
        f = a / den  # [B, m, C, C]: the block of F~
        o = xp.where(qr, x[..., 1:, 0] / den + f @ vb, 0.0)
        o_all[:, c0:c1, ...] = o
        if not grad:
            continue
        g = target[:, c0:c1, ...]
        if mode == "y":
            g = o - g
        g = xp.where(qr, g, 0.0)
        if loss is not None:
            loss = loss + 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
        r = row_sums(g * o, xp)  # [B, m, C, 1]
        saved["g"][:, c0:c1, ...], saved["r"][:, c0:c1, ...], saved["den"][:, c0:c1, ...] = g, r, den
        if need & {"q", "k"}:
            p = f * (g @ vb.mT - r)  # [B, m, C, C]: dloss/dS on the block
        if "q" in need:
            parts_out["q"][:, c0:c1, ...] = beta * (kron_apply(x[..., 1:], cols[2](-r, g), xp) / den + p @ kb)
        if "k" in need:
            parts_out["k"][:, c0:c1, ...] = beta * (p.mT @ qb)
        if "v" in need:
            parts_out["v"][:, c0:c1, ...] = f.mT @ g
    total = n_keys[:, -1, -1, 0]
    keys = KeyState(xp.reshape(total, lay.lead), lay.lead_state(carry), d_v, d_head, with_k)
    return CausalForward(o_all, parts_out.get("q"), parts_out.get("k"), parts_out.get("v"), saved.get("g"),
                         saved.get("r"), saved.get("den"), keys, loss, worst)


def backward_sweep(lay: _Layout, fwd: CausalForward, beta, choice: PolyChoice, *, suffix: QueryState = None,
                   need=("k", "v")):
    """The backward sweep: adds the suffix-state parts of dK, dV into ``fwd.dk``, ``fwd.dv`` (in place) and
    returns the :class:`QueryState` before the first row (this shard's sums plus ``suffix``, with the loss
    and normaliser ratio of both)."""
    xp, dtype = lay.xp, lay.dtype
    B, d_v, d_head = lay.B, lay.d_v, lay.d_head
    need = set(need) & {"k", "v"}
    with_k = "k" in need
    width = QueryState.width(d_v, d_head, with_k)
    fq = _Features(xp, d_head, choice, "query", dtype)
    fk = _Features(xp, d_head, choice, "key", dtype)
    if suffix is None:
        carry = xp.zeros((B, lay.k, width), dtype=dtype)
        loss, worst = fwd.loss, fwd.worst
    else:
        if (suffix.d_v, suffix.d_head) != (d_v, d_head):
            raise ValueError("the suffix query state does not match these inputs")
        carry = lay.flat_state(suffix.stacked(with_k))
        loss = None if fwd.loss is None else fwd.loss + suffix.loss
        worst = xp.minimum(fwd.worst, suffix.worst)
    rows = 1 + d_v if with_k else d_v
    cols = [_Columns(xp) for _ in range(3)]
    for c0, c1 in lay.groups(reverse=True):
        qb, kb, vb = lay.q[:, c0:c1, ...], lay.k_[:, c0:c1, ...], lay.v[:, c0:c1, ...]
        g, r = fwd.g[:, c0:c1, ...], fwd.r[:, c0:c1, ...]
        u = fq(beta * qb) / fwd.den[:, c0:c1, ...]
        psi = xp.where(lay.key_real[:, c0:c1, ...], fk(kb), 0.0)
        states, carry = _exclusive(xp, carry, u.mT @ query_rhs(xp, g, r, qb, with_k, cols[:2]), reverse=True)  # [B, m, k, W]
        x = _grid(psi @ states, rows, xp)  # [B, m, C, rows, cols]
        if "v" in need:
            fwd.dv[:, c0:c1, ...] += x[..., 1:, 0] if with_k else x[..., 0]
        if "k" in need:
            fwd.dk[:, c0:c1, ...] += beta * kron_apply(x[..., 1:], cols[2](-1.0, vb), xp)
    return QueryState(lay.lead_state(carry), loss, worst, d_v, d_head, with_k)


def _layout(q, k, v, beta, choice, compute_dtype, chunk, group, key_mask, query_mask):
    xp = backend.namespace(q, k, v)
    lead, L = q.shape[:-2], q.shape[-2]
    query_mask = check_mask("query_mask", query_mask, lead, L)
    key_mask = check_mask("key_mask", key_mask, lead, L)
    check_extreme_pairs(beta * xp.astype(q, compute_dtype, copy=False), xp.astype(k, compute_dtype, copy=False),
                        choice, query_mask=query_mask, key_mask=key_mask)
    return _Layout(xp, q, k, v, choice, compute_dtype, chunk, group, key_mask, query_mask)


def chunked_output(q, k, v, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False, chunk=None,
                   group=None, key_mask=None, query_mask=None, prefix: KeyState = None):
    """:func:`output` with the chunk size ``C`` and the group size ``m`` (chunks per step) forced, masks,
    and an optional carried ``prefix`` key state (see the module docstring)."""
    lay = _layout(q, k, v, beta, choice, compute_dtype, chunk, group, key_mask, query_mask)
    fwd = forward_sweep(lay, beta, choice, prefix=prefix, softmax_one=softmax_one)
    check_normaliser_ratio(fwd.worst, choice)
    return lay.unpad(fwd.o, q.dtype)


def chunked_loss_and_grads(q, k, v, y, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False,
                           need=("q", "k", "v"), chunk=None, group=None, grad_output=None, key_mask=None,
                           query_mask=None, prefix: KeyState = None, suffix: QueryState = None,
                           return_states=False):
    """:func:`loss_and_grads` with the chunk size ``C`` and the group size ``m`` (chunks per step) forced,
    and the carried states of a token shard: ``prefix`` (sum over earlier keys) and ``suffix`` (sums over
    later queries). ``return_states`` appends ``(keys, queries)``: the key state after the last row (the next
    shard's prefix) and the query state before the first row (the previous shard's suffix; None unless dK
    or dV is needed)."""
    if (y is None) == (grad_output is None):
        raise ValueError("pass exactly one of y (targets) and grad_output (upstream gradient)")
    need = set(need)
    lay = _layout(q, k, v, beta, choice, compute_dtype, chunk, group, key_mask, query_mask)
    mode, target = ("y", y) if y is not None else ("grad_output", grad_output)
    fwd = forward_sweep(lay, beta, choice, target=lay.padded(target), mode=mode, prefix=prefix,
                        softmax_one=softmax_one, need=need)
    check_normaliser_ratio(fwd.worst, choice)
    queries = None
    if need & {"k", "v"}:
        queries = backward_sweep(lay, fwd, beta, choice, suffix=suffix, need=need)
    grads = {"q": fwd.dq, "k": fwd.dk, "v": fwd.dv}
    loss = None if fwd.loss is None else lay.xp.astype(fwd.loss, q.dtype)
    out = (loss,) + tuple(lay.unpad(grads[t], q.dtype) if t in need else None for t in "qkv")
    return out + ((fwd.keys, queries),) if return_states else out


def output(q, k, v, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False, key_mask=None,
           query_mask=None):
    """Causal ``O~`` of shape ``(..., L, d_v)`` in ``q.dtype``; row ``i`` attends to keys ``j <= i``.

    Parameters and returns as :func:`gpulora.poly.chain.output`. Cost ``O(L k d_v + L C k)`` per leading
    index; raises :class:`PolynomialFailure` when a normaliser falls below ``n_i p_min / 2``.
    """
    return chunked_output(q, k, v, beta, choice, compute_dtype, softmax_one=softmax_one, key_mask=key_mask,
                          query_mask=query_mask)


def loss_and_grads(q, k, v, y, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False,
                   need=("q", "k", "v"), grad_output=None, key_mask=None, query_mask=None):
    """Causal loss and gradients with respect to ``Q``, ``K``, ``V`` by the chunked chain above.

    Parameters and returns as :func:`gpulora.poly.chain.loss_and_grads` (``y`` or ``grad_output``, masks;
    the chunking replaces ``budget``). Cost ``O(L k d_v d_head + L C (k + d_v + d_head))`` time per leading
    index, memory linear in ``L`` and free of ``L k`` (:func:`peak_bytes`).

    Raises
    ------
    PolynomialFailure
        When a normaliser ``D_i`` is not finite or below ``n_i p_min / 2``, or the features' rounding is
        past the estimate.
    """
    return chunked_loss_and_grads(q, k, v, y, beta, choice, compute_dtype, softmax_one=softmax_one, need=need,
                                  grad_output=grad_output, key_mask=key_mask, query_mask=query_mask)
