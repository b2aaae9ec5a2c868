"""The public entry points: validate, plan (exact or poly, which polynomial, which precision), run, pack.

Host reads, on CuPy (each one scalar or a few numbers, each a synchronisation): the finiteness check of
``x`` and ``y`` (weights and adapters are checked once, when ``Head`` and ``LoRA`` are built), the score
bound ``M`` (the degree choice needs it on the host), and the poly path's two run-time checks
(``3 * batch * H`` feature products at the extreme rows, and the smallest normaliser ratio): 3 reads per
exact call, 5 per poly call, whatever the sizes (pinned by ``tests/test_array_api.py``). Everything else,
the gradient chain included, stays on the device, on CuPy's current stream.

Arrays may come from any library that follows the array API standard (NumPy, CuPy, ``array_api_strict``,
...); results come back in the namespace and dtype of ``x``. The Numba kernels serve CuPy arrays only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import backend, cost
from .adapters import adapter_grads, output_layout, prepare
from .exact import attention as exact
from .model import GradResult, Head, LoRA
from .poly import causal as causal_chain
from .poly import chain
from .poly.coefficients import FAMILIES, PolyChoice, choose
from .validation import check_degree, check_method, check_tol

__all__ = ["forward", "lora_grad", "loss"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What will run: ``method``, and for poly the polynomial and the compute dtype."""

    method: str
    bound: float
    choice: PolyChoice | None = None
    compute_dtype: np.dtype | None = None
    note: str = ""


def _check_options(method, degree, tol, causal, family):
    check_method(method)
    if degree is not None:
        check_degree(degree)
    if tol is not None:
        check_tol(tol)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    if method == "exact" and (degree is not None or family is not None):
        raise ValueError("degree and family apply to method='poly' or 'auto', not method='exact'")


def plan(prob, method, *, degree=None, tol=None, causal=False, family=None, targets=("q", "k", "v")) -> Plan:
    """Decide what runs for a prepared problem (see :func:`lora_grad` for ``method="auto"``)."""
    bound = chain.score_bound(prob.q, prob.k, prob.beta)
    if method == "exact":
        return Plan("exact", bound)
    dtype = backend.host_dtype(prob.q)
    try:
        choice, compute = choose(bound, tol=tol, degree=degree, family=family, dtype=dtype)
    except ValueError as err:
        if method == "poly":
            raise
        return Plan("exact", bound, note=f"auto: poly cannot meet the tolerance here ({err})")
    if method == "poly":
        return Plan("poly", bound, choice, compute)
    lead, L = math.prod(prob.q.shape[:2]), prob.q.shape[-2]
    d_head, d_v = prob.q.shape[-1], prob.v.shape[-1]
    name = "cupy" if backend.is_cupy(prob.q) else "numpy"
    t_exact = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name, causal=causal)
    t_poly = lead * cost.poly_seconds(L, d_head, d_v, choice.features(d_head), targets, backend=name,
                                      causal=causal, float64_features=compute != dtype)
    winner = "poly" if t_poly < t_exact else "exact"
    note = (f"auto: estimated exact {t_exact:.3g} s vs poly {t_poly:.3g} s (degree {choice.degree} "
            f"{choice.family}, k = {choice.features(d_head)}): ran {winner}")
    return Plan(winner, bound, choice, compute, note)


def _zero_d(prob, value):
    """A 0-d array in the namespace and dtype of ``x`` (NumPy reductions give scalars otherwise)."""
    return prob.xp.asarray(value, dtype=prob.x.dtype)


def _run(prob, p: Plan, *, causal, need):
    args = (prob.q, prob.k, prob.v, prob.y, prob.beta)
    if p.method == "exact":
        return exact.loss_and_grads(*args, causal=causal, softmax_one=prob.softmax_one, need=need)
    impl = causal_chain if causal else chain
    compute = backend.namespace_dtype(prob.xp, p.compute_dtype)
    return impl.loss_and_grads(*args, p.choice, compute, softmax_one=prob.softmax_one, need=need)


def _output(prob, p: Plan, *, causal):
    args = (prob.q, prob.k, prob.v, prob.beta)
    if p.method == "exact":
        return exact.attention_output(*args, causal=causal, softmax_one=prob.softmax_one)
    impl = causal_chain if causal else chain
    return impl.output(*args, p.choice, backend.namespace_dtype(prob.xp, p.compute_dtype),
                       softmax_one=prob.softmax_one)


