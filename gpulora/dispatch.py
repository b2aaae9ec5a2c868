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

    def without_padding(self) -> Attention:
        """This call with the padding rows of ``q``, ``k`` and ``v`` zeroed: they take part in no result, and
        whatever finite values they hold can then overflow no score, feature or product. ``O(L d)``."""
        if self.key_valid is None:
            return self
        return dataclasses.replace(self, q=self.masked_rows(self.q), k=self.masked_rows(self.k),
                                   v=self.masked_rows(self.v))


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
    clean = att.without_padding()
    bound = chain.score_bound(clean.q, clean.k, att.beta)
    if method == "exact":
        return Plan("exact", bound)
    dtype = np.dtype(att.q.dtype)
    try:
        choice, compute = choose(bound, tol=tol, degree=degree, family=family, dtype=dtype)
    except ValueError as err:
        if method == "poly":
            raise
        return Plan("exact", bound, note=f"auto: poly cannot meet the tolerance here ({err})")
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


def _expanded(att: Attention, a):
    """A key/value array repeated over the group axis (a broadcast view: the causal chain and the rounding
    check take equal leading axes)."""
    return att.xp.broadcast_to(a, att.q.shape[:-2] + a.shape[-2:])


def _group_sum(att: Attention, a):
    """The adjoint of :func:`_expanded`: sum a key/value gradient over its group of query heads."""
    if a is None or a.shape[2] == att.k.shape[2]:
        return a
    return att.xp.sum(a, axis=2, keepdims=True)


def _poly_chain(att: Attention, p: Plan, y, grad_output, need):
    """Non-causal poly: the three streamed passes of :mod:`gpulora.poly.chain`, the output kept from pass 2.

    Grouped-query attention costs nothing extra: the key states of a key/value head serve its whole group
    (broadcast in pass 2), and the query states of the group are summed before pass 3 (the states are sums).
    """
    xp, q, k, v, beta, mask = att.xp, att.q, att.k, att.v, att.beta, att.key_valid
    dtype = p.compute_dtype
    chain.check_extreme_pairs(beta * xp.astype(q, dtype, copy=False),
                              xp.astype(_expanded(att, k), dtype, copy=False), p.choice, query_mask=mask, key_mask=mask)
    keys = chain.key_pass(k, v, p.choice, need=need, key_mask=mask, compute_dtype=dtype)
    rows, state = chain.query_pass(q, keys, beta, p.choice, y=y, grad_output=grad_output, query_mask=mask,
                                   softmax_one=att.softmax_one, need=need)
    chain.check_normaliser_ratio(state.worst, p.choice)
    grads = {}
    if (y is not None or grad_output is not None) and set(need) & {"k", "v"}:
        if state.data.shape[2] != k.shape[2]:
            state = dataclasses.replace(state, data=xp.sum(state.data, axis=2, keepdims=True))
        grads = chain.key_grad_pass(k, v, state, beta, p.choice, need=need, key_mask=mask)
    loss = None if state.loss is None else xp.astype(state.loss, q.dtype)
    return loss, rows["o"], rows.get("dq"), grads.get("dk"), grads.get("dv")


def _poly_causal(att: Attention, p: Plan, y, grad_output, need):
    """Causal poly: the forward and backward sweeps of :mod:`gpulora.poly.causal`, the output kept from the
    forward sweep (keys and values repeated over each group, their gradients summed back)."""
    xp, q, beta, mask = att.xp, att.q, att.beta, att.key_valid
    lay = causal_chain._layout(q, _expanded(att, att.k), _expanded(att, att.v), beta, p.choice, p.compute_dtype,
                               None, None, mask, mask)
    target = y if y is not None else grad_output
    mode = None if target is None else ("y" if y is not None else "grad_output")
    fwd = causal_chain.forward_sweep(lay, beta, p.choice, target=None if target is None else lay.padded(target),
                                     mode=mode, softmax_one=att.softmax_one, need=need)
    chain.check_normaliser_ratio(fwd.worst, p.choice)
    if mode is not None and set(need) & {"k", "v"}:
        causal_chain.backward_sweep(lay, fwd, beta, p.choice, need=need)
    grads = {t: None if a is None or t not in need else lay.unpad(a, q.dtype)
             for t, a in (("q", fwd.dq), ("k", fwd.dk), ("v", fwd.dv))}
    loss = None if fwd.loss is None else xp.astype(fwd.loss, q.dtype)
    return (loss, lay.unpad(fwd.o, q.dtype), grads["q"], _group_sum(att, grads["k"]),
            _group_sum(att, grads["v"]))


def _vjp(att: Attention, p: Plan, *, y, grad_output, need):
    if p.method == "exact":
        return exact.attention_vjp(att.q, att.k, att.v, att.beta, y=y, grad_output=grad_output, causal=att.causal,
                                   softmax_one=att.softmax_one, key_valid=att.key_valid, need=need)
    return (_poly_causal if att.causal else _poly_chain)(att, p, y, grad_output, need)


def _output(att: Attention, p: Plan):
    if p.method == "exact":
        return exact.attention_output(att.q, att.k, att.v, att.beta, causal=att.causal, softmax_one=att.softmax_one,
                                      key_valid=att.key_valid)
    return (_poly_causal if att.causal else _poly_chain)(att, p, None, None, ())[1]


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
    return _with_fallback(_vjp, att.without_padding(), p, requested, y=y, grad_output=grad_output,
                          need=tuple(need))


def run_output(att: Attention, p: Plan, requested: str):
    """``(plan that ran, out)`` with ``out`` of shape ``(N, H_kv, n_rep, L, d_v)``."""
    return _with_fallback(_output, att.without_padding(), p, requested)
