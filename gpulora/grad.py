"""The public entry points: validate, plan (exact or poly, which polynomial, which precision), run, pack.

**Error contract** (README, "Precision and tolerance"). A poly result carries ``error_bound`` (``eps``,
a priori: approximation plus estimated rounding of ``p ~ exp`` on ``[-M, M]``) and ``error_estimate`` (a
posteriori, per call: :func:`error_estimate`). ``method="auto"`` never runs a polynomial whose ``eps``
exceeds ``tol`` nor one over the feature budget (:mod:`gpulora.poly.budget`), and when the poly run's
``error_estimate`` exceeds ``GRAD_TOL_FACTOR * tol`` it runs exact as well and returns that.
``method="poly"`` runs what it is asked and emits :class:`gpulora.AccuracyWarning` in both cases instead. A computation that overflows
the dtype although every input is finite raises ``ValueError``; nothing returns NaN or inf.

Host reads, on CuPy (each one scalar or a few numbers, each a synchronisation): the finiteness check of
``x`` (and ``y``) and the fused one of the weights and adapters (they may have changed in place since
``Head``/``LoRA`` were built), the score bound ``M`` (the degree choice needs it on the host), the poly
path's two run-time checks (``3 * batch * H`` feature products at the extreme rows, and the smallest
normaliser ratio) and its error estimate (the loss and the spread of ``V``), and the fused finiteness
check of the results. Everything else, the gradient chain included, stays on the device, on CuPy's
current stream.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from . import backend, cost
from .adapters import adapter_grads, output_layout, prepare
from .exact import attention as exact
from .model import AccuracyWarning, GradResult, Head, LoRA, check_parameters
from .poly import causal as causal_chain
from .poly import chain
from .poly.budget import FeatureBudgetError, check_budget, poly_bytes
from .poly.coefficients import DEFAULT_TOL, FAMILIES, PolyChoice, choose
from .validation import all_finite, check_bool, check_degree, check_method, check_tol

__all__ = ["GRAD_TOL_FACTOR", "error_estimate", "forward", "lora_grad", "loss"]

# tol bounds the relative error of p ~ exp; the gradients it gives carry a small multiple of it (the tests
# hold 10 tol on bounded problems). A poly result whose error_estimate exceeds this multiple of tol is not
# returned by method="auto" (it reruns exact) and draws an AccuracyWarning under method="poly".
GRAD_TOL_FACTOR = 10.0


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


def _check_options(method, degree, tol, causal, family):
    """The validated options ``(degree, tol, causal)``; NumPy scalars become Python ones."""
    check_method(method)
    degree = None if degree is None else check_degree(degree)
    tol = None if tol is None else check_tol(tol)
    causal = check_bool("causal", causal)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    if method == "exact" and (degree is not None or family is not None):
        raise ValueError("degree and family apply to method='poly' or 'auto', not method='exact'")
    return degree, tol, causal


def _prepare(head, lora, x, y=None, *, need_y=False):
    if need_y and y is None:
        raise TypeError("y must be a NumPy or CuPy array of targets (L, H d_v) or (batch, L, H d_v), got None")
    if isinstance(head, Head) and isinstance(lora, LoRA):  # else prepare names the wrong type
        check_parameters(head, lora)  # B and A are usually updated in place between calls
    return prepare(head, lora, x, y)


def plan(prob, method, *, degree=None, tol=None, causal=False, family=None, targets=("q", "k", "v")) -> Plan:
    """Decide what runs for a prepared problem (see :func:`lora_grad` for ``method="auto"``).

    Refusals (``method="poly"``: raised; ``"auto"``: exact, the reason in ``note``): a score bound that
    overflows the dtype, no polynomial meeting ``tol`` (:func:`~gpulora.poly.coefficients.choose`), a
    feature map over the budget (:mod:`gpulora.poly.budget`). A fixed ``degree`` whose error bound exceeds
    ``tol`` (default :data:`~gpulora.poly.coefficients.DEFAULT_TOL`) warns under ``"poly"``
    (:class:`~gpulora.AccuracyWarning`) and runs exact under ``"auto"``. Cost ``O(L d)`` plus the cached
    polynomial search; nothing of size ``k`` is allocated.
    """
    with np.errstate(over="ignore"):  # an overflowing bound is inf, handled below
        bound = chain.score_bound(prob.q, prob.k, prob.beta)
    target = DEFAULT_TOL if tol is None else tol
    if method == "exact":
        return Plan("exact", bound, tol=target)
    dtype = np.dtype(prob.q.dtype)
    batch, heads, L, d_head = prob.q.shape
    lead, d_v = batch * heads, prob.v.shape[-1]
    try:
        if not math.isfinite(bound):
            raise ValueError(f"the score bound M = beta max|q_i| max|k_j| overflows {dtype} (the projections "
                             f"x @ W are too large): no polynomial can cover the scores")
        choice, compute = choose(bound, tol=tol, degree=degree, family=family, dtype=dtype)
        check_budget(d_head, choice.degree, nbytes=poly_bytes(lead, L, choice.features(d_head), d_head, d_v,
                                                               np.dtype(compute).itemsize),
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
        warnings.warn(msg, AccuracyWarning, stacklevel=3)
    if method == "poly":
        return Plan("poly", bound, choice, compute, tol=target, warned=eps > target)
    name = "cupy" if backend.is_cupy(prob.q) else "numpy"
    t_exact = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name, causal=causal)
    t_poly = lead * cost.poly_seconds(L, d_head, d_v, choice.features(d_head), targets, backend=name,
                                      causal=causal, float64_features=compute != dtype)
    winner = "poly" if t_poly < t_exact else "exact"
    note = (f"auto: estimated exact {t_exact:.3g} s vs poly {t_poly:.3g} s (degree {choice.degree} "
            f"{choice.family}, k = {choice.features(d_head)}): ran {winner}")
    return Plan(winner, bound, choice, compute, note, tol=target)


def error_estimate(prob, p: Plan, residual_norm: float) -> float:
    """A-posteriori estimate of the relative error of a poly call's gradients (and loss): ``eps + E / (R - E)``.

    ``eps = p.error_bound``; ``R = |O~ - y|_F`` the norm of the computed residual; ``E`` a bound on
    ``|O~ - O|_F``: every weight of ``F~`` is within a relative ``delta = 2 eps / (1 - eps)`` of ``F`` and the
    weight errors of a row sum to zero, so ``|o~_i - o_i| <= delta max_j |v_j - c|`` for any constant ``c``
    (the mean of ``V``; ``0`` for Softmax_1, whose virtual key has value 0), and ``E = delta sqrt(L sum over
    (batch, head) of max_j |v_j - c|^2)``. Since ``|G| >= R - E``, ``E / (R - E)`` bounds the relative error of
    the residual ``G = O - y`` that every gradient is linear in; it is ``inf`` when ``R <= E`` (near a
    perfect fit, the residual may be all approximation error). ``E`` is a worst case (no cancellation
    between keys): measured, it is 60..500 times the actual ``|O~ - O|`` on random problems, and the
    estimate upper-bounded the measured adapter-gradient error at every noise level tested
    (tests/test_adversarial.py). Not covered: cancellation in the sum over tokens of an adapter gradient
    (README, "Precision and tolerance"). Cost ``O(L d_v)``, one host read.
    """
    eps = p.error_bound
    delta = 2 * eps / (1 - eps)
    xp = prob.xp
    v = xp.astype(prob.v, xp.float64, copy=False)
    c = 0.0 if prob.softmax_one else xp.mean(v, axis=-2, keepdims=True)
    spread2 = xp.max(xp.sum((v - c) ** 2, axis=-1), axis=-1)  # [batch, H]
    e_out = delta * math.sqrt(v.shape[-2] * backend.to_float(xp.sum(spread2)))
    return eps + (e_out / (residual_norm - e_out) if residual_norm > e_out else math.inf)


def _zero_d(prob, value):
    """A 0-d array in the namespace and dtype of ``x`` (NumPy reductions give scalars otherwise)."""
    return prob.xp.asarray(value, dtype=prob.x.dtype)


def _run(prob, p: Plan, *, causal, need):
    args = (prob.q, prob.k, prob.v, prob.y, prob.beta)
    if p.method == "exact":
        return exact.loss_and_grads(*args, causal=causal, softmax_one=prob.softmax_one, need=need)
    impl = causal_chain if causal else chain
    return impl.loss_and_grads(*args, p.choice, p.compute_dtype, softmax_one=prob.softmax_one, need=need)


def _run_grads(prob, p: Plan, *, causal, lora):
    """``(loss, {target: AdapterGrad})``: :func:`_run` and the chain rule to the adapters."""
    loss_, dq, dk, dv = _run(prob, p, causal=causal, need=lora.targets)
    return loss_, adapter_grads(lora, prob, {"q": dq, "k": dk, "v": dv})


def _output(prob, p: Plan, *, causal):
    args = (prob.q, prob.k, prob.v, prob.beta)
    if p.method == "exact":
        return exact.attention_output(*args, causal=causal, softmax_one=prob.softmax_one)
    impl = causal_chain if causal else chain
    return impl.output(*args, p.choice, p.compute_dtype, softmax_one=prob.softmax_one)


def _leaves(out):
    """The arrays of a run's result: a tuple of arrays and ``None``, or ``(loss, {target: AdapterGrad})``."""
    for a in out if isinstance(out, tuple) else (out,):
        if isinstance(a, dict):
            yield from (x for g in a.values() for x in (g.B, g.A))
        elif a is not None:
            yield a


