"""Plan and run one attention call: exact or poly, which polynomial, which precision, the checks and the
fallback.

Both front doors use it: :mod:`gpulora.functional` (q/k/v level) and :mod:`gpulora.grad` (LoRA heads).
They hand over an :class:`Attention`, the validated call in the grouped layout

    q (N, H_kv, n_rep, L, d_head),   k (N, H_kv, 1, L, d_head),   v (N, H_kv, 1, L, d_v),
    key_valid (N, 1, 1, L) bool or None  (its False positions are padding queries too unless pad_queries=False),

in the compute dtype (float32 or float64), where ``N`` is the flattened batch and each key/value head
serves ``n_rep`` query heads (``n_rep = 1``: plain multi-head attention). :func:`run_vjp` and
:func:`run_output` return gradients in the same layout (``dk``, ``dv`` summed over the group).

**Error contract** (README, "Precision and tolerance"). A poly plan carries ``error_bound`` (``eps``, a
priori: approximation plus estimated rounding of ``p ~ exp`` on ``[-M, M]``); a poly run with targets ``y``
gets ``error_estimate`` (a posteriori, per call: :func:`error_estimate`). ``method="auto"`` never runs a
polynomial whose ``eps`` exceeds ``tol`` nor one over the feature budget (:mod:`gpulora.poly.budget`), and
when the poly run's ``error_estimate`` exceeds ``GRAD_TOL_FACTOR * tol`` it runs exact as well and returns
that. ``method="poly"`` runs what it is asked and emits :class:`gpulora.AccuracyWarning` in both cases
instead. A computation that overflows the dtype although every input is finite raises ``ValueError``;
nothing returns NaN or inf.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from . import backend, cost
from .exact import attention as exact
from .model import AccuracyWarning, AdapterGrad
from .poly import causal as causal_chain
from .poly import chain
from .poly.budget import FeatureBudgetError, check_budget, poly_bytes
from .poly.coefficients import DEFAULT_TOL, FAMILIES, PolyChoice, choose
from .poly.products import row_sums
from .validation import all_finite, check_bool, check_degree, check_method, check_tol

__all__ = ["GRAD_TOL_FACTOR", "Attention", "Plan", "check_options", "error_estimate", "estimate_from_spread",
           "plan", "plan_for_bound", "run_output", "run_vjp"]

# tol bounds the relative error of p ~ exp; the gradients it gives carry a small multiple of it (the tests
# hold 10 tol on bounded problems). A poly result whose error_estimate exceeds this multiple of tol is not
# returned by method="auto" (it reruns exact) and draws an AccuracyWarning under method="poly".
GRAD_TOL_FACTOR = 10.0


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
    # True: a masked position is padding as a query too (self-attention: zero output and gradient there);
    # False: only keys are masked and every query row is computed (cross-attention, transformers' masks)
    pad_queries: bool = True

    @property
    def query_valid(self):
        """The mask of the real query rows, ``(N, 1, 1, L)``, or None (every row real)."""
        return self.key_valid if self.pad_queries else None

    def masked_rows(self, a, valid=None):
        """``a (N, ., ., L, d)`` with the rows ``valid`` (default: ``key_valid``) excludes zeroed (a new array;
        ``a`` itself when nothing is excluded)."""
        valid = self.key_valid if valid is None else valid
        return a if valid is None else self.xp.where(valid[..., None], a, 0.0)

    def without_padding(self) -> Attention:
        """This call with the masked rows of ``k`` and ``v``, and the padding rows of ``q``, zeroed: they take
        part in no result, and whatever finite values they hold can then overflow no score, feature or
        product. ``O(L d)``."""
        if self.key_valid is None:
            return self
        q = self.q if self.query_valid is None else self.masked_rows(self.q, self.query_valid)
        return dataclasses.replace(self, q=q, k=self.masked_rows(self.k), v=self.masked_rows(self.v))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What will run: ``method``, and for poly the polynomial, the compute dtype and its error bound."""

    method: str
    bound: float
    choice: PolyChoice | None = None
    compute_dtype: np.dtype | None = None
    note: str = ""
    tol: float = DEFAULT_TOL
    warned: bool = False  # an AccuracyWarning was already emitted for this call

    @property
    def error_bound(self) -> float:
        """``eps``: approximation plus estimated rounding of ``p ~ exp`` on ``[-M, M]`` (0 for exact)."""
        return self.choice.total_error(self.compute_dtype) if self.method == "poly" else 0.0

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
            error_bound=self.error_bound,
        )


