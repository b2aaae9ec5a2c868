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
import hashlib
import io
import math
import sys
import typing
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
    "boundary_text",
    "PlotKind",
    "compare",
    "csv_digest",
    "csv_text",
    "plot",
    "progress_bar",
    "read_csv",
    "read_points",
    "summary_rows",
    "sweep",
    "write_csv",
]

DEFAULT_BOUNDS = (0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20)
DEFAULT_LENGTHS = tuple(2**p for p in range(7, 21))  # 128 .. 1048576
# Elements of the (L, k) feature matrix above which the poly path is modelled, not run (memory and time).
DEFAULT_MAX_FEATURE_ELEMENTS = 1 << 24
_ERROR_FACTOR = 10  # adapter gradients stay within this multiple of tol (gpulora.lora_grad, tests)


class _NoProgress:
    """The part of tqdm's interface that gpulora uses, doing nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix_str(self, text="", refresh=True):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm progress bar on stderr when stderr is a terminal and tqdm is installed (``gpulora[plot]``);
    otherwise an object with the same methods that shows nothing (so a pipe or a log gets no bar)."""
    if not enabled or not sys.stderr.isatty():
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


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
            max_repeat=1, on_step=None) -> Comparison:
    """Run ``lora_grad`` with ``method="exact"`` and ``method="poly"`` on ``problem`` and compare.

    A ``ValueError`` of the poly path (no polynomial meets ``tol``, rounding, causal poly not available,
    :class:`gpulora.PolynomialFailure`) is recorded in ``poly_message`` instead of raised; a bad ``tol``
    is rejected first (``ValueError``). ``on_step(name)``, if given, is called after ``"exact"`` and
    after ``"poly"`` ran (progress display).
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
        if on_step is not None:
            on_step("exact")
    if run_poly:
        try:
            px, tp = time_call(lambda: lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=tol, causal=causal),
                               min_time=min_time, max_repeat=max_repeat)
        except ValueError as err:
            px, tp, message = None, None, str(err)
        if on_step is not None:
            on_step("poly")
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
    gradient error of poly against exact, where measured. ``rounding_error`` is the estimated rounding
    error of the chosen polynomial in ``compute_dtype``; ``rounding_error_float32`` / ``_float64`` are
    the same estimate in each precision (docs/math.md section 7).
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
    rounding_error_float32: float | None
    rounding_error_float64: float | None
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
        rounding_error_float32=None if choice is None else choice.rounding_error(np.float32),
        rounding_error_float64=None if choice is None else choice.rounding_error(np.float64),
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
    bar = progress_bar(total=len(bounds) * len(lengths), desc="phase sweep", unit="pt", enabled=progress)
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


def summary_rows(points: Sequence[PhasePoint]) -> list[tuple[str, ...]]:
    """Per score bound ``M``: the polynomial, the smallest ``L`` from which poly is cheaper and the worst
    measured gradient error, as rows of strings (a header row first); the table ``phase`` prints."""
    rows = [("M", "family", "degree", "features", "compute", "poly cheaper from L", "worst grad error")]
    for m in sorted({p.bound for p in points}):
        row = [p for p in points if p.bound == m]
        r0 = row[0]
        if r0.status in ("no_polynomial", "rounding"):
            why = "no polynomial meets tol" if r0.status == "no_polynomial" else "float64 rounding too large"
            rows.append((f"{m:g}", "-", "-", "-", "-", f"never ({why})", "-"))
            continue
        wins = [p.L for p in row if p.winner == "poly"]
        errs = [p.grad_error for p in row if p.grad_error is not None]
        rows.append((f"{m:g}", r0.family or "-", str(r0.degree), str(r0.features), r0.compute_dtype or "-",
                     str(min(wins)) if wins else "never in range",
                     "-" if not errs else format(max(errs), ".2e")))
    return rows


def csv_text(points: Sequence[PhasePoint]) -> str:
    """The sweep as CSV text, one row per point, columns the fields of :class:`PhasePoint` (empty = None)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in dataclasses.fields(PhasePoint)], lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(p).items()})
    return buf.getvalue()


def csv_digest(points: Sequence[PhasePoint]) -> str:
    """SHA-256 of :func:`csv_text`: :func:`plot` stores it in the PNG, so a figure names the CSV it shows."""
    return hashlib.sha256(csv_text(points).encode()).hexdigest()


def write_csv(points: Sequence[PhasePoint], path) -> None:
    """Write :func:`csv_text` to ``path``."""
    with open(path, "w", newline="") as fh:
        fh.write(csv_text(points))


