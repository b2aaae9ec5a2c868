"""The public entry points of tensor attention: validate, plan (exact or poly), run, pack.

Mirrors :mod:`gpulora.grad` (and :mod:`gpulora.dispatch`) and its error contract: the same ``method`` semantics, the same polynomial
choice (:func:`gpulora.poly.coefficients.choose` on the bound of :func:`gpulora.tensor.chain.score_bound`)
and feature budget (:mod:`gpulora.poly.budget`), ``error_bound`` and ``error_estimate`` on every result
(:func:`error_estimate`), :class:`gpulora.AccuracyWarning` under ``method="poly"`` where ``method="auto"``
runs exact instead, the fallback of ``"auto"`` to exact when the polynomial fails at run time (said in
``GradResult.note``), results checked finite, and :func:`gpulora.adapters.adapter_grads` for the chain rule
from projections to ``B`` and ``A``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from .. import backend
from ..adapters import _merge_heads, _split_heads, adapter_grads
from ..dispatch import Plan, _leaves, estimate_from_spread, judge_estimate
from ..model import AccuracyWarning, GradResult, LoRA, RunRecord, check_call_types, check_parameters
from ..poly.budget import FeatureBudgetError, check_budget, poly_bytes
from ..poly.chain import PolynomialFailure
from ..poly.coefficients import DEFAULT_TOL, choose
from ..validation import all_finite, check_beta, check_degree, check_method, check_real_array, check_tol
from . import chain, cost, exact
from .model import TARGETS, TensorHead

__all__ = ["TensorAttentionGrad", "attention_vjp", "error_estimate", "forward", "lora_grad", "loss", "plan", "prepare"]


@dataclasses.dataclass(frozen=True)
class TensorProblem:
    """A validated call: projections in head layout ``(batch, H, L, d)``, in the compute dtype of ``x``."""

    xp: Any
    x: Any  # (batch, L, d_model)
    q: Any  # (batch, H, L, d_head)
    k1: Any
    k2: Any
    v1: Any  # (batch, H, L, d_v)
    v2: Any
    y: Any  # (batch, H, L, d_v): targets, or the upstream gradient when upstream is True; or None
    upstream: bool
    beta: float
    batched: bool

    @property
    def projections(self):
        return self.q, self.k1, self.k2, self.v1, self.v2


@dataclasses.dataclass(frozen=True)
class TensorAttentionGrad(RunRecord):
    """What :func:`attention_vjp` returns, as :class:`gpulora.AttentionGrad` does for matrix attention (the
    run fields keyword-only, from :class:`gpulora.model.RunRecord`).

    Attributes
    ----------
    dq, dk1, dk2 : arrays of shape (..., L, d_head)
    dv1, dv2 : arrays of shape (..., L, d_v)
        The gradients of ``sum(O * dO)`` with respect to ``q, k1, k2, v1, v2``.
    out : array of shape (..., L, d_v)
        The attention output ``O``, computed on the way.
    method, degree, features, bound, family, compute_dtype, note, error_bound, error_estimate
        As in :class:`gpulora.GradResult` (the upstream gradient is exact, so ``error_estimate`` is
        ``eps + 2 eps / (1 - eps)`` for poly; 0 for exact).
    """

    dq: Any
    dk1: Any
    dk2: Any
    dv1: Any
    dv2: Any
    out: Any


def _check_options(method, degree, tol):
    check_method(method)
    if degree is not None:
        check_degree(degree)
    if tol is not None:
        check_tol(tol)
    if method == "exact" and degree is not None:
        raise ValueError("degree applies to method='poly' or 'auto', not method='exact'")


def _target_or_upstream(y, grad_output, *, required=True):
    if y is not None and grad_output is not None:
        raise ValueError("pass either y (targets) or grad_output (an upstream gradient dO), not both")
    if required and y is None and grad_output is None:
        raise ValueError("y must be an array of targets (or pass grad_output=dO instead), got None")
    return (grad_output, True) if grad_output is not None else (y, False)


def prepare(head: TensorHead, lora: LoRA, x, y=None, *, grad_output=None, need_target=False) -> TensorProblem:
    """Validate the call and project ``x`` to the adapted ``Q, K1, K2, V1, V2`` (cast to ``x.dtype``)."""
    check_call_types(head, lora, TensorHead, "gpulora.tensor.TensorHead", TARGETS, " for a tensor head")
    check_parameters(head, lora)  # B and A are usually updated in place between calls
    target, upstream = _target_or_upstream(y, grad_output, required=need_target)
    name = "grad_output" if upstream else "y"
    check_real_array("x", x, ndim=(2, 3))
    arrays = [x] + [head.weight(t) for t in TARGETS] + [a for pair in lora.adapters.values() for a in pair]
    if target is not None:
        check_real_array(name, target, ndim=(2, 3))
        arrays.append(target)
    xp = backend.namespace(*arrays)
    batched = x.ndim == 3
    if x.shape[-1] != head.d_model:
        raise ValueError(f"x must have d_model = {head.d_model} columns (rows of w_q), got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or (batched and x.shape[0] < 1):
        raise ValueError(f"x must have at least one token and one batch member, got shape {tuple(x.shape)}")
    if target is not None:
        want = x.shape[:-1] + (head.heads * head.d_v,)
        if tuple(target.shape) != want:
            raise ValueError(f"{name} must have shape {want} (x's leading shape, then heads * d_v), got "
                             f"{tuple(target.shape)}")
    for t, (b, a) in lora.adapters.items():
        d_out = head.weight(t).shape[1]
        if b.shape[0] != head.d_model or a.shape[1] != d_out:
            raise ValueError(f"adapters[{t!r}] must be B of shape ({head.d_model}, r) and A of shape (r, {d_out}) "
                             f"for w_{t} of shape {tuple(head.weight(t).shape)}, got B {tuple(b.shape)} and A "
                             f"{tuple(a.shape)}")
    dtype = x.dtype
    x3 = x if batched else x[None, ...]

    def project(t):
        w = xp.astype(head.weight(t), dtype, copy=False)
        if t in lora.adapters:
            b, a = lora.adapters[t]
            w = w + lora.scaling(t) * (xp.astype(b, dtype, copy=False) @ xp.astype(a, dtype, copy=False))
        return _split_heads(xp, x3 @ w, head.heads)

    y4 = None
    if target is not None:
        y4 = _split_heads(xp, xp.astype(target if batched else target[None, ...], dtype, copy=False), head.heads)
    return TensorProblem(xp, x3, *(project(t) for t in TARGETS), y4, upstream, head.beta, batched)


def plan(projections, beta, method, *, degree=None, tol=None, targets=TARGETS) -> Plan:
    """Decide what runs (see :func:`lora_grad` for ``method="auto"``) for ``projections = (q, k1, k2, v1, v2)``
    of shape ``(..., L, d)``.

    Refusals (``"poly"``: raised; ``"auto"``: exact, the reason in ``note``): a bound that overflows, no
    polynomial meeting ``tol``, a feature map over the budget. A fixed ``degree`` whose error bound exceeds
    ``tol`` warns under ``"poly"`` (:class:`gpulora.AccuracyWarning`) and runs exact under ``"auto"``.
    """
    q, k1, k2, v1, _ = projections
    with np.errstate(over="ignore"):  # an overflowing bound is inf, handled below
        bound = chain.score_bound(q, k1, k2, beta)
    target = DEFAULT_TOL if tol is None else tol
    if method == "exact":
        return Plan("exact", bound, tol=target)
    dtype = backend.host_dtype(q)
    lead, L, d_head, d_v = math.prod(q.shape[:-2]), q.shape[-2], q.shape[-1], v1.shape[-1]
    what = f"tensor attention with score bound M = beta max|q| max|k1 * k2| = {bound:.3g}"
    try:
        if not math.isfinite(bound):
            raise ValueError(f"{what} overflows {dtype}: no polynomial can cover the scores")
        choice, compute = choose(bound, tol=tol, degree=degree, dtype=dtype)
        k = choice.features(d_head)
        # three feature maps instead of two: 3/2 of the matrix chain's estimate
        nbytes = 3 * poly_bytes(lead, L, k, d_head, d_v, np.dtype(compute).itemsize) // 2
        check_budget(d_head, choice.degree, nbytes=nbytes, what=f"the {choice.family} polynomial for {what}")
    except ValueError as err:
        if method == "poly":
            if isinstance(err, FeatureBudgetError) or what in str(err):
                raise
            raise ValueError(f"{what}: {err}") from None
        why = "poly is over the feature budget" if isinstance(err, FeatureBudgetError) else \
            "poly cannot meet the tolerance here"
        return Plan("exact", bound, note=f"auto: {why} ({err}); ran exact", tol=target)
    eps = choice.total_error(compute)
    if eps > target:  # only a fixed degree gets here
        msg = (f"degree={choice.degree}: the {choice.family} polynomial's error bound on [-M, M], M = "
               f"{bound:.3g}, is {eps:.3g} (approximation plus rounding), more than tol={target:.3g}; the "
               f"gradients may be off by a multiple of that. Pass tol= instead of degree= (or a higher degree)")
        if method != "poly":
            return Plan("exact", bound, note=f"auto: {msg}; ran exact", tol=target)
        warnings.warn(msg, AccuracyWarning, stacklevel=3)
    if method == "poly":
        return Plan("poly", bound, choice, compute, tol=target, warned=eps > target)
    name = "cupy" if backend.is_cupy(q) else "numpy"
    t_exact = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name)
    t_poly = lead * cost.poly_seconds(L, d_head, d_v, k, targets, backend=name, float64_features=compute != dtype)
    winner = "poly" if t_poly < t_exact else "exact"
    note = (f"auto: estimated exact {t_exact:.3g} s vs poly {t_poly:.3g} s (degree {choice.degree} "
            f"{choice.family}, k = {k}): ran {winner}")
    return Plan(winner, bound, choice, compute, note, tol=target)


def error_estimate(projections, p: Plan, residual_norm: float, *, upstream=False) -> float:
    """A-posteriori estimate of the relative error of a poly call's gradients (and loss), as
    :func:`gpulora.dispatch.error_estimate` for matrix attention: ``eps + E / (R - E)``.

    ``eps = p.error_bound``; every weight of ``F~`` is within a relative ``delta = 2 eps / (1 - eps)`` of
    ``F`` and the weight errors of a row sum to zero, so ``|o~_i - o_i| <= delta max_{j1, j2}
    |v1_j1 * v2_j2 - c|`` for any constant ``c``. With ``c = m1 * m2`` (the column means of ``V1``, ``V2``),
    ``v1 * v2 - c = (v1 - m1) * v2 + m1 * (v2 - m2)`` and, by Hoelder, ``|a * b|_2 <= min(|a|_inf |b|_2,
    |a|_2 |b|_inf)``; ``E = delta sqrt(L sum over (batch, head) of that maximum squared)`` bounds
    ``|O~ - O|_F``, a worst case (no cancellation between key pairs). ``R = |O~ - y|_F``; the last step is
    :func:`gpulora.dispatch.estimate_from_spread` (``inf`` when ``0 < E`` and ``R <= E``: near a perfect fit
    the residual may be all approximation error). With an upstream gradient
    (``upstream``) ``G = dO`` carries no approximation error and the estimate is ``eps + delta``. Cost
    ``O(L d_v)``, one host read.
    """
    eps = p.error_bound
    delta = 2 * eps / (1 - eps)
    if upstream:
        return eps + delta
    xp = backend.namespace(*projections)
    v1, v2 = (xp.astype(v, xp.float64, copy=False) for v in projections[3:])
    m1, m2 = xp.mean(v1, axis=-2, keepdims=True), xp.mean(v2, axis=-2, keepdims=True)

    def norms(a):  # (max row 2-norm, max |entry|) per leading index
        return xp.max(xp.sum(a * a, axis=-1), axis=-1) ** 0.5, xp.max(xp.abs(a), axis=(-2, -1))

    def product(a, b):  # bound on max_{rows} |a_i * b_j|_2
        (a2, ai), (b2, bi) = norms(a), norms(b)
        return xp.minimum(ai * b2, a2 * bi)

    spread = product(v1 - m1, v2) + product(m1, v2 - m2)  # [batch, H]
    return estimate_from_spread(p, v1.shape[-2], backend.to_float(xp.sum(spread * spread)), residual_norm)


def _run(projections, p: Plan, *, beta, y, upstream, need, with_output=False):
    kw = dict(grad_output=y, need=need) if upstream else dict(y=y, need=need)
    kw["with_output"] = with_output
    if p.method == "exact":
        return exact.loss_and_grads(*projections, beta, **kw)
    return chain.loss_and_grads(*projections, beta, p.choice, p.compute_dtype, **kw)


def _output(projections, p: Plan, *, beta):
    if p.method == "exact":
        return exact.attention_output(*projections, beta)
    return chain.output(*projections, beta, p.choice, p.compute_dtype)


def _checked_run(run, projections, p: Plan, **kw):
    """``run(projections, p, **kw)``, raising rather than returning NaN or inf from finite inputs (the scores
    or products overflowed): :class:`gpulora.PolynomialFailure` for poly (``auto`` then runs exact), else
    ``ValueError``. One fused reduction, one host read on CuPy."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = run(projections, p, **kw)
    if not all_finite(*_leaves(out)):
        dtype = np.dtype(projections[0].dtype)
        raise (PolynomialFailure if p.method == "poly" else ValueError)(
            f"the {p.method} tensor-attention computation overflowed {dtype} (NaN or inf in its results) "
            f"although every input is finite: the scores reach up to M = {p.bound:.3g}; scale x or the "
            f"weights down (or beta), or use float64 inputs")
    return out


