"""Dense references: docs/math.md section 2 written out with the whole ``L x L`` matrices (small L only).

:func:`dense_weights` builds the attention weights, either the exact softmax or, given polynomial
coefficients, ``F~ = rownormalise(p(S))``, with the causal and key-padding masks; :func:`dense_vjp` and
:func:`dense_loss_grads` evaluate the exact-gradient formula for *any* weights ``F`` and an upstream
gradient or targets. With ``F~`` in place of ``F`` it is what the chained polynomial gradient must equal to
rounding (docs/math.md section 4: approximation error and algebra error tested apart). The layer pieces a
real model adds are written out the plain way too: :func:`repeat_kv` (grouped-query attention, as Hugging
Face's ``repeat_kv``) and :func:`rotate_half_reference` (rotary embeddings, LLaMA convention). ``O(L^2)``
memory; nothing here is blocked or fused, so the fast paths are tested against a second implementation.
"""

from __future__ import annotations

import math

from .. import backend

__all__ = ["dense_attention_vjp", "dense_layer", "dense_loss_grads", "dense_vjp", "dense_weights", "repeat_kv",
           "rope_cos_sin_reference", "rotate_half_reference", "rotation_matrices"]


def dense_weights(s, *, causal=False, softmax_one=False, coef=None, key_mask=None):
    """Row weights of scores ``s (..., L, L)``: softmax (``coef=None``) or ``p(s) / rowsum p(s)``.

    ``coef`` are the monomial coefficients of ``p``; Softmax_1 adds 1 (the virtual zero-score key,
    ``exp(0) ~ p(0)`` to the approximation's accuracy; ``1`` exactly here as in the chain) to each row sum.
    ``key_mask (..., L)`` (True = attend, broadcast over the leading axes of ``s``) gives masked keys weight
    0 and padding query rows all-zero weights.
    """
    xp = backend.namespace(s)
    L = s.shape[-1]
    mask = xp.arange(L)[None, :] > xp.arange(s.shape[-2])[:, None] if causal else xp.zeros((1, L), dtype=xp.bool)
    if key_mask is not None:
        mask = mask | ~key_mask[..., None, :]
        row = key_mask[..., :, None]
        s = xp.where(row, s, 0.0)
    if coef is None:
        s = xp.where(mask, -math.inf, s)
        m = xp.max(s, axis=-1, keepdims=True)
        m = xp.where(m == -math.inf, 0.0, m)
        if softmax_one:
            m = xp.maximum(m, 0.0)
        w = xp.exp(s - m)
        extra = xp.exp(-m) if softmax_one else 0.0
    else:
        w = xp.zeros_like(s)
        for c in reversed(list(coef)):  # Horner
            w = w * s + c
        w = xp.where(mask, 0.0, w)
        extra = 1.0 if softmax_one else 0.0
    den = xp.sum(w, axis=-1, keepdims=True) + extra
    f = w / xp.where(den == 0, 1.0, den)
    return f if key_mask is None else xp.where(key_mask[..., :, None], f, 0.0)


def dense_vjp(f, q, k, v, grad_output, beta, *, row_mask=None):
    """``(O, dQ, dK, dV)`` by the formula of docs/math.md section 2 for given weights and upstream gradient.

    ``O = F V``, ``r = rowsum(G * O)``, ``P = F * (G V^T - r)``, ``dQ = beta P K``, ``dK = beta P^T Q``,
    ``dV = F^T G``, with ``G = grad_output`` taken as 0 on the padding rows (``row_mask (..., L)`` False).
    Same leading shape for every array (expand grouped keys with :func:`repeat_kv` first). ``O(L^2)`` memory.
    """
    xp = backend.namespace(f, q, k, v, grad_output)
    o = f @ v
    g = grad_output if row_mask is None else xp.where(row_mask[..., None], grad_output, 0.0)
    r = xp.sum(g * o, axis=-1, keepdims=True)
    p = f * (g @ v.mT - r)
    return o, beta * (p @ k), beta * (p.mT @ q), f.mT @ g


