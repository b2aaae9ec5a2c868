"""Operation counts of exact and polynomial tensor attention, and the cost model behind ``method="auto"``.

Counts are flops per (batch member, head), shared by ``auto``, :func:`gpulora.tensor.diagnose`, the phase
sweep and the asv suite. Times divide them by effective rates (:data:`RATES`) measured with
``asv_bench/benchmarks/bench_tensor.py`` (BENCHMARKS.md, "Tensor attention"); only their ratio matters.
"""

from __future__ import annotations

import math

__all__ = ["RATES", "exact_flops", "exact_seconds", "log_threshold", "poly_flops", "poly_seconds"]

# Effective flop rates (flop/s) of each path as a whole, GEMMs, exp and Python overhead included.
# numpy: the 2-core x86-64 machine (OpenBLAS, one thread), float64, all five targets, d_head = d_v = 4
#   (BENCHMARKS.md, "Tensor attention"): exact = median rate over L = 128..1024 (1.5 .. 2.9 GFLOP/s),
#   poly = median over g = 2..4 at L = 4096..65536 (0.56 .. 1.9 GFLOP/s).
# cupy: NOT MEASURED (no GPU lent); the NumPy values stand in so that "auto" chooses by operation count.
RATES = {
    "numpy": {"exact": 2.1e9, "poly": 1.0e9},
    "cupy": {"exact": 2.1e9, "poly": 1.0e9},
}
_EXACT_ELEMENTWISE = 12  # exp, max, rescale, P, products with the broadcast rows: flop-equivalents per triple


def exact_flops(L: int, d_head: int, d_v: int, targets=("q", "k1", "k2", "v1", "v2")) -> float:
    """Flops of the exact loss and gradients for one head: about ``L^3 (4 d_head + 8 d_v)`` with every target
    (scores and output in the forward sweep; scores again and the products each target needs after)."""
    t = set(targets)
    per = 2 * d_head + 2 * d_v + _EXACT_ELEMENTWISE  # forward sweep
    if t:
        per += 2 * d_head + _EXACT_ELEMENTWISE  # recomputed F
        per += 2 * d_v * (("v1" in t) + ("v2" in t))
        if t & {"q", "k1", "k2"}:
            per += 2 * d_v + 2 * d_head * (bool(t & {"q", "k1"}) + ("k2" in t))  # W, P K2, P^T QK1
    return float(L) ** 3 * per


def poly_flops(L: int, d_head: int, d_v: int, k: int, targets=("q", "k1", "k2", "v1", "v2")) -> float:
    """Flops of the polynomial forward and chained gradient for one head with ``k`` features:
    ``O(L k d_v d_head)``."""
    t = set(targets)
    f = 3 * 2 * L * k + 5 * L * k + 6 * L * k * d_v  # three feature maps, D and U, N1, N2, O~
    if t & {"v1", "v2"}:
        f += 2 * L * k * d_v + 2 * L * k * d_v * (("v1" in t) + ("v2" in t))
    contract = 2 * L * k * d_v * d_head
    readout = 2 * L * k * d_v * d_head + 2 * L * d_v * d_head + 2 * L * k * d_head
    if "q" in t or "k2" in t:
        f += contract + 2 * L * k * d_head  # T1, M1
    if "q" in t or "k1" in t:
        f += contract + 2 * L * k * d_head  # T2, M2
    if t & {"k1", "k2"}:
        f += contract + 2 * L * k * d_head  # TQ, R
    f += readout * (("q" in t) + ("k1" in t) + ("k2" in t))
    return float(f)


def exact_seconds(L, d_head, d_v, targets=("q", "k1", "k2", "v1", "v2"), *, backend="numpy") -> float:
    """Modelled time of the exact loss and gradients for one head."""
    return exact_flops(L, d_head, d_v, targets) / RATES[backend]["exact"]


def poly_seconds(L, d_head, d_v, k, targets=("q", "k1", "k2", "v1", "v2"), *, backend="numpy",
                 float64_features=False) -> float:
    """Modelled time of the polynomial path for one head (float64 features for float32 input: twice)."""
    t = poly_flops(L, d_head, d_v, k, targets) / RATES[backend]["poly"]
    return 2 * t if float64_features else t


def log_threshold(L: int) -> float:
    """``cbrt(log L)``: the entry-bound scale below which tensor attention is possible in almost-linear time
    (Alman & Song 2024; above ``Omega(cbrt(log L))`` no truly sub-cubic algorithm exists under SETH)."""
    return math.log(max(L, 2)) ** (1.0 / 3.0)