def _with_fallback(run, projections, p: Plan, requested: str, **kw):
    """:func:`_checked_run`; under ``method="auto"`` a poly run that fails falls back to exact, and says so."""
    try:
        return p, _checked_run(run, projections, p, **kw)
    except PolynomialFailure as err:
        if requested != "auto":
            raise
        p = dataclasses.replace(p, method="exact", note=f"auto: poly failed ({err}); fell back to exact")
        return p, _checked_run(run, projections, p, **kw)


def _checked_poly(projections, p: Plan, requested: str, out, run, *, upstream, **kw):
    """``(p, out, estimate)`` after the a-posteriori check of a poly run (0 for exact): over
    ``GRAD_TOL_FACTOR * tol``, ``"auto"`` reruns exact and says why, ``"poly"`` warns."""
    if p.method != "poly":
        return p, out, 0.0
    loss_ = backend.to_float(out[0])
    est = error_estimate(projections, p, math.sqrt(2 * max(loss_, 0.0)), upstream=upstream)
    return judge_estimate(p, est, requested, out,
                          lambda p: _with_fallback(run, projections, p, requested, upstream=upstream, **kw),
                          stacklevel=4)


def lora_grad(head: TensorHead, lora: LoRA, x, y=None, *, grad_output=None, method="auto", degree=None,
              tol=None) -> GradResult:
    """Loss and gradients of tensor attention with respect to every adapter's ``B`` and ``A``.

    Parameters
    ----------
    head : TensorHead
        Frozen ``w_q, w_k1, w_k2 (d_model, H d_head)``, ``w_v1, w_v2 (d_model, H d_v)`` and ``beta``.
    lora : gpulora.LoRA
        Adapters for a non-empty subset of ``"q", "k1", "k2", "v1", "v2"``.
    x : array of shape (L, d_model) or (batch, L, d_model)
        NumPy or CuPy, float32 or float64; results come back in its namespace and dtype.
    y : array of shape (L, H d_v) or (batch, L, H d_v)
        Targets of the loss ``0.5 ||O - y||^2`` (summed over the batch).
    grad_output : array shaped like ``y``, optional
        An upstream gradient ``dO`` in place of ``y``: the gradients are then the vector-Jacobian product
        (the backward of a network whose loss reaches attention through ``O``), and ``loss`` is
        ``sum(O * dO)``, the scalar whose gradient they are.
    method : {"auto", "exact", "poly"}
        ``"exact"``: ``O(L^3 (d_head + d_v))`` time, memory linear in ``L``. ``"poly"``: the polynomial
        method, ``O(L k d_v d_head)`` time, ``k = C(d_head + g, g)``. ``"auto"``: the bound ``M``, the
        degree ``tol`` needs and the modelled cost of both (:mod:`gpulora.tensor.cost`) decide; exact
        when poly cannot meet ``tol`` or fails at run time, and ``GradResult.note`` says why.
    degree : int, optional
        Fix the polynomial degree ``g``; otherwise the smallest one that meets ``tol``.
    tol : float, optional
        Target max relative error of ``p ~ exp`` on ``[-M, M]``, approximation plus estimated rounding
        (default ``gpulora.DEFAULT_TOL = 1e-3``); gradients then carry relative errors of a small
        multiple of it on bounded problems (the tests hold ``10 tol``).

    Returns
    -------
    gpulora.GradResult
        ``loss``, ``grads[target].B / .A``, the ``method`` that ran, ``degree``, ``features``, ``bound``,
        ``error_bound`` (a priori, ``eps`` of ``p ~ exp`` on ``[-M, M]``) and ``error_estimate`` (a
        posteriori, :func:`error_estimate`; over ``10 tol`` ``"auto"`` reruns exact and ``"poly"`` warns
        with :class:`gpulora.AccuracyWarning`).

    Raises
    ------
    ValueError, TypeError
        Bad input, naming the argument; for ``method="poly"``, when no polynomial meets ``tol`` at this
        bound or it fails at run time (:class:`gpulora.PolynomialFailure`).
    """
    _check_options(method, degree, tol)
    prob = prepare(head, lora, x, y, grad_output=grad_output, need_target=True)
    need = lora.targets
    p = plan(prob.projections, prob.beta, method, degree=degree, tol=tol, targets=need)
    kw = dict(beta=prob.beta, y=prob.y, upstream=prob.upstream, need=need)
    p, out = _with_fallback(_run, prob.projections, p, method, **kw)
    p, (loss_, *d), est = _checked_poly(prob.projections, p, method, out, _run, **kw)
    grads = adapter_grads(lora, prob, {t: _merge_heads(prob.xp, g) for t, g in zip(TARGETS, d) if g is not None})
    return GradResult(loss=prob.xp.asarray(loss_, dtype=prob.x.dtype), grads=grads, error_estimate=est,
                      **p.fields(prob.q.shape[-1]))