def check_options(method, degree, tol, causal, family, softmax_one=False):
    """The validated options ``(degree, tol, causal, softmax_one)`` every entry point shares (each error names
    its argument); NumPy scalars become Python ones."""
    check_method(method)
    degree = None if degree is None else check_degree(degree)
    tol = None if tol is None else check_tol(tol)
    causal = check_bool("causal", causal)
    softmax_one = check_bool("softmax_one", softmax_one)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    if method == "exact" and (degree is not None or family is not None):
        raise ValueError("degree and family apply to method='poly' or 'auto', not method='exact'")
    return degree, tol, causal, softmax_one


def plan(att: Attention, method, *, degree=None, tol=None, family=None, targets=("q", "k", "v")) -> Plan:
    """Decide what runs.

    ``bound`` is ``M = beta max_i |q_i| max_j |k_j|`` over the real (unmasked) rows. ``method="auto"``
    estimates the cost of both methods for these sizes (:mod:`gpulora.cost`) and picks the cheaper one that
    meets ``tol``. Refusals (``method="poly"``: raised; ``"auto"``: exact, the reason in ``note``): a score
    bound that overflows the dtype, no polynomial meeting ``tol`` (:func:`~gpulora.poly.coefficients.choose`),
    a feature map over the budget (:mod:`gpulora.poly.budget`). A fixed ``degree`` whose error bound exceeds
    ``tol`` (default :data:`~gpulora.poly.coefficients.DEFAULT_TOL`) warns under ``"poly"``
    (:class:`~gpulora.AccuracyWarning`) and runs exact under ``"auto"``. Cost ``O(L d)`` plus the cached
    polynomial search; nothing of size ``k`` is allocated.
    """
    clean = att.without_padding()
    with np.errstate(over="ignore"):  # an overflowing bound is inf, handled below
        bound = chain.score_bound(clean.q, clean.k, att.beta)
    return plan_for_bound(bound, method, dtype=backend.host_dtype(att.q), lead=math.prod(att.q.shape[:-2]), L=att.q.shape[-2],
                          d_head=att.q.shape[-1], d_v=att.v.shape[-1],
                          backend_name="cupy" if backend.is_cupy(att.q) else "numpy", causal=att.causal,
                          degree=degree, tol=tol, family=family, targets=targets)


def plan_for_bound(bound, method, *, dtype, lead, L, d_head, d_v, backend_name="numpy", causal=False, degree=None,
                   tol=None, family=None, targets=("q", "k", "v"), task_lead=None, task_L=None) -> Plan:
    """:func:`plan` from a score bound computed elsewhere (reduced over token shards by
    :mod:`gpulora.distributed`) and the sizes of the whole call (``lead`` = batch x heads); the feature
    budget applies to the largest task, ``task_lead`` x ``task_L`` rows (default: the whole call)."""
    target = DEFAULT_TOL if tol is None else tol
    if method == "exact":
        return Plan("exact", bound, tol=target)
    dtype = np.dtype(dtype)
    task_lead = lead if task_lead is None else task_lead
    task_L = L if task_L is None else task_L
    try:
        if not math.isfinite(bound):
            raise ValueError(f"the score bound M = beta max|q_i| max|k_j| overflows {dtype} (the projections "
                             f"are too large): no polynomial can cover the scores")
        choice, compute = choose(bound, tol=tol, degree=degree, family=family, dtype=dtype)
        check_budget(d_head, choice.degree, nbytes=poly_bytes(task_lead, task_L, choice.features(d_head), d_head,
                                                               d_v, np.dtype(compute).itemsize),
                     what=f"the {choice.family} polynomial for M = {bound:.3g}")
    except ValueError as err:
        if method == "poly":
            raise
        why = "poly is over the feature budget" if isinstance(err, FeatureBudgetError) else \
            "poly cannot meet the tolerance here"
        return Plan("exact", bound, note=f"auto: {why} ({err}); ran exact", tol=target)
    eps = choice.total_error(compute)
    if eps > target:  # only a fixed degree gets here: a tol-driven choice meets tol by construction
        msg = (f"degree={choice.degree}: the {choice.family} polynomial's error bound on [-M, M], M = "
               f"{bound:.3g}, is {eps:.3g} (approximation plus rounding), more than tol={target:.3g}; the "
               f"gradients may be off by a multiple of that. Pass tol= instead of degree= (or a higher degree)")
        if method != "poly":
            return Plan("exact", bound, note=f"auto: {msg}; ran exact", tol=target)
        warnings.warn(msg, AccuracyWarning, stacklevel=4)  # the caller of lora_grad (through plan)
    if method == "poly":
        return Plan("poly", bound, choice, compute, tol=target, warned=eps > target)
    t_exact = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=backend_name, causal=causal)
    t_poly = lead * cost.poly_seconds(L, d_head, d_v, choice.features(d_head), targets, backend=backend_name,
                                      causal=causal, float64_features=compute != dtype)
    winner = "poly" if t_poly < t_exact else "exact"
    note = (f"auto: estimated exact {t_exact:.3g} s vs poly {t_poly:.3g} s (degree {choice.degree} "
            f"{choice.family}, k = {choice.features(d_head)}): ran {winner}")
    return Plan(winner, bound, choice, compute, note, tol=target)


