"""Real-head shapes, side by side with PyTorch: the exact path's CPU speed, and the case where poly loses.

``ExactVsSDPA``: the attention core alone (no projections) of a MiniLM-like layer, 12 heads of d_head 32,
float32, L = 512..4096, with scores bounded like a trained head's (``M = 8``): gpulora's blocked exact
loss and gradients against PyTorch autograd through ``scaled_dot_product_attention`` (forward +
backward), in the same process, on the same arrays.

``RealHeadLike``: a LoRA problem with ``M = 8`` (trained heads measure ``max |S|`` 7..10). The polynomial
method needs a degree-20 polynomial and billions of features there, so ``method="auto"`` correctly runs the
exact path; the benchmark times it beside ``method="exact"`` and tracks what poly would have cost.
"""

from __future__ import annotations

import math

import numpy as np

import gpulora
from gpulora import backend
from gpulora.diagnose import exact_max_score
from gpulora.exact import attention
from gpulora.poly.chain import score_bound

from .bench_torch import import_torch, torch_device
from .common import BACKENDS, Benchmark, problem, setup, warm_up  # noqa: F401

REAL_BOUND = 8.0


def bounded_heads(rng, heads, L, d, bound):
    """``q, k, v, y`` of shape ``(1, heads, L, d)`` with ``(1 / sqrt(d)) max|q_i| max|k_j| = bound``."""
    q, k, v, y = (rng.standard_normal((1, heads, L, d)) for _ in range(4))
    beta = 1 / math.sqrt(d)
    c = math.sqrt(bound / (beta * np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max()))
    return q * c, k * c, v, y, beta


class ExactVsSDPA(Benchmark):
    """Attention loss and dQ, dK, dV: gpulora exact vs PyTorch SDPA autograd, 12 heads x d_head 32."""

    params = [BACKENDS, [512, 1024, 2048, 4096], ["float32"]]
    param_names = ["backend", "L", "dtype"]
    heads, d_head = 12, 32

    def setup(self, backend_name, L, dtype):
        xp = self.setup_backend(backend_name)
        torch = import_torch()
        device = torch_device(torch, backend_name)
        host = bounded_heads(np.random.default_rng(0), self.heads, L, self.d_head, REAL_BOUND)
        self.beta = host[-1]
        self.q, self.k, self.v, self.y = (xp.asarray(a.astype(dtype)) for a in host[:4])
        self.torch = torch
        self.tq, self.tk, self.tv = (torch.tensor(a.astype(dtype), device=device, requires_grad=True)
                                     for a in host[:3])
        self.ty = torch.tensor(host[3].astype(dtype), device=device)
        self.device = device
        self._gpulora()  # warm-up of both (lazy imports, thread pools)
        self._torch()

    def bounds(self):
        return (score_bound(self.q, self.k, self.beta), exact_max_score(self.q, self.k, self.beta))

    def _gpulora(self):
        attention.loss_and_grads(self.q, self.k, self.v, self.y, self.beta)
        backend.synchronize()

    def _torch(self):
        for t in (self.tq, self.tk, self.tv):
            t.grad = None
        o = self.torch.nn.functional.scaled_dot_product_attention(self.tq, self.tk, self.tv, scale=self.beta)
        (0.5 * ((o - self.ty) ** 2).sum()).backward()
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_gpulora_exact(self, *params):
        self._gpulora()

    def time_torch_sdpa(self, *params):
        self._torch()


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
