"""Where a tensor-attention problem sits relative to its phase transition, in numbers of its own.

Alman & Song (ICLR 2024): tensor attention can be computed in almost-linear time when the entries of
``Q``, ``K1``, ``K2`` are ``o(cbrt(log L))`` (a polynomial of low degree then approximates ``exp`` on the
scores), and not in truly sub-cubic time when they are ``Omega(cbrt(log L))``, under SETH; Liang, Shi,
Song and Zhou (2024) show the same for the backward.
:func:`diagnose` reports the cheap bound ``M`` (:func:`gpulora.tensor.chain.score_bound`), the exact
``max |S|`` when ``L`` is small enough, the threshold scale ``cbrt(log L)``, the polynomial that ``tol``
needs and the modelled cost of both methods.
"""

from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..diagnosis import Diagnosis, _choice_fields, _plan
from ..model import LoRA
from ..poly.coefficients import DEFAULT_TOL
from ..validation import check_tol
from . import cost
from .chain import score_bound
from .exact import _pair_rows, block_sizes
from .grad import prepare
from .model import TensorHead

__all__ = ["TensorDiagnosis", "diagnose", "exact_max_score"]

EXACT_MAX_SCORE_LIMIT = 1 << 27  # batch * H * L^3 scores: computed exactly up to this many

_LABELS = {
    "gpulora diagnosis": "gpulora diagnosis (tensor attention)",
    "bound M = beta max|q| max|k|": "bound M = beta max|q| max|k1 * k2|",
    "threshold sqrt(log L)": "threshold cbrt(log L)",
}


@dataclasses.dataclass(frozen=True)
class TensorDiagnosis(Diagnosis):
    """The diagnosis of a tensor-attention problem: the fields of :class:`gpulora.Diagnosis`, with
    ``threshold = cbrt(log L)``, ``bound`` the tensor bound, and costs of the tensor paths."""

    def __str__(self) -> str:
        text = super().__str__()
        for old, new in _LABELS.items():
            text = text.replace(old, new)
        return text


def exact_max_score(q, k1, k2, beta) -> float:
    """``max |S|`` over all (batch, head) and triples, by blocks: ``O(L^3 d)`` time, linear memory."""
    xp = backend.namespace(q, k1, k2)
    L = q.shape[-2]
    bq, b1, _ = block_sizes(math.prod(q.shape[:-2]), L, q.shape[-1], block_k2=L)
    best = xp.zeros((), dtype=q.dtype)
    for i0 in range(0, L, bq):
        for a0 in range(0, L, b1):
            s = _pair_rows(xp, q[..., i0:i0 + bq, :], k1[..., a0:a0 + b1, :]) @ k2.mT
            best = xp.maximum(best, xp.max(xp.abs(s)))
    return beta * backend.to_float(best)


def _regime(m: float, threshold: float, log_L: float) -> str:
    if m <= threshold:
        return "below the threshold (bounded entries): the polynomial method can be almost linear in L"
    if m <= log_L:
        return "in the transition (cbrt(log L) < M <= log L): poly works only at moderate L, d_head and tol"
    return "above the threshold (M > log L): no sub-cubic algorithm is expected (SETH); use exact"


def diagnose(head: TensorHead, lora: LoRA, x, *, tol=None) -> TensorDiagnosis:
    """Where this tensor-attention problem sits relative to the phase transition, and which method to use.

    Parameters
    ----------
    head, lora, x
        As in :func:`gpulora.tensor.lora_grad`.
    tol : float, optional
        Target relative error of ``p ~ exp`` (default ``gpulora.DEFAULT_TOL = 1e-3``).

    Returns
    -------
    TensorDiagnosis
        Prints as a short table. Cost ``O(L d)``, plus ``O(L^3 d)`` for the exact ``max |S|`` when
        ``batch * H * L^3 <= 2^27``.
    """
    tol = DEFAULT_TOL if tol is None else check_tol(tol)
    prob = prepare(head, lora, x)
    q = prob.q
    batch, heads, L, d_head = q.shape
    d_v = prob.v1.shape[-1]
    lead = batch * heads
    m = score_bound(q, prob.k1, prob.k2, prob.beta)
    max_score = exact_max_score(q, prob.k1, prob.k2, prob.beta) if lead * L**3 <= EXACT_MAX_SCORE_LIMIT else None
    threshold, log_L = cost.log_threshold(L), math.log(max(L, 2))
    name = "cupy" if backend.is_cupy(q) else "numpy"
    targets = lora.targets
    e_flops = lead * cost.exact_flops(L, d_head, d_v, targets)
    e_sec = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name)
    notes = []
    dtype = backend.host_dtype(q)
    choice, compute = _plan(m, tol, dtype, notes)
    p_flops = p_sec = None
    if choice is not None:
        k = choice.features(d_head)
        p_flops = lead * cost.poly_flops(L, d_head, d_v, k, targets)
        p_sec = lead * cost.poly_seconds(L, d_head, d_v, k, targets, backend=name, float64_features=compute != dtype)
        if k * d_v >= L * L:
            notes.append(f"k * d_v = {k * d_v} >= L^2 = {L * L}: the low-rank chain is not smaller than the "
                         f"L x L^2 matrix it replaces")
    if m > threshold:
        notes.append("the polynomial method for tensor attention needs entries below about cbrt(log L) "
                     f"(= {threshold:.3g} here): use it for heads bounded by construction (normalised q, k1, "
                     "k2 at a small fixed temperature, small d_head)")
    return TensorDiagnosis(
        L=L, batch=batch, heads=heads, d_head=d_head, d_v=d_v, beta=prob.beta, dtype=str(dtype),
        bound=m, max_score=max_score, threshold=threshold, log_L=log_L,
        regime=_regime(m, threshold, log_L), tol=tol,
        **_choice_fields(choice, compute, d_head),
        exact_flops=e_flops, poly_flops=p_flops, exact_seconds=e_sec, poly_seconds=p_sec,
        recommended="poly" if p_sec is not None and p_sec < e_sec else "exact", notes=tuple(notes),
    )