def error_estimate(att: Attention, p: Plan, residual_norm: float) -> float:
    """A-posteriori estimate of the relative error of a poly call's gradients (and loss): ``eps + E / (R - E)``.

    ``eps = p.error_bound``; ``R = |O~ - y|_F`` the norm of the computed residual; ``E`` a bound on
    ``|O~ - O|_F``: every weight of ``F~`` is within a relative ``delta = 2 eps / (1 - eps)`` of ``F`` and the
    weight errors of a row sum to zero, so ``|o~_i - o_i| <= delta max_j |v_j - c|`` for any constant ``c``
    (the mean of ``V``; ``0`` for Softmax_1, whose virtual key has value 0), and ``E = delta sqrt(L sum over
    (batch, query head) of max_j |v_j - c|^2)`` (a key/value head counts once per query head it serves).
    Since ``|G| >= R - E``, ``E / (R - E)`` bounds the relative error of the residual ``G = O - y`` that every
    gradient is linear in; it is ``inf`` when ``0 < E`` and ``R <= E`` (near a perfect fit, the residual may
    be all approximation error), and ``eps`` when ``E = 0`` (all values equal, or every row padding). ``E`` is a worst case (no cancellation between keys): measured, it is 60..500 times
    the actual ``|O~ - O|`` on random problems, and the estimate upper-bounded the measured adapter-gradient
    error at every noise level tested (tests/test_adversarial.py). Not covered: cancellation in the sum over
    tokens of an adapter gradient (README, "Precision and tolerance"). Cost ``O(L d_v)``, one host read.
    """
    xp = att.xp
    v = att.v  # (N, H_kv, 1, L, d_v), compute dtype: a float64 copy of it cost more than the check's arithmetic
    if not att.softmax_one:
        v = v - (xp.ones((1, v.shape[-2]), dtype=v.dtype) @ v) / max(v.shape[-2], 1)  # minus the mean (BLAS)
    # max_j |v_j - c|^2 in v's dtype, enlarged by a rounding allowance so that it stays an upper bound
    rounding = 1.0 + 4.0 * (v.shape[-1] + 2) * float(np.finfo(backend.host_dtype(v)).eps)
    spread2 = xp.max(row_sums(v * v, xp)[..., 0], axis=-1)  # [N, H_kv, 1]
    return estimate_from_spread(p, v.shape[-2] * att.q.shape[2], rounding * backend.to_float(xp.sum(spread2)),
                                residual_norm)


