"""The PyTorch bridge on one attention layer: forward and backward through ``gpulora.torch.attention`` against
torch's ``scaled_dot_product_attention`` (SDPA), the cost a training step pays per layer.

The layer has the shape of one all-MiniLM-L6-v2 layer (12 heads, ``d_head = 32``, batch 1), float32, random
``q``, ``k``, ``v`` that require grad and a random upstream gradient. ``impl``:

* ``"sdpa"``: plain torch SDPA and torch autograd (the baseline);
* ``"gpulora"``: the bridge with ``method="exact", exact_engine="gpulora"``: gpulora's exact forward and
  backward through DLPack;
* ``"bridge-sdpa"``: the bridge with ``method="exact", exact_engine="sdpa"`` (the default): input checks and
  the run record around SDPA, i.e. the bridge's own overhead.

``track_step_ratio`` times the implementation and SDPA in the same process and returns the ratio of their
best step times (robust to a busy machine). Backend ``"numpy"`` runs on the CPU, ``"cupy"`` on CUDA (skipped
without a CUDA device, and for ``"gpulora"`` without CuPy). Grid L in {512, 2048}, causal off;
``bench_scaling.BridgeStepScaling``: L from 512 to 16384, causal off and on. The inputs are standard normal
(``M`` about 6 to 8 at these sizes, like a trained head; tracked by ``track_score_bound``).

On a small or busy CPU, run with ``OPENBLAS_NUM_THREADS=1`` (and ``OMP_NUM_THREADS=1``): torch's OpenMP
pool and NumPy's OpenBLAS pool otherwise spin against each other and the ``"gpulora"`` times measure that
(8x to 80x SDPA on two busy cores, against 2x to 7x with one thread each; docs/pytorch.md).
"""

from __future__ import annotations

from .bench_torch import import_torch
from .common import BACKENDS, Benchmark, array_module, best_seconds, settle, setup  # noqa: F401

LENGTHS = [512, 2048]
IMPLS = ["sdpa", "gpulora", "bridge-sdpa"]
CAUSAL = [False]
HEADS, D_HEAD = 12, 32


def attention_step(impl, q, k, v, grad_out, causal):
    """One forward and backward of one attention layer; ``q.grad``, ``k.grad``, ``v.grad`` are set."""
    torch = import_torch()
    for t in (q, k, v):
        t.grad = None
    if impl == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        import gpulora.torch as gt

        engine = "gpulora" if impl == "gpulora" else "sdpa"
        out = gt.attention(q, k, v, causal=causal, method="exact", exact_engine=engine)
    out.backward(grad_out)


class BridgeStep(Benchmark):
    """Forward + backward of one 12-head attention layer (``O(L^2)`` for every implementation)."""

    params = [BACKENDS, LENGTHS, IMPLS, CAUSAL]
    param_names = ["backend", "L", "impl", "causal"]
    timeout = 600

    def setup(self, backend_name, L, impl, causal):
        torch = import_torch()
        if backend_name == "cupy":
            if not torch.cuda.is_available():
                raise NotImplementedError("torch sees no CUDA device")
            if impl == "gpulora":
                array_module("cupy")
            device = "cuda"
        elif backend_name == "numpy":
            device = "cpu"
        else:
            raise NotImplementedError(f"unknown backend {backend_name!r}")
        self.torch, self.device, self.impl, self.causal = torch, device, impl, causal
        g = torch.Generator().manual_seed(0)

        def tensor(grad):
            return torch.randn(1, HEADS, L, D_HEAD, generator=g).to(device).requires_grad_(grad)

        self.q, self.k, self.v = tensor(True), tensor(True), tensor(True)
        self.grad_out = tensor(False)
        self._step(impl)  # warm-up: lazy imports, first-call dispatch
        settle()  # asv times the next call: let torch's OpenMP workers stop spinning first

    def bounds(self):
        """``(M, max |S|)`` of the layer's scores (SDPA's default scale ``1 / sqrt(d_head)``)."""
        import math

        from gpulora.diagnosis import exact_max_score
        from gpulora.poly.chain import score_bound

        q, k = (t.detach().cpu().numpy() for t in (self.q, self.k))
        beta = 1 / math.sqrt(D_HEAD)
        return score_bound(q, k, beta), exact_max_score(q, k, beta, causal=self.causal)

    def _step(self, impl):
        attention_step(impl, self.q, self.k, self.v, self.grad_out, self.causal)
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_step(self, *params):
        self._step(self.impl)

    def track_step_ratio(self, *params):
        if self.impl == "sdpa":
            return 1.0
        return best_seconds(lambda: self._step(self.impl)) / best_seconds(lambda: self._step("sdpa"))

    track_step_ratio.unit = "x SDPA"