def _check_result(prob, p: Plan, out) -> None:
    """Raise rather than return NaN or inf from finite inputs (the scores or products overflowed the dtype).

    One fused reduction over the results, one host read on CuPy. A poly run raises
    :class:`~gpulora.PolynomialFailure` (``auto`` then runs exact); an exact run a ``ValueError``.
    """
    if all_finite(*_leaves(out)):
        return
    bound = p.bound
    if not math.isfinite(bound):  # it overflowed too: recompute it in float64 for the message
        f64 = prob.xp.float64
        with np.errstate(over="ignore"):
            bound = chain.score_bound(prob.xp.astype(prob.q, f64), prob.xp.astype(prob.k, f64), prob.beta)
    dtype = np.dtype(prob.q.dtype)
    msg = (f"the {p.method} computation overflowed {dtype} (NaN or inf in its results) although every input "
           f"is finite: the scores reach up to M = {bound:.3g} and the gradients scale with their size "
           f"(largest {dtype} {float(np.finfo(dtype).max):.3g}); scale x or the weights down (or beta), or "
           f"use float64 inputs")
    raise (chain.PolynomialFailure if p.method == "poly" else ValueError)(msg)


def _checked_run(run, prob, p: Plan, **kw):
    # overflow shows as inf/nan in the results, which _check_result turns into an error: no RuntimeWarning
    with np.errstate(over="ignore", invalid="ignore"):
        out = run(prob, p, **kw)
    _check_result(prob, p, out)
    return out


