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
recomputes ``F = exp(S - lse)`` block by block. The largest temporary is ``batch * H * block_q * block_k``
elements (at most :data:`BLOCK_ELEMENTS`), never ``L x L``.

**Cost** ``O(batch H L^2 (d_head + d_v))`` time (about ``L^2 (6 d_head + 6 d_v)`` flops per head with all
targets; causal about half), ``O(batch H L (d_head + d_v) + BLOCK_ELEMENTS)`` memory.

**Precision**: every product runs in the input dtype (BLAS/cuBLAS accumulation in that dtype); the loss is
reduced in float64.
"""

from __future__ import annotations

import math

from .. import backend

__all__ = ["BLOCK_ELEMENTS", "attention_output", "block_sizes", "loss_and_grads", "query_rows_loss_and_grads",
           "scores"]

BLOCK_ELEMENTS = 1 << 22


def block_sizes(lead: int, L: int, block_q=None, block_k=None) -> tuple[int, int]:
    """Query and key block sizes keeping ``lead * block_q * block_k <= BLOCK_ELEMENTS`` (unless forced)."""
    lead = max(lead, 1)
    if block_k is None:
        single = lead * L * min(L, 64) <= BLOCK_ELEMENTS
        block_k = L if single else max(64, math.isqrt(BLOCK_ELEMENTS // lead))
    block_k = max(1, min(int(block_k), L))
    if block_q is None:
        block_q = BLOCK_ELEMENTS // (lead * block_k)
    return max(1, min(int(block_q), L)), block_k


def scores(xp, qb, kb, beta, i0, j0, causal, fill=-math.inf):
    """Scores ``beta qb kb^T`` of the query rows from ``i0`` and key rows from ``j0``, shape ``[lead, bq, bk]``;
    with ``causal``, entries ``j > i`` are ``fill``."""
    s = beta * (qb @ kb.mT)
    if causal:
        i = xp.arange(i0, i0 + qb.shape[-2])[:, None]
        j = xp.arange(j0, j0 + kb.shape[-2])[None, :]
        s = xp.where(j > i, fill, s)
    return s


def _forward_rows(xp, qb, k, v, beta, i0, kv_end, block_k, causal, softmax_one):
    """Output, row log-sum-exp and (single key block only) the weights ``F`` of one query block."""
    if kv_end <= block_k:
        s = scores(xp, qb, k[..., :kv_end, :], beta, i0, 0, causal)
        m = xp.max(s, axis=-1, keepdims=True)
        if softmax_one:
            m = xp.maximum(m, 0.0)
        e = xp.exp(s - m)
        l = xp.sum(e, axis=-1, keepdims=True)
        if softmax_one:
            l = l + xp.exp(-m)
        f = e / l
        return f @ v[..., :kv_end, :], m + xp.log(l), f
    lead, bq = qb.shape[:-2], qb.shape[-2]
    # online softmax; Softmax_1 starts from its virtual key (score 0, value 0)
    m = xp.full(lead + (bq, 1), 0.0 if softmax_one else -math.inf, dtype=qb.dtype)
    l = xp.full(lead + (bq, 1), 1.0 if softmax_one else 0.0, dtype=qb.dtype)
    o = xp.zeros(lead + (bq, v.shape[-1]), dtype=qb.dtype)
    for j0 in range(0, kv_end, block_k):
        j1 = min(kv_end, j0 + block_k)
        s = scores(xp, qb, k[..., j0:j1, :], beta, i0, j0, causal)
        m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
        e = xp.exp(s - m_new)
        rescale = xp.exp(m - m_new)
        l = l * rescale + xp.sum(e, axis=-1, keepdims=True)
        o = o * rescale + e @ v[..., j0:j1, :]
        m = m_new
    return o / l, m + xp.log(l), None


def _kv_end(L, i1, causal):
    return min(L, i1) if causal else L


def attention_output(q, k, v, beta, *, causal=False, softmax_one=False, block_q=None, block_k=None):
    """``O = softmax(beta Q K^T) V`` of shape ``(..., L, d_v)``, blocked like :func:`loss_and_grads`."""
    xp = backend.namespace(q, k, v)
    L = q.shape[-2]
    bq, bk = block_sizes(math.prod(q.shape[:-2]), L, block_q, block_k)
    out = backend.empty(q.shape[:-1] + (v.shape[-1],), q.dtype, xp)
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        o, _, _ = _forward_rows(xp, q[..., i0:i1, :], k, v, beta, i0, _kv_end(L, i1, causal), bk, causal,
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
    return query_rows_loss_and_grads(q, k, v, y, beta, row0=0, causal=causal, softmax_one=softmax_one, need=need,
                                     block_q=block_q, block_k=block_k)


def query_rows_loss_and_grads(qr, k, v, yr, beta, *, row0=0, causal=False, softmax_one=False,
                              need=("q", "k", "v"), block_q=None, block_k=None):
    """What the query rows ``row0 .. row0 + Lq`` contribute to :func:`loss_and_grads`, against all keys.

    :func:`loss_and_grads` is the case ``row0 = 0``, ``Lq = L``. For token-sharded exact gradients
    (:mod:`gpulora.distributed`) a worker holds the rows ``qr, yr (..., Lq, d)`` of its shard and the whole
    ``k, v (..., L, d)``: the query rows' loss and ``dQ`` are complete, the key and value gradients are
    partial sums to be reduced over the shards. Blocked as the module docstring says
    (``lead * block_q * block_k <= BLOCK_ELEMENTS``, sizes forced by ``block_q``, ``block_k``). Cost
    ``O(Lq L (d_head + d_v))`` time, ``O(L (d_head + d_v))`` memory per leading index.

    Returns
    -------
    (loss, dq, dk, dv)
        ``loss`` 0-d of ``qr.dtype``; ``dq (..., Lq, d_head)``; ``dk (..., L, d_head)`` and
        ``dv (..., L, d_v)`` partial (rows past the last key a causal shard sees are zero); ``None`` for
        gradients not in ``need``.
    """
    xp = backend.namespace(qr, k, v, yr)
    need = set(need)
    Lq, L = qr.shape[-2], k.shape[-2]
    bq, bk = block_sizes(math.prod(qr.shape[:-2]), L, block_q, block_k)
    dq = backend.empty(qr.shape, qr.dtype, xp) if "q" in need else None
    dk = xp.zeros(k.shape, dtype=k.dtype) if "k" in need else None
    dv = xp.zeros(v.shape, dtype=v.dtype) if "v" in need else None
    loss = xp.zeros((), dtype=xp.float64)
    for a0 in range(0, Lq, bq):
        a1 = min(Lq, a0 + bq)
        i0 = row0 + a0
        qb = qr[..., a0:a1, :]
        kv_end = _kv_end(L, row0 + a1, causal)
        o, lse, f = _forward_rows(xp, qb, k, v, beta, i0, kv_end, bk, causal, softmax_one)
        g = o - yr[..., a0:a1, :]
        loss = loss + 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
        if not need:
            continue
        r = xp.sum(g * o, axis=-1, keepdims=True)
        dqb = xp.zeros(qb.shape, dtype=qr.dtype) if dq is not None else None
        for j0 in range(0, kv_end, bk):
            j1 = min(kv_end, j0 + bk)
            kb, vb = k[..., j0:j1, :], v[..., j0:j1, :]
            fb = f if f is not None else xp.exp(scores(xp, qb, kb, beta, i0, j0, causal) - lse)
            if dv is not None:
                dv[..., j0:j1, :] += fb.mT @ g
            if dq is None and dk is None:
                continue
            p = fb * (g @ vb.mT - r)  # [lead, bq, bk]: dloss/dS on this block
            if dqb is not None:
                dqb += p @ kb
            if dk is not None:
                dk[..., j0:j1, :] += beta * (p.mT @ qb)
        if dq is not None:
            dq[..., a0:a1, :] = beta * dqb
    return xp.astype(loss, qr.dtype), dq, dk, dv
