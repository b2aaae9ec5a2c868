"""Tensor attention (``gpulora.tensor``): exact ``O(L^3)`` vs polynomial method, time, memory and error.

Problems: :func:`gpulora.tensor.testing.make_problem` with unit-norm input rows of width ``D_MODEL``, rank
``RANK`` adapters on all five targets, ``d_head = d_v``, and ``Q``, ``K1``, ``K2`` scaled so that the
tensor score bound equals ``SCORE_BOUND`` (below ``cbrt(log L)`` from L = 4 on). The asv grid is small (a
few seconds per class, for regression tracking); the scaling study quoted in BENCHMARKS.md ("Tensor
attention") is :func:`scaling_study`, ``python -m benchmarks.bench_tensor`` from ``asv_bench/``.
"""

from __future__ import annotations

import numpy as np

import gpulora.tensor as tensor
from gpulora.poly.monomials import feature_dim
from gpulora.tensor import cost
from gpulora.tensor.testing import make_problem
from gpulora.testing import rel_error

from .common import (BACKENDS, D_MODEL, MAX_SCORE_LIMIT, RANK, SCORE_BOUND, Benchmark, CallBenchmark,
                     best_seconds, peak_alloc_mib, setup)  # noqa: F401  (setup: the module-level asv hook, seeding)

EXACT_LENGTHS = [64, 256]
POLY_LENGTHS = [1024, 16384]
ERROR_LENGTHS = [64]
D_HEADS = [4]
DEGREES = [2, 4]
DTYPES = ["float64"]


def problem(xp, L, d_head, dtype, *, seed=0):
    """The seeded tensor benchmark problem on ``xp`` in ``dtype``."""
    return make_problem(seed, L=L, d_model=D_MODEL, d_head=d_head, r=RANK, dtype=np.dtype(dtype), xp=xp,
                        score_bound_=SCORE_BOUND)


def tensor_bounds(prob) -> tuple[float, float]:
    """``(M, max |S|)`` of a tensor :func:`problem`: the tensor bound gpulora plans with and the exact
    maximum score over all triples (NaN beyond :data:`MAX_SCORE_LIMIT` triples). Two host reads."""
    import math

    from gpulora.tensor.chain import score_bound
    from gpulora.tensor.diagnose import exact_max_score
    from gpulora.tensor.grad import prepare

    p = prepare(prob.head, prob.lora, prob.x)
    lead, L = math.prod(p.q.shape[:-2]), p.q.shape[-2]
    exact = exact_max_score(p.q, p.k1, p.k2, p.beta) if lead * L**3 <= MAX_SCORE_LIMIT else math.nan
    return score_bound(p.q, p.k1, p.k2, p.beta), exact


def _max_rel_error(result, reference) -> float:
    return max(max(rel_error(result.grads[t].B, reference.grads[t].B),
                   rel_error(result.grads[t].A, reference.grads[t].A)) for t in reference.grads)


class TensorExactGrad(CallBenchmark):
    """Exact tensor attention (blocked over queries and key pairs, ``O(L^3 (d_head + d_v))``)."""

    params = [BACKENDS, EXACT_LENGTHS, D_HEADS, DTYPES]
    param_names = ["backend", "L", "d_head", "dtype"]
    kwargs = {"method": "exact"}

    def setup(self, backend_name, L, d_head, dtype):
        self._prepare(backend_name, L, d_head, dtype)
        self.flops = cost.exact_flops(L, d_head, d_head)

    def bounds(self) -> tuple[float, float]:
        return tensor_bounds(self.prob)

    def _prepare(self, backend_name, L, d_head, dtype):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, d_head, dtype)
        warm = problem(xp, 16, d_head, dtype)  # lazy imports and caches out of the first timed sample
        tensor.lora_grad(warm.head, warm.lora, warm.x, warm.y, **self.kwargs)

    def _run(self):
        p = self.prob
        return tensor.lora_grad(p.head, p.lora, p.x, p.y, **self.kwargs)

    def track_alloc_lora_grad(self, *params):
        return peak_alloc_mib(self._run)

    track_alloc_lora_grad.unit = "MiB"


