"""The scaling study that BENCHMARKS.md quotes: exact, poly, causal poly and PyTorch over L = 1024..65536.

The same benchmarks as ``bench_grad`` / ``bench_torch`` (subclasses, same methods) on the larger grid: L in
powers of two from 1024 to 65536, d_head in {4, 8, 16}, degree in {2, 4}, targets qkv, float64, M = 1; the
exact path, PyTorch and the poly-vs-exact error only up to ``EXACT_MAX_L``. Also the larger grids of
``bench_chain.PolyVsTorch`` and ``bench_bridge.BridgeStep``. Select it with
``asv run -b '^bench_scaling'`` (about 20 minutes on a 2-core CPU); the command that produced the published
figures is in BENCHMARKS.md.
"""

from __future__ import annotations

from . import bench_bridge, bench_chain, bench_grad, bench_torch
from .common import BACKENDS, EXACT_MAX_L, setup  # noqa: F401  (setup: the module-level asv hook)

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
EXACT_LENGTHS = [L for L in LENGTHS if L <= EXACT_MAX_L]
D_HEADS = [4, 8, 16]
DEGREES = [2, 4]


class ExactScaling(bench_grad.ExactGrad):
    """:class:`bench_grad.ExactGrad` over the scaling grid."""

    params = [BACKENDS, EXACT_LENGTHS, D_HEADS, ["qkv"], ["float64"]]


class PolyScaling(bench_grad.PolyGrad):
    """:class:`bench_grad.PolyGrad` over the scaling grid."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, ["qkv"], ["float64"]]


class PolyErrorScaling(bench_grad.PolyError):
    """:class:`bench_grad.PolyError` where the exact reference is affordable."""

    params = [BACKENDS, EXACT_LENGTHS, D_HEADS, DEGREES, ["qkv"], ["float64"]]


class CausalPolyScaling(bench_grad.CausalPolyGrad):
    """:class:`bench_grad.CausalPolyGrad` over the scaling grid."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, ["float64"]]


class TorchScaling(bench_torch.TorchGrad):
    """:class:`bench_torch.TorchGrad` (PyTorch autograd through SDPA) where exact runs."""

    params = [BACKENDS, EXACT_LENGTHS, D_HEADS, ["qkv"], ["float64"]]


class PolyVsTorchScaling(bench_chain.PolyVsTorch):
    """:class:`bench_chain.PolyVsTorch` (poly beside PyTorch autograd of the same polynomial attention)."""

    params = [BACKENDS, [4096, 16384, 65536], D_HEADS, DEGREES, ["qv", "qkv"], ["float32", "float64"]]


class BridgeStepScaling(bench_bridge.BridgeStep):
    """:class:`bench_bridge.BridgeStep` (one 12-head layer through the PyTorch bridge vs SDPA), L to 16384."""

    params = [BACKENDS, [512, 1024, 2048, 4096, 8192, 16384], bench_bridge.IMPLS, [False, True]]
