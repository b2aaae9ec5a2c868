"""Exact vs polynomial method, measured: one comparison (the demo) and the phase-transition sweep (the plot).

:func:`compare` runs both methods on one problem, times them and measures the relative error of every
poly adapter gradient against the exact one. :func:`sweep` walks a grid of score bounds ``M`` (inputs
scaled with :func:`gpulora.testing.make_problem`) and sequence lengths ``L`` and records, for each point,
the polynomial that ``tol`` needs (:func:`gpulora.poly.coefficients.choose`), the cost of both methods
(measured wall time where affordable, :mod:`gpulora.cost` beyond, and said which), the measured gradient
error where ``L`` is small, and which method is cheaper. :func:`plot` draws the phase diagram and
:func:`write_csv` writes the numbers; ``python -m gpulora phase`` does all three.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from . import cost
from .grad import lora_grad
from .model import GradResult
from .poly.coefficients import DEFAULT_TOL, FAMILIES, MAX_DEGREE, choose, measure
from .testing import Problem, make_problem, rel_error, time_call
from .validation import check_tol

__all__ = [
    "DEFAULT_BOUNDS",
    "DEFAULT_LENGTHS",
    "MATRIX",
    "Comparison",
    "PhasePoint",
    "PlotKind",
    "compare",
    "plot",
    "sweep",
    "write_csv",
]

DEFAULT_BOUNDS = (0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20)
DEFAULT_LENGTHS = tuple(2**p for p in range(7, 21))  # 128 .. 1048576
# Elements of the (L, k) feature matrix above which the poly path is modelled, not run (memory and time).
DEFAULT_MAX_FEATURE_ELEMENTS = 1 << 24
_ERROR_FACTOR = 10  # adapter gradients stay within this multiple of tol (gpulora.lora_grad, tests)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Exact and poly on one problem.

    Attributes
    ----------
    exact, poly : GradResult or None
        The results (``poly`` is None when it could not run; ``poly_message`` says why).
    exact_seconds, poly_seconds : float or None
        Fastest wall time of each.
    errors : dict of str to (float, float)
        Per target, relative Frobenius error of the poly ``B`` and ``A`` gradients against the exact ones.
    loss_error : float or None
        Relative error of the poly loss.
    """

    exact: GradResult | None
    poly: GradResult | None
    exact_seconds: float | None
    poly_seconds: float | None
    errors: dict
    loss_error: float | None
    poly_message: str = ""

    @property
    def max_error(self) -> float | None:
        """The worst relative gradient error over targets and ``B``/``A`` (None without both results)."""
        return max((e for pair in self.errors.values() for e in pair), default=None)

    @property
    def speedup(self) -> float | None:
        """``exact_seconds / poly_seconds``."""
        if self.exact_seconds is None or not self.poly_seconds:
            return None
        return self.exact_seconds / self.poly_seconds


def compare(problem: Problem, *, tol=None, causal=False, run_exact=True, run_poly=True, min_time=0.0,
            max_repeat=1) -> Comparison:
    """Run ``lora_grad`` with ``method="exact"`` and ``method="poly"`` on ``problem`` and compare.

    A ``ValueError`` of the poly path (no polynomial meets ``tol``, rounding, causal poly not available,
    :class:`gpulora.PolynomialFailure`) is recorded in ``poly_message`` instead of raised; a bad ``tol``
    is rejected first (``ValueError``).
    """
    p = problem
    if tol is not None:
        check_tol(tol)
    ex = px = None
    te = tp = None
    message = ""
    if run_exact:
        ex, te = time_call(lambda: lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=causal),
                           min_time=min_time, max_repeat=max_repeat)
    if run_poly:
        try:
            px, tp = time_call(lambda: lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=tol, causal=causal),
                               min_time=min_time, max_repeat=max_repeat)
        except ValueError as err:
            px, tp, message = None, None, str(err)
    errors, loss_error = {}, None
    if ex is not None and px is not None:
        errors = {t: (rel_error(px.grads[t].B, ex.grads[t].B), rel_error(px.grads[t].A, ex.grads[t].A))
                  for t in ex.grads}
        loss_error = rel_error(px.loss, ex.loss)
    return Comparison(ex, px, te, tp, errors, loss_error, message)


