"""``gpulora.lora_grad``: exact vs polynomial method, time, memory, throughput and accuracy."""

from __future__ import annotations

import gpulora
from gpulora.poly.monomials import feature_dim
from gpulora import backend, cost
from gpulora.testing import rel_error

from .common import BACKENDS, EXACT_MAX_L, Benchmark, CallBenchmark, peak_alloc_mib, problem, setup, warm_up  # noqa: F401

# The regression grid (~1 min): one length per class, both targets and dtypes, M = 1. The scaling study of
# BENCHMARKS.md subclasses these classes with larger grids in bench_scaling.py.
LENGTHS = [4096]
EXACT_LENGTHS = [1024, 4096]
ERROR_LENGTHS = [1024]
D_HEADS = [8]
DEGREES = [2, 4]
TARGETS = ["qv", "qkv"]
DTYPES = ["float32", "float64"]


def _max_rel_error(result, reference) -> float:
    """Largest relative Frobenius error over every adapter's ``B`` and ``A`` gradient."""
    return max(max(rel_error(result.grads[t].B, reference.grads[t].B),
                   rel_error(result.grads[t].A, reference.grads[t].A)) for t in reference.grads)


class ExactGrad(CallBenchmark):
    """Exact (blocked, ``O(L^2)``) loss and adapter gradients."""

    params = [BACKENDS, EXACT_LENGTHS, D_HEADS, TARGETS, DTYPES]
    param_names = ["backend", "L", "d_head", "targets", "dtype"]

    def setup(self, backend_name, L, d_head, targets, dtype):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, d_head, targets, dtype)
        warm_up(xp, d_head, targets, dtype, method="exact")
        self.flops = cost.exact_flops(L, d_head, d_head, tuple(targets))

    def _run(self):
        p = self.prob
        return gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")


class PolyGrad(CallBenchmark):
    """Polynomial method (chained low-rank gradient) at a fixed degree; the family is chosen by gpulora."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, TARGETS, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "targets", "dtype"]

    def setup(self, backend_name, L, d_head, degree, targets, dtype):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, d_head, targets, dtype)
        warm_up(xp, d_head, targets, dtype, method="poly", degree=degree)
        self.degree = degree
        k = feature_dim(d_head, degree)
        self.flops = cost.poly_flops(L, d_head, d_head, k, tuple(targets))

    def _run(self):
        p = self.prob
        return gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=self.degree)

    def track_alloc_lora_grad(self, *params):
        return peak_alloc_mib(self._run)

    track_alloc_lora_grad.unit = "MiB"


class PolyError(Benchmark):
    """Accuracy bought with the speed: poly against exact on the same problem (``L <= EXACT_MAX_L``)."""

    params = [BACKENDS, ERROR_LENGTHS, D_HEADS, DEGREES, TARGETS, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "targets", "dtype"]

    def setup(self, backend_name, L, d_head, degree, targets, dtype):
        self.prob = problem(self.setup_backend(backend_name), L, d_head, targets, dtype)
        self.degree = degree

    def track_rel_error_poly_vs_exact(self, *params):
        p = self.prob
        exact = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        poly = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=self.degree)
        return _max_rel_error(poly, exact)

    track_rel_error_poly_vs_exact.unit = "relative error"


class CausalPolyGrad(CallBenchmark):
    """Causal polynomial method (:mod:`gpulora.poly.causal`, chunked prefix sums)."""

    causal = True
    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, d_head, "qkv", dtype)
        warm_up(xp, d_head, "qkv", dtype, method="poly", degree=degree, causal=True)
        self.degree = degree
        self.L = L
        self.flops = cost.poly_flops(L, d_head, d_head, feature_dim(d_head, degree), ("q", "k", "v"), causal=True)

    def _run(self):
        p = self.prob
        return gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=self.degree, causal=True)

    def track_rel_error_poly_vs_exact(self, *params):
        if self.L > EXACT_MAX_L:
            return float("nan")  # the exact reference is not affordable here
        p = self.prob
        exact = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=True)
        return _max_rel_error(self._run(), exact)

    track_rel_error_poly_vs_exact.unit = "relative error"


class DeviceMemory(Benchmark):
    """Bytes the CuPy memory pool holds after one call (its high-water mark, since the pool keeps freed
    blocks); ``peakmem_`` sees host memory only. CuPy only."""

    params = [BACKENDS, [4096], D_HEADS, DEGREES, ["exact", "poly"]]
    param_names = ["backend", "L", "d_head", "degree", "method"]

    def setup(self, backend_name, L, d_head, degree, method):
        if backend_name != "cupy":
            raise NotImplementedError("device memory is tracked on the CuPy backend only")
        if method == "exact" and (L > EXACT_MAX_L or degree != DEGREES[0]):
            raise NotImplementedError("exact: L <= EXACT_MAX_L, and it does not depend on the degree")
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, d_head, "qkv", "float32")
        self.kwargs = {"method": method, "degree": degree if method == "poly" else None}
        self.pool = xp.get_default_memory_pool()

    def track_device_memory(self, *params):
        p = self.prob
        backend.synchronize()
        self.pool.free_all_blocks()
        before = self.pool.total_bytes()
        gpulora.lora_grad(p.head, p.lora, p.x, p.y, **self.kwargs)
        backend.synchronize()
        return (self.pool.total_bytes() - before) / 2**20

    track_device_memory.unit = "MiB"