def dense_loss_grads(f, q, k, v, y, beta, *, row_mask=None):
    """Loss ``0.5 ||O - Y||^2`` and ``(dQ, dK, dV)`` for given weights ``f (..., L, L)``.

    ``row_mask (..., L)`` (True = real token) drops padding rows from the loss (``G = 0`` there).
    """
    xp = backend.namespace(f, q, k, v, y)
    o = f @ v
    g = o - y
    if row_mask is not None:
        g = xp.where(row_mask[..., None], g, 0.0)
    r = xp.sum(g * o, axis=-1, keepdims=True)
    p = f * (g @ v.mT - r)
    return 0.5 * xp.sum(g * g), beta * (p @ k), beta * (p.mT @ q), f.mT @ g


def dense_attention_vjp(q, k, v, grad_output, *, beta=None, causal=False, key_mask=None, softmax_one=False,
                        coef=None):
    """``(out, dq, dk, dv)`` in the layout of :func:`gpulora.attention_vjp`, densely.

    ``q (..., H, L, d_head)``, ``k (..., H_kv, L, d_head)``, ``v (..., H_kv, L, d_v)``: the key/value heads are
    repeated (:func:`repeat_kv`), the weights built by :func:`dense_weights` (softmax, or ``p(S)`` row-normalised
    with ``coef``), the gradient taken by :func:`dense_vjp`, and ``dk``, ``dv`` summed over each group.
    """
    xp = backend.namespace(q, k, v, grad_output)
    H, H_kv, d = q.shape[-3], k.shape[-3], q.shape[-1]
    n_rep = H // H_kv
    beta = 1.0 / math.sqrt(d) if beta is None else beta
    kr, vr = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    mask = None if key_mask is None else key_mask[..., None, :]
    f = dense_weights(beta * q @ kr.mT, causal=causal, softmax_one=softmax_one, coef=coef, key_mask=mask)
    o, dq, dk, dv = dense_vjp(f, q, kr, vr, grad_output, beta, row_mask=mask)

    def group_sum(a):
        return xp.sum(xp.reshape(a, a.shape[:-3] + (H_kv, n_rep) + a.shape[-2:]), axis=-3)

    return o, dq, group_sum(dk), group_sum(dv)


def repeat_kv(a, n_rep: int):
    """``(..., H_kv, L, d) -> (..., H_kv n_rep, L, d)``: key/value head ``j`` serves query heads
    ``j n_rep .. (j + 1) n_rep - 1`` (Hugging Face's ``repeat_kv``)."""
    xp = backend.namespace(a)
    lead, (h, L, d) = a.shape[:-3], a.shape[-3:]
    return xp.reshape(xp.broadcast_to(a[..., None, :, :], lead + (h, n_rep, L, d)), lead + (h * n_rep, L, d))


def rope_cos_sin_reference(position_ids, dim: int, theta: float):
    """LLaMA's rotary tables for integer ``position_ids (..., L)``: ``(cos, sin)`` of shape ``(..., L, dim)``,
    ``inv_freq_m = theta^(-2m / dim)``, angles ``pos * inv_freq`` concatenated twice (float64)."""
    xp = backend.namespace(position_ids)
    inv_freq = 1.0 / theta ** (xp.astype(xp.arange(0, dim, 2), xp.float64) / dim)
    ang = xp.astype(position_ids, xp.float64)[..., None] * inv_freq
    emb = xp.concat([ang, ang], axis=-1)
    return xp.cos(emb), xp.sin(emb)


def rotate_half_reference(x, cos, sin):
    """``x cos + rotate_half(x) sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (LLaMA's convention)."""
    xp = backend.namespace(x, cos, sin)
    h = x.shape[-1] // 2
    return x * cos + xp.concat([-x[..., h:], x[..., :h]], axis=-1) * sin


def rotation_matrices(cos, sin):
    """The rotary map as explicit matrices ``R (..., L, d, d)`` with ``rope(x)_i = sum_j R_ij x_j``, built
    from the tables entry by entry (``R_ii = cos_i``; ``R_{i, i+d/2} = -sin_i``, ``R_{i+d/2, i} = sin_{i+d/2}``)."""
    xp = backend.namespace(cos, sin)
    d = cos.shape[-1]
    h = d // 2
    eye = xp.eye(d, dtype=cos.dtype)
    # rotate_half as a matrix: out_i = -x_{i+h} (i < h), out_i = x_{i-h} (i >= h)
    rot = xp.concat([xp.concat([xp.zeros((h, h), dtype=cos.dtype), -xp.eye(h, dtype=cos.dtype)], axis=1),
                     xp.concat([xp.eye(h, dtype=cos.dtype), xp.zeros((h, h), dtype=cos.dtype)], axis=1)], axis=0)
    return cos[..., :, None] * eye + sin[..., :, None] * rot


