"""Where a problem sits relative to the phase transition of Hu et al. (2025), in numbers of its own.

The polynomial method is almost linear in ``L`` only while the entries of ``S = beta Q K^T`` stay below
about ``sqrt(log L)``; above it (under SETH) no sub-quadratic algorithm exists. :func:`diagnose` reports the
cheap bound ``M = beta max|q_i| max|k_j|``, the exact ``max |S|`` when ``L`` is small enough to afford it,
the threshold scale, the degree/family/features that ``tol`` needs (and the precision the rounding
allows), and the estimated cost of both methods.

What it tells users plainly (docs/math.md section 7, measured on pretrained MiniLM heads): trained attention heads
sit far above the threshold (median ``max |S|`` 7..10, ``1.4..1.8 log L``); the cheap bound is not loose, the
scores are large; float32 rounding limits the polynomial to ``M`` about 6 at tol 1e-3 and float64 to about
15. The poly path is for heads whose scores are bounded by construction (QK-norm at a small fixed
temperature, small ``d_head``, normalised inputs).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import backend, cost
from .adapters import prepare
from .exact.attention import block_sizes, scores
from .model import Head, LoRA, check_parameters
from .poly.budget import check_budget, poly_bytes
from .poly.chain import score_bound
from .poly.coefficients import DEFAULT_TOL, choose
from .validation import check_bool, check_tol

__all__ = ["Diagnosis", "diagnose", "exact_max_score"]

EXACT_MAX_SCORE_LIMIT = 1 << 26  # batch * H * L^2 scores: computed exactly up to this many


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The diagnosis of one problem (see :func:`diagnose`); ``str()`` gives a short table."""

    L: int
    batch: int
    heads: int
    d_head: int
    d_v: int
    beta: float
    dtype: str
    bound: float
    max_score: float | None
    threshold: float
    log_L: float
    regime: str
    tol: float
    family: str | None
    degree: int | None
    features: int | None
    compute_dtype: str | None
    approx_error: float | None
    rounding_error: float | None
    exact_flops: float
    poly_flops: float | None
    exact_seconds: float
    poly_seconds: float | None
    recommended: str
    notes: tuple[str, ...]

    def __str__(self) -> str:
        def num(v, fmt=".3g"):
            return "n/a" if v is None else format(v, fmt)

        rows = [
            ("problem", f"L={self.L}, batch={self.batch}, heads={self.heads}, d_head={self.d_head}, "
                        f"d_v={self.d_v}, beta={self.beta:.4g}, {self.dtype}"),
            ("bound M = beta max|q| max|k|", num(self.bound)),
            ("exact max |S|", num(self.max_score) if self.max_score is not None else "not computed (L too large)"),
            ("threshold sqrt(log L)", f"{self.threshold:.3g}   (log L = {self.log_L:.3g})"),
            ("regime", self.regime),
            (f"polynomial for tol {self.tol:.2g}",
             "none reaches it" if self.degree is None else
             f"{self.family}, degree {self.degree}, k = {self.features} features, {self.compute_dtype}"),
            ("  approx / rounding error", f"{num(self.approx_error)} / {num(self.rounding_error)}"),
            ("est. cost exact", f"{self.exact_flops:.3g} flop, {self.exact_seconds:.3g} s"),
            ("est. cost poly", "n/a" if self.poly_flops is None
             else f"{self.poly_flops:.3g} flop, {self.poly_seconds:.3g} s"),
            ("recommended", self.recommended),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["gpulora diagnosis"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def exact_max_score(q, k, beta, *, causal=False) -> float:
    """``max |S|`` over all (batch, head) by blocks of queries: ``O(L^2 d)`` time, linear memory."""
    xp = backend.namespace(q, k)
    L = q.shape[-2]
    bq, _ = block_sizes(math.prod(q.shape[:-2]), L, block_k=L)
    best = xp.zeros((), dtype=q.dtype)
    for i0 in range(0, L, bq):
        s = scores(xp, q[..., i0:i0 + bq, :], k, beta, i0, 0, causal, fill=0.0)
        best = xp.maximum(best, xp.max(xp.abs(s)))
    return backend.to_float(best)  # one host read


_REGIMES = {
    "below sqrt(log L)": "below the threshold (bounded entries): the polynomial method can be almost linear in L",
    "between sqrt(log L) and log L": "in the transition (sqrt(log L) < M <= log L): poly works only at moderate "
                                     "L, d_head and tol",
    "above log L": "above the threshold (M > log L): no sub-quadratic algorithm is expected (SETH); use exact",
}


def regime_key(m: float, threshold: float, log_L: float) -> str:
    """Where a score bound ``m`` sits against ``threshold`` (``sqrt(log L)``) and ``log L``: a key of
    :data:`_REGIMES` (the survey's CSV column; :func:`diagnose` prints its explanation)."""
    if m <= threshold:
        return "below sqrt(log L)"
    if m <= log_L:
        return "between sqrt(log L) and log L"
    return "above log L"


def _regime(m: float, threshold: float, log_L: float) -> str:
    return _REGIMES[regime_key(m, threshold, log_L)]


def _plan(m: float, tol: float, dtype, notes: list):
    """``(choice, compute dtype)`` of the polynomial :func:`choose` picks for the bound ``m``, or
    ``(None, None)`` with the reason appended to ``notes``; a note too where float32 rounding puts the
    features in float64. Shared by :func:`diagnose` and :func:`gpulora.tensor.diagnose`."""
    try:
        choice, compute = choose(m, tol=tol, dtype=dtype)
    except ValueError as err:
        notes.append(str(err))
        return None, None
    if compute != dtype:
        notes.append(f"float32 rounding of the polynomial (~{choice.rounding_error(dtype):.2g}) exceeds tol: "
                     f"its features are computed in float64")
    return choice, compute


def _choice_fields(choice, compute, d_head: int) -> dict:
    """The polynomial fields of a diagnosis (``family`` .. ``rounding_error``); all None without a choice."""
    return dict(
        family=None if choice is None else choice.family,
        degree=None if choice is None else choice.degree,
        features=None if choice is None else choice.features(d_head),
        compute_dtype=None if compute is None else str(compute),
        approx_error=None if choice is None else choice.approx_error,
        rounding_error=None if choice is None else choice.rounding_error(compute),
    )


def diagnose(head: Head, lora: LoRA, x, *, tol=None, causal=False) -> Diagnosis:
    """Where this problem sits relative to the phase transition, and which method it should use.

    Parameters
    ----------
    head, lora, x
        As in :func:`gpulora.lora_grad` (``x`` of shape ``(L, d_model)`` or ``(batch, L, d_model)``).
    tol : float, optional
        Target relative error of ``p ~ exp`` (default ``gpulora.DEFAULT_TOL = 1e-3``).
    causal : bool
        Count costs (and the exact max) for a causal mask.

    Returns
    -------
    Diagnosis
        Prints as a short table. Cost ``O(L d)``, plus ``O(L^2 d)`` for the exact ``max |S|`` when
        ``batch * H * L^2 <= 2^26``. A polynomial over the feature budget (:mod:`gpulora.poly.budget`) is
        shown with the reason in the notes, and poly is not recommended.
    """
    tol = DEFAULT_TOL if tol is None else check_tol(tol)
    causal = check_bool("causal", causal)
    if isinstance(head, Head) and isinstance(lora, LoRA):  # else prepare names the wrong type
        check_parameters(head, lora)
    prob = prepare(head, lora, x)
    att = prob.attention(causal)  # grouped-query layout: k, v broadcast over each group
    q, k = att.q, att.k
    batch, heads, L, d_head = prob.q.shape
    d_v = prob.v.shape[-1]
    lead = batch * heads
    m = score_bound(q, k, prob.beta)
    max_score = exact_max_score(q, k, prob.beta, causal=causal) if lead * L * L <= EXACT_MAX_SCORE_LIMIT else None
    threshold, log_L = cost.log_threshold(L), math.log(max(L, 2))
    name = "cupy" if backend.is_cupy(q) else "numpy"
    targets = lora.targets
    e_flops = lead * cost.exact_flops(L, d_head, d_v, targets, causal=causal)
    e_sec = lead * cost.exact_seconds(L, d_head, d_v, targets, backend=name, causal=causal)
    notes = []
    dtype = backend.host_dtype(q)
    choice, compute = _plan(m, tol, dtype, notes)
    over_budget = False
    if choice is not None:
        try:
            check_budget(d_head, choice.degree, what=f"the {choice.family} polynomial",
                         nbytes=poly_bytes(lead, L, choice.features(d_head), d_head, d_v, compute.itemsize))
        except ValueError as err:
            notes.append(str(err))
            over_budget = True
    p_flops = p_sec = None
    if choice is not None and not over_budget:
        k = choice.features(d_head)
        p_flops = lead * cost.poly_flops(L, d_head, d_v, k, targets, causal=causal)
        p_sec = lead * cost.poly_seconds(L, d_head, d_v, k, targets, backend=name, causal=causal,
                                         float64_features=compute != dtype)
        if choice.features(d_head) * d_v >= L:
            notes.append(f"k * d_v = {choice.features(d_head) * d_v} >= L = {L}: the low-rank chain is not "
                         f"smaller than the L x L matrix it replaces")
    recommended = "poly" if p_sec is not None and p_sec < e_sec else "exact"
    if m > threshold:
        notes.append("trained attention heads typically sit far above the threshold (MiniLM: median max|S| "
                     "7..10, about 1.4..1.8 log L); the poly path is meant for heads bounded by construction "
                     "(QK-norm with a small fixed temperature, small d_head, normalised inputs)")
    if m > 6 and dtype == np.float32:
        notes.append("float32 holds the polynomial to tol 1e-3 only up to M about 6 (float64 to about 15)")
    return Diagnosis(
        L=L, batch=batch, heads=heads, d_head=d_head, d_v=d_v, beta=prob.beta, dtype=str(dtype),
        bound=m, max_score=max_score, threshold=threshold, log_L=log_L,
        regime=_regime(m, threshold, log_L), tol=tol,
        **_choice_fields(choice, compute, d_head),
        exact_flops=e_flops, poly_flops=p_flops, exact_seconds=e_sec, poly_seconds=p_sec,
        recommended=recommended, notes=tuple(notes),
    )
