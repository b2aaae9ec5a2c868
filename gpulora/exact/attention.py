r"""Exact attention: output and vector-Jacobian product, blocked so that memory stays linear in L.

For every leading index (batch, head) with ``Q (L, d_head)``, ``K (L, d_head)``, ``V (L, d_v)`` and an
upstream gradient ``G = dloss/dO (L, d_v)`` (docs/math.md section 2, row convention):

    S = beta Q K^T,  F = rowsoftmax(S),  O = F V
    r = rowsum(G * O) = rowsum(F * G V^T),  P = F * (G V^T - r 1^T)          (P = dloss/dS)
    dQ = beta P K,  dK = beta P^T Q,  dV = F^T G

For the paper's loss ``0.5 ||O - Y||^2`` the upstream gradient is ``G = O - Y``, formed block by block.

**Masks.** Causal: entries ``j > i`` of ``S`` are ``-inf``. A key mask ``key_valid (..., L)`` (True =
attend) excludes the masked keys (``-inf`` in their columns) and marks the query rows at masked positions
as padding: their output is 0 and their ``G`` is taken as 0, so they contribute nothing to any gradient.
A padding row may have no key at all (left padding under ``causal``): its row max and sum are replaced by
0 and 1, which keeps it finite (weights 0) at a per-row cost. Softmax_1 adds a
virtual key with score 0 and value 0 to every row (``F = e^S / (1 + rowsum e^S)``); its Jacobian has the
same form, so ``P`` is unchanged.

**Grouped-query attention.** The leading axes of ``q`` and of ``k``, ``v`` need only broadcast: with
``q (B, H_kv, n_rep, L, d_head)`` and ``k, v (B, H_kv, 1, L, d)`` each key/value head serves its group of
``n_rep`` query heads, and ``dK``, ``dV`` come back shaped like ``k``, ``v``, summed over the group.

**Blocking** (the FlashAttention backward pattern). Query rows are processed in blocks of ``block_q``.
When a whole key row fits (``block_k = L``), one pass per query block computes ``F`` (max-subtracted),
``O``, ``r``, and the block's contributions to ``dQ``, ``dK``, ``dV``. Otherwise keys come in blocks of
``block_k``: a first sweep computes ``O`` and the row log-sum-exp with the online softmax, a second
recomputes ``F = exp(S - lse)`` block by block. With a single key block ``r`` is the row sum of
``F * G V^T`` over the block, from the same products that it is subtracted from, so that where one key
dominates a row the two terms of ``G V^T - r`` cancel alike, as in PyTorch's autograd through the softmax
(a row with one key gets exactly zero ``dQ``, ``dK`` in any precision:
``tests/exact/test_attention_grad.py``); over several key blocks ``r = rowsum(G * O)``, FlashAttention's
form. The largest temporary is ``lead * block_q * block_k`` elements (at most :data:`BLOCK_ELEMENTS` on the
CPU, :data:`GPU_BLOCK_ELEMENTS` on CuPy), never ``L x L``.

**Per block** six products (``beta Q K^T``, ``E V``; ``E^T G'``, ``G' V^T``, ``P K``, ``P^T (beta Q)``) and
six elementwise passes, in place in two buffers: max, subtract, exp, sum over ``E = exp(S - m)``; then
``P = E * (G' V^T - r')`` with ``G' = G / l`` and ``r' = r / l`` (single key block), so the normalisation
``1 / l`` and ``beta`` cost ``O(L d)`` instead of passes over the block. On the CPU the two products of
inner dimension ``d`` (``Q K^T``, ``G' V^T``) take about half the time (they write one block element per
``2 d`` flops); the elementwise passes about 15 %.

**Cost** ``O(lead L^2 (d_head + d_v))`` time (about ``L^2 (6 d_head + 6 d_v)`` flops per head with all
gradients; causal about half), ``O(lead L (d_head + d_v) + BLOCK_ELEMENTS)`` memory.

**Precision**: every product runs in the input dtype (BLAS/cuBLAS accumulation in that dtype); the loss is
reduced in float64.
"""

from __future__ import annotations

import math

from .. import backend

__all__ = ["BLOCK_ELEMENTS", "GPU_BLOCK_ELEMENTS", "attention_output", "attention_vjp", "block_sizes", "loss_and_grads", "scores"]