def read_csv(path) -> list[dict[str, Any]]:
    """The rows of a sweep CSV as dicts of strings (as written by :func:`write_csv`)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_points(path) -> list[PhasePoint]:
    """The sweep written by :func:`write_csv`, as :class:`PhasePoint` objects (exactly as they were)."""
    types = typing.get_type_hints(PhasePoint)
    points = []
    for row in read_csv(path):
        values = {}
        for name, text in row.items():
            kind = types[name]
            if text == "":
                values[name] = None
            elif kind in (int, int | None):
                values[name] = int(text)
            elif kind in (float, float | None):
                values[name] = float(text)
            else:
                values[name] = text
        points.append(PhasePoint(**values))
    return points


def boundary_text(points: Sequence[PhasePoint]) -> str:
    """Where poly becomes the cheaper method: the smallest ``L`` per score bound ``M``, score bounds with
    the same ``L`` grouped (``"L = 512 at M = 0.5..3"``), then where poly never wins or is infeasible.
    The sentence that ``phase`` prints and README quotes."""
    bounds = sorted({p.bound for p in points})
    first, never, infeasible = [], [], []
    for m in bounds:
        row = [p for p in points if p.bound == m]
        if row[0].status in ("no_polynomial", "rounding"):
            infeasible.append(m)
            continue
        wins = [p.L for p in row if p.winner == "poly"]
        if wins:
            first.append((min(wins), m))
        else:
            never.append(m)
    groups = []
    for L, m in first:
        if groups and groups[-1][0] == L:
            groups[-1][2] = m
        else:
            groups.append([L, m, m])
    parts = [f"L = {L} at M = {lo:g}" + (f"..{hi:g}" if hi != lo else "") for L, lo, hi in groups]
    text = "poly is the cheaper method from " + ", ".join(parts) if parts else "poly is never the cheaper method"
    if never:
        text += f"; not within the lengths swept at M = {', '.join(f'{m:g}' for m in never)}"
    if infeasible:
        text += f"; infeasible (no usable polynomial) at M = {', '.join(f'{m:g}' for m in infeasible)}"
    return text


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
    """Draw the sweep as a PNG 880 pixels wide, three panels stacked: (a) the phase diagram, (b) cost vs
    ``L`` at a few ``M``, (c) error vs ``M``. The PNG's ``Source`` text holds :func:`csv_digest`. ``kind``
    (default :data:`MATRIX`) holds the threshold scale, cost model and labels (tensor attention has its own).

    (a) x = ``L``, y = ``M`` (both log); marker = the cheaper method at ``tol`` (filled: decided by
    measured wall times, hollow: by the cost model), crosses where no polynomial is usable; the curves
    ``sqrt(log L)`` and ``log L`` and, for float32 inputs, the bound above which the features need float64.
    (c) the approximation error of the chosen polynomial and its estimated rounding error in float32 and
    in float64, as two curves (filled where that precision is the one used), and the measured gradient
    errors. Needs matplotlib (``gpulora[plot]``).
    """
    kind = MATRIX if kind is None else kind
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, works under any backend

    p0 = points[0]
    bounds = sorted({p.bound for p in points})
    lengths = sorted({p.L for p in points})
    with matplotlib.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        fig = Figure(figsize=(8.8, 19.5), layout="constrained")
        ax, bx, cx = fig.subplots(3, 1, height_ratios=[1.25, 1, 1])
        _plot_phase(ax, points, bounds, lengths, kind)
        _plot_cost(bx, points, bounds, cost_bounds, kind)
        _plot_error(cx, points, bounds)
        fig.suptitle(f"{kind.title}, tol {p0.tol:g}\n"
                     f"d_head={p0.d_head}, d_v={p0.d_v}, d_model={p0.d_model}, r={p0.rank}, targets "
                     f"{p0.targets}, {p0.dtype}, {p0.backend}", fontsize=13)
        fig.savefig(path, dpi=100, metadata={"Source": f"gpulora phase; csv sha256 {csv_digest(points)}"})


def _float64_switch(points):
    """The score bound between the last float32-feature ``M`` and the first float64 one (float32 inputs)."""
    f64 = [p.bound for p in points if p.status == "ok" and p.compute_dtype != p.dtype]
    f32 = [p.bound for p in points if p.status == "ok" and p.compute_dtype == p.dtype]
    if not (f64 and f32) or points[0].dtype == "float64":
        return None
    return math.sqrt(max(f32) * min(f64))  # geometric middle: the M axes are logarithmic


def _log_bound_axis(axis, bounds):
    """Tick a logarithmic axis of score bounds at the swept values, labelling those at least a factor 1.2
    apart (the others get an unlabelled tick) so that the labels never overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    labelled = []
    for v in sorted(bounds):
        if not labelled or v >= 1.2 * labelled[-1]:
            labelled.append(v)
    axis.set_major_locator(FixedLocator(labelled))
    axis.set_minor_locator(FixedLocator([v for v in bounds if v not in labelled]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _plot_phase(ax, points, bounds, lengths, kind):
    from matplotlib.lines import Line2D

    style = {"poly": ("o", "tab:green"), "exact": ("s", "tab:red")}
    for p in points:
        if p.status == "ok":
            marker, colour = style[p.winner]
            ax.scatter(p.L, p.bound, s=60, marker=marker, edgecolors=colour, linewidths=1.5,
                       facecolors=colour if p.basis == "measured" else "white", zorder=3)
        else:
            colour = {"no_polynomial": "0.55", "rounding": "black", "failed": "tab:purple"}[p.status]
            ax.scatter(p.L, p.bound, s=55, marker="x", color=colour, linewidths=1.5, zorder=3)
    xs = np.geomspace(lengths[0], lengths[-1], 200)
    ax.plot(xs, kind.threshold(xs), "b--", lw=2, zorder=2)
    ax.plot(xs, np.log(xs), "b-.", lw=2, zorder=2)
    legend = [
        Line2D([], [], ls="", marker="o", color="tab:green", ms=8, label="poly cheaper"),
        Line2D([], [], ls="", marker="s", color="tab:red", ms=8, label="exact cheaper"),
        Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", ms=8,
               label="hollow: decided by the cost model\n(filled: by measured wall time)"),
        Line2D([], [], ls="", marker="x", color="0.55", ms=8, mew=1.5,
               label=f"poly infeasible: no polynomial of\ndegree <= {MAX_DEGREE} meets tol"),
    ]
    if any(p.status == "rounding" for p in points):
        legend.append(Line2D([], [], ls="", marker="x", color="black", ms=8, mew=1.5,
                             label="poly infeasible: float64 rounding"))
    if any(p.status == "failed" for p in points):
        legend.append(Line2D([], [], ls="", marker="x", color="tab:purple", ms=8, mew=1.5,
                             label="poly failed at run time"))
    legend += [Line2D([], [], color="b", ls="--", lw=2, label=kind.threshold_label),
               Line2D([], [], color="b", ls="-.", lw=2, label="log L")]
    switch = _float64_switch(points)
    if switch is not None:
        ax.axhline(switch, color="tab:orange", ls=":", lw=2, zorder=1)
        legend.append(Line2D([], [], color="tab:orange", ls=":", lw=2,
                             label=f"above: {points[0].dtype} rounding too large,\nfeatures in float64"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _log_bound_axis(ax.yaxis, bounds)
    ax.set_ylim(min(bounds) / 1.25, max(bounds) * 1.25)
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel(kind.bound_label)
    ax.set_title("(a) Which method is cheaper")
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.grid(alpha=0.3)


def _plot_cost(bx, points, bounds, cost_bounds, kind):
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
    bx.set_xlabel("sequence length L (tokens)")
    bx.set_ylabel(f"seconds, loss + all gradients ({points[0].backend})")
    bx.set_title(kind.cost_title)
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    bx.grid(alpha=0.3, which="both")


def _plot_error(cx, points, bounds):
    p0 = points[0]
    ok = sorted({p.bound: p for p in points if p.status == "ok"}.values(), key=lambda p: p.bound)
    if ok:
        ms = [p.bound for p in ok]
        cx.plot(ms, [p.approx_error for p in ok], "o-", color="tab:blue", label="approximation: max rel. error "
                "of p ~ exp on [-M, M]")
        for name, colour, marker in (("float32", "tab:orange", "^"), ("float64", "tab:brown", "v")):
            errs = [max(getattr(p, f"rounding_error_{name}"), 1e-17) for p in ok]
            cx.plot(ms, errs, ":", color=colour, lw=1.5)
            used = [p.compute_dtype == name for p in ok]
            cx.scatter(ms, errs, marker=marker, s=45, edgecolors=colour, linewidths=1.3, zorder=3,
                       facecolors=[colour if u else "white" for u in used],
                       label=f"estimated {name} rounding (filled: features in {name})")
    row = [p for p in points if p.grad_error is not None]
    if row:
        ls = sorted({p.L for p in row})
        which = f"L = {ls[0]}" if len(ls) == 1 else f"one cross per L = {ls[0]}..{ls[-1]}"
        cx.plot([p.bound for p in row], [max(p.grad_error, 1e-17) for p in row], "x", color="tab:red", ms=7,
                mew=1.5, label=f"measured worst gradient error ({which})")
    switch = _float64_switch(points)
    if switch is not None:
        cx.axvline(switch, color="tab:orange", ls=":", lw=2, label=f"{p0.dtype} features left, float64 right")
    cx.axhline(p0.tol, color="k", lw=1.5, label=f"tol = {p0.tol:g}")
    cx.axhline(_ERROR_FACTOR * p0.tol, color="k", ls="--", lw=1, label=f"{_ERROR_FACTOR} tol (documented "
               "gradient bound)")
    cx.set_xscale("log")
    _log_bound_axis(cx.xaxis, bounds)
    cx.set_yscale("log")
    cx.set_xlabel("score bound M")
    cx.set_ylabel("relative error")
    cx.set_title("(c) Error of the polynomial method vs M\n(gradients: worst adapter B or A against exact)")
    cx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    cx.grid(alpha=0.3, which="both")


MATRIX = PlotKind(
    threshold=lambda L: np.sqrt(np.log(L)), threshold_label="sqrt(log L): threshold scale",
    model_seconds=_model_seconds,
    bound_label="score bound M = beta max|q_i| max|k_j|  (bounds |S_ij|, dimensionless)",
    cost_title="(b) Cost vs L: exact O(L^2) vs poly O(L k d_v d_head)",
    title="gpulora phase transition: polynomial method vs exact attention LoRA gradient",
)
