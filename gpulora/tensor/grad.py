"""The public entry points of tensor attention: validate, plan (exact or poly), run, pack.

Mirrors :mod:`gpulora.grad`: the same ``method`` semantics, the same polynomial choice
(:func:`gpulora.poly.coefficients.choose` on the bound of :func:`gpulora.tensor.chain.score_bound`), the same
fallback of ``method="auto"`` to exact when the polynomial fails at run time (said in ``GradResult.note``),
and :func:`gpulora.adapters.adapter_grads` for the chain rule from projections to ``B`` and ``A``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .. import backend
from ..adapters import _split_heads, adapter_grads, output_layout
from ..grad import Plan, _with_fallback
from ..model import GradResult, LoRA
from ..poly.coefficients import choose
from ..validation import check_beta, check_degree, check_method, check_real_array, check_tol
from . import chain, cost, exact
from .model import TARGETS, TensorHead

__all__ = ["attention_vjp", "forward", "lora_grad", "loss", "plan", "prepare"]


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
    if not isinstance(head, TensorHead):
        raise TypeError(f"head must be a gpulora.tensor.TensorHead, got {type(head).__name__}")
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora must be a gpulora.LoRA, got {type(lora).__name__}")
    unknown = [t for t in lora.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"adapters has unknown targets {unknown} for a tensor head; expected a subset of {TARGETS}")
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
    x3 = x if batched else x[None]

    def project(t):
        w = xp.astype(head.weight(t), dtype, copy=False)
        if t in lora.adapters:
            b, a = lora.adapters[t]
            w = w + lora.scaling(t) * (xp.astype(b, dtype, copy=False) @ xp.astype(a, dtype, copy=False))
        return _split_heads(xp, x3 @ w, head.heads)

    y4 = None
    if target is not None:
        y4 = _split_heads(xp, xp.astype(target if batched else target[None], dtype, copy=False), head.heads)
    return TensorProblem(xp, x3, *(project(t) for t in TARGETS), y4, upstream, head.beta, batched)


def plan(projections, beta, method, *, degree=None, tol=None, targets=TARGETS) -> Plan:
    """Decide what runs (see :func:`lora_grad` for ``method="auto"``) for ``projections = (q, k1, k2, v1, v2)``
    of shape ``(..., L, d)``."""
    q, k1, k2, v1, _ = projections
    bound = chain.score_bound(q, k1, k2, beta)
    if method == "exact":
        return Plan("exact", bound)
    dtype = np.dtype(q.dtype)
    try:
        choice, compute = choose(bound, tol=tol, degree=degree, dtype=dtype)
    except ValueError as err:
        if method == "poly":
            raise ValueError(f"tensor attention with score bound M = beta max|q| max|k1 * k2| = {bound:.3g}: "
                             f"{err}") from None
        return Plan("exact", bound, note=f"auto: poly cannot meet the tolerance here ({err})")
    if method == "poly":
        return Plan("poly", bound, choice, compute)
    lead, L, d_head, d_v = math.prod(q.shape[:-2]), q.shape[-2], q.shape[-1], v1.shape[-1]
    name = "cupy" if backend.is_cupy(q) else "numpy"
    k = choice.features(d_head)
    t_exact = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name)
    t_poly = lead * cost.poly_seconds(L, d_head, d_v, k, targets, backend=name, float64_features=compute != dtype)
    winner = "poly" if t_poly < t_exact else "exact"
    note = (f"auto: estimated exact {t_exact:.3g} s vs poly {t_poly:.3g} s (degree {choice.degree} "
            f"{choice.family}, k = {k}): ran {winner}")
    return Plan(winner, bound, choice, compute, note)


def _run(projections, p: Plan, *, beta, y, upstream, need):
    kw = dict(grad_output=y, need=need) if upstream else dict(y=y, need=need)
    if p.method == "exact":
        return exact.loss_and_grads(*projections, beta, **kw)
    return chain.loss_and_grads(*projections, beta, p.choice, p.compute_dtype, **kw)


def _output(projections, p: Plan, *, beta):
    if p.method == "exact":
        return exact.attention_output(*projections, beta)
    return chain.output(*projections, beta, p.choice, p.compute_dtype)


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
        ``loss``, ``grads[target].B / .A``, the ``method`` that ran, ``degree``, ``features``, ``bound``.

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
    p, (loss_, *d) = _with_fallback(_run, prob.projections, p, method, beta=prob.beta, y=prob.y,
                                    upstream=prob.upstream, need=need)
    grads = adapter_grads(lora, prob, dict(zip(TARGETS, d)))
    poly = p.method == "poly"
    return GradResult(
        loss=prob.xp.asarray(loss_, dtype=prob.x.dtype),
        grads=grads,
        method=p.method,
        degree=p.choice.degree if poly else None,
        features=p.choice.features(prob.q.shape[-1]) if poly else None,
        bound=p.bound,
        family=p.choice.family if poly else None,
        compute_dtype=str(p.compute_dtype) if poly else None,
        note=p.note,
    )


def forward(head: TensorHead, lora: LoRA, x, *, method="exact", degree=None, tol=None):
    """Tensor-attention output ``O`` of shape ``(L, H d_v)`` or ``(batch, L, H d_v)``.

    Arguments as in :func:`lora_grad`. Cost ``O(L^3 (d_head + d_v))`` exact, ``O(L k d_v)`` poly.
    """
    _check_options(method, degree, tol)
    prob = prepare(head, lora, x)
    p = plan(prob.projections, prob.beta, method, degree=degree, tol=tol, targets=())
    _, o = _with_fallback(_output, prob.projections, p, method, beta=prob.beta)
    return output_layout(prob, o)


def loss(head: TensorHead, lora: LoRA, x, y, *, method="exact", degree=None, tol=None):
    """The loss ``0.5 ||O - y||^2`` (summed over the batch) as a 0-d array; arguments as in :func:`lora_grad`."""
    _check_options(method, degree, tol)
    prob = prepare(head, lora, x, y, need_target=True)
    p = plan(prob.projections, prob.beta, method, degree=degree, tol=tol, targets=())
    _, (loss_, *_) = _with_fallback(_run, prob.projections, p, method, beta=prob.beta, y=prob.y,
                                    upstream=False, need=())
    return prob.xp.asarray(loss_, dtype=prob.x.dtype)


def attention_vjp(q, k1, k2, v1, v2, grad_output, *, beta=None, method="exact", degree=None, tol=None):
    """The backward of tensor attention for an upstream gradient: ``(q, k1, k2, v1, v2, dO) -> (dq, dk1, dk2,
    dv1, dv2)``.

    Parameters
    ----------
    q, k1, k2 : arrays of shape (..., L, d_head)
    v1, v2, grad_output : arrays of shape (..., L, d_v)
        Same namespace (NumPy or CuPy) and dtype; leading axes (batch, heads) are independent.
    beta : float, optional
        Inverse temperature; ``None`` means ``1 / d_head``.
    method, degree, tol
        As in :func:`lora_grad` (use that to learn which method ``"auto"`` ran).

    Returns
    -------
    tuple of 5 arrays
        The gradients of ``sum(O * dO)`` with respect to ``q, k1, k2, v1, v2``, shaped like them.
        Cost as :func:`lora_grad`.
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
    p = plan(arrays[:5], beta, method, degree=degree, tol=tol)
    _, (_, *d) = _with_fallback(_run, arrays[:5], p, method, beta=beta, y=grad_output, upstream=True, need=TARGETS)
    return tuple(d)
