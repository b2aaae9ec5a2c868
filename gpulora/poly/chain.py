r"""The chained low-rank LoRA gradient of the polynomial method, in time almost linear in L.

With ``phi = phi(beta q)``, ``psi = psi(k)`` the feature maps of :mod:`gpulora.poly.features`
(``phi_i . psi_j = p(s_ij) ~ exp(s_ij)``), ``D = Phi (Psi^T 1)`` (plus 1 for Softmax_1), ``U = diag(1/D) Phi``
and ``F~ = U Psi^T`` (never formed), per leading index (SPEC section 4):

    O~ = U (Psi^T V)                                        O(L k d_v)
    G  = O~ - Y,  r_i = g_i . o~_i,  loss = 0.5 ||G||^2
    dV = Psi (U^T G)                                        O(L k d_v)
    dQ = beta [ (U (x) G) . T_K  -  r * (U (Psi^T K)) ],    T_K = Psi^T (V (x) K)   (k, d_v, d_head)
    dK = beta [ (Psi (x) V) . T_Q  -  Psi (U^T (r * Q)) ],  T_Q = U^T (G (x) Q)     (k, d_v, d_head)

This is the paper's chain (``f ~ U1 V1^T``, ``p1 = (U1 (x) U2)(V1 (x) V2)^T`` of rank ``k d_v``,
``p2 = diag(r) U1 V1^T`` of rank ``k``) with every product taken in an order that never forms an ``L x L``
or ``L x k d_v`` array; it equals the exact-gradient formula of SPEC section 2 evaluated with ``F~`` for
``F`` to rounding, whatever the degree. Only what the targets need is computed: ``{v}`` needs ``U, Psi, G``;
``{q}`` adds ``T_K``; ``{k}`` adds ``T_Q``.

**Cost** ``O(batch H L k d_v d_head)`` time, ``O(batch H (L k + k d_v d_head))`` memory
(``k = C(d_head + g, g)``; the products are blocked over L, see :mod:`gpulora.poly.products`).

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
``p(s)`` at the most negative scores of the extreme rows (where cancellation is worst), and
:func:`check_normaliser` checks every ``D_i >= n_i p_min / 2`` (``p >= p_min > 0`` on ``[-M, M]``,
``n_i`` keys in row ``i``). Two host reads.
"""

from __future__ import annotations

import math

from .. import backend
import numpy as np

from .coefficients import PolyChoice, evaluate
from .features import feature_scales, monomial_features
from .monomials import monomial_table
from .products import kron_contract, kron_readout

__all__ = ["PolynomialFailure", "check_extreme_pairs", "check_normaliser", "features", "loss_and_grads", "output", "score_bound"]


class PolynomialFailure(ValueError):
    """The polynomial approximation broke down on this input (normaliser not positive or far too small)."""


def score_bound(q, k, beta) -> float:
    """``M = max over leading indices of beta * max_i |q_i| * max_j |k_j|`` (row norms; ``O(L d)``).

    By Cauchy-Schwarz ``|s_ij| <= M`` for every score. One host read.
    """
    xp = backend.namespace(q, k)
    qn = xp.max(xp.sum(q * q, axis=-1), axis=-1)
    kn = xp.max(xp.sum(k * k, axis=-1), axis=-1)
    return beta * math.sqrt(max(backend.to_float(xp.max(qn * kn)), 0.0))


def features(q, k, beta, choice: PolyChoice, *, softmax_one=False):
    """``(U, Psi)`` with ``U = diag(1/D) phi(beta q)``: the factors of ``F~ = U Psi^T`` (non-causal).

    Raises :class:`PolynomialFailure` when a normaliser falls below its guaranteed lower bound.
    """
    xp = backend.namespace(q, k)
    d = q.shape[-1]
    table = monomial_table(d, choice.degree)
    sq = xp.asarray(feature_scales(choice.coef, d, "query"), dtype=q.dtype)
    sk = xp.asarray(feature_scales(choice.coef, d, "key"), dtype=q.dtype)
    qs = beta * q
    phi = monomial_features(qs, table, sq)  # [..., L, k]
    psi = monomial_features(k, table, sk)  # [..., L, k]
    check_extreme_pairs(qs, k, phi, psi, choice)
    den = phi @ xp.sum(psi, axis=-2)[..., None]  # [..., L, 1]
    n_keys = k.shape[-2]
    check_normaliser(den, n_keys * choice.min_value, choice)
    if softmax_one:
        den += 1.0
    phi /= den  # U in place of Phi: one (..., L, k) array fewer at the peak
    return phi, psi


def _pick_rows(xp, a, n, rows):
    """``a[n, rows, :]`` for ``a (N, L, c)`` and index arrays ``n``, ``rows``: one ``take`` of the flattened
    rows (the array API's integer-array indexing does not mix with slices)."""
    return xp.take(xp.reshape(a, (-1, a.shape[-1])), n * a.shape[-2] + rows, axis=0)