def _with_fallback(run, prob, p: Plan, requested: str, **kw):
    """``run(prob, p, **kw)`` with its results checked finite; under ``method="auto"`` a poly run that fails
    falls back to exact, and says so."""
    try:
        return p, _checked_run(run, prob, p, **kw)
    except chain.PolynomialFailure as err:
        if requested != "auto":
            raise
        p = dataclasses.replace(p, method="exact", note=f"auto: poly failed ({err}); fell back to exact")
        return p, _checked_run(run, prob, p, **kw)


def _checked_poly(prob, p: Plan, requested: str, out, rerun, **kw):
    """``(p, out, estimate)`` after the a-posteriori check of a poly run (:func:`error_estimate`; 0 for exact).

    Over ``GRAD_TOL_FACTOR * p.tol``: ``"auto"`` reruns with exact (the cost of both, less than twice
    exact's since auto chose poly for being cheaper) and says why; ``"poly"`` warns with
    :class:`~gpulora.AccuracyWarning` (unless the plan already did).
    """
    if p.method != "poly":
        return p, out, 0.0
    est = error_estimate(prob, p, math.sqrt(2 * max(backend.to_float(out[0]), 0.0)))
    if est <= GRAD_TOL_FACTOR * p.tol:
        return p, out, est
    why = (f"the a-posteriori error estimate of the poly gradients, {est:.3g}, exceeds {GRAD_TOL_FACTOR:g} * tol "
           f"= {GRAD_TOL_FACTOR * p.tol:.3g}: the residual O - y is small against the polynomial's output error "
           f"(which is absolute, about 2 eps |V| with eps = {p.error_bound:.3g}, not relative to the residual)")
    if requested == "auto":
        p = dataclasses.replace(p, method="exact", note=f"auto: {why}; reran exact")
        return _with_fallback(rerun, prob, p, requested, **kw) + (0.0,)
    if not p.warned:
        warnings.warn(why, AccuracyWarning, stacklevel=3)
    return p, out, est


