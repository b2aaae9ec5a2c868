"""Shared pieces of the gpulora asv suite: backends, seeded problems, score bounds, synchronised timing.

Every benchmark class derives from :class:`Benchmark` (parametrised over ``backend`` first), builds its
inputs in ``setup`` with :func:`gpulora.testing.make_problem`, and ends every ``time_`` call with
:func:`gpulora.backend.synchronize`. ``setup`` raises ``NotImplementedError`` (asv's "skip") when CuPy or a
CUDA device is missing, and for parameter combinations that are not meaningful. Operation and byte counts
come from :mod:`gpulora.cost` (defined once there).

Every class states the score bound of its inputs next to its times: ``track_score_bound`` (the a-priori
bound ``M = beta max|q_i| max|k_j|`` that gpulora plans with) and ``track_max_score`` (the exact ``max |S|``
where it is affordable, NaN beyond :data:`MAX_SCORE_LIMIT` scores).

Grids are fixed (asv's convention: ``params`` never depend on the environment). The ``bench_grad``,
``bench_torch``, ``bench_features`` and ``bench_products`` classes are the small regression grid (a few
minutes for ``asv run --python=same --quick`` on a 2-core CPU); ``bench_scaling`` holds the scaling study
that BENCHMARKS.md quotes (``asv run -b '^bench_scaling'``), and ``bench_realhead`` the side-by-side
comparisons with PyTorch on real-head shapes.
"""

from __future__ import annotations

import abc
import math
import time
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
    "MAX_SCORE_LIMIT",
    "RANK",
    "SCORE_BOUND",
    "Benchmark",
    "CallBenchmark",
    "array_module",
    "best_seconds",
    "peak_alloc_mib",
    "problem",
    "row_bounds",
    "scaled_rows",
    "score_bounds",
    "setup",
    "warm_up",
]

BACKENDS = ["numpy", "cupy"]
# Every problem: unit-norm input rows of width D_MODEL, LoRA rank RANK, d_v = d_head, and Q/K scaled so
# that the a-priori score bound beta * max|q_i| * max|k_j| equals SCORE_BOUND (the bounded regime the
# polynomial method is for; the degree is a parameter, so the error is tracked beside the time).
D_MODEL = 16
RANK = 4
SCORE_BOUND = 1.0
# The exact O(L^2) path (and PyTorch's) costs ~30 s a call at L = 65536 on the 2-core CPU: not beyond this.
EXACT_MAX_L = 16384
# The exact max |S| of a benchmark problem is computed (O(batch H L^2 d), blocked) up to this many scores.
MAX_SCORE_LIMIT = 1 << 28


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


def problem(xp, L, d_head, targets, dtype, *, seed=0, bound=SCORE_BOUND, **kwargs):
    """The seeded benchmark problem (:func:`gpulora.testing.make_problem`) on ``xp`` in ``dtype``, with
    Q/K scaled so that the score bound ``M`` is ``bound``."""
    return make_problem(seed, L=L, d_model=kwargs.pop("d_model", D_MODEL), d_head=d_head, r=RANK,
                        targets=targets, dtype=np.dtype(dtype), xp=xp, score_bound=bound, **kwargs)


def score_bounds(prob, *, causal=False) -> tuple[float, float]:
    """``(M, max |S|)`` of a :func:`problem`: the a-priori bound gpulora plans with and the exact maximum
    score (NaN when ``batch H L^2`` exceeds :data:`MAX_SCORE_LIMIT`). Two host reads."""
    from gpulora.adapters import prepare
    from gpulora.diagnosis import exact_max_score
    from gpulora.poly.chain import score_bound

    p = prepare(prob.head, prob.lora, prob.x)
    bound = score_bound(p.q, p.k, p.beta)
    lead, L = math.prod(p.q.shape[:-2]), p.q.shape[-2]
    exact = exact_max_score(p.q, p.k, p.beta, causal=causal) if lead * L * L <= MAX_SCORE_LIMIT else math.nan
    return bound, exact


