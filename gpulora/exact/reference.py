"""Dense references: docs/math.md section 2 written out with the whole ``L x L`` matrices (small L only).

:func:`dense_weights` builds the attention weights, either the exact softmax or, given polynomial
coefficients, ``F~ = rownormalise(p(S))``; :func:`dense_loss_grads` evaluates the exact-gradient formula for
*any* weights ``F``. With ``F~`` in place of ``F`` it is what the chained polynomial gradient must equal to
rounding (docs/math.md section 4: approximation error and algebra error tested apart). ``O(L^2)`` memory.
"""

from __future__ import annotations

import math

from .. import backend

__all__ = ["dense_loss_grads", "dense_weights"]


def dense_weights(s, *, causal=False, softmax_one=False, coef=None):
    """Row weights of scores ``s (..., L, L)``: softmax (``coef=None``) or ``p(s) / rowsum p(s)``.

    ``coef`` are the monomial coefficients of ``p``; Softmax_1 adds 1 (the virtual zero-score key,
    ``exp(0) ~ p(0)`` to the approximation's accuracy; ``1`` exactly here as in the chain) to each row sum.
    """
    xp = backend.namespace(s)
    L = s.shape[-1]
    mask = xp.arange(L)[None, :] > xp.arange(s.shape[-2])[:, None] if causal else None
    if coef is None:
        if mask is not None:
            s = xp.where(mask, -math.inf, s)
        m = xp.max(s, axis=-1, keepdims=True)
        if softmax_one:
            m = xp.maximum(m, 0.0)
        w = xp.exp(s - m)
        extra = xp.exp(-m) if softmax_one else 0.0
    else:
        w = xp.zeros_like(s)
        for c in reversed(list(coef)):  # Horner
            w = w * s + c
        if mask is not None:
            w = xp.where(mask, 0.0, w)
        extra = 1.0 if softmax_one else 0.0
    return w / (xp.sum(w, axis=-1, keepdims=True) + extra)


def dense_loss_grads(f, q, k, v, y, beta):
    """Loss and ``(dQ, dK, dV)`` by the formula of docs/math.md section 2 for given weights ``f (..., L, L)``.

    ``O = F V``, ``G = O - Y``, ``r = rowsum(G * O)``, ``P = F * (G V^T - r)``, ``dQ = beta P K``,
    ``dK = beta P^T Q``, ``dV = F^T G``. Cost ``O(L^2 (d_head + d_v))`` time and ``O(L^2)`` memory.
    """
    xp = backend.namespace(f, q, k, v, y)
    o = f @ v
    g = o - y
    r = xp.sum(g * o, axis=-1, keepdims=True)
    p = f * (g @ v.mT - r)
    return 0.5 * xp.sum(g * g), beta * (p @ k), beta * (p.mT @ q), f.mT @ g
