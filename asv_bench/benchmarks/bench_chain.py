"""The polynomial method on the CPU (or GPU) beside PyTorch autograd through the same polynomial attention,
and its GFLOP/s beside the machine's matmul rate, all measured in one process.

``TorchPolyLoRA`` is the baseline a user would write: the LoRA projections, the tensor-power features of
the same polynomial (built degree by degree with index gathers), ``O = (Phi (Psi^T V)) / (Phi (Psi^T 1))``,
``0.5 ||O - Y||^2`` and ``loss.backward()``. It is linear in ``L`` like gpulora's chain; its forward equals
gpulora's polynomial output, and its gradient is that of a loss built on ``p`` (with ``p'``), which differs
from the chain's (docs/math.md section 4) by the approximation error only. The class times both on the same
problem and reports the speed-up, the chain's GFLOP/s (flops from :func:`gpulora.cost.poly_flops`) and a
square matmul of the same dtype in the same run, so the rates can be compared on a shared machine.
"""

from __future__ import annotations

import numpy as np

import gpulora
from gpulora import backend, cost
from gpulora.poly.coefficients import measure
from gpulora.poly.features import feature_scales
from gpulora.poly.monomials import feature_dim, monomial_table

from .bench_grad import D_HEADS, DEGREES
from .bench_torch import TorchLoRA, import_torch
from .common import BACKENDS, Benchmark, best_seconds, problem, settle, setup, warm_up  # noqa: F401

# the regression grid; bench_scaling.PolyVsTorchScaling runs L 4096..65536, every d_head, targets, dtype
LENGTHS = [65536]
TARGETS = ["qv"]
DTYPES = ["float32"]
MATMUL_N = 1024


class TorchPolyLoRA(TorchLoRA):
    """:class:`bench_torch.TorchLoRA` with the polynomial attention in place of SDPA (see the module
    docstring); ``coef`` are the monomial coefficients of ``p`` (``gpulora.poly.coefficients``)."""

    def __init__(self, prob, device, dtype, coef):
        super().__init__(prob, device, dtype)
        torch = self.torch
        d = prob.head.w_q.shape[1] // prob.head.heads
        table = monomial_table(d, len(coef) - 1)
        starts = table.degree_start
        self.degrees = [(torch.as_tensor(table.parent[lo:hi].astype(np.int64), device=device),
                         torch.as_tensor(table.coord[lo:hi].astype(np.int64), device=device))
                        for lo, hi in zip(starts[1:-1], starts[2:])]
        self.scales = {side: torch.as_tensor(feature_scales(coef, d, side), dtype=dtype, device=device)
                       for side in ("query", "key")}

    def features(self, z, side):
        cols = self.torch.ones(z.shape[:-1] + (1,), dtype=z.dtype, device=z.device)
        for parent, coord in self.degrees:
            cols = self.torch.cat([cols, cols[..., parent] * z[..., coord]], dim=-1)
        return cols * self.scales[side]

    def attention(self, q, k, v):
        phi, psi = self.features(self.beta * q, "query"), self.features(k, "key")
        return (phi @ (psi.mT @ v)) / (phi @ psi.sum(dim=-2, keepdim=True).mT)


class PolyVsTorch(Benchmark):
    """``lora_grad(method="poly")`` and the PyTorch baseline on one problem, one head (``d_v = d_head``)."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, TARGETS, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "targets", "dtype"]

    def setup(self, backend_name, L, d_head, degree, targets, dtype):
        torch = import_torch()
        xp = self.setup_backend(backend_name)
        device = "cuda" if backend_name == "cupy" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("torch sees no CUDA device")
        self.prob = problem(xp, L, d_head, targets, dtype)
        warm_up(xp, d_head, targets, dtype, method="poly", degree=degree)
        self.degree = degree
        res = self._run()
        coef = measure(res.family, degree, res.bound).coef
        self.torch_model = TorchPolyLoRA(problem(np, L, d_head, targets, dtype), device, getattr(torch, dtype), coef)
        TorchPolyLoRA(problem(np, 64, d_head, targets, dtype), device, getattr(torch, dtype), coef)()  # warm-up
        self.flops = cost.poly_flops(L, d_head, d_head, feature_dim(d_head, degree), tuple(targets))
        self.a = xp.ones((MATMUL_N, MATMUL_N), dtype=getattr(xp, dtype))
        settle()  # torch ran last: its OpenMP workers must stop spinning before gpulora is timed

    def _run(self):
        p = self.prob
        out = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=self.degree)
        backend.synchronize()
        return out

    def _torch(self):
        self.torch_model()
        self.torch_model.synchronize()

    def _matmul(self):
        self.a @ self.a
        backend.synchronize()

    def time_gpulora_poly(self, *params):
        self._run()

    def time_torch_poly_autograd(self, *params):
        self._torch()

    def track_speedup_vs_torch_poly(self, *params):
        return best_seconds(self._torch) / best_seconds(self._run)

    track_speedup_vs_torch_poly.unit = "x"

    def track_gflops_poly(self, *params):
        return self.flops / best_seconds(self._run) / 1e9

    track_gflops_poly.unit = "GFLOP/s"

    def track_gflops_matmul(self, *params):
        return 2 * MATMUL_N**3 / best_seconds(self._matmul, budget=0.2) / 1e9

    track_gflops_matmul.unit = "GFLOP/s"

    def track_fraction_of_matmul(self, *params):
        """The chain's GFLOP/s over the matmul's, both measured here and now."""
        return (self.flops / best_seconds(self._run)) / (2 * MATMUL_N**3 / best_seconds(self._matmul, budget=0.2))

    track_fraction_of_matmul.unit = "fraction"