def lora_grad(head: Head, lora: LoRA, x, y, *, method="auto", degree=None, tol=None, causal=False,
              family=None) -> GradResult:
    """Loss and gradients of ``0.5 ||attention(x) - y||^2`` with respect to every adapter's ``B`` and ``A``.

    Parameters
    ----------
    head : Head
        Frozen weights ``w_q, w_k (d_model, H d_head)``, ``w_v (d_model, H d_v)``, ``beta``.
    lora : LoRA
        Adapters for a non-empty subset of ``"q"``, ``"k"``, ``"v"``.
    x : array of shape (L, d_model) or (batch, L, d_model)
        NumPy or CuPy, float32 or float64; results come back in its namespace and dtype.
    y : array of shape (L, H d_v) or (batch, L, H d_v)
        Targets, same leading shape as ``x``.
    method : {"auto", "exact", "poly"}
        ``"exact"``: ``O(L^2 d)`` time, memory linear in ``L`` (blocked). ``"poly"``: the polynomial method
        (Hu et al. 2025), ``O(L k d_v d_head)`` time with ``k = C(d_head + g, g)``. ``"auto"``: computes the
        bound ``M``, the degree ``tol`` needs and the estimated cost of both (:mod:`gpulora.cost`), runs
        the cheaper one that meets ``tol`` and says why in ``GradResult.note``. It runs exact when no
        polynomial meets ``tol``, when the feature map is over budget (:mod:`gpulora.poly.budget`), when a
        fixed ``degree``'s error bound exceeds ``tol``, when poly fails at run time, and (after the poly
        run, so at the cost of both) when poly's ``error_estimate`` exceeds ``GRAD_TOL_FACTOR * tol``
        (``10 tol``: near a perfect fit, see ``GradResult.error_estimate``).
    degree : int, optional
        Fix the polynomial degree ``g`` (poly/auto); otherwise the smallest one that meets ``tol``. A degree
        whose error bound exceeds ``tol`` (default ``1e-3``) emits :class:`~gpulora.AccuracyWarning` under
        ``"poly"``; ``"auto"`` runs exact instead.
    tol : float, optional
        Target max relative error of ``p ~ exp`` on ``[-M, M]`` (``0 < tol < 1``), approximation plus
        estimated rounding; default ``1e-3``. Per-token gradients then carry errors of a small multiple of
        it relative to the residual; adapter gradients too (``10 tol`` relative is what the tests hold at
        a few hundred tokens), except near a perfect fit (``error_estimate`` shows it) and where their sum
        over tokens cancels, which at large ``L`` can amplify the relative error (see
        :mod:`gpulora.poly.chain`, "Error").
    causal : bool
        Mask ``j > i``.
    family : {"taylor", "shifted_taylor", "chebyshev"}, optional
        Restrict the polynomial family (by default chosen with the degree).

    Returns
    -------
    GradResult
        ``loss``, ``grads[target].B / .A``, ``method`` that ran, ``degree``, ``features``, ``bound``,
        ``error_bound`` (a priori) and ``error_estimate`` (a posteriori, :func:`error_estimate`).

    Raises
    ------
    ValueError, TypeError
        For bad input (naming the argument; the weights and adapters are re-checked finite at every call);
        when the computation overflows the dtype although the inputs are finite; for ``method="poly"``
        when no polynomial can meet ``tol`` at this bound, when its features are over budget
        (:class:`gpulora.poly.budget.FeatureBudgetError`), or when the polynomial fails at run time
        (:class:`gpulora.PolynomialFailure`).

    Warns
    -----
    AccuracyWarning
        ``method="poly"`` only: a fixed ``degree`` whose error bound exceeds ``tol``, or an
        ``error_estimate`` over ``tol``.
    """
    degree, tol, causal = _check_options(method, degree, tol, causal, family)
    prob = _prepare(head, lora, x, y, need_y=True)
    need = lora.targets
    p = plan(prob, method, degree=degree, tol=tol, causal=causal, family=family, targets=need)
    p, out = _with_fallback(_run_grads, prob, p, method, causal=causal, lora=lora)
    p, (loss_, grads), est = _checked_poly(prob, p, method, out, _run_grads, causal=causal, lora=lora)
    poly = p.method == "poly"
    return GradResult(
        loss=_zero_d(prob, loss_),
        grads=grads,
        method=p.method,
        degree=p.choice.degree if poly else None,
        features=p.choice.features(prob.q.shape[-1]) if poly else None,
        bound=p.bound,
        family=p.choice.family if poly else None,
        compute_dtype=str(p.compute_dtype) if poly else None,
        note=p.note,
        error_bound=p.error_bound,
        error_estimate=est,
    )


