"""Operation counts of the exact and polynomial gradients, and the cost model behind ``method="auto"``.

Counts are flops per (batch member, head), defined once here and shared by ``auto``, ``diagnose``, the
phase sweep and the asv throughput tracks. Time estimates divide them by an effective rate per backend and
method, measured on the machines named below (``RATES``); the ratio of the two rates is what matters for
the choice.
"""

from __future__ import annotations

import math

__all__ = ["RATES", "estimate_seconds", "exact_flops", "log_threshold", "poly_flops"]

# Effective flop rates (flop/s) of each path as a whole (GEMMs plus the elementwise work, Python loop
# overhead included), fitted on the asv sizes of BENCHMARKS.md. numpy: the 2-core x86-64 CI machine,
# NumPy 2.4 with OpenBLAS. cupy: not measured yet (no GPU was lent when this was written); the CPU ratio
# between the methods is reused, which keeps "auto" choosing by operation count.
RATES = {
    "numpy": {"exact": 9.0e9, "poly": 6.0e9},
    "cupy": {"exact": 9.0e9, "poly": 6.0e9},
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


def poly_flops(L: int, d_head: int, d_v: int, k: int, targets=("q", "k", "v")) -> float:
    """Flops of the chained polynomial gradient for one head with ``k`` features: ``O(L k d_v d_head)``."""
    t = set(targets)
    f = 2 * L * k + 3 * L * k + 4 * L * k * d_v  # two feature maps, D and U, O~
    if "v" in t:
        f += 4 * L * k * d_v
    for side in ("q", "k"):
        if side in t:
            f += 4 * L * k * d_v * d_head + 2 * L * d_v * d_head + 4 * L * k * d_head
    return float(f)


def estimate_seconds(flops: float, backend: str, method: str) -> float:
    """``flops`` divided by the effective rate of ``method`` on ``backend`` ("numpy" or "cupy")."""
    return flops / RATES[backend][method]


def log_threshold(L: int) -> float:
    """``sqrt(log L)``: the scale of the entry bound below which almost-linear time is possible."""
    return math.sqrt(math.log(max(L, 2)))