def warm_up(xp, d_head, targets, dtype, **kwargs):
    """One ``lora_grad(**kwargs)`` call on a 64-token problem of the same shapes: the first call of a
    process pays lazy imports (array_api_compat's NumPy namespace, ~0.1 s) and cache fills that would
    otherwise land in the first timed sample (``number = 1``, no asv warm-up)."""
    import gpulora

    p = problem(xp, 64, d_head, targets, dtype)
    gpulora.lora_grad(p.head, p.lora, p.x, p.y, **kwargs)
    backend.synchronize()


SETTLE_SECONDS = 0.2


def settle():
    """Pause before the timed call of a setup that ran PyTorch: torch's OpenMP workers spin for a while after
    their work and take the two cores from the NumPy call that follows (seen on the CI-class machine as a
    first poly call after setup about a third slower than the next ones; a pause of 0.05 s already removed
    it). asv times the call right after ``setup`` (``number = 1``)."""
    time.sleep(SETTLE_SECONDS)


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


def scaled_rows(rng, L, d, bound):
    """``L`` Gaussian rows of width ``d`` scaled so that ``max_i |z_i|^2 = bound``: then every product
    ``z_i . z_j`` (a score of keys against themselves) lies in ``[-bound, bound]``."""
    z = rng.standard_normal((L, d))
    return z * (math.sqrt(bound) / np.linalg.norm(z, axis=-1).max())


def row_bounds(z) -> tuple[float, float]:
    """``(M, max |S|)`` of the scores ``z z^T`` of host rows ``z``: ``max |z_i|^2`` (attained at ``i = j``)."""
    m = float(np.max(np.sum(np.asarray(z, dtype=np.float64) ** 2, axis=-1)))
    return m, m


class Benchmark(abc.ABC):
    """Base class: ``backend`` is the first parameter; ``setup_backend`` resolves it (or skips).

    Subclasses set ``params`` / ``param_names`` with ``BACKENDS`` / ``"backend"`` first and define
    ``setup``. The class is abstract so that asv, which scans every class a module holds (this one is
    imported into each), does not take its ``track_`` methods for benchmarks of its own.
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

    causal = False  # whether the benchmarked call masks j > i (max |S| then runs over j <= i)

    @abc.abstractmethod
    def setup(self, *params):
        """Build the inputs of one parameter combination; raise ``NotImplementedError`` to skip it."""

    def setup_backend(self, name):
        self.xp = array_module(name)
        return self.xp

    def bounds(self) -> tuple[float, float]:
        """``(M, max |S|)`` of the benchmarked inputs: :func:`score_bounds` of ``self.prob`` by default."""
        return score_bounds(self.prob, causal=self.causal)

    def track_score_bound(self, *params):
        """The score bound ``M = beta max|q_i| max|k_j|`` of the inputs (what the polynomial is fitted to)."""
        return float(self.bounds()[0])

    track_score_bound.unit = "M"

    def track_max_score(self, *params):
        """The exact ``max |S|`` of the inputs (NaN where not affordable)."""
        return float(self.bounds()[1])

    track_max_score.unit = "max |S|"


class CallBenchmark(Benchmark):
    """A :class:`Benchmark` of one gradient call, ``self._run()``: its time (synchronised), asv's peak
    memory of the process, and its GFLOP/s against ``self.flops`` (set in ``setup``, from
    :mod:`gpulora.cost`), best of :func:`best_seconds`."""

    @abc.abstractmethod
    def _run(self):
        """One gradient call on the inputs of ``setup``; its result."""

    def time_lora_grad(self, *params):
        self._run()
        backend.synchronize()

    def peakmem_lora_grad(self, *params):
        self._run()

    def track_gflops_lora_grad(self, *params):
        return self.flops / best_seconds(self._run) / 1e9

    track_gflops_lora_grad.unit = "GFLOP/s"