def check_extreme_pairs(qs, k, phi, psi, choice: PolyChoice, factor: float = 10.0) -> None:
    """Measure the rounding of ``phi . psi`` where it is worst, and raise if it is far past the estimate.

    The cancellation is largest at the most negative scores. For each leading index, take the query row of
    largest norm ``i*`` and the key row of largest norm ``j*`` (they define ``M``), the key most opposed to
    ``i*`` and the query most opposed to ``j*``, and compare ``phi_i . psi_j`` at those three pairs with
    ``p(s_ij)`` evaluated in float64 on the host. A relative deviation above ``factor`` times the error
    budget the polynomial was chosen for (``choice.budget``, at least its approximation error) raises
    :class:`PolynomialFailure`. Cost ``O(L d)``,
    one host read of ``3 * batch * H`` pairs. This catches what the normaliser bound cannot: rounding
    garbage that is positive (e.g. ``p(-20)`` computed as 4442 in float32 by a degree-40 Taylor polynomial).
    """
    xp = backend.namespace(qs, k, phi, psi)
    d, kf = qs.shape[-1], phi.shape[-1]
    q2, k2 = xp.reshape(qs, (-1,) + qs.shape[-2:]), xp.reshape(k, (-1,) + k.shape[-2:])
    f2, p2 = xp.reshape(phi, (-1,) + phi.shape[-2:]), xp.reshape(psi, (-1,) + psi.shape[-2:])
    n = xp.arange(q2.shape[0])
    i_star = xp.argmax(xp.sum(q2 * q2, axis=-1), axis=-1)  # [n]
    j_star = xp.argmax(xp.sum(k2 * k2, axis=-1), axis=-1)
    j_opp = xp.argmin(xp.sum(_pick_rows(xp, q2, n, i_star)[:, None, :] * k2, axis=-1), axis=-1)
    i_opp = xp.argmin(xp.sum(q2 * _pick_rows(xp, k2, n, j_star)[:, None, :], axis=-1), axis=-1)
    rows = xp.concat([i_star, i_star, i_opp])
    cols = xp.concat([j_star, j_opp, j_star])
    nn = xp.concat([n, n, n])
    # [3 n]: features products and the scores they must reproduce
    got = xp.sum(_pick_rows(xp, f2, nn, rows) * _pick_rows(xp, p2, nn, cols), axis=-1)
    s = xp.sum(_pick_rows(xp, q2, nn, rows) * _pick_rows(xp, k2, nn, cols), axis=-1)
    got, s = backend.to_numpy(xp.stack([got, s])).astype(np.float64)  # one host read
    want = evaluate(choice.coef, s)
    dev = float(np.max(np.abs(got - want) / np.abs(want))) if want.size else 0.0
    allowed = factor * max(choice.budget, choice.approx_error, 4 * float(xp.finfo(phi.dtype).eps))
    if not dev <= allowed:
        raise PolynomialFailure(
            f"the degree-{choice.degree} {choice.family} polynomial lost its accuracy to rounding in "
            f"{phi.dtype} on this input: phi(q) . psi(k) deviates from p(q . k) by {dev:.3g} (relative) at "
            f"the most negative scores (allowed {allowed:.3g}, bound M = {choice.bound:.3g}, {kf} features "
            f"of {d} coordinates). Use a smaller bound (normalised inputs), float64, or method='exact'"
        )


def check_normaliser(den, lower, choice: PolyChoice) -> None:
    """Raise :class:`PolynomialFailure` unless every entry of ``den`` is finite and ``>= lower / 2``."""
    xp = backend.namespace(den)
    worst = backend.to_float(xp.min(den / lower)) if den.size else 1.0
    if not (math.isfinite(worst) and worst >= 0.5):
        raise PolynomialFailure(
            f"the degree-{choice.degree} {choice.family} polynomial failed on this input: a softmax "
            f"normaliser is {worst:.3g} times its guaranteed lower bound (must be >= 0.5) for the score "
            f"bound M = {choice.bound:.3g}; rounding has swamped the approximation. Use a smaller bound "
            f"(normalised inputs), a float64 input, or method='exact'"
        )


def _cast(xp, dtype, *arrays):
    return [None if a is None else xp.astype(a, dtype, copy=False) for a in arrays]


def output(q, k, v, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False):
    """``O~ = U (Psi^T V)`` of shape ``(..., L, d_v)`` in ``q.dtype``. Cost ``O(L k d_v)``."""
    xp = backend.namespace(q, k, v)
    qc, kc, vc = _cast(xp, compute_dtype, q, k, v)
    u, psi = features(qc, kc, beta, choice, softmax_one=softmax_one)
    return xp.astype(u @ (psi.mT @ vc), q.dtype, copy=False)


def loss_and_grads(q, k, v, y, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False,
                   need=("q", "k", "v")):
    """Loss and the gradients with respect to ``Q``, ``K``, ``V`` by the chain above (non-causal).

    Parameters and returns as :func:`gpulora.exact.attention.loss_and_grads`, plus the polynomial ``choice``
    and the ``compute_dtype`` of the features and products (results come back in ``q.dtype``).
    """
    xp = backend.namespace(q, k, v, y)
    need = set(need)
    qc, kc, vc, yc = _cast(xp, compute_dtype, q, k, v, y)
    u, psi = features(qc, kc, beta, choice, softmax_one=softmax_one)
    o = u @ (psi.mT @ vc)  # [..., L, d_v]
    g = o - yc
    loss = 0.5 * xp.sum(xp.astype(g, xp.float64) ** 2)
    r = xp.sum(g * o, axis=-1, keepdims=True)  # [..., L, 1]
    dq = dk = dv = None
    if "v" in need:
        dv = psi @ (u.mT @ g)
    if "q" in need:
        t_k = kron_contract(psi, vc, kc)  # [..., k, d_v, d_head]
        dq = beta * (kron_readout(u, g, t_k) - r * (u @ (psi.mT @ kc)))
    if "k" in need:
        t_q = kron_contract(u, g, qc)  # [..., k, d_v, d_head]
        dk = beta * (kron_readout(psi, vc, t_q) - psi @ (u.mT @ (r * qc)))
    back = _cast(xp, q.dtype, loss, dq, dk, dv)
    return tuple(back)