def forward(head: Head, lora: LoRA, x, *, method="exact", degree=None, tol=None, causal=False, family=None):
    """Attention output ``O`` of shape ``(L, H d_v)`` or ``(batch, L, H d_v)``, exactly or by the polynomial method.

    Arguments as in :func:`lora_grad`. Cost ``O(L^2 d)`` exact, ``O(L k d_v)`` poly. The poly output has
    no residual to be relative to: every row of it is within ``2 eps / (1 - eps) * max_j |v_j - mean(v)|``
    of the exact one (``eps`` the polynomial's error bound, at most ``tol`` unless a fixed ``degree`` says
    otherwise, and then :class:`~gpulora.AccuracyWarning`).
    """
    degree, tol, causal = _check_options(method, degree, tol, causal, family)
    prob = _prepare(head, lora, x)
    p = plan(prob, method, degree=degree, tol=tol, causal=causal, family=family, targets=())
    _, o = _with_fallback(_output, prob, p, method, causal=causal)
    return output_layout(prob, o)


def loss(head: Head, lora: LoRA, x, y, *, method="exact", degree=None, tol=None, causal=False, family=None):
    """The loss ``0.5 ||O - y||^2`` (summed over the batch) as a 0-d array; arguments as in :func:`lora_grad`.

    The poly loss is checked like the poly gradients (:func:`error_estimate`; its relative error is at most
    about twice the residual's): over ``GRAD_TOL_FACTOR * tol``, ``"auto"`` reruns exact and ``"poly"`` warns.
    """
    degree, tol, causal = _check_options(method, degree, tol, causal, family)
    prob = _prepare(head, lora, x, y, need_y=True)
    p = plan(prob, method, degree=degree, tol=tol, causal=causal, family=family, targets=())
    p, out = _with_fallback(_run, prob, p, method, causal=causal, need=())
    _, out, _ = _checked_poly(prob, p, method, out, _run, causal=causal, need=())
    return _zero_d(prob, out[0])