def estimate_from_spread(p: Plan, rows: int, spread2: float, residual_norm: float) -> float:
    """:func:`error_estimate` from ``spread2``, the sum over (batch, key/value head) of ``max_j |v_j - c|^2``,
    computed elsewhere (over token shards by :mod:`gpulora.distributed`); ``rows = L n_rep``."""
    eps = p.error_bound
    delta = 2 * eps / (1 - eps)
    e_out = delta * math.sqrt(rows * spread2)
    if e_out == 0:  # every value row equal (or every row padding): O~ = O whatever the weights
        return eps
    return eps + (e_out / (residual_norm - e_out) if residual_norm > e_out else math.inf)


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
    xp, q, k, v, beta, mask, rows_mask = att.xp, att.q, att.k, att.v, att.beta, att.key_valid, att.query_valid
    dtype = backend.namespace_dtype(xp, p.compute_dtype)
    chain.check_extreme_pairs(beta * xp.astype(q, dtype, copy=False),
                              xp.astype(_expanded(att, k), dtype, copy=False), p.choice, query_mask=rows_mask,
                              key_mask=mask)
    keys = chain.key_pass(k, v, p.choice, need=need, key_mask=mask, compute_dtype=dtype)
    rows, state = chain.query_pass(q, keys, beta, p.choice, y=y, grad_output=grad_output, query_mask=rows_mask,
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
    lay = causal_chain._layout(q, _expanded(att, att.k), _expanded(att, att.v), beta, p.choice,
                               backend.namespace_dtype(xp, p.compute_dtype),
                               None, None, mask, att.query_valid)
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
                                   softmax_one=att.softmax_one, key_valid=att.key_valid, need=need,
                                   pad_queries=att.pad_queries)
    return (_poly_causal if att.causal else _poly_chain)(att, p, y, grad_output, need)


def _output(att: Attention, p: Plan):
    if p.method == "exact":
        return exact.attention_output(att.q, att.k, att.v, att.beta, causal=att.causal, softmax_one=att.softmax_one,
                                      key_valid=att.key_valid, pad_queries=att.pad_queries)
    return (_poly_causal if att.causal else _poly_chain)(att, p, None, None, ())[1]


def _leaves(out):
    """The arrays of a run's result: nested tuples/dicts of arrays, :class:`AdapterGrad` and ``None``."""
    if isinstance(out, (tuple, list)):
        for a in out:
            yield from _leaves(a)
    elif isinstance(out, dict):
        for a in out.values():
            yield from _leaves(a)
    elif isinstance(out, AdapterGrad):
        yield from (out.B, out.A)
    elif out is not None:
        yield out


def _check_result(att: Attention, p: Plan, out) -> None:
    """Raise rather than return NaN or inf from finite inputs (the scores or products overflowed the dtype).

    One fused reduction over the results, one host read on CuPy. A poly run raises
    :class:`~gpulora.PolynomialFailure` (``auto`` then runs exact); an exact run a ``ValueError``.
    """
    if all_finite(*_leaves(out)):
        return
    bound = p.bound
    if not math.isfinite(bound):  # it overflowed too: recompute it in float64 for the message
        f64, clean = att.xp.float64, att.without_padding()
        with np.errstate(over="ignore"):
            bound = chain.score_bound(att.xp.astype(clean.q, f64), att.xp.astype(clean.k, f64), att.beta)
    dtype = backend.host_dtype(att.q)
    msg = (f"the {p.method} computation overflowed {dtype} (NaN or inf in its results) although every input "
           f"is finite: the scores reach up to M = {bound:.3g} and the gradients scale with their size "
           f"(largest {dtype} {float(np.finfo(dtype).max):.3g}); scale x or the weights down (or beta), or "
           f"use float64 inputs")
    raise (chain.PolynomialFailure if p.method == "poly" else ValueError)(msg)


def _checked_run(run, att: Attention, p: Plan, **kw):
    # overflow shows as inf/nan in the results, which _check_result turns into an error: no RuntimeWarning
    with np.errstate(over="ignore", invalid="ignore"):
        out = run(att, p, **kw)
    _check_result(att, p, out)
    return out


def _with_fallback(run, att: Attention, p: Plan, requested: str, **kw):
    """``run(att, p, **kw)`` with its results checked finite; under ``method="auto"`` a poly run that fails
    falls back to exact, and says so."""
    try:
        return p, _checked_run(run, att, p, **kw)
    except chain.PolynomialFailure as err:
        if requested != "auto":
            raise
        p = dataclasses.replace(p, method="exact", note=f"auto: poly failed ({err}); fell back to exact")
        return p, _checked_run(run, att, p, **kw)


