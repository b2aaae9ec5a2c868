"""Operation counts of the exact and polynomial gradients, and the cost model behind ``method="auto"``.

Counts are flops per (batch member, head), defined once here and shared by ``auto``, ``diagnose``, the
phase sweep and the asv throughput tracks. Time estimates divide them by an effective rate per backend and
method, measured on the machines named below (``RATES``); the ratio of the two rates is what matters for
the choice.
"""

from __future__ import annotations

import math

__all__ = [
    "RATES",
    "estimate_seconds",
    "exact_flops",
    "exact_seconds",
    "feature_map_bytes",
    "feature_map_flops",
    "kron_contract_bytes",
    "kron_contract_flops",
    "kron_readout_bytes",
    "kron_readout_flops",
    "log_threshold",
    "poly_flops",
    "poly_seconds",
]

# Effective flop rates (flop/s) of each path as a whole: the counts of exact_flops / poly_flops divided by
# the measured median time, GEMMs, elementwise passes and Python overhead all included. Only their ratio
# matters for method="auto".
# numpy: measured by the asv suite (the scaling study, bench_scaling; command and tables in BENCHMARKS.md) on the
#   2-core x86-64 machine (Intel Xeon, NumPy 2 with OpenBLAS), float64, targets qkv, d_v = d_head:
#   exact = median over d_head {4, 8, 16} of the rate at L = 16384 (3.7 / 6.6 / 11.6 GFLOP/s: the
#   elementwise softmax passes over L^2 scores, not the d_head-proportional GEMMs, dominate there);
#   poly = median over d_head {4, 8, 16} x g {2, 4} at L = 65536 (2.6 .. 36 GFLOP/s: small k is bound by
#   elementwise passes and the NumPy feature-map gathers, large k by the BLAS). With these two numbers
#   "auto" picks the faster method at 29 of the 30 measured points of that grid (BENCHMARKS.md).
#   Re-checked after the feature-major chain (issue 16), old and new interleaved in one process,
#   OPENBLAS_NUM_THREADS=1, L = 65536, float64, qkv: poly's rate at d_head {4, 8} x g {2, 4} rose 1.06..1.36x
#   (to 6.6 / 16.3 / 13.8 / 27.0 GFLOP/s), within the 1.5x this model tolerates, so "poly" stays 1.1e10.
# cupy: measured on an NVIDIA H200 by asv_bench/gpu_run.sh (the GPU section of BENCHMARKS.md), float32,
#   8 heads, forward + backward, M = 1: exact 3.2..3.7 TFLOP/s at d_head 16 and 10.6..12.4 at d_head 64
#   (L = 4096, 16384), median 7e12; poly at g = 2 1.2..2.0 TFLOP/s at d_head 16 (k = 153, launch- and
#   elementwise-bound) and 19.6..22.6 at d_head 64 (k = 2145, GEMM-bound), median 1e13. One rate per path
#   mis-states small-k poly by up to 8x, so "auto" on a GPU can pick the slower method near the crossover
#   (at most about 1.3x slower at the measured points).
RATES = {
    "numpy": {"exact": 6.6e9, "poly": 1.1e10},
    "cupy": {"exact": 7e12, "poly": 1e13},
}
# Elementwise work per score in the exact path (scale, mask, max, exp, normalise, P): flop-equivalents.
_EXACT_ELEMENTWISE = 12


def exact_flops(L: int, d_head: int, d_v: int, targets=("q", "k", "v"), *, causal=False) -> float:
    """Flops of the exact loss and gradients for one head: about ``L^2 (6 d_head + 6 d_v)`` with all targets."""
    t = set(targets)
    per_score = 2 * d_head + 2 * d_v + _EXACT_ELEMENTWISE  # S, F V, softmax
    if t & {"q", "k"}:
        per_score += 2 * d_v  # G V^T
    per_score += 2 * d_head * (("q" in t) + ("k" in t)) + 2 * d_v * ("v" in t)
    return float(L) * L * per_score * (0.5 if causal else 1.0)


