"""The phase transition of tensor attention, measured: the sweep behind ``python -m gpulora phase
--attention tensor``.

The same experiment and the same three panels as :mod:`gpulora.phase` (matrix attention), for
:mod:`gpulora.tensor`: for each score bound ``M`` (``w_q``, ``w_k1``, ``w_k2`` scaled to hit it) and length
``L``, the polynomial ``tol`` needs (:func:`gpulora.poly.coefficients.choose`), the cost of both methods
(measured where affordable, :mod:`gpulora.tensor.cost` beyond, and said which), the measured gradient error
of poly against exact where ``L`` is small, and which method is cheaper. The threshold scale is
``cbrt(log L)``. Points are :class:`gpulora.phase.PhasePoint` rows (their ``sqrt_log_L`` column holds
``cbrt(log L)`` here), written and drawn by :func:`gpulora.phase.write_csv` and :func:`gpulora.phase.plot`
with :data:`TENSOR`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..phase import PhasePoint, PlotKind, _point, _poly_choice
from ..poly.coefficients import DEFAULT_TOL
from ..testing import rel_error, time_call
from . import cost
from .grad import lora_grad
from .model import TARGETS
from .testing import make_problem

__all__ = ["DEFAULT_BOUNDS", "DEFAULT_LENGTHS", "TENSOR", "sweep"]

DEFAULT_BOUNDS = (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16)
DEFAULT_LENGTHS = tuple(2**p for p in range(5, 17))  # 32 .. 65536
DEFAULT_MAX_FEATURE_ELEMENTS = 1 << 22


def _model_seconds(L, d_head, d_v, k, targets, name, upcast):
    targets = tuple(targets) if not isinstance(targets, str) else _split_targets(targets)
    te = cost.exact_seconds(L, d_head, d_v, targets, backend=name)
    tp = None if k is None else cost.poly_seconds(L, d_head, d_v, k, targets, backend=name, float64_features=upcast)
    return te, tp


def _split_targets(text: str) -> tuple:
    """``"q,k1,v2"`` (the CSV form) back to a tuple of target names."""
    return tuple(t for t in text.split(",") if t)


TENSOR = PlotKind(
    threshold=lambda L: np.log(L) ** (1.0 / 3.0), threshold_label="cbrt(log L): threshold scale",
    model_seconds=_model_seconds,
    bound_label="score bound M = beta max|q_i| max|k1 * k2|  (bounds |S_ij1j2|, dimensionless)",
    cost_title="(b) Cost vs L: exact O(L^3) vs poly O(L k d_v d_head)",
    title="gpulora phase transition of tensor attention: polynomial method vs exact LoRA gradient",
)


def _run(p, method, tol, measure):
    fn = lambda: lora_grad(p.head, p.lora, p.x, p.y, method=method, tol=tol)  # noqa: E731
    return time_call(fn, min_time=0.3, max_repeat=5) if measure else (fn(), None)


def sweep(bounds: Sequence[float] = DEFAULT_BOUNDS, lengths: Sequence[int] = DEFAULT_LENGTHS, *, tol=None,
          d_model=16, d_head=4, d_v=4, rank=4, targets=TARGETS, dtype=np.float32, xp=np, seed=0,
          time_max_L=256, poly_time_max_L=65536, error_max_L=128,
          max_feature_elements=DEFAULT_MAX_FEATURE_ELEMENTS, progress=True) -> list[PhasePoint]:
    """Sweep the score bound ``M`` and the length ``L`` of a tensor-attention problem; one point per pair.

    Parameters
    ----------
    bounds, lengths, tol, d_model, d_head, d_v, rank, dtype, xp, seed, progress
        As :func:`gpulora.phase.sweep`; ``targets`` is an iterable of names among ``"q", "k1", "k2",
        "v1", "v2"`` (all by default).
    time_max_L : int
        Exact wall times are measured up to this ``L`` (``O(L^3)``: 256 takes about 2 s on 2 cores),
        modelled beyond.
    poly_time_max_L : int
        Poly wall times are measured up to this ``L`` while ``L k <= max_feature_elements``.
    error_max_L : int
        The poly gradient error against exact is measured up to this ``L``.

    Returns
    -------
    list of gpulora.phase.PhasePoint
        In the order ``for M in bounds: for L in lengths``; ``targets`` joined with commas.
    """
    from tqdm.auto import tqdm

    tol = DEFAULT_TOL if tol is None else float(tol)
    dtype = np.dtype(dtype)
    name = "cupy" if xp.__name__.startswith("cupy") else "numpy"
    targets = tuple(targets)
    common = dict(d_model=d_model, d_head=d_head, d_v=d_v, r=rank, targets=targets, dtype=dtype, xp=xp)
    warm = make_problem(seed, L=16, score_bound_=1.0, **common)
    for method in ("exact", "poly"):
        lora_grad(warm.head, warm.lora, warm.x, warm.y, method=method, tol=tol)
    exact_time, points = {}, []
    bar = tqdm(total=len(bounds) * len(lengths), desc="tensor phase sweep", unit="pt", disable=not progress)
    for m in bounds:
        choice, compute, status = _poly_choice(float(m), tol, dtype)
        k = None if choice is None else choice.features(d_head)
        upcast = compute is not None and compute != dtype
        for L in lengths:
            te_model, tp_model = _model_seconds(L, d_head, d_v, k, targets, name, upcast)
            run_poly = k is not None and L <= poly_time_max_L and L * k <= max_feature_elements
            want_error = run_poly and L <= error_max_L
            measure_exact = L <= time_max_L and L not in exact_time
            te = tp = err = None
            point_status = status
            if measure_exact or want_error or run_poly:
                p = make_problem(seed, L=L, score_bound_=float(m), **common)
                ex = None
                if measure_exact or want_error:
                    ex, te = _run(p, "exact", tol, measure_exact)
                    if te is not None:
                        exact_time[L] = te
                if run_poly:
                    try:
                        px, tp = _run(p, "poly", tol, True)
                        if ex is not None and want_error:
                            err = max(max(rel_error(px.grads[t].B, ex.grads[t].B),
                                          rel_error(px.grads[t].A, ex.grads[t].A)) for t in ex.grads)
                    except ValueError:
                        point_status = "failed"
            te = exact_time.get(L)
            points.append(_point(
                L, te, tp, te_model, tp_model, err, choice, compute, k, bound=float(m), tol=tol,
                dtype=dtype.name, backend=name, d_model=d_model, d_head=d_head, d_v=d_v, rank=rank,
                targets=",".join(targets), status=point_status,
                sqrt_log_L=cost.log_threshold(L),
            ))
            bar.update()
    bar.close()
    return points