def _checked_poly(att: Attention, p: Plan, requested: str, out, rerun, *, estimate=None, **kw):
    """``(p, out, estimate)`` after the a-posteriori check of a poly run (:func:`error_estimate`; 0 for exact).

    ``out[0]`` is the loss, or ``None`` when an upstream gradient was given: that gradient is exact, there
    is no computed residual to amplify the error, and the estimate is ``eps``. Over
    ``GRAD_TOL_FACTOR * p.tol``: ``"auto"`` reruns with exact (the cost of both, less than twice exact's since
    auto chose poly for being cheaper) and says why; ``"poly"`` warns with :class:`~gpulora.AccuracyWarning`
    (unless the plan already did). ``estimate(p, residual_norm)`` replaces :func:`error_estimate` where
    ``att`` does not hold the whole call (:mod:`gpulora.distributed`).
    """
    if p.method != "poly":
        return p, out, 0.0
    if out[0] is None:
        return p, out, p.error_bound
    residual = math.sqrt(2 * max(backend.to_float(out[0]), 0.0))
    est = error_estimate(att, p, residual) if estimate is None else estimate(p, residual)
    return judge_estimate(p, est, requested, out, lambda p: _with_fallback(rerun, att, p, requested, **kw),
                          stacklevel=5)


def judge_estimate(p: Plan, est: float, requested: str, out, rerun, *, stacklevel: int):
    """``(p, out, est)`` when ``est`` is within ``GRAD_TOL_FACTOR * p.tol``. Over it: under ``"auto"``,
    ``rerun(exact plan) + (0.0,)`` with the reason in the plan's note; otherwise an
    :class:`~gpulora.AccuracyWarning` (unless the plan already warned; ``stacklevel`` as ``warnings.warn``
    counts it from here), and the result as it is. Shared by the matrix and tensor attention calls."""
    if est <= GRAD_TOL_FACTOR * p.tol:
        return p, out, est
    why = (f"the a-posteriori error estimate of the poly gradients, {est:.3g}, exceeds {GRAD_TOL_FACTOR:g} * tol "
           f"= {GRAD_TOL_FACTOR * p.tol:.3g}: the residual O - y is small against the polynomial's output error "
           f"(which is absolute, about 2 eps |V| with eps = {p.error_bound:.3g}, not relative to the residual)")
    if requested == "auto":
        return rerun(dataclasses.replace(p, method="exact", note=f"auto: {why}; reran exact")) + (0.0,)
    if not p.warned:
        warnings.warn(why, AccuracyWarning, stacklevel=stacklevel)
    return p, out, est


def _finished_vjp(att: Attention, p: Plan, *, y, grad_output, need, finish):
    out = _vjp(att, p, y=y, grad_output=grad_output, need=need)
    return out if finish is None else finish(out)


def run_vjp(att: Attention, p: Plan, requested: str, *, y=None, grad_output=None, need=("q", "k", "v"),
            finish=None):
    """``(plan that ran, results, error estimate)`` for targets ``y`` or an upstream gradient ``grad_output``
    (``(N, H_kv, n_rep, L, d_v)``).

    The results are ``(loss, out, dq, dk, dv)`` (see :func:`gpulora.exact.attention.attention_vjp`), or
    ``finish`` of them (a tuple whose first entry is still the loss): the chain rule to adapters or inputs,
    so that the finiteness check covers what the caller returns. Checked as the module docstring says.
    """
    kw = dict(y=y, grad_output=grad_output, need=tuple(need), finish=finish)
    att = att.without_padding()
    p, out = _with_fallback(_finished_vjp, att, p, requested, **kw)
    return _checked_poly(att, p, requested, out, _finished_vjp, **kw)


def run_output(att: Attention, p: Plan, requested: str):
    """``(plan that ran, out)`` with ``out`` of shape ``(N, H_kv, n_rep, L, d_v)``."""
    return _with_fallback(_output, att.without_padding(), p, requested)