@dataclasses.dataclass(frozen=True)
class PhasePoint:
    """One point ``(M, L)`` of the sweep; the fields are the CSV columns (see :func:`write_csv`).

    ``status`` is ``"ok"`` (a polynomial meets ``tol``), ``"no_polynomial"`` (no positive polynomial of
    degree <= ``MAX_DEGREE`` approximates ``exp`` on ``[-M, M]`` to ``tol``), ``"rounding"`` (one does,
    but rounding would swamp it even in float64) or ``"failed"`` (it broke down at run time). ``*_source``
    is ``"measured"`` (fastest wall time) or ``"model"`` (:mod:`gpulora.cost`); ``basis`` says which
    decided ``winner`` (both times measured, or both modelled). ``grad_error`` is the worst relative
    gradient error of poly against exact, where measured.
    """

    bound: float
    L: int
    tol: float
    dtype: str
    backend: str
    d_model: int
    d_head: int
    d_v: int
    rank: int
    targets: str
    status: str
    family: str | None
    degree: int | None
    features: int | None
    compute_dtype: str | None
    approx_error: float | None
    rounding_error: float | None
    exact_seconds: float
    exact_source: str
    poly_seconds: float | None
    poly_source: str | None
    winner: str
    basis: str
    grad_error: float | None
    sqrt_log_L: float
    log_L: float


def _approximation_reaches(bound: float, tol: float) -> bool:
    """True if some positive polynomial of degree <= MAX_DEGREE meets ``tol`` on ``[-M, M]``, rounding aside."""
    return any(c.positive and c.approx_error <= tol
               for family in FAMILIES for c in (measure(family, g, bound) for g in range(1, MAX_DEGREE + 1)))


def _poly_choice(bound, tol, dtype):
    """``(choice, compute_dtype, status)``; choice is None when no polynomial is usable."""
    try:
        choice, compute = choose(bound, tol=tol, dtype=dtype)
        return choice, compute, "ok"
    except ValueError:
        return None, None, ("rounding" if _approximation_reaches(bound, tol) else "no_polynomial")


def _model_seconds(L, d_head, d_v, k, targets, name, upcast):
    te = cost.exact_seconds(L, d_head, d_v, targets, backend=name)
    tp = None if k is None else cost.poly_seconds(L, d_head, d_v, k, targets, backend=name, float64_features=upcast)
    return te, tp


def _point(L, te, tp, te_model, tp_model, err, choice, compute, k, **fields) -> PhasePoint:
    """One :class:`PhasePoint` of a sweep: measured seconds ``te``/``tp`` (None: not measured, the cost
    model's ``te_model``/``tp_model`` stand in), the winner and its basis, the polynomial's fields from
    ``choice`` (None: no polynomial reaches tol) and the problem's ``fields`` (bound .. status,
    ``sqrt_log_L``: the threshold scale of the caller's attention)."""
    e_src = "model" if te is None else "measured"
    p_src = None if k is None else ("model" if tp is None else "measured")
    te = te_model if te is None else te
    tp = tp_model if (tp is None and k is not None) else tp
    if fields["status"] != "ok" or tp is None:
        winner, basis = "exact", "infeasible"
    elif e_src == p_src == "measured":
        winner, basis = ("poly" if tp < te else "exact"), "measured"
    else:
        winner, basis = ("poly" if tp_model < te_model else "exact"), "model"
    return PhasePoint(
        L=int(L), **fields,
        family=None if choice is None else choice.family,
        degree=None if choice is None else choice.degree, features=k,
        compute_dtype=None if compute is None else np.dtype(compute).name,
        approx_error=None if choice is None else choice.approx_error,
        rounding_error=None if choice is None else choice.rounding_error(compute),
        exact_seconds=te, exact_source=e_src, poly_seconds=tp, poly_source=p_src,
        winner=winner, basis=basis, grad_error=err,
        log_L=math.log(max(L, 2)),
    )


