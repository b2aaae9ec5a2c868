"""Shared pieces of the gpulora asv suite: backends, parameter grids, seeded problems, synchronised timing.

Every benchmark class derives from :class:`Benchmark` (parametrised over ``backend`` first), builds its
inputs in ``setup`` with :func:`gpulora.testing.make_problem`, and ends every ``time_`` call with
:func:`gpulora.backend.synchronize`. ``setup`` raises ``NotImplementedError`` (asv's "skip") when CuPy or a
CUDA device is missing, and for parameter combinations that are not meaningful. Operation and byte counts
come from :mod:`gpulora.cost` (defined once there).

Grids: the default grid is small, so that ``asv run --python=same --quick`` of one commit takes a few
minutes on a 2-core CPU. ``GPULORA_BENCH_FULL=1`` selects the grid that BENCHMARKS.md quotes (L from 1024
to 65536, d_head in {4, 8, 16}, degree in {2, 4}; exact and PyTorch only up to ``EXACT_MAX_L``).
"""

from __future__ import annotations

import os
import timeit
import tracemalloc

import numpy as np

from gpulora import backend
from gpulora import testing
from gpulora.testing import make_problem

__all__ = [
    "BACKENDS",
    "D_MODEL",
    "EXACT_MAX_L",
    "FULL",
    "RANK",
    "SCORE_BOUND",
    "Benchmark",
    "array_module",
    "best_seconds",
    "grid",
    "peak_alloc_mib",
    "problem",
    "setup",
    "warm_up",
]

BACKENDS = ["numpy", "cupy"]
FULL = os.environ.get("GPULORA_BENCH_FULL", "") not in ("", "0")
# Every problem: unit-norm input rows of width D_MODEL, LoRA rank RANK, d_v = d_head, and Q/K scaled so
# that the a-priori score bound beta * max|q_i| * max|k_j| equals SCORE_BOUND (the bounded regime the
# polynomial method is for; the degree is a parameter, so the error is tracked beside the time).
D_MODEL = 16
RANK = 4
SCORE_BOUND = 1.0
# The exact O(L^2) path (and PyTorch's) costs ~30 s a call at L = 65536 on the 2-core CPU: not beyond this.
EXACT_MAX_L = 16384


def grid(default, full):
    """The list of parameter values: ``full`` under ``GPULORA_BENCH_FULL=1``, else ``default``."""
    return list(full if FULL else default)


def setup(*args, **kwargs):
    """Module-level asv hook (imported by every benchmark module): seed the global RNGs."""
    np.random.seed(1234)


def array_module(name: str):
    """NumPy or CuPy for ``backend`` name ``name``.

    Raises
    ------
    NotImplementedError
        When ``name`` is "cupy" and CuPy or a CUDA device is missing (asv then skips the benchmark).
    """
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError as err:
            raise NotImplementedError(f"CuPy is not installed ({err})") from None
        if not backend.has_cuda():
            raise NotImplementedError("CuPy is installed but sees no CUDA device")
        return cupy
    raise NotImplementedError(f"unknown backend {name!r}")


def problem(xp, L, d_head, targets, dtype, *, seed=0):
    """The seeded benchmark problem (:func:`gpulora.testing.make_problem`) on ``xp`` in ``dtype``."""
    return make_problem(seed, L=L, d_model=D_MODEL, d_head=d_head, r=RANK, targets=targets,
                        dtype=np.dtype(dtype), xp=xp, score_bound=SCORE_BOUND)


def warm_up(xp, d_head, targets, dtype, **kwargs):
    """One ``lora_grad(**kwargs)`` call on a 64-token problem of the same shapes: the first call of a
    process pays lazy imports (array_api_compat's NumPy namespace, ~0.1 s) and cache fills that would
    otherwise land in the first timed sample (``number = 1``, no asv warm-up)."""
    import gpulora

    p = problem(xp, 64, d_head, targets, dtype)
    gpulora.lora_grad(p.head, p.lora, p.x, p.y, **kwargs)
    backend.synchronize()


def best_seconds(fn, *, budget=1.0, max_repeat=5, timer=timeit.default_timer) -> float:
    """Least wall time of synchronised calls of ``fn``: at least one, more while under ``budget`` seconds."""
    return testing.time_call(fn, min_time=budget, max_repeat=max_repeat, timer=timer)[1]  # module-qualified: asv collects time_* names


def peak_alloc_mib(fn) -> float:
    """Peak of the host memory that ``fn`` allocates while it runs (tracemalloc, which NumPy reports to),
    in MiB: the working set of the call, without the interpreter and libraries that ``peakmem_`` counts."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        backend.synchronize()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


class Benchmark:
    """Base class: ``backend`` is the first parameter; ``setup_backend`` resolves it (or skips).

    Subclasses set ``params`` / ``param_names`` with ``BACKENDS`` / ``"backend"`` first.
    """

    timer = timeit.default_timer
    params = [BACKENDS]
    param_names = ["backend"]
    # Slow calls (seconds at the large sizes): one process, exactly one call per sample, 3 to 10 samples
    # within ~10 s; asv reports the median and the interquartile range.
    rounds = 1
    number = 1
    repeat = (3, 10, 10.0)
    warmup_time = 0.0
    timeout = 600

    def setup_backend(self, name):
        self.xp = array_module(name)
        return self.xp