def forward(head: TensorHead, lora: LoRA, x, *, method="exact", degree=None, tol=None):
    """Tensor-attention output ``O`` of shape ``(L, H d_v)`` or ``(batch, L, H d_v)``.

    Arguments as in :func:`lora_grad`. Cost ``O(L^3 (d_head + d_v))`` exact, ``O(L k d_v)`` poly.
    """
    _check_options(method, degree, tol)
    prob = prepare(head, lora, x)
    p = plan(prob.projections, prob.beta, method, degree=degree, tol=tol, targets=())
    _, o = _with_fallback(_output, prob.projections, p, method, beta=prob.beta)
    merged = _merge_heads(prob.xp, o)  # (batch, L, H d_v)
    return merged if prob.batched else merged[0, ...]


def loss(head: TensorHead, lora: LoRA, x, y, *, method="exact", degree=None, tol=None):
    """The loss ``0.5 ||O - y||^2`` (summed over the batch) as a 0-d array; arguments as in :func:`lora_grad`."""
    _check_options(method, degree, tol)
    prob = prepare(head, lora, x, y, need_target=True)
    p = plan(prob.projections, prob.beta, method, degree=degree, tol=tol, targets=())
    kw = dict(beta=prob.beta, y=prob.y, upstream=False, need=())
    p, out = _with_fallback(_run, prob.projections, p, method, **kw)
    _, (loss_, *_), _ = _checked_poly(prob.projections, p, method, out, _run, **kw)
    return prob.xp.asarray(loss_, dtype=prob.x.dtype)


