"""Plan and run one attention call: exact or poly, which polynomial, which precision, and the fallback.

Both front doors use it: :mod:`gpulora.functional` (q/k/v level) and :mod:`gpulora.grad` (LoRA heads).
They hand over an :class:`Attention`, the validated call in the grouped layout

    q (N, H_kv, n_rep, L, d_head),   k (N, H_kv, 1, L, d_head),   v (N, H_kv, 1, L, d_v),
    key_valid (N, 1, 1, L) bool or None,

in the compute dtype (float32 or float64), where ``N`` is the flattened batch and each key/value head
serves ``n_rep`` query heads (``n_rep = 1``: plain multi-head attention). :func:`run_vjp` and
:func:`run_output` return gradients in the same layout (``dk``, ``dv`` summed over the group).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from . import backend, cost
from .exact import attention as exact
from .poly import causal as causal_chain
from .poly import chain
from .poly.coefficients import FAMILIES, PolyChoice, choose
from .validation import check_bool, check_degree, check_method, check_tol

__all__ = ["Attention", "Plan", "check_options", "plan", "run_output", "run_vjp"]


@dataclasses.dataclass(frozen=True)
class Attention:
    """A validated attention call in the grouped layout (see the module docstring)."""

    xp: Any
    q: Any
    k: Any
    v: Any
    beta: float
    causal: bool = False
    softmax_one: bool = False
    key_valid: Any = None

    def masked_rows(self, a):
        """``a (N, ., ., L, d)`` with its padding rows zeroed (a new array; ``a`` itself when unmasked)."""
        return a if self.key_valid is None else self.xp.where(self.key_valid[..., None], a, 0.0)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What will run: ``method``, and for poly the polynomial and the compute dtype."""

    method: str
    bound: float
    choice: PolyChoice | None = None
    compute_dtype: np.dtype | None = None
    note: str = ""

    def fields(self, d_head: int) -> dict:
        """The result fields that describe this plan (``method``, ``degree``, ``features``, ...)."""
        poly = self.method == "poly"
        return dict(
            method=self.method,
            degree=self.choice.degree if poly else None,
            features=self.choice.features(d_head) if poly else None,
            bound=self.bound,
            family=self.choice.family if poly else None,
            compute_dtype=str(self.compute_dtype) if poly else None,
            note=self.note,
        )


def check_options(method, degree, tol, causal, family, softmax_one=False):
    """Validate the options every entry point shares (each error names its argument)."""
    check_method(method)
    if degree is not None:
        check_degree(degree)
    if tol is not None:
        check_tol(tol)
    check_bool("causal", causal)
    check_bool("softmax_one", softmax_one)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    if method == "exact" and (degree is not None or family is not None):
        raise ValueError("degree and family apply to method='poly' or 'auto', not method='exact'")


def plan(att: Attention, method, *, degree=None, tol=None, family=None, targets=("q", "k", "v")) -> Plan:
    """Decide what runs.

    ``bound`` is ``M = beta max_i |q_i| max_j |k_j|`` over the real (unmasked) rows. ``method="auto"``
    estimates the cost of both methods for these sizes (:mod:`gpulora.cost`) and picks the cheaper one that
    meets ``tol``; it picks exact, and says why in ``note``, when no polynomial meets ``tol``.
    """
    bound = chain.score_bound(att.masked_rows(att.q), att.masked_rows(att.k), att.beta)
    if method == "exact":
        return Plan("exact", bound)
    dtype = np.dtype(att.q.dtype)
    try:
        choice, compute = choose(bound, tol=tol, degree=degree, family=family, dtype=dtype)
    except ValueError as err:
        if method == "poly":
            raise
        return Plan("exact", bound, note=f"auto: poly cannot meet the tolerance here ({err})")
    if att.key_valid is not None:
        if method == "poly":
            raise ValueError("key_mask (or lengths) is not yet supported by method='poly'; use method='exact'")
        return Plan("exact", bound, note="auto: the poly path does not take a key mask yet: ran exact")
    if method == "poly":
        return Plan("poly", bound, choice, compute)
    lead, L = math.prod(att.q.shape[:-2]), att.q.shape[-2]
    d_head, d_v = att.q.shape[-1], att.v.shape[-1]
    name = "cupy" if backend.is_cupy(att.q) else "numpy"
    t_exact = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name, causal=att.causal)
    t_poly = lead * cost.poly_seconds(L, d_head, d_v, choice.features(d_head), targets, backend=name,
                                      causal=att.causal, float64_features=compute != dtype)
    winner = "poly" if t_poly < t_exact else "exact"
    note = (f"auto: estimated exact {t_exact:.3g} s vs poly {t_poly:.3g} s (degree {choice.degree} "
            f"{choice.family}, k = {choice.features(d_head)}): ran {winner}")
    return Plan(winner, bound, choice, compute, note)


