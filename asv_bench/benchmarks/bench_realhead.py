"""The case where the polynomial method correctly loses: a trained head's score bound.

(The exact path against PyTorch SDPA on a MiniLM-like layer, side by side, is ``bench_bridge.BridgeStep``.)

``RealHeadLike``: a LoRA problem with ``M = 8`` (trained heads measure ``max |S|`` 7..10). The polynomial
method needs a degree-20 polynomial and billions of features there, so ``method="auto"`` correctly runs the
exact path; the benchmark times it beside ``method="exact"`` and tracks what poly would have cost.
"""

from __future__ import annotations

import math

import gpulora
from gpulora import backend

from .common import BACKENDS, Benchmark, problem, setup, warm_up  # noqa: F401

REAL_BOUND = 8.0


class RealHeadLike(Benchmark):
    """``lora_grad`` at a trained head's score bound (M = 8): auto runs exact, poly would lose by far."""

    params = [BACKENDS, [1024, 4096], ["float32", "float64"]]
    param_names = ["backend", "L", "dtype"]

    def setup(self, backend_name, L, dtype):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, 16, "qv", dtype, bound=REAL_BOUND, d_model=64, heads=4)
        warm_up(xp, 16, "qv", dtype, method="auto")
        p = self.prob
        self.diagnosis = gpulora.diagnose(p.head, p.lora, p.x)

    def _run(self, method):
        p = self.prob
        res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method=method)
        backend.synchronize()
        return res

    def time_auto(self, *params):
        self._run("auto")

    def time_exact(self, *params):
        self._run("exact")

    def track_auto_ran_poly(self, *params):
        """1 if ``method="auto"`` ran poly, 0 if it (correctly) ran exact."""
        return float(self._run("auto").method == "poly")

    track_auto_ran_poly.unit = "ran poly"

    def track_poly_features_needed(self, *params):
        """Features ``k = C(d_head + g, g)`` of the polynomial that tol 1e-3 needs at this M (NaN: none)."""
        k = self.diagnosis.features
        return math.nan if k is None else float(k)

    track_poly_features_needed.unit = "features"

    def track_poly_over_exact_estimate(self, *params):
        """Estimated poly time over estimated exact time (gpulora.cost), NaN where no polynomial reaches tol."""
        d = self.diagnosis
        return math.nan if d.poly_seconds is None else d.poly_seconds / d.exact_seconds

    track_poly_over_exact_estimate.unit = "ratio"