def poly_flops(L: int, d_head: int, d_v: int, k: int, targets=("q", "k", "v"), *, causal=False) -> float:
    """Flops of the chained polynomial gradient for one head with ``k`` features: ``O(L k d_v d_head)``.

    ``causal`` adds the dense masked work inside the chunks of :mod:`gpulora.poly.causal`, about
    ``2 L C (k + 3 d_v + 2 d_head)`` with its default chunk size ``C``.
    """
    t = set(targets)
    f = 2 * L * k + 3 * L * k + 4 * L * k * d_v  # two feature maps, D and U, O~
    if "v" in t:
        f += 4 * L * k * d_v
    for side in ("q", "k"):
        if side in t:
            f += 4 * L * k * d_v * d_head + 2 * L * d_v * d_head + 4 * L * k * d_head
    if causal:
        from .poly.causal import chunk_size

        f += 2 * L * chunk_size(L, k, d_head, d_v) * (k + 3 * d_v + 2 * d_head)
    return float(f)


def estimate_seconds(flops: float, backend: str, method: str) -> float:
    """``flops`` divided by the effective rate of ``method`` on ``backend`` ("numpy" or "cupy")."""
    return flops / RATES[backend][method]


def exact_seconds(L: int, d_head: int, d_v: int, targets=("q", "k", "v"), *, backend="numpy",
                  causal=False) -> float:
    """Modelled time of the exact loss and gradients for one head."""
    return estimate_seconds(exact_flops(L, d_head, d_v, targets, causal=causal), backend, "exact")


def poly_seconds(L: int, d_head: int, d_v: int, k: int, targets=("q", "k", "v"), *, backend="numpy",
                 causal=False, float64_features=False) -> float:
    """Modelled time of the polynomial gradient for one head; float64 features (for float32 inputs whose
    rounding demands them) cost about twice as much."""
    t = estimate_seconds(poly_flops(L, d_head, d_v, k, targets, causal=causal), backend, "poly")
    return 2 * t if float64_features else t


def log_threshold(L: int) -> float:
    """``sqrt(log L)``: the scale of the entry bound below which almost-linear time is possible."""
    return math.sqrt(math.log(max(L, 2)))


def feature_map_flops(L: int, k: int) -> float:
    """Flops of one scaled monomial feature map of ``L`` rows: one multiply to build each of the ``k``
    columns from its parent and one to scale it, ``2 L k``."""
    return 2.0 * L * k


def feature_map_bytes(L: int, d: int, k: int, itemsize: int) -> float:
    """Compulsory memory traffic of one feature map: read ``z (L, d)`` and the ``k`` scales, write
    ``phi (L, k)``. The throughput it gives (bytes / time) is comparable with the copy bandwidth; the NumPy
    reference moves about three times as much (every column reads its parent column and one of ``z``)."""
    return float(itemsize) * (L * d + k + L * k)


def kron_contract_flops(L: int, k: int, p: int, q: int) -> float:
    """Flops of ``T = Psi^T (A (x) B)`` (``gpulora.poly.products.kron_contract``): ``2 L k p q``."""
    return 2.0 * L * k * p * q


def kron_contract_bytes(L: int, k: int, p: int, q: int, itemsize: int) -> float:
    """Compulsory traffic of ``kron_contract``: read ``psi (L, k)``, ``a (L, p)``, ``b (L, q)``, write
    ``T (k, p, q)``."""
    return float(itemsize) * (L * (k + p + q) + k * p * q)


def kron_readout_flops(L: int, k: int, p: int, q: int) -> float:
    """Flops of ``(U (x) A) . T`` (``gpulora.poly.products.kron_readout``): ``2 L k p q + 2 L p q``."""
    return 2.0 * L * k * p * q + 2.0 * L * p * q


def kron_readout_bytes(L: int, k: int, p: int, q: int, itemsize: int) -> float:
    """Compulsory traffic of ``kron_readout``: read ``u (L, k)``, ``a (L, p)``, ``T (k, p, q)``, write
    ``out (L, q)``."""
    return float(itemsize) * (L * (k + p + q) + k * p * q)