def sweep(bounds: Sequence[float] = DEFAULT_BOUNDS, lengths: Sequence[int] = DEFAULT_LENGTHS, *, tol=None,
          d_model=32, d_head=4, d_v=4, rank=8, targets="qkv", dtype=np.float32, xp=np, seed=0,
          time_max_L=8192, error_max_L=2048, max_feature_elements=DEFAULT_MAX_FEATURE_ELEMENTS,
          progress=True) -> list[PhasePoint]:
    """Sweep the score bound ``M`` and the sequence length ``L``; one :class:`PhasePoint` per pair.

    Parameters
    ----------
    bounds : sequence of float
        Score bounds ``M = beta max|q_i| max|k_j|`` (> 0); the problem's ``w_q``, ``w_k`` (and their
        adapters) are scaled to hit each exactly.
    lengths : sequence of int
        Sequence lengths ``L``.
    tol : float, optional
        Target relative error of ``p ~ exp`` (default :data:`gpulora.DEFAULT_TOL`).
    d_model, d_head, d_v, rank, targets, dtype, xp, seed
        The problem (see :func:`gpulora.testing.make_problem`), one head, no batch.
    time_max_L : int
        Wall times are measured for ``L <= time_max_L`` (poly only while ``L k <= max_feature_elements``),
        modelled with :mod:`gpulora.cost` beyond.
    error_max_L : int
        The poly gradient error against exact is measured for ``L <= error_max_L`` (where poly runs).
    max_feature_elements : int
        Largest ``L k`` for which the poly path is run.
    progress : bool
        Show a tqdm progress bar (on stderr).

    Returns
    -------
    list of PhasePoint
        In the order ``for M in bounds: for L in lengths``.
    """
    from tqdm.auto import tqdm

    tol = DEFAULT_TOL if tol is None else float(tol)
    dtype = np.dtype(dtype)
    name = "cupy" if xp.__name__.startswith("cupy") else "numpy"
    targets = "".join(targets)
    common = dict(d_model=d_model, d_head=d_head, d_v=d_v, r=rank, targets=targets, dtype=dtype, xp=xp)
    # Warm-up (CuPy kernel compilation, first-call overheads) so that no measured point pays for it.
    compare(make_problem(seed, L=min(128, min(lengths)), score_bound=1.0, **common), tol=tol)
    choices = {m: _poly_choice(float(m), tol, dtype) for m in bounds}
    exact_time = {}  # L -> measured exact seconds (M-independent), filled at the first M that measures it
    points = []
    bar = tqdm(total=len(bounds) * len(lengths), desc="phase sweep", unit="pt", disable=not progress)
    for m in bounds:
        choice, compute, status = choices[m]
        k = None if choice is None else choice.features(d_head)
        upcast = compute is not None and compute != dtype
        for L in lengths:
            te_model, tp_model = _model_seconds(L, d_head, d_v, k, targets, name, upcast)
            want_error = L <= error_max_L
            run_poly = k is not None and L <= time_max_L and L * k <= max_feature_elements
            run_exact = (L <= time_max_L and L not in exact_time) or (want_error and run_poly)
            te = tp = err = None
            point_status = status
            if run_exact or run_poly:
                cmp = compare(make_problem(seed, L=L, score_bound=float(m), **common), tol=tol,
                              run_exact=run_exact, run_poly=run_poly, min_time=0.3, max_repeat=5)
                te, tp = cmp.exact_seconds, cmp.poly_seconds
                err = cmp.max_error if want_error else None
                if run_poly and cmp.poly is None:
                    point_status = "failed"
                if te is not None:
                    exact_time.setdefault(L, te)
            if te is None:
                te = exact_time.get(L)
            points.append(_point(
                L, te, tp, te_model, tp_model, err, choice, compute, k, bound=float(m), tol=tol,
                dtype=dtype.name, backend=name, d_model=d_model, d_head=d_head, d_v=d_v, rank=rank,
                targets=targets, status=point_status,
                sqrt_log_L=cost.log_threshold(L),
            ))
            bar.update()
    bar.close()
    return points


def write_csv(points: Sequence[PhasePoint], path) -> None:
    """Write the sweep as CSV, one row per point, columns the fields of :class:`PhasePoint` (empty = None)."""
    fields = [f.name for f in dataclasses.fields(PhasePoint)]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for p in points:
            w.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(p).items()})