def _expanded(att: Attention):
    """``(q, k, v)`` with ``k``, ``v`` repeated over the group axis (the poly chain takes equal leading axes)."""
    xp, shape = att.xp, att.q.shape[:-2]
    k = xp.broadcast_to(att.k, shape + att.k.shape[-2:])
    v = xp.broadcast_to(att.v, shape + att.v.shape[-2:])
    return att.q, k, v


def _group_sum(att: Attention, a):
    """The adjoint of :func:`_expanded`: sum a key/value gradient over its group of query heads."""
    if a is None or a.shape[2] == att.k.shape[2]:
        return a
    return att.xp.sum(a, axis=2, keepdims=True)


def _poly_output(att: Attention, p: Plan):
    impl = causal_chain if att.causal else chain
    q, k, v = _expanded(att)
    return impl.output(q, k, v, att.beta, p.choice, p.compute_dtype, softmax_one=att.softmax_one)


def _poly_vjp(att: Attention, p: Plan, y, grad_output, need):
    impl = causal_chain if att.causal else chain
    q, k, v = _expanded(att)
    o = impl.output(q, k, v, att.beta, p.choice, p.compute_dtype, softmax_one=att.softmax_one)
    if y is None:
        # the chain's G = O~ - Y is the given upstream gradient when Y = O~ - G
        y = o - grad_output
    loss, dq, dk, dv = impl.loss_and_grads(q, k, v, y, att.beta, p.choice, p.compute_dtype,
                                           softmax_one=att.softmax_one, need=need)
    return (loss if grad_output is None else None), o, dq, _group_sum(att, dk), _group_sum(att, dv)


def _vjp(att: Attention, p: Plan, *, y, grad_output, need):
    if p.method == "exact":
        return exact.attention_vjp(att.q, att.k, att.v, att.beta, y=y, grad_output=grad_output, causal=att.causal,
                                   softmax_one=att.softmax_one, key_valid=att.key_valid, need=need)
    return _poly_vjp(att, p, y, grad_output, need)


def _output(att: Attention, p: Plan):
    if p.method == "exact":
        return exact.attention_output(att.q, att.k, att.v, att.beta, causal=att.causal, softmax_one=att.softmax_one,
                                      key_valid=att.key_valid)
    return _poly_output(att, p)


def _with_fallback(run, att: Attention, p: Plan, requested: str, **kw):
    """``run(att, p, **kw)``; under ``method="auto"`` a poly run that fails falls back to exact, and says so."""
    try:
        return p, run(att, p, **kw)
    except chain.PolynomialFailure as err:
        if requested != "auto":
            raise
        p = dataclasses.replace(p, method="exact", note=f"auto: poly failed ({err}); fell back to exact")
        return p, run(att, p, **kw)


def run_vjp(att: Attention, p: Plan, requested: str, *, y=None, grad_output=None, need=("q", "k", "v")):
    """``(plan that ran, (loss, out, dq, dk, dv))`` for targets ``y`` or an upstream gradient ``grad_output``
    (``(N, H_kv, n_rep, L, d_v)``); see :func:`gpulora.exact.attention.attention_vjp`."""
    return _with_fallback(_vjp, att, p, requested, y=y, grad_output=grad_output, need=tuple(need))


def run_output(att: Attention, p: Plan, requested: str):
    """``(plan that ran, out)`` with ``out`` of shape ``(N, H_kv, n_rep, L, d_v)``."""
    return _with_fallback(_output, att, p, requested)
