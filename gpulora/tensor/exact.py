r"""Exact tensor attention: output, loss and gradients, blocked so that memory stays linear in L.

The formulas are those of :mod:`gpulora.tensor.reference` (docs/tensor.md, "Exact gradient"). Per leading
index (batch, head) the queries come in blocks of ``bq`` rows and the key pairs ``(j1, j2)`` in tiles of
``b1 x b2``. On one tile, with ``QK1[(i, a)] = q_i * k1_a`` (``bq b1`` rows of width ``d_head``):

    S   = beta QK1 K2^T                          (bq b1, b2)     one GEMM
    E   = exp(S - m)                             running max m and sum l per query (online softmax)
    O  += sum_a v1_a * (E V2)[(i, a)]            (bq, d_v)       one GEMM, one reduction over a
    W   = GV1 V2^T,  GV1[(i, a)] = g_i * v1_a    (bq b1, b2)     W[i, a, b] = g_i . (v1_a * v2_b)
    P   = F * (W - r_i)                          F = exp(S - lse)
    dQ  += beta sum_a k1_a * (P K2)[(i, a)]      dK1 += beta sum_i q_i * (P K2)[(i, a)]
    dK2 += beta P^T QK1                          dV2 += F^T GV1      dV1 += sum_i g_i * (F V2)[(i, a)]

When all key pairs fit in one tile (``b1 = b2 = L``) one pass per query block does everything; otherwise a
first sweep computes ``O`` and the log-sum-exp ``lse`` with the online softmax and a second recomputes
``F = exp(S - lse)`` tile by tile (the FlashAttention backward pattern, over key pairs). The ``L x L^2``
matrix is never formed: the largest temporary has ``lead * bq * b1 * max(b2, d_head, d_v)`` elements, at
most :data:`BLOCK_ELEMENTS`.

**Cost** ``O(batch H L^3 (d_head + d_v))`` time (about ``L^3 (6 d_head + 6 d_v)`` flops per head with every
target, plus ``2 L^3 (d_head + d_v)`` for the first sweep when the key pairs do not fit one tile), and
``O(batch H L (d_head + d_v) + BLOCK_ELEMENTS)`` memory. Every product runs in the input dtype; the loss is
reduced in float64.
"""

from __future__ import annotations

import math

from .. import backend

__all__ = ["BLOCK_ELEMENTS", "attention_output", "block_sizes", "loss_and_grads"]

BLOCK_ELEMENTS = 1 << 20