def read_csv(path) -> list[dict[str, Any]]:
    """The rows of a sweep CSV as dicts of strings (as written by :func:`write_csv`)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _pick(values, targets):
    """The values of ``values`` nearest to each of ``targets`` (deduplicated, in order)."""
    out = []
    for t in targets:
        v = min(values, key=lambda x: abs(math.log(x / t)))
        if v not in out:
            out.append(v)
    return out


@dataclasses.dataclass(frozen=True)
class PlotKind:
    """What differs between the phase plots of matrix and tensor attention (:data:`MATRIX`; the tensor one
    is ``gpulora.tensor.phase.TENSOR``): the threshold scale, the cost model and the labels."""

    threshold: Any  # L (array) -> threshold scale of the entry bound
    threshold_label: str
    model_seconds: Any  # (L, d_head, d_v, k or None, targets, backend, upcast) -> (exact s, poly s or None)
    bound_label: str
    cost_title: str
    title: str


def plot(points: Sequence[PhasePoint], path, *, cost_bounds=(1, 4, 10), kind: PlotKind | None = None) -> None:
    """Draw the sweep as a PNG: (a) the phase diagram, (b) cost vs ``L`` at a few ``M``, (c) error vs ``M``.

    (a) x = ``L`` (log), y = ``M``; marker = the cheaper method at ``tol`` (filled: decided by measured
    wall times, hollow: by the cost model), crosses where no polynomial is usable; the curves
    ``sqrt(log L)`` and ``log L`` and, for float32 inputs, the bound above which the features need float64.
    """
    kind = MATRIX if kind is None else kind
    from matplotlib.figure import Figure  # no pyplot: no global state, works under any backend
    from matplotlib.lines import Line2D

    p0 = points[0]
    bounds = sorted({p.bound for p in points})
    lengths = sorted({p.L for p in points})
    fig = Figure(figsize=(19, 7.6))
    ax, bx, cx = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)

    # (a) phase diagram
    style = {"poly": ("o", "tab:green"), "exact": ("s", "tab:red")}
    for p in points:
        if p.status == "ok":
            marker, colour = style[p.winner]
            filled = p.basis == "measured"
            ax.scatter(p.L, p.bound, s=70, marker=marker, edgecolors=colour, linewidths=1.5,
                       facecolors=colour if filled else "white", zorder=3)
        else:
            colour = {"no_polynomial": "0.55", "rounding": "black", "failed": "tab:purple"}[p.status]
            ax.scatter(p.L, p.bound, s=60, marker="x", color=colour, linewidths=1.5, zorder=3)
    xs = np.geomspace(lengths[0], lengths[-1], 200)
    ax.plot(xs, kind.threshold(xs), "b--", lw=2, zorder=2)
    ax.plot(xs, np.log(xs), "b-.", lw=2, zorder=2)
    f64 = [p.bound for p in points if p.status == "ok" and p.compute_dtype != p.dtype]
    f32 = [p.bound for p in points if p.status == "ok" and p.compute_dtype == p.dtype]
    legend = [
        Line2D([], [], ls="", marker="o", color="tab:green", ms=8, label="poly cheaper"),
        Line2D([], [], ls="", marker="s", color="tab:red", ms=8, label="exact cheaper"),
        Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", ms=8,
               label="hollow: decided by cost model\n(filled: by measured wall time)"),
        Line2D([], [], ls="", marker="x", color="0.55", ms=8, mew=1.5,
               label=f"poly infeasible: no polynomial\n(degree <= {MAX_DEGREE}) meets tol"),
    ]
    if any(p.status == "rounding" for p in points):
        legend.append(Line2D([], [], ls="", marker="x", color="black", ms=8, mew=1.5,
                             label="poly infeasible: float64 rounding"))
    if any(p.status == "failed" for p in points):
        legend.append(Line2D([], [], ls="", marker="x", color="tab:purple", ms=8, mew=1.5,
                             label="poly failed at run time"))
    legend += [Line2D([], [], color="b", ls="--", lw=2, label=kind.threshold_label),
               Line2D([], [], color="b", ls="-.", lw=2, label="log L")]
    switch = 0.5 * (max(f32) + min(f64)) if f64 and f32 and p0.dtype != "float64" else None
    if switch is not None:
        y = switch
        ax.axhline(y, color="tab:orange", ls=":", lw=2, zorder=1)
        legend.append(Line2D([], [], color="tab:orange", ls=":", lw=2,
                             label=f"above: {p0.dtype} rounding too large,\nfeatures computed in float64"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (tokens, log scale)")
    ax.set_ylabel(kind.bound_label)
    ax.set_title(f"(a) Cheaper method at tol {p0.tol:g}\n"
                 f"d_head={p0.d_head}, d_v={p0.d_v}, d_model={p0.d_model}, r={p0.rank}, targets {p0.targets}, "
                 f"{p0.dtype}, {p0.backend}", fontsize=10)
    ax.set_ylim(0, max(bounds) * 1.05)
    ax.legend(handles=legend, **below)
    ax.grid(alpha=0.3)

    # (b) cost vs L at a few M
    shown = _pick([b for b in bounds if any(p.bound == b and p.status == "ok" for p in points)] or bounds,
                  cost_bounds)
    ex = sorted({p.L: p for p in points}.values(), key=lambda p: p.L)
    ex_model = [kind.model_seconds(p.L, p.d_head, p.d_v, None, p.targets, p.backend, False)[0] for p in ex]
    bx.plot([p.L for p in ex], ex_model, "k-", lw=1.5, label="exact, model")
    meas = [(p.L, p.exact_seconds) for p in ex if p.exact_source == "measured"]
    if meas:
        bx.plot(*zip(*meas), "ks", ms=6, label="exact, measured")
    colours = ["tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:olive"] * 4
    for b, c in zip(shown, colours):
        row = [p for p in points if p.bound == b and p.poly_seconds is not None]
        if not row:
            continue
        r0 = row[0]
        model = [kind.model_seconds(p.L, p.d_head, p.d_v, p.features, p.targets, p.backend,
                                p.compute_dtype != p.dtype)[1] for p in row]
        bx.plot([p.L for p in row], model, "--", color=c, lw=1.5,
                label=f"poly M={b:g} (g={r0.degree}, k={r0.features}), model")
        meas = [(p.L, p.poly_seconds) for p in row if p.poly_source == "measured"]
        if meas:
            bx.plot(*zip(*meas), "o", color=c, ms=6, label=f"poly M={b:g}, measured")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("sequence length L (tokens, log scale)")
    bx.set_ylabel(f"time of loss + all adapter gradients (s, {p0.backend})")
    bx.set_title(kind.cost_title, fontsize=10)
    bx.legend(**below)
    bx.grid(alpha=0.3, which="both")

    # (c) error vs M
    ok = sorted({p.bound: p for p in points if p.status == "ok"}.values(), key=lambda p: p.bound)
    if ok:
        cx.plot([p.bound for p in ok], [p.approx_error for p in ok], "o-", color="tab:blue",
                label="max rel. error of p ~ exp on [-M, M] (chosen g)")
        cx.plot([p.bound for p in ok], [max(p.rounding_error, 1e-17) for p in ok], "^:", color="tab:orange",
                label="estimated rounding error (compute dtype)")
    row = [p for p in points if p.grad_error is not None]
    if row:
        ls = sorted({p.L for p in row})
        which = f"L = {ls[0]}" if len(ls) == 1 else f"one cross per L = {ls[0]}..{ls[-1]}"
        cx.plot([p.bound for p in row], [max(p.grad_error, 1e-17) for p in row], "x", color="tab:red", ms=7,
                mew=1.5, label=f"measured worst gradient error ({which})")
    if switch is not None:
        cx.axvline(switch, color="tab:orange", ls=":", lw=2,
                   label=f"{p0.dtype} features to the left, float64 to the right")
    cx.axhline(p0.tol, color="k", lw=1.5, label=f"tol = {p0.tol:g}")
    cx.axhline(_ERROR_FACTOR * p0.tol, color="k", ls="--", lw=1,
               label=f"{_ERROR_FACTOR} tol (documented gradient bound)")
    cx.set_yscale("log")
    cx.set_xlabel("score bound M (dimensionless)")
    cx.set_ylabel("relative error (Frobenius for gradients; max for exp)")
    cx.set_title("(c) Error of the polynomial method vs M\n"
                 "(worst adapter gradient B or A against exact)", fontsize=10)
    cx.legend(**{**below, "ncol": 1})
    cx.grid(alpha=0.3, which="both")

    fig.suptitle(kind.title, fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


MATRIX = PlotKind(
    threshold=lambda L: np.sqrt(np.log(L)), threshold_label="sqrt(log L): threshold scale",
    model_seconds=_model_seconds,
    bound_label="score bound M = beta max|q_i| max|k_j|  (bounds |S_ij|, dimensionless)",
    cost_title="(b) Cost vs L: exact O(L^2) vs poly O(L k d_v d_head)",
    title="gpulora phase transition: polynomial method vs exact attention LoRA gradient",
)