def dense_layer(head, lora, x, *, y=None, grad_output=None, causal=False, key_mask=None, cos=None, sin=None,
                coef=None):
    """A whole layer call, densely in NumPy float64: ``(loss, out, {t: (dB, dA)}, dx)``.

    ``head``/``lora`` are a :class:`gpulora.Head` and :class:`gpulora.LoRA`; ``x (batch, L, d_model)``;
    ``y`` or ``grad_output`` ``(batch, L, H d_v)``; ``key_mask (batch, L)``; ``cos``, ``sin``
    ``(batch or 1, L, d_head)`` rotary tables (applied as explicit matrices, :func:`rotation_matrices`).
    Merged weights, biases, heads split by reshaping, :func:`dense_attention_vjp`, then the chain rule
    written out: ``dW = x^T dP``, ``dB = s dW A^T``, ``dA = s B^T dW``, ``dx = sum_t dP_t W_t^T``.
    ``coef`` gives polynomial weights instead of the softmax. ``O(L^2)`` memory.
    """
    import numpy as np

    f64 = [np.asarray(backend.to_numpy(a), dtype=np.float64) if a is not None else None
           for a in (x, y, grad_output, cos, sin)]
    x, y, grad_output, cos, sin = f64
    b, L, _ = x.shape
    H, H_kv, dv = head.heads, head.kv_heads, head.d_v
    w, proj = {}, {}
    for t, heads in (("q", H), ("k", H_kv), ("v", H_kv)):
        w[t] = np.asarray(backend.to_numpy(head.weight(t)), dtype=np.float64)
        if t in lora.adapters:
            bb, aa = (np.asarray(backend.to_numpy(a), dtype=np.float64) for a in lora.adapters[t])
            w[t] = w[t] + lora.scaling(t) * bb @ aa
        p = x @ w[t]
        if head.bias(t) is not None:
            p = p + np.asarray(backend.to_numpy(head.bias(t)), dtype=np.float64)
        proj[t] = p.reshape(b, L, heads, -1).transpose(0, 2, 1, 3)
    rot = None if cos is None else rotation_matrices(cos, sin)[:, None]  # (b or 1, 1, L, d, d)
    q, k = proj["q"], proj["k"]
    if rot is not None:
        q, k = np.einsum("...ij,...j->...i", rot, q), np.einsum("...ij,...j->...i", rot, k)
    loss = None
    if y is not None:
        mask = None if key_mask is None else np.asarray(backend.to_numpy(key_mask))
        o = dense_attention_vjp(q, k, proj["v"], np.zeros((b, H, L, dv)), beta=head.beta, causal=causal,
                                key_mask=mask, softmax_one=head.softmax_one, coef=coef)[0]
        g = o.transpose(0, 2, 1, 3).reshape(b, L, H * dv) - y
        if mask is not None:
            g = g * mask[..., None]
        loss = 0.5 * np.sum(g * g)
        grad_output = g
    mask = None if key_mask is None else np.asarray(backend.to_numpy(key_mask))
    go = grad_output.reshape(b, L, H, dv).transpose(0, 2, 1, 3)
    o, dq, dk, dvv = dense_attention_vjp(q, k, proj["v"], go, beta=head.beta, causal=causal, key_mask=mask,
                                         softmax_one=head.softmax_one, coef=coef)
    if rot is not None:
        dq, dk = np.einsum("...ji,...j->...i", rot, dq), np.einsum("...ji,...j->...i", rot, dk)
    dp = {t: a.transpose(0, 2, 1, 3).reshape(b, L, -1) for t, a in (("q", dq), ("k", dk), ("v", dvv))}
    grads = {}
    for t, (bb, aa) in lora.adapters.items():
        bb, aa = (np.asarray(backend.to_numpy(a), dtype=np.float64) for a in (bb, aa))
        dw = np.einsum("bli,blj->ij", x, dp[t])
        s = lora.scaling(t)
        grads[t] = (s * dw @ aa.T, s * bb.T @ dw)
    dx = sum(dp[t] @ w[t].T for t in ("q", "k", "v"))
    return loss, o.transpose(0, 2, 1, 3).reshape(b, L, H * dv), grads, dx