def _with_fallback(run, prob, p: Plan, requested: str, **kw):
    """``run(prob, p, **kw)``; under ``method="auto"`` a poly run that fails falls back to exact, and says so."""
    try:
        return p, run(prob, p, **kw)
    except chain.PolynomialFailure as err:
        if requested != "auto":
            raise
        p = dataclasses.replace(p, method="exact", note=f"auto: poly failed ({err}); fell back to exact")
        return p, run(prob, p, **kw)


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
        NumPy, CuPy or another array-API-standard array, float32 or float64; results come back in its
        namespace and dtype.
    y : array of shape (L, H d_v) or (batch, L, H d_v)
        Targets, same leading shape as ``x``.
    method : {"auto", "exact", "poly"}
        ``"exact"``: ``O(L^2 d)`` time, memory linear in ``L`` (blocked). ``"poly"``: the polynomial method
        (Hu et al. 2025), ``O(L k d_v d_head)`` time with ``k = C(d_head + g, g)``. ``"auto"``: computes the
        bound ``M``, the degree ``tol`` needs and the estimated cost of both (:mod:`gpulora.cost`), runs
        the cheaper one that meets ``tol`` (exact when poly cannot, or when poly fails at run time) and
        says why in ``GradResult.note``.
    degree : int, optional
        Fix the polynomial degree ``g`` (poly/auto); otherwise the smallest one that meets ``tol``.
    tol : float, optional
        Target max relative error of ``p ~ exp`` on ``[-M, M]`` (``0 < tol < 1``), approximation plus
        estimated rounding; default ``1e-3``. Per-token gradients then carry errors of a small multiple of
        it; adapter gradients too (``10 tol`` relative is what the tests hold at a few hundred tokens),
        except where their sum over tokens cancels, which at large ``L`` can amplify the relative error
        (see :mod:`gpulora.poly.chain`, "Error").
    causal : bool
        Mask ``j > i``.
    family : {"taylor", "shifted_taylor", "chebyshev"}, optional
        Restrict the polynomial family (by default chosen with the degree).

    Returns
    -------
    GradResult
        ``loss``, ``grads[target].B / .A``, ``method`` that ran, ``degree``, ``features``, ``bound``.

    Raises
    ------
    ValueError, TypeError
        For bad input (naming the argument); for ``method="poly"`` when no polynomial can meet ``tol`` at
        this bound, or when the polynomial fails at run time (:class:`gpulora.PolynomialFailure`).
    """
    _check_options(method, degree, tol, causal, family)
    prob = prepare(head, lora, x, y)
    need = lora.targets
    p = plan(prob, method, degree=degree, tol=tol, causal=causal, family=family, targets=need)
    p, (loss_, dq, dk, dv) = _with_fallback(_run, prob, p, method, causal=causal, need=need)
    grads = adapter_grads(lora, prob, {"q": dq, "k": dk, "v": dv})
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
    )


def forward(head: Head, lora: LoRA, x, *, method="exact", degree=None, tol=None, causal=False, family=None):
    """Attention output ``O`` of shape ``(L, H d_v)`` or ``(batch, L, H d_v)``, exactly or by the polynomial method.

    Arguments as in :func:`lora_grad`. Cost ``O(L^2 d)`` exact, ``O(L k d_v)`` poly.
    """
    _check_options(method, degree, tol, causal, family)
    prob = prepare(head, lora, x)
    p = plan(prob, method, degree=degree, tol=tol, causal=causal, family=family, targets=())
    _, o = _with_fallback(_output, prob, p, method, causal=causal)
    return output_layout(prob, o)


def loss(head: Head, lora: LoRA, x, y, *, method="exact", degree=None, tol=None, causal=False, family=None):
    """The loss ``0.5 ||O - y||^2`` (summed over the batch) as a 0-d array; arguments as in :func:`lora_grad`."""
    _check_options(method, degree, tol, causal, family)
    prob = prepare(head, lora, x, y)
    p = plan(prob, method, degree=degree, tol=tol, causal=causal, family=family, targets=())
    _, (loss_, _, _, _) = _with_fallback(_run, prob, p, method, causal=causal, need=())
    return _zero_d(prob, loss_)

