r"""Exact attention loss and gradients, blocked so that memory stays linear in L.

For every leading index (batch, head) with ``Q (L, d_head)``, ``K (L, d_head)``, ``V (L, d_v)``, ``Y (L, d_v)``
(SPEC section 2, row convention):

    S = beta Q K^T,  F = rowsoftmax(S),  O = F V,  G = O - Y,  loss = 0.5 ||G||_F^2
    r = rowsum(G * O),  P = F * (G V^T - r 1^T)          (P = dloss/dS)
    dQ = beta P K,  dK = beta P^T Q,  dV = F^T G

Causal: entries ``j > i`` of ``S`` are ``-inf``. Softmax_1 adds a virtual key with score 0 and value 0 to
every row (``F = e^S / (1 + rowsum e^S)``); its Jacobian has the same form, so ``P`` is unchanged.

**Blocking** (the FlashAttention backward pattern). Query rows are processed in blocks of ``block_q``.
When a whole key row fits (``block_k = L``), one pass per query block computes ``F`` (max-subtracted),
``O``, ``G``, ``r``, and the block's contributions to ``dQ``, ``dK``, ``dV``. Otherwise keys come in blocks
of ``block_k``: a first sweep computes ``O`` and the row log-sum-exp with the online softmax, a second
recomputes ``F = exp(S - m) / l`` block by block. The largest temporary is ``batch * H * block_q * block_k``
elements (at most :data:`BLOCK_ELEMENTS`), never ``L x L``.

**Per block** six products (``beta Q K^T``, ``E V``; ``E^T G'``, ``G' V^T``, ``P K``, ``P^T (beta Q)``) and
six elementwise passes, all in place in two buffers: max, subtract, exp, sum over ``E = exp(S - m)``; then
``P = E * (G' V^T - r')`` with ``G' = G / l`` and ``r' = r / l``, so the normalisation ``1 / l`` costs
``O(L d)`` instead of a pass over the block. On the CPU the two products of inner dimension ``d``
(``Q K^T``, ``G' V^T``) take about half the time: they write a block element per ``2 d`` flops.

**Cost** ``O(batch H L^2 (d_head + d_v))`` time (about ``L^2 (6 d_head + 6 d_v)`` flops per head with all
targets; causal about half), ``O(batch H L (d_head + d_v) + BLOCK_ELEMENTS)`` memory.

**Precision**: every product runs in the input dtype (BLAS/cuBLAS accumulation in that dtype); the loss is
reduced in float64.
"""

from __future__ import annotations

import math

from .. import backend

__all__ = ["BLOCK_ELEMENTS", "GPU_BLOCK_ELEMENTS", "attention_output", "block_sizes", "loss_and_grads", "scores"]

# Elements of one [lead, block_q, block_k] temporary (two such buffers are live per block: weights and P).
# Measured on the 2-core machine, 12 heads of d_head 32, L 512..2048, float32: with one BLAS thread 2^18
# (cache-sized) was ~20 % faster than 2^22, but with two threads on a busy machine small blocks cost far
# more (each of the ~6 lead * blocks GEMM calls pays the thread hand-off), so blocks stay large: 2^22.
BLOCK_ELEMENTS = 1 << 22
# On a GPU the blocks are as large as memory comfortably allows: every block costs ~20 kernel launches, and
# 2^26 elements (256 MiB in float32 per buffer) keeps launches a small part of the time.
GPU_BLOCK_ELEMENTS = 1 << 26
MIN_ROWS = 64  # a whole key row per block (no recomputation) while at least this many query rows fit