def block_sizes(lead: int, L: int, width: int, block_q=None, block_k1=None, block_k2=None):
    """``(bq, b1, b2)``: query rows and key-pair tile keeping ``lead * bq * b1 * max(b2, width)`` within
    :data:`BLOCK_ELEMENTS` (unless forced). ``width = max(d_head, d_v)``. The tile covers every key pair
    (``b1 = b2 = L``) when that still leaves blocks of 8 queries (or all of them)."""
    budget = max(1, BLOCK_ELEMENTS // max(lead, 1))
    b2 = int(block_k2) if block_k2 is not None else max(1, min(L, budget // 64))
    b2 = max(1, min(b2, L))
    rest = max(1, budget // max(b2, width))
    if block_k1 is not None:
        b1 = int(block_k1)
    elif b2 == L and rest >= L * min(L, 8):
        b1 = L
    else:
        b1 = math.isqrt(rest)
    b1 = max(1, min(b1, L))
    bq = int(block_q) if block_q is not None else rest // b1
    return max(1, min(bq, L)), b1, b2


def _pair_rows(xp, a, b):
    """``(..., n, d) x (..., m, d) -> (..., n m, d)`` with row ``(i, j)`` equal to ``a_i * b_j``."""
    out = a[..., :, None, :] * b[..., None, :, :]
    return xp.reshape(out, out.shape[:-3] + (out.shape[-3] * out.shape[-2], out.shape[-1]))


def _as3(xp, z, n):
    """``z (..., n m, c)`` viewed as ``(..., n, m, c)``."""
    return xp.reshape(z, z.shape[:-2] + (n, z.shape[-2] // n, z.shape[-1]))


def _tiles(L, b1, b2):
    for a0 in range(0, L, b1):
        for c0 in range(0, L, b2):
            yield slice(a0, min(L, a0 + b1)), slice(c0, min(L, c0 + b2))


def _forward_rows(xp, qb, k1, k2, v1, v2, beta, b1, b2):
    """Output ``(..., bq, d_v)``, log-sum-exp ``(..., bq, 1)`` and (one tile only) the weights ``F`` of
    one query block, as ``(..., bq b1, b2)``."""
    lead, bq = qb.shape[:-2], qb.shape[-2]
    L = k1.shape[-2]
    m = xp.full(lead + (bq, 1), -math.inf, dtype=qb.dtype)
    l = xp.zeros(lead + (bq, 1), dtype=qb.dtype)
    o = xp.zeros(lead + (bq, v1.shape[-1]), dtype=qb.dtype)
    single = b1 == L and b2 == L
    f = None
    for s1, s2 in _tiles(L, b1, b2):
        s = beta * (_pair_rows(xp, qb, k1[..., s1, :]) @ k2[..., s2, :].mT)  # [..., bq n1, n2]
        s3 = xp.reshape(s, lead + (bq, -1))
        m_new = xp.maximum(m, xp.max(s3, axis=-1, keepdims=True))
        e = xp.reshape(xp.exp(s3 - m_new), s.shape)
        rescale = xp.exp(m - m_new)
        l = l * rescale + xp.sum(xp.reshape(e, lead + (bq, -1)), axis=-1, keepdims=True)
        o = o * rescale + xp.sum(_as3(xp, e @ v2[..., s2, :], bq) * v1[..., None, s1, :], axis=-2)
        m = m_new
        if single:
            f = xp.reshape(xp.reshape(e, lead + (bq, -1)) / l, s.shape)
    return o / l, m + xp.log(l), f


def _blocks(q, k1, v1, block_q, block_k1, block_k2):
    L = q.shape[-2]
    return block_sizes(math.prod(q.shape[:-2]), L, max(q.shape[-1], v1.shape[-1]), block_q, block_k1, block_k2)


def attention_output(q, k1, k2, v1, v2, beta, *, block_q=None, block_k1=None, block_k2=None):
    """``O`` of shape ``(..., L, d_v)``, blocked as :func:`loss_and_grads`. Cost ``O(L^3 (d_head + d_v))``."""
    xp = backend.namespace(q, k1, k2, v1, v2)
    L = q.shape[-2]
    bq, b1, b2 = _blocks(q, k1, v1, block_q, block_k1, block_k2)
    out = backend.empty(q.shape[:-1] + (v1.shape[-1],), q.dtype, xp)
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        out[..., i0:i1, :] = _forward_rows(xp, q[..., i0:i1, :], k1, k2, v1, v2, beta, b1, b2)[0]
    return out


def loss_and_grads(q, k1, k2, v1, v2, beta, *, y=None, grad_output=None, need=("q", "k1", "k2", "v1", "v2"),
                   block_q=None, block_k1=None, block_k2=None, with_output=False):
    """Exact loss and the gradients with respect to ``Q, K1, K2, V1, V2`` that ``need`` asks for.

    Parameters
    ----------
    q, k1, k2 : arrays of shape (..., L, d_head)
    v1, v2 : arrays of shape (..., L, d_v)
        Same namespace and dtype; leading axes (batch, heads) are independent problems.
    beta : float
    y, grad_output : array of shape (..., L, d_v)
        Exactly one: targets (``G = O - y``, loss ``0.5 ||G||^2``) or an upstream gradient ``dO``
        (``G = dO``, "loss" ``sum(O * dO)``).
    need : iterable of {"q", "k1", "k2", "v1", "v2"}
        Gradients to compute; empty gives the loss alone.
    block_q, block_k1, block_k2 : int, optional
        Force block sizes (tests); by default :func:`block_sizes`.
    with_output : bool
        Also return the output ``O`` (computed on the way), as a seventh element.

    Returns
    -------
    (loss, dq, dk1, dk2, dv1, dv2[, o])
        ``loss`` a 0-d array of ``q.dtype`` (summed over leading axes); each gradient shaped like its
        input, or ``None`` when not needed.
    """
    target = y if grad_output is None else grad_output
    xp = backend.namespace(q, k1, k2, v1, v2, target)
    need = set(need)
    L = q.shape[-2]
    lead = q.shape[:-2]
    bq, b1, b2 = _blocks(q, k1, v1, block_q, block_k1, block_k2)
    dq = backend.empty(q.shape, q.dtype, xp) if "q" in need else None
    grads = {t: xp.zeros(a.shape, dtype=a.dtype) for t, a in (("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2))
             if t in need}
    loss = xp.zeros((), dtype=xp.float64)
    out = backend.empty(q.shape[:-1] + (v1.shape[-1],), q.dtype, xp) if with_output else None
    for i0 in range(0, L, bq):
        i1 = min(L, i0 + bq)
        qb = q[..., i0:i1, :]
        n = i1 - i0
        o, lse, f_single = _forward_rows(xp, qb, k1, k2, v1, v2, beta, b1, b2)
        if out is not None:
            out[..., i0:i1, :] = o
        if grad_output is None:
            g = o - y[..., i0:i1, :]
            loss = loss + 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
        else:
            g = grad_output[..., i0:i1, :]
            loss = loss + xp.sum(xp.astype(o * g, xp.float64))
        if not need:
            continue
        # [..., bq, 1]; with a single tile, from the products it is subtracted from (as in the matrix case)
        r = None if f_single is not None else xp.sum(g * o, axis=-1, keepdims=True)
        dqb = xp.zeros(qb.shape, dtype=q.dtype) if dq is not None else None
        for s1, s2 in _tiles(L, b1, b2):
            k1b, k2b, v1b, v2b = k1[..., s1, :], k2[..., s2, :], v1[..., s1, :], v2[..., s2, :]
            qk1 = _pair_rows(xp, qb, k1b)  # [..., bq n1, d_head]
            if f_single is not None:
                f = f_single
            else:
                s = beta * (qk1 @ k2b.mT)
                f = xp.reshape(xp.exp(xp.reshape(s, lead + (n, -1)) - lse), s.shape)  # [..., bq n1, n2]
            gv1 = _pair_rows(xp, g, v1b)  # [..., bq n1, d_v]
            if "v1" in grads:
                grads["v1"][..., s1, :] += xp.sum(_as3(xp, f @ v2b, n) * g[..., :, None, :], axis=-3)
            if "v2" in grads:
                grads["v2"][..., s2, :] += f.mT @ gv1
            if dqb is None and "k1" not in grads and "k2" not in grads:
                continue
            w = gv1 @ v2b.mT  # [..., bq n1, n2]: g_i . (v1_a * v2_b)
            if r is None:  # r = rowsum(F * W) over the row's key pairs: rows one pair dominates cancel alike
                r = backend.row_dots(xp, xp.reshape(f, lead + (n, -1)), xp.reshape(w, lead + (n, -1)))[..., None]
            p = xp.reshape(f, lead + (n, -1)) * (xp.reshape(w, lead + (n, -1)) - r)
            p = xp.reshape(p, f.shape)  # dloss/dS on this tile
            if dqb is not None or "k1" in grads:
                pk2 = p @ k2b  # [..., bq n1, d_head]
                if dqb is not None:
                    dqb += xp.sum(_as3(xp, pk2, n) * k1b[..., None, :, :], axis=-2)
                if "k1" in grads:
                    grads["k1"][..., s1, :] += beta * xp.sum(_as3(xp, pk2, n) * qb[..., :, None, :], axis=-3)
            if "k2" in grads:
                grads["k2"][..., s2, :] += beta * (p.mT @ qk1)
        if dq is not None:
            dq[..., i0:i1, :] = beta * dqb
    result = (xp.astype(loss, q.dtype), dq) + tuple(grads.get(t) for t in ("k1", "k2", "v1", "v2"))
    return result + (out,) if with_output else result
