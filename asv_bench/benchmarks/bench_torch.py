"""The baseline users know: the same LoRA problem through PyTorch autograd and
``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-style kernels on CPU and CUDA).

Backend "numpy" runs CPU torch, "cupy" CUDA torch; skipped (``NotImplementedError``) without torch, or
without a CUDA device for "cupy". ``tests/test_benchmarks.py`` checks once, in float64, that
:class:`TorchLoRA` gives gpulora's exact gradients, so the baseline solves the same problem.
"""

from __future__ import annotations

import numpy as np

from gpulora import backend, cost

from .common import BACKENDS, CallBenchmark, problem, setup  # noqa: F401

LENGTHS = [1024, 4096]
D_HEADS = [8]
TARGETS = ["qkv"]
DTYPES = ["float32", "float64"]


def torch_device(torch, backend_name) -> str:
    """"cpu" for backend "numpy", "cuda" for "cupy"; ``NotImplementedError`` (skip) without a CUDA device."""
    if backend_name == "cupy":
        if not torch.cuda.is_available():
            raise NotImplementedError("torch sees no CUDA device")
        return "cuda"
    if backend_name == "numpy":
        return "cpu"
    raise NotImplementedError(f"unknown backend {backend_name!r}")


def import_torch():
    """``torch``, or ``NotImplementedError`` (asv's skip) when it is not installed."""
    try:
        import torch
    except ImportError as err:
        raise NotImplementedError(f"PyTorch is not installed ({err})") from None
    return torch


class TorchLoRA:
    """One LoRA-adapted attention head in PyTorch: ``W = W0 + (alpha / r) B A``, ``Q = X Wq`` (etc.),
    ``O = SDPA(Q, K, V, scale=beta)``, ``loss = 0.5 ||O - Y||^2``; :meth:`__call__` runs forward and
    backward, leaving the gradients in ``self.adapters[t][0].grad`` (B) and ``[1].grad`` (A).

    Parameters
    ----------
    prob : gpulora.testing.Problem
        NumPy arrays (unbatched, one head), converted to torch tensors of ``dtype`` on ``device``.
    device : {"cpu", "cuda"}
    dtype : torch dtype
    """

    def __init__(self, prob, device, dtype):
        torch = import_torch()
        self.torch = torch
        self.device = device

        def tensor(a, grad=False):
            return torch.tensor(np.asarray(backend.to_numpy(a)), dtype=dtype, device=device, requires_grad=grad)

        h, lora = prob.head, prob.lora
        self.w0 = {"q": tensor(h.w_q), "k": tensor(h.w_k), "v": tensor(h.w_v)}
        self.adapters = {t: (tensor(b, True), tensor(a, True)) for t, (b, a) in lora.adapters.items()}
        self.scaling = {t: lora.scaling(t) for t in lora.adapters}
        self.beta = float(h.beta)
        self.x, self.y = tensor(prob.x), tensor(prob.y)

    def __call__(self):
        """Forward and backward; returns the loss tensor (gradients are set, not accumulated)."""
        proj = {}
        for t, w0 in self.w0.items():
            w = w0
            if t in self.adapters:
                b, a = self.adapters[t]
                b.grad = a.grad = None
                w = w0 + self.scaling[t] * (b @ a)
            proj[t] = (self.x @ w)[None, None]  # (1, 1, L, d)
        o = self.attention(proj["q"], proj["k"], proj["v"])
        loss = 0.5 * ((o[0, 0] - self.y) ** 2).sum()
        loss.backward()
        return loss

    def attention(self, q, k, v):
        """The attention output of ``(1, 1, L, d)`` tensors: SDPA with ``scale = beta`` (subclasses swap it)."""
        return self.torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.beta)

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class TorchGrad(CallBenchmark):
    """PyTorch autograd through SDPA: loss and adapter gradients (``O(L^2)``, like gpulora's exact)."""

    params = [BACKENDS, LENGTHS, D_HEADS, TARGETS, DTYPES]
    param_names = ["backend", "L", "d_head", "targets", "dtype"]

    def setup(self, backend_name, L, d_head, targets, dtype):
        torch = import_torch()
        device = torch_device(torch, backend_name)
        self.prob = problem(np, L, d_head, targets, "float64")
        self.model = TorchLoRA(self.prob, device, getattr(torch, dtype))
        TorchLoRA(problem(np, 64, d_head, targets, "float64"), device, getattr(torch, dtype))()  # warm-up
        self.flops = cost.exact_flops(L, d_head, d_head, tuple(targets))

    def _run(self):
        self.model()
        self.model.synchronize()

