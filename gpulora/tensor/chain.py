r"""The polynomial method for tensor attention: forward and chained gradient in time almost linear in L.

With a polynomial ``p(s) = sum_m c_m s^m ~ exp(s)`` on ``[-M, M]`` and the symmetric monomials of
:mod:`gpulora.poly.monomials`, ``p(beta q . (k1 * k2)) = sum_a w_a (beta q)^a (k1 * k2)^a`` with
``w_a = c_|a| |a|! / a!``, and ``(k1 * k2)^a = k1^a k2^a``. The weight is split in three,

    phi(q)_a = sign(w_a) |w_a|^(1/3) (beta q)^a,   psi(k)_a = |w_a|^(1/3) k^a   (for k1 and for k2),

so ``p(s_ij1j2) = phi_i . (psi1_j1 * psi2_j2)`` and, by ``(A (x) B)^T (C (x) D) = (A^T C) * (B^T D)``
(docs/tensor.md, "Polynomial method"), with ``Phi, Psi1, Psi2 (L, k)``, per leading index:

    D  = Phi ((Psi1^T 1) * (Psi2^T 1)),   U = diag(1/D) Phi,   N1 = Psi1^T V1,  N2 = Psi2^T V2
    O~ = U (N1 * N2)                                                            O(L k d_v)
    G  = O~ - Y (or dO),  r_i = g_i . o~_i
    dV1 = Psi1 ((U^T G) * N2)             dV2 = Psi2 ((U^T G) * N1)            O(L k d_v)
    dQ  = beta [ (U (x) G) . (T1 * T2)  -  r * (U (M1 * M2)) ]
    dK1 = beta [ (Psi1 (x) V1) . (TQ * T2)  -  Psi1 (R * M2) ]
    dK2 = beta [ (Psi2 (x) V2) . (TQ * T1)  -  Psi2 (R * M1) ]

with ``M1 = Psi1^T K1``, ``M2 = Psi2^T K2``, ``R = U^T (r * Q)`` (``k x d_head``) and the 3-tensors
``T1 = Psi1^T (V1 (x) K1)``, ``T2 = Psi2^T (V2 (x) K2)``, ``TQ = U^T (G (x) Q)`` (``k x d_v x d_head``,
:func:`gpulora.poly.products.kron_contract`; ``(U (x) G) . T`` is ``kron_readout``). This is the exact
gradient formula of :mod:`gpulora.tensor.reference` evaluated with the polynomial weights
``F~ = rownormalise(p(S))`` in place of the softmax, to rounding, whatever the degree: no ``L x L^2`` (or
``L x L``, or ``L x k d_v``) array is formed. Only what the targets need is computed (``v1``/``v2`` need
``U, Psi, G``; ``q`` needs ``T1, T2``; ``k1`` needs ``TQ, T2``; ``k2`` needs ``TQ, T1``).

**Cost** ``O(batch H L k d_v d_head)`` time and ``O(batch H (L k + k d_v d_head))`` memory,
``k = C(d_head + g, g)``.

**Bound.** Every score satisfies ``|s| <= beta |q| |k1 * k2|`` (Cauchy-Schwarz) and, by Hoelder,
``|k1 * k2| <= min(|k1|_inf |k2|_2, |k1|_2 |k2|_inf, |k1|_4 |k2|_4)`` (for the last:
``sum k1^2 k2^2 <= (sum k1^4)^(1/2) (sum k2^4)^(1/2)``). :func:`score_bound` takes the row maxima of each
norm, ``O(L d)``; it is never larger than ``beta max|q| max|k1| max|k2|`` and usually much smaller (for
random directions in ``d`` dimensions ``|k|_inf ~ |k|_2 sqrt(2 log d / d)``). The degree and precision are
chosen from it exactly as for matrix attention (:func:`gpulora.poly.coefficients.choose`).

**Run-time checks** (as in :mod:`gpulora.poly.chain`): ``phi . (psi1 * psi2)`` is compared with ``p(s)``
at the most negative scores of the extreme rows (the worst cancellation, :func:`check_extreme_triples`),
and every normaliser must satisfy ``D_i >= L^2 p_min / 2``. Either failing raises
:class:`gpulora.PolynomialFailure`. Two host reads.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..poly.chain import PolynomialFailure, _pick_rows, check_normaliser
from ..poly.coefficients import PolyChoice, evaluate
from ..poly.features import feature_scales, monomial_features
from ..poly.monomials import monomial_table
from ..poly.products import kron_contract, kron_readout

__all__ = ["check_extreme_triples", "features", "loss_and_grads", "output", "score_bound", "split_scales"]


def score_bound(q, k1, k2, beta) -> float:
    """``M = max over leading indices of beta max|q_i|_2 min(|k1|_inf |k2|_2, |k1|_2 |k2|_inf, |k1|_4 |k2|_4)``
    (each norm maximised over rows): ``|s_ij1j2| <= M`` for every score. ``O(L d)``, one host read."""
    xp = backend.namespace(q, k1, k2)

    def row_max(a, power):
        if power == math.inf:
            return xp.max(xp.abs(a), axis=(-2, -1))
        return xp.max(xp.sum(xp.abs(a) ** power, axis=-1), axis=-1) ** (1.0 / power)

    n1 = [row_max(k1, p) for p in (2, math.inf, 4)]
    n2 = [row_max(k2, p) for p in (2, math.inf, 4)]
    pair = xp.minimum(xp.minimum(n1[1] * n2[0], n1[0] * n2[1]), n1[2] * n2[2])
    return beta * max(backend.to_float(xp.max(row_max(q, 2) * pair)), 0.0)


def split_scales(coef, d: int):
    """``(query, key)`` column scales (float64, ``(k,)``) splitting ``w_a = c_|a| |a|!/a!`` in three:
    ``sign(w_a) |w_a|^(1/3)`` for ``phi`` and ``|w_a|^(1/3)`` for each of ``psi1``, ``psi2``."""
    key = feature_scales(coef, d, "key") ** (2.0 / 3.0)  # (|w|^(1/2))^(2/3)
    return np.sign(feature_scales(coef, d, "query")) * key, key


def check_extreme_triples(qs, k1, k2, phi, psi1, psi2, choice: PolyChoice, factor: float = 10.0) -> None:
    """Measure the rounding of ``phi_i . (psi1_j1 * psi2_j2)`` where it is worst, and raise if it is far past
    the estimate (the tensor form of :func:`gpulora.poly.chain.check_extreme_pairs`).

    Per leading index: the rows of largest norm ``i*``, ``a*``, ``b*`` of ``qs = beta q``, ``k1``, ``k2``
    (they define ``M``) and, holding two of them, the row of the third with the most negative score. The four
    triples' feature products, taken from the features actually computed, are compared with ``p(s)``
    evaluated in float64 on the host; a relative deviation above ``factor`` times the error budget
    (``choice.budget``, at least the approximation error) raises :class:`gpulora.PolynomialFailure`.
    Cost ``O(L d + n k)``, one host read of ``4 n`` triples (``n`` leading indices).
    """
    xp = backend.namespace(qs, k1, k2, phi, psi1, psi2)
    flat = [xp.reshape(a, (-1,) + a.shape[-2:]) for a in (qs, k1, k2, phi, psi1, psi2)]
    q2, a2, b2, f0, f1, f2 = flat
    n = xp.arange(q2.shape[0])

    def biggest(z):
        return xp.argmax(xp.sum(z * z, axis=-1), axis=-1)

    def most_negative(z, w):  # argmin_j of z_j . w, w one row per leading index
        return xp.argmin(xp.sum(z * w[:, None, :], axis=-1), axis=-1)

    def pick(z, m, rows):  # z[m, rows] (array-API integer indexing)
        return _pick_rows(xp, z, m, rows)

    i, a, b = biggest(q2), biggest(a2), biggest(b2)
    b_opp = most_negative(b2, pick(q2, n, i) * pick(a2, n, a))
    a_opp = most_negative(a2, pick(q2, n, i) * pick(b2, n, b))
    i_opp = most_negative(q2, pick(a2, n, a) * pick(b2, n, b))
    rows, cols1, cols2 = xp.concat([i, i, i, i_opp]), xp.concat([a, a, a_opp, a]), xp.concat([b, b_opp, b, b])
    nn = xp.concat([n, n, n, n])
    got = xp.sum(pick(f0, nn, rows) * pick(f1, nn, cols1) * pick(f2, nn, cols2), axis=-1)
    s = xp.sum(pick(q2, nn, rows) * pick(a2, nn, cols1) * pick(b2, nn, cols2), axis=-1)
    got, s = backend.to_numpy(got).astype(np.float64), backend.to_numpy(s).astype(np.float64)
    want = evaluate(choice.coef, s)
    dev = float(np.max(np.abs(got - want) / np.abs(want))) if want.size else 0.0
    allowed = factor * max(choice.budget, choice.approx_error, 4 * float(np.finfo(backend.host_dtype(phi)).eps))
    if not dev <= allowed:
        raise PolynomialFailure(
            f"the degree-{choice.degree} {choice.family} polynomial lost its accuracy to rounding in "
            f"{phi.dtype} on this input: phi(q) . (psi(k1) * psi(k2)) deviates from p(s) by {dev:.3g} "
            f"(relative) at the most negative scores (allowed {allowed:.3g}, bound M = {choice.bound:.3g}). "
            f"Use a smaller bound (normalised inputs), float64, or method='exact'")


def features(q, k1, k2, beta, choice: PolyChoice):
    """``(U, Psi1, Psi2)``, each ``(..., L, k)``, with ``U = diag(1/D) phi(beta q)``, after the run-time checks.

    Raises :class:`gpulora.PolynomialFailure` when rounding swamps ``phi . (psi1 * psi2)`` at the extreme
    scores or a normaliser falls below ``L^2 p_min / 2``.
    """
    xp = backend.namespace(q, k1, k2)
    d, L = q.shape[-1], k1.shape[-2]
    table = monomial_table(d, choice.degree)
    sq, sk = (xp.asarray(s, dtype=q.dtype) for s in split_scales(choice.coef, d))
    qs = beta * q
    phi = monomial_features(qs, table, sq)  # [..., L, k]
    psi1 = monomial_features(k1, table, sk)
    psi2 = monomial_features(k2, table, sk)
    check_extreme_triples(qs, k1, k2, phi, psi1, psi2, choice)
    den = phi @ (xp.sum(psi1, axis=-2) * xp.sum(psi2, axis=-2))[..., None]  # [..., L, 1]
    check_normaliser(den, L * L * choice.min_value, choice)
    phi /= den  # U in place of Phi
    return phi, psi1, psi2


def _cast(xp, dtype, *arrays):
    if isinstance(dtype, np.dtype):  # the plan's NumPy dtype, as xp's
        dtype = backend.namespace_dtype(xp, dtype)
    return [None if a is None else xp.astype(a, dtype, copy=False) for a in arrays]


def output(q, k1, k2, v1, v2, beta, choice: PolyChoice, compute_dtype):
    """``O~ = U ((Psi1^T V1) * (Psi2^T V2))`` of shape ``(..., L, d_v)`` in ``q.dtype``. ``O(L k d_v)``."""
    xp = backend.namespace(q, k1, k2, v1, v2)
    qc, k1c, k2c, v1c, v2c = _cast(xp, compute_dtype, q, k1, k2, v1, v2)
    u, psi1, psi2 = features(qc, k1c, k2c, beta, choice)
    return xp.astype(u @ ((psi1.mT @ v1c) * (psi2.mT @ v2c)), q.dtype, copy=False)


def loss_and_grads(q, k1, k2, v1, v2, beta, choice: PolyChoice, compute_dtype, *, y=None, grad_output=None,
                   need=("q", "k1", "k2", "v1", "v2"), with_output=False):
    """Loss and the gradients with respect to ``Q, K1, K2, V1, V2`` by the chain above.

    Arguments and returns as :func:`gpulora.tensor.exact.loss_and_grads`, plus the polynomial ``choice``
    and the ``compute_dtype`` of the features and products (results come back in ``q.dtype``); with
    ``with_output`` the output ``O~`` follows as a seventh element.
    """
    target = y if grad_output is None else grad_output
    xp = backend.namespace(q, k1, k2, v1, v2, target)
    need = set(need)
    qc, k1c, k2c, v1c, v2c, tc = _cast(xp, compute_dtype, q, k1, k2, v1, v2, target)
    u, psi1, psi2 = features(qc, k1c, k2c, beta, choice)
    n1, n2 = psi1.mT @ v1c, psi2.mT @ v2c  # [..., k, d_v]
    o = u @ (n1 * n2)
    if grad_output is None:
        g = o - tc
        loss = 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
    else:
        g = tc
        loss = xp.sum(xp.astype(o * g, xp.float64))
    r = xp.sum(g * o, axis=-1, keepdims=True)  # [..., L, 1]
    out = dict.fromkeys(("q", "k1", "k2", "v1", "v2"))
    if need & {"v1", "v2"}:
        ug = u.mT @ g  # [..., k, d_v]
        if "v1" in need:
            out["v1"] = psi1 @ (ug * n2)
        if "v2" in need:
            out["v2"] = psi2 @ (ug * n1)
    t1 = kron_contract(psi1, v1c, k1c) if need & {"q", "k2"} else None  # [..., k, d_v, d_head]
    t2 = kron_contract(psi2, v2c, k2c) if need & {"q", "k1"} else None
    m1 = psi1.mT @ k1c if need & {"q", "k2"} else None  # [..., k, d_head]
    m2 = psi2.mT @ k2c if need & {"q", "k1"} else None
    if "q" in need:
        out["q"] = beta * (kron_readout(u, g, t1 * t2) - r * (u @ (m1 * m2)))
    if need & {"k1", "k2"}:
        t_q = kron_contract(u, g, qc)
        rq = u.mT @ (r * qc)  # [..., k, d_head]
        if "k1" in need:
            out["k1"] = beta * (kron_readout(psi1, v1c, t_q * t2) - psi1 @ (rq * m2))
        if "k2" in need:
            out["k2"] = beta * (kron_readout(psi2, v2c, t_q * t1) - psi2 @ (rq * m1))
    extra = (o,) if with_output else ()
    return tuple(_cast(xp, q.dtype, loss, *(out[t] for t in ("q", "k1", "k2", "v1", "v2")), *extra))