# Elements of one [lead, block_q, block_k] temporary (two such buffers are live per block: weights and P).
# Measured on the 2-core machine, 12 heads of d_head 32, L 512..2048, float32: with one BLAS thread 2^18
# (cache-sized) was ~20 % faster than 2^22, but with two threads on a busy machine small blocks cost far
# more (each of the ~6 lead * blocks GEMM calls pays the thread hand-off), so blocks stay large.
BLOCK_ELEMENTS = 1 << 22
# On a GPU every block costs ~20 kernel launches: 2^26 elements (256 MiB of float32 per buffer).
GPU_BLOCK_ELEMENTS = 1 << 26


def block_sizes(lead: int, L: int, block_q=None, block_k=None, *, elements=None) -> tuple[int, int]:
    """Query and key block sizes keeping ``lead * block_q * block_k <= elements`` (unless forced);
    ``elements`` defaults to :data:`BLOCK_ELEMENTS`."""
    lead = max(lead, 1)
    elements = BLOCK_ELEMENTS if elements is None else elements
    if block_k is None:
        single = lead * L * min(L, 64) <= elements
        block_k = L if single else max(64, math.isqrt(elements // lead))
    block_k = max(1, min(int(block_k), L))
    if block_q is None:
        block_q = elements // (lead * block_k)
    return max(1, min(int(block_q), L)), block_k


def _elements(q) -> int:
    """Block size in elements for ``q``'s library: :data:`GPU_BLOCK_ELEMENTS` on CuPy, else the CPU's."""
    return GPU_BLOCK_ELEMENTS if backend.is_cupy(q) else BLOCK_ELEMENTS


def _exp_shifted(xp, s, m):
    """``exp(s - m)`` computed in the buffer of ``s``, which it consumes: no temporary of the block's size."""
    s -= m
    return backend.exp_inplace(xp, s)


def scores(xp, qb, kb, beta, i0, j0, causal, fill=-math.inf, key_valid=None):
    """Scores ``beta qb kb^T`` of the query rows from ``i0`` and key rows from ``j0``, shape ``[lead, bq, bk]``.

    Entries ``j > i`` (with ``causal``) and the columns of masked keys (``key_valid (..., L)`` False) are
    ``fill``; both masks are applied in one pass over the block. ``beta = 1`` (rows already scaled) costs
    no pass.
    """
    s = qb @ kb.mT
    if beta != 1:
        s *= beta
    allowed = None
    if causal:
        allowed = xp.arange(j0, j0 + kb.shape[-2])[None, :] <= xp.arange(i0, i0 + qb.shape[-2])[:, None]
    if key_valid is not None:
        keys = key_valid[..., None, j0:j0 + kb.shape[-2]]
        allowed = keys if allowed is None else xp.logical_and(allowed, keys)
    return s if allowed is None else xp.where(allowed, s, fill)


def _sum_to(xp, a, shape):
    """Sum ``a`` over the leading axes where ``shape`` has 1 (or lacks the axis): the adjoint of broadcasting."""
    extra = a.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, n in enumerate(shape) if n == 1 and a.shape[extra + i] != 1)
    return xp.reshape(xp.sum(a, axis=axes), shape) if axes else a


def _finite_max(xp, m):
    """Row maxima with those of rows that have no key at all (all scores ``-inf``: padding rows) set to 0;
    with their sums set to 1 (``xp.where(l == 0, 1.0, l)``) their weights are 0 and their log-sum-exp finite."""
    return xp.where(m == -math.inf, 0.0, m)


def _forward_rows(xp, qb, k, v, beta, i0, kv_end, block_k, causal, softmax_one, key_valid):
    """Output, row log-sum-exp, and (single key block only, else ``None``) the unnormalised weights
    ``E = exp(S - m)`` with their row sums ``l`` (``F = E / l``) of one query block."""
    if kv_end <= block_k:
        s = scores(xp, qb, k[..., :kv_end, :], beta, i0, 0, causal, key_valid=key_valid)
        m = xp.max(s, axis=-1, keepdims=True)
        if softmax_one:
            m = xp.maximum(m, 0.0)
        if key_valid is not None:
            m = _finite_max(xp, m)
        e = _exp_shifted(xp, s, m)
        l = xp.sum(e, axis=-1, keepdims=True)
        if softmax_one:
            l = l + xp.exp(-m)
        if key_valid is not None:
            l = xp.where(l == 0, 1.0, l)
        o = e @ v[..., :kv_end, :]
        o /= l
        return o, m + xp.log(l), (e, l)
    lead = tuple(max(a, b) for a, b in zip(qb.shape[:-2], k.shape[:-2]))
    bq = qb.shape[-2]
    # online softmax; Softmax_1 starts from its virtual key (score 0, value 0)
    m = xp.full(lead + (bq, 1), 0.0 if softmax_one else -math.inf, dtype=qb.dtype)
    l = xp.full(lead + (bq, 1), 1.0 if softmax_one else 0.0, dtype=qb.dtype)
    o = xp.zeros(lead + (bq, v.shape[-1]), dtype=qb.dtype)
    for j0 in range(0, kv_end, block_k):
        j1 = min(kv_end, j0 + block_k)
        s = scores(xp, qb, k[..., j0:j1, :], beta, i0, j0, causal, key_valid=key_valid)
        m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
        # a row whose keys so far are all masked keeps m = -inf: shift by 0 there (its terms are all 0)
        shift = _finite_max(xp, m_new) if key_valid is not None else m_new
        e = _exp_shifted(xp, s, shift)
        rescale = xp.exp(m - shift)
        l = l * rescale + xp.sum(e, axis=-1, keepdims=True)
        o = o * rescale + e @ v[..., j0:j1, :]
        m = m_new
    if key_valid is not None:
        m, l = _finite_max(xp, m), xp.where(l == 0, 1.0, l)
    return o / l, m + xp.log(l), None


def _kv_end(L, i1, causal):
    return min(L, i1) if causal else L


def _row_valid(key_valid, i0, i1):
    return None if key_valid is None else key_valid[..., i0:i1, None]


def attention_output(q, k, v, beta, *, causal=False, softmax_one=False, key_valid=None, pad_queries=True,
                     block_q=None, block_k=None):
    """``O = softmax(beta Q K^T) V`` of shape ``(..., L, d_v)``, blocked like :func:`attention_vjp`.

    ``q (..., L, d_head)``, ``k (..., L, d_head)``, ``v (..., L, d_v)`` with broadcasting leading axes;
    ``key_valid`` a boolean ``(..., L)`` broadcasting against them (padding rows of ``O`` are 0, unless
    ``pad_queries=False``: keys masked only, as in :func:`attention_vjp`).
    """
    xp = backend.namespace(q, k, v)
    L = q.shape[-2]
    lead = tuple(max(a, b) for a, b in zip(q.shape[:-2], k.shape[:-2]))
    bq, bk = block_sizes(math.prod(lead), L, block_q, block_k, elements=_elements(q))
    out = backend.empty(lead + (L, v.shape[-1]), q.dtype, xp)
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        o, _, _ = _forward_rows(xp, q[..., i0:i1, :], k, v, beta, i0, _kv_end(L, i1, causal), bk, causal,
                                softmax_one, key_valid)
        valid = _row_valid(key_valid if pad_queries else None, i0, i1)
        out[..., i0:i1, :] = o if valid is None else xp.where(valid, o, 0.0)
    return out


def attention_vjp(q, k, v, beta, *, grad_output=None, y=None, causal=False, softmax_one=False, key_valid=None,
                  pad_queries=True, need=("q", "k", "v"), block_q=None, block_k=None, row0=0):
    """Exact attention output and the vector-Jacobian product for an upstream gradient (or the paper's loss).

    Parameters
    ----------
    q, k : arrays of shape (..., L, d_head)
    v : array of shape (..., L, d_v)
        Same namespace and dtype; leading axes broadcast (batch, heads; grouped-query attention with a
        size-1 group axis on ``k`` and ``v``).
    beta : float
    grad_output : array of shape (..., L, d_v), optional
        ``G = dloss/dO`` (the full leading shape of the output). Exactly one of ``grad_output`` and ``y``.
    y : array of shape (..., L, d_v), optional
        Targets of the loss ``0.5 ||O - Y||^2`` (summed over leading axes and the valid rows); ``G = O - Y``.
    causal, softmax_one : bool
    key_valid : boolean array of shape (..., L), optional
        True = attend; broadcasts against the leading axes. Padding rows get ``O = 0`` and ``G = 0``.
    pad_queries : bool
        False: ``key_valid`` masks keys only and every query row is computed (cross-attention); a row
        without a key gets ``O = 0``.
    need : iterable of {"q", "k", "v"}
        Gradients to compute; an empty ``need`` gives the output (and loss) alone.
    block_q, block_k : int, optional
        Force block sizes (tests); by default chosen by :func:`block_sizes`.
    row0 : int
        Position of the first query row among the keys (token-sharded exact, :mod:`gpulora.distributed`):
        ``q``, ``grad_output``/``y`` are the rows ``row0 .. row0 + Lq`` of a sequence whose ``L`` keys ``k``,
        ``v`` are all given. ``dq`` and the loss are then those rows'; ``dk``, ``dv`` are their partial sums
        over the whole sequence. Cost ``O(Lq L (d_head + d_v))``.

    Returns
    -------
    (loss, out, dq, dk, dv)
        ``loss`` a 0-d array of ``q.dtype`` (``None`` with ``grad_output``); ``out`` the attention output
        ``(..., L, d_v)``; each gradient shaped like its input (``dk``, ``dv`` summed over the axes they
        were broadcast along), or ``None`` when not needed.
    """
    if (grad_output is None) == (y is None):
        raise ValueError("give exactly one of grad_output and y")
    upstream = y if grad_output is None else grad_output
    xp = backend.namespace(q, k, v, upstream)
    need = set(need)
    L, Lk = q.shape[-2], k.shape[-2]
    lead = tuple(max(a, b) for a, b in zip(q.shape[:-2], k.shape[:-2]))
    bq, bk = block_sizes(math.prod(lead), Lk, block_q, block_k, elements=_elements(q))
    out = backend.empty(lead + (L, v.shape[-1]), q.dtype, xp)
    dq = backend.empty(q.shape, q.dtype, xp) if "q" in need else None
    dk = xp.zeros(k.shape, dtype=k.dtype) if "k" in need else None
    dv = xp.zeros(v.shape, dtype=v.dtype) if "v" in need else None
    loss = xp.zeros((), dtype=xp.float64)
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        qb = beta * q[..., i0:i1, :]  # dK = beta P^T Q = P^T (beta Q): beta costs O(L d), no block pass
        kv_end = _kv_end(Lk, row0 + i1, causal)
        o, lse, el = _forward_rows(xp, qb, k, v, 1, row0 + i0, kv_end, bk, causal, softmax_one, key_valid)
        valid = _row_valid(key_valid if pad_queries else None, row0 + i0, row0 + i1)
        if valid is not None:
            o = xp.where(valid, o, 0.0)
        out[..., i0:i1, :] = o
        g = upstream[..., i0:i1, :]
        if y is not None:
            g = o - g
        if valid is not None:
            g = xp.where(valid, g, 0.0)
        if y is not None:
            loss = loss + 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
        if not need:
            continue
        if el is not None:  # single key block: F = E / l; fold 1 / l into G (then r becomes r / l too)
            g = g / el[1]
        # r / l: from the block's own products below when there is a single key block and they are formed
        r = None if el is not None and need & {"q", "k"} else xp.sum(g * o, axis=-1, keepdims=True)
        dqb = xp.zeros(qb.shape, dtype=q.dtype) if dq is not None else None
        for j0 in range(0, kv_end, bk):
            j1 = min(kv_end, j0 + bk)
            kb, vb = k[..., j0:j1, :], v[..., j0:j1, :]
            if el is not None:
                fb = el[0]
            else:
                fb = _exp_shifted(xp, scores(xp, qb, kb, 1, row0 + i0, j0, causal, key_valid=key_valid), lse)
            if dv is not None:
                dv[..., j0:j1, :] += _sum_to(xp, fb.mT @ g, vb.shape)
            if dq is None and dk is None:
                continue
            # [lead, bq, bk]: dloss/dS on this block (0 on padding rows, where g = r = 0), in one buffer
            p = g @ vb.mT
            if r is None:  # r / l = rowsum(E * (G' V^T)) / l, from the products the block subtracts it from
                r = backend.row_dots(xp, fb, p)[..., None] / el[1]
            p -= r
            p *= fb
            if dqb is not None:
                dqb += _sum_to(xp, p @ kb, qb.shape)
            if dk is not None:
                dk[..., j0:j1, :] += _sum_to(xp, p.mT @ qb, kb.shape)
        if dq is not None:
            dqb *= beta
            dq[..., i0:i1, :] = dqb
    return (None if y is None else xp.astype(loss, q.dtype)), out, dq, dk, dv


def loss_and_grads(q, k, v, y, beta, *, causal=False, softmax_one=False, need=("q", "k", "v"), key_valid=None,
                   block_q=None, block_k=None):
    """``(loss, dq, dk, dv)`` of the paper's loss ``0.5 ||O - Y||^2``: :func:`attention_vjp` with ``y``."""
    loss, _, dq, dk, dv = attention_vjp(q, k, v, beta, y=y, causal=causal, softmax_one=softmax_one,
                                        key_valid=key_valid, need=need, block_q=block_q, block_k=block_k)
    return loss, dq, dk, dv