def attention_vjp(q, k1, k2, v1, v2, grad_output, *, beta=None, method="auto", degree=None,
                  tol=None) -> TensorAttentionGrad:
    """The backward of tensor attention for an upstream gradient: ``(q, k1, k2, v1, v2, dO) -> (dq, dk1, dk2,
    dv1, dv2)`` at the level of the projections (as :func:`gpulora.attention_vjp` for matrix attention).

    Parameters
    ----------
    q, k1, k2 : arrays of shape (..., L, d_head)
    v1, v2, grad_output : arrays of shape (..., L, d_v)
        Same namespace (NumPy or CuPy) and dtype; leading axes (batch, heads) are independent.
    beta : float, optional
        Inverse temperature; ``None`` means ``1 / d_head``.
    method, degree, tol
        As in :func:`lora_grad`.

    Returns
    -------
    TensorAttentionGrad
        ``dq, dk1, dk2, dv1, dv2`` (the gradients of ``sum(O * dO)``), ``out`` and what ran. Cost as
        :func:`lora_grad`.
    """
    _check_options(method, degree, tol)
    names = ("q", "k1", "k2", "v1", "v2", "grad_output")
    arrays = (q, k1, k2, v1, v2, grad_output)
    for n, a in zip(names, arrays):
        check_real_array(n, a, min_ndim=2)
    backend.namespace(*arrays)
    for n, a in zip(names[1:], arrays[1:]):
        if a.dtype != q.dtype:
            raise TypeError(f"{n} must have the dtype of q ({q.dtype}), got {a.dtype}")
    lead, L = q.shape[:-2], q.shape[-2]
    if L < 1 or q.shape[-1] < 1:
        raise ValueError(f"q must have at least one row and one column, got shape {tuple(q.shape)}")
    for n, a, like in (("k1", k1, q), ("k2", k2, q), ("v2", v2, v1), ("grad_output", grad_output, v1)):
        if tuple(a.shape) != tuple(like.shape):
            raise ValueError(f"{n} must have shape {tuple(like.shape)}, got {tuple(a.shape)}")
    if tuple(v1.shape[:-1]) != tuple(lead) + (L,):
        raise ValueError(f"v1 must have shape {tuple(lead) + (L, 'd_v')} (q's leading shape and L), got "
                         f"{tuple(v1.shape)}")
    beta = 1.0 / q.shape[-1] if beta is None else check_beta(beta)
    projections = arrays[:5]
    p = plan(projections, beta, method, degree=degree, tol=tol)
    kw = dict(beta=beta, y=grad_output, upstream=True, need=TARGETS, with_output=True)
    p, out = _with_fallback(_run, projections, p, method, **kw)
    p, (_, *d, o), est = _checked_poly(projections, p, method, out, _run, **kw)
    return TensorAttentionGrad(*d, out=o, error_estimate=est, **p.fields(q.shape[-1]))
