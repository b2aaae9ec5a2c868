r"""Dense references of tensor attention: every formula written out with the whole ``L x L x L`` scores.

Tensor attention (Alman & Song, ICLR 2024) of one head, per leading index (batch, head), with
``Q, K1, K2 (L, d_head)``, ``V1, V2 (L, d_v)`` (row convention, docs/tensor.md):

    S[i, j1, j2] = beta sum_c Q[i, c] K1[j1, c] K2[j2, c]                  (L, L, L): query i, key pair (j1, j2)
    F = softmax of S over the key pairs (j1, j2)
    O[i] = sum_{j1, j2} F[i, j1, j2] V1[j1] * V2[j2]                      (L, d_v), * elementwise
    G = O - Y (or G = dO, an upstream gradient),  loss = 0.5 ||G||^2

The softmax backward gives ``P = dloss/dS = F * (W - r)`` with ``W[i, j1, j2] = g_i . (v1_j1 * v2_j2)`` and
``r_i = g_i . o_i``, and then

    dQ[i]   = beta sum_{j1, j2} P[i, j1, j2] K1[j1] * K2[j2]
    dK1[j1] = beta sum_{i, j2}  P[i, j1, j2] Q[i] * K2[j2]
    dK2[j2] = beta sum_{i, j1}  P[i, j1, j2] Q[i] * K1[j1]
    dV1[j1] = sum_{i, j2} F[i, j1, j2] G[i] * V2[j2]
    dV2[j2] = sum_{i, j1} F[i, j1, j2] G[i] * V1[j1]

:func:`dense_weights` builds ``F``, the exact softmax or, given polynomial coefficients, the polynomial
weights ``F~ = p(S) / rowsum p(S)``; :func:`dense_loss_grads` evaluates the formulas above for *any*
weights. With ``F~`` it is what the chained polynomial gradient (:mod:`gpulora.tensor.chain`) must equal to
rounding whatever the degree, and with the softmax what the blocked exact path
(:mod:`gpulora.tensor.exact`) must equal. Each line was checked against central finite differences in
float64 (``tests/tensor/test_reference.py``). Cost ``O(L^3 (d_head + d_v))`` time and ``O(L^3)`` memory:
small ``L`` only.
"""

from __future__ import annotations

from .. import backend

__all__ = ["dense_loss_grads", "dense_scores", "dense_weights"]


def dense_scores(q, k1, k2, beta):
    """``S[..., i, j1, j2] = beta sum_c q[i, c] k1[j1, c] k2[j2, c]``, shape ``(..., L, L, L)``."""
    xp = backend.namespace(q, k1, k2)
    return beta * xp.sum(q[..., :, None, None, :] * k1[..., None, :, None, :] * k2[..., None, None, :, :], axis=-1)


def dense_weights(s, *, coef=None):
    """Weights over the key pairs of scores ``s (..., L, L1, L2)``: the softmax (``coef=None``) or
    ``p(s) / sum p(s)`` for the polynomial with monomial coefficients ``coef``."""
    xp = backend.namespace(s)
    if coef is None:
        w = xp.exp(s - xp.max(s, axis=(-2, -1), keepdims=True))
    else:
        w = xp.zeros_like(s)
        for c in reversed(list(coef)):  # Horner
            w = w * s + c
    return w / xp.sum(w, axis=(-2, -1), keepdims=True)


def dense_loss_grads(f, q, k1, k2, v1, v2, beta, *, y=None, grad_output=None):
    """Loss and ``(dQ, dK1, dK2, dV1, dV2)`` by the formulas above for given weights ``f (..., L, L, L)``.

    Exactly one of ``y`` (targets, ``G = O - y``, loss ``0.5 ||G||^2``) and ``grad_output`` (``G = dO``,
    "loss" ``sum(O * dO)``, the scalar whose gradient is the vector-Jacobian product) is given.
    Returns ``(loss, dq, dk1, dk2, dv1, dv2, o)``.
    """
    xp = backend.namespace(f, q, k1, k2, v1, v2)
    o = xp.sum(f[..., None] * v1[..., None, :, None, :] * v2[..., None, None, :, :], axis=(-3, -2))
    if grad_output is None:
        g = o - y
        loss = 0.5 * xp.sum(g * g)
    else:
        g = grad_output
        loss = xp.sum(o * g)
    r = xp.sum(g * o, axis=-1)[..., None, None]
    w = xp.sum(g[..., :, None, None, :] * v1[..., None, :, None, :] * v2[..., None, None, :, :], axis=-1)
    p = f * (w - r)
    dq = beta * xp.sum(p[..., None] * k1[..., None, :, None, :] * k2[..., None, None, :, :], axis=(-3, -2))
    dk1 = beta * xp.sum(p[..., None] * q[..., :, None, None, :] * k2[..., None, None, :, :], axis=(-4, -2))
    dk2 = beta * xp.sum(p[..., None] * q[..., :, None, None, :] * k1[..., None, :, None, :], axis=(-4, -3))
    dv1 = xp.sum(f[..., None] * g[..., :, None, None, :] * v2[..., None, None, :, :], axis=(-4, -2))
    dv2 = xp.sum(f[..., None] * g[..., :, None, None, :] * v1[..., None, :, None, :], axis=(-4, -3))
    return loss, dq, dk1, dk2, dv1, dv2, o