def block_sizes(lead: int, L: int, block_q=None, block_k=None, *, elements=None) -> tuple[int, int]:
    """Query and key block sizes keeping ``lead * block_q * block_k <= elements`` (unless forced);
    ``elements`` defaults to :data:`BLOCK_ELEMENTS`."""
    lead = max(lead, 1)
    elements = BLOCK_ELEMENTS if elements is None else elements
    if block_k is None:
        single = lead * L * min(L, MIN_ROWS) <= elements
        block_k = L if single else max(64, math.isqrt(elements // lead))
    block_k = max(1, min(int(block_k), L))
    if block_q is None:
        block_q = elements // (lead * block_k)
    return max(1, min(int(block_q), L)), block_k


def _elements(q) -> int:
    """Block size in elements for the arrays of ``q``'s library: cache-sized on the CPU, large on a GPU."""
    return GPU_BLOCK_ELEMENTS if backend.is_cupy(q) else BLOCK_ELEMENTS


def scores(xp, qb, kb, beta, i0, j0, causal, fill=-math.inf):
    """Scores ``beta qb kb^T`` of the query rows from ``i0`` and key rows from ``j0``, shape ``[lead, bq, bk]``;
    with ``causal``, entries ``j > i`` are ``fill``. ``beta = 1`` for rows already scaled (no extra pass)."""
    s = qb @ kb.mT
    if beta != 1:
        s *= beta
    if causal:
        i = xp.arange(i0, i0 + qb.shape[-2])[:, None]
        j = xp.arange(j0, j0 + kb.shape[-2])[None, :]
        s = xp.where(j > i, fill, s)
    return s


def _weights(xp, s, m):
    """``exp(s - m)`` computed in the buffer of ``s`` (which it consumes): two passes, no temporary."""
    s -= m
    return backend.exp_inplace(xp, s)


def _forward_rows(xp, qs, k, v, i0, kv_end, block_k, causal, softmax_one):
    """Softmax statistics and output of the query block ``qs`` (rows already scaled by ``beta``).

    Returns ``(o, m, l, e)``: the output ``o = F V``, the row shift ``m`` and normaliser ``l`` with
    ``F = exp(S - m) / l``, and (single key block only, else ``None``) the unnormalised weights
    ``e = exp(S - m)``, which the backward pass reuses. Work per block: one ``qs K^T`` and one ``e V``
    product and four passes over the ``[lead, bq, bk]`` block (max, subtract, exp, sum), in place.
    """
    if kv_end <= block_k:
        s = scores(xp, qs, k[..., :kv_end, :], 1, i0, 0, causal)
        m = xp.max(s, axis=-1, keepdims=True)
        if softmax_one:
            m = xp.maximum(m, 0.0)
        e = _weights(xp, s, m)
        l = xp.sum(e, axis=-1, keepdims=True)
        if softmax_one:
            l = l + xp.exp(-m)
        o = e @ v[..., :kv_end, :]
        o /= l
        return o, m, l, e
    lead, bq = qs.shape[:-2], qs.shape[-2]
    # online softmax; Softmax_1 starts from its virtual key (score 0, value 0)
    m = xp.full(lead + (bq, 1), 0.0 if softmax_one else -math.inf, dtype=qs.dtype)
    l = xp.full(lead + (bq, 1), 1.0 if softmax_one else 0.0, dtype=qs.dtype)
    o = xp.zeros(lead + (bq, v.shape[-1]), dtype=qs.dtype)
    for j0 in range(0, kv_end, block_k):
        j1 = min(kv_end, j0 + block_k)
        s = scores(xp, qs, k[..., j0:j1, :], 1, i0, j0, causal)
        m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
        e = _weights(xp, s, m_new)
        rescale = xp.exp(m - m_new)
        l = l * rescale + xp.sum(e, axis=-1, keepdims=True)
        o = o * rescale + e @ v[..., j0:j1, :]
        m = m_new
    o /= l
    return o, m, l, None


def _kv_end(L, i1, causal):
    return min(L, i1) if causal else L


def attention_output(q, k, v, beta, *, causal=False, softmax_one=False, block_q=None, block_k=None):
    """``O = softmax(beta Q K^T) V`` of shape ``(..., L, d_v)``, blocked like :func:`loss_and_grads`."""
    xp = backend.namespace(q, k, v)
    L = q.shape[-2]
    bq, bk = block_sizes(math.prod(q.shape[:-2]), L, block_q, block_k, elements=_elements(q))
    out = backend.empty(q.shape[:-1] + (v.shape[-1],), q.dtype, xp)
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        o, _, _, _ = _forward_rows(xp, beta * q[..., i0:i1, :], k, v, i0, _kv_end(L, i1, causal), bk, causal,
                                   softmax_one)
        out[..., i0:i1, :] = o
    return out


def loss_and_grads(q, k, v, y, beta, *, causal=False, softmax_one=False, need=("q", "k", "v"),
                   block_q=None, block_k=None):
    """Exact loss and the gradients with respect to ``Q``, ``K``, ``V`` that ``need`` asks for.

    Parameters
    ----------
    q, k : arrays of shape (..., L, d_head)
    v, y : arrays of shape (..., L, d_v)
        Same namespace and dtype; leading axes (batch, heads) are independent problems.
    beta : float
    causal, softmax_one : bool
    need : iterable of {"q", "k", "v"}
        Gradients to compute; an empty ``need`` gives the loss alone.
    block_q, block_k : int, optional
        Force block sizes (tests); by default chosen by :func:`block_sizes`.

    Returns
    -------
    (loss, dq, dk, dv)
        ``loss`` a 0-d array of ``q.dtype`` (summed over leading axes); each gradient shaped like its
        input, or ``None`` when not needed.
    """
    xp = backend.namespace(q, k, v, y)
    need = set(need)
    L = q.shape[-2]
    bq, bk = block_sizes(math.prod(q.shape[:-2]), L, block_q, block_k, elements=_elements(q))
    dq = backend.empty(q.shape, q.dtype, xp) if "q" in need else None
    dk = xp.zeros(k.shape, dtype=k.dtype) if "k" in need else None
    dv = xp.zeros(v.shape, dtype=v.dtype) if "v" in need else None
    loss = xp.zeros((), dtype=xp.float64)
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        qs = beta * q[..., i0:i1, :]  # dK = beta P^T Q = P^T (beta Q)
        kv_end = _kv_end(L, i1, causal)
        o, m, l, e = _forward_rows(xp, qs, k, v, i0, kv_end, bk, causal, softmax_one)
        g = o - y[..., i0:i1, :]
        loss = loss + 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
        if not need:
            continue
        # F = e / l row by row: fold 1 / l into the (bq, d_v) factors instead of the (bq, bk) weights
        gl = g / l
        rl = xp.sum(gl * o, axis=-1, keepdims=True)
        dqb = xp.zeros(qs.shape, dtype=q.dtype) if dq is not None else None
        for j0 in range(0, kv_end, bk):
            j1 = min(kv_end, j0 + bk)
            kb, vb = k[..., j0:j1, :], v[..., j0:j1, :]
            w = e if e is not None else _weights(xp, scores(xp, qs, kb, 1, i0, j0, causal), m)
            if dv is not None:
                dv[..., j0:j1, :] += w.mT @ gl
            if dq is None and dk is None:
                continue
            # [lead, bq, bk]: P = dloss/dS = F * (G V^T - r) = e * (G V^T - r) / l, in one buffer
            p = gl @ vb.mT
            p -= rl
            p *= w
            if dqb is not None:
                dqb += p @ kb
            if dk is not None:
                dk[..., j0:j1, :] += p.mT @ qs
        if dq is not None:
            dqb *= beta
            dq[..., i0:i1, :] = dqb
    return xp.astype(loss, q.dtype), dq, dk, dv
