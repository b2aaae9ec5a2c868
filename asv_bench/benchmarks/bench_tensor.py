"""Tensor attention (``gpulora.tensor``): exact ``O(L^3)`` vs polynomial method, time, memory and error.

Problems: :func:`gpulora.tensor.testing.make_problem` with unit-norm input rows of width ``D_MODEL``, rank
``RANK`` adapters on all five targets, ``d_head = d_v``, and ``Q``, ``K1``, ``K2`` scaled so that the
tensor score bound equals ``SCORE_BOUND`` (below ``cbrt(log L)`` from L = 64 on). Default grid: a few
seconds per class; ``GPULORA_BENCH_FULL=1`` selects the grid quoted in BENCHMARKS.md ("Tensor attention").
"""

from __future__ import annotations

import numpy as np

import gpulora.tensor as tensor
from gpulora import backend
from gpulora.poly.monomials import feature_dim
from gpulora.tensor import cost
from gpulora.tensor.testing import make_problem
from gpulora.testing import rel_error

from .common import (BACKENDS, D_MODEL, RANK, SCORE_BOUND, Benchmark, best_seconds, grid, peak_alloc_mib,
                     setup)  # noqa: F401  (setup: the module-level asv hook, seeding)

EXACT_LENGTHS = grid([64, 256], [64, 128, 256, 512, 1024])
POLY_LENGTHS = grid([1024, 16384], [64, 256, 1024, 4096, 16384, 65536])
ERROR_LENGTHS = grid([64], [64, 128, 256])
D_HEADS = grid([4], [4])
DEGREES = grid([2, 4], [2, 3, 4])
DTYPES = ["float64"]


def problem(xp, L, d_head, dtype, *, seed=0):
    """The seeded tensor benchmark problem on ``xp`` in ``dtype``."""
    return make_problem(seed, L=L, d_model=D_MODEL, d_head=d_head, r=RANK, dtype=np.dtype(dtype), xp=xp,
                        score_bound_=SCORE_BOUND)


def _max_rel_error(result, reference) -> float:
    return max(max(rel_error(result.grads[t].B, reference.grads[t].B),
                   rel_error(result.grads[t].A, reference.grads[t].A)) for t in reference.grads)


class TensorExactGrad(Benchmark):
    """Exact tensor attention (blocked over queries and key pairs, ``O(L^3 (d_head + d_v))``)."""

    params = [BACKENDS, EXACT_LENGTHS, D_HEADS, DTYPES]
    param_names = ["backend", "L", "d_head", "dtype"]
    kwargs = {"method": "exact"}

    def setup(self, backend_name, L, d_head, dtype):
        self._prepare(backend_name, L, d_head, dtype)
        self.flops = cost.exact_flops(L, d_head, d_head)

    def _prepare(self, backend_name, L, d_head, dtype):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, d_head, dtype)
        warm = problem(xp, 16, d_head, dtype)  # lazy imports and caches out of the first timed sample
        tensor.lora_grad(warm.head, warm.lora, warm.x, warm.y, **self.kwargs)

    def _run(self):
        p = self.prob
        return tensor.lora_grad(p.head, p.lora, p.x, p.y, **self.kwargs)

    def time_lora_grad(self, *params):
        self._run()
        backend.synchronize()

    def peakmem_lora_grad(self, *params):
        self._run()

    def track_alloc_lora_grad(self, *params):
        return peak_alloc_mib(self._run)

    track_alloc_lora_grad.unit = "MiB"

    def track_gflops_lora_grad(self, *params):
        return self.flops / best_seconds(self._run) / 1e9

    track_gflops_lora_grad.unit = "GFLOP/s"


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

    def track_rel_error_poly_vs_exact(self, *params):
        p = self.prob
        exact = tensor.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        poly = tensor.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=self.degree)
        return _max_rel_error(poly, exact)

    track_rel_error_poly_vs_exact.unit = "relative error"