class TensorPolyGrad(TensorExactGrad):
    """Polynomial method for tensor attention at a fixed degree, ``O(L k d_v d_head)``."""

    params = [BACKENDS, POLY_LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        self.kwargs = {"method": "poly", "degree": degree}
        self._prepare(backend_name, L, d_head, dtype)
        self.flops = cost.poly_flops(L, d_head, d_head, feature_dim(d_head, degree))


class TensorPolyError(Benchmark):
    """Accuracy bought with the speed: poly against exact on the same problem."""

    params = [BACKENDS, ERROR_LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        self.prob = problem(self.setup_backend(backend_name), L, d_head, dtype)
        self.degree = degree

    def bounds(self) -> tuple[float, float]:
        return tensor_bounds(self.prob)

    def track_rel_error_poly_vs_exact(self, *params):
        p = self.prob
        exact = tensor.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        poly = tensor.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=self.degree)
        return _max_rel_error(poly, exact)

    track_rel_error_poly_vs_exact.unit = "relative error"


def scaling_study(exact_lengths=(16, 32, 64, 128, 256, 512, 1024),
                  poly_lengths=(16, 32, 64, 128, 256, 1024, 4096, 16384, 65536),
                  degrees=(2, 3, 4), d_head=4, repeat=5):
    """The figures of BENCHMARKS.md ("Tensor attention") without asv: best-of-``repeat`` wall times, peak
    allocations (tracemalloc) and poly-vs-exact errors, then least-squares exponents and the crossover
    of the fitted power laws. Prints Markdown. ``python -m benchmarks.bench_tensor`` from ``asv_bench/``."""
    import math

    xp, rows, exact_runs = np, [], {}
    problem(xp, 16, d_head, "float64")  # imports and caches
    for L in sorted(set(exact_lengths) | set(poly_lengths)):
        p = problem(xp, L, d_head, "float64")
        if L in exact_lengths:
            fn = lambda: tensor.lora_grad(p.head, p.lora, p.x, p.y, method="exact")  # noqa: E731
            t = best_seconds(fn, budget=math.inf, max_repeat=repeat if L <= 256 else 1)
            exact_runs[L] = fn() if L <= 256 else None
            rows.append(("exact", L, None, t, peak_alloc_mib(fn) if L <= 512 else math.nan, None))
        if L in poly_lengths:
            for g in degrees:
                fn = lambda: tensor.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=g)  # noqa: E731
                t = best_seconds(fn, budget=math.inf, max_repeat=repeat)
                err = _max_rel_error(fn(), exact_runs[L]) if exact_runs.get(L) is not None else None
                rows.append((f"poly g={g} (k={feature_dim(d_head, g)})", L, g, t, peak_alloc_mib(fn), err))
    print("| method | L | time | alloc of the call | max rel. error vs exact |\n|---|---:|---:|---:|---:|")
    for name, L, _, t, mib, err in rows:
        print(f"| {name} | {L} | {t:.3g} s | {mib:.3g} MiB | {'-' if err is None else f'{err:.2e}'} |")

    def fit(points):
        x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
        return np.polyfit(x, y, 1)

    ex = [(L, t) for name, L, _, t, _, _ in rows if name == "exact" and L >= 128]
    a, b = fit(ex)
    print(f"\nexact exponent (L = {ex[0][0]}..{ex[-1][0]}): {a:.2f}")
    for g in degrees:
        pts = [(L, t) for _, L, gg, t, _, _ in rows if gg == g and L >= 1024]
        pa, pb = fit(pts)
        cross = math.exp((pb - b) / (a - pa))
        print(f"poly g={g}: exponent (L = {pts[0][0]}..{pts[-1][0]}) {pa:.2f}; fitted crossover L* = {cross:.3g}")


if __name__ == "__main__":
    scaling_study()
