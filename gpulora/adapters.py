"""LoRA-merged projections into per-head layout, and the chain rule from dQ, dK, dV back to B and A.

``W = W0 + s B @ A`` with ``s = alpha / r``. Forward: ``Q = x @ Wq`` reshaped from ``(batch, L, H d_head)``
to ``(batch, H, L, d_head)``. Backward (SPEC section 2): ``dW = sum_batch x^T dQ`` (heads concatenated back
along the columns), ``dB = s dW A^T``, ``dA = s B^T dW``. Cost ``O(batch L d_model H d)`` both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import backend
from .model import TARGETS, AdapterGrad, Head, LoRA
from .validation import check_real_array

__all__ = ["Problem", "adapter_grads", "prepare"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A validated call: projections in head layout ``(batch, H, L, d)``, all in the compute dtype of ``x``."""

    xp: Any
    x: Any  # (batch, L, d_model)
    q: Any  # (batch, H, L, d_head)
    k: Any
    v: Any  # (batch, H, L, d_v)
    y: Any  # (batch, H, L, d_v) or None
    beta: float
    softmax_one: bool
    batched: bool  # whether x had a batch axis


def _split_heads(xp, a, heads):
    b, L, n = a.shape
    return xp.permute_dims(xp.reshape(a, (b, L, heads, n // heads)), (0, 2, 1, 3))


def _merge_heads(xp, a):
    b, h, L, d = a.shape
    return xp.reshape(xp.permute_dims(a, (0, 2, 1, 3)), (b, L, h * d))


def prepare(head: Head, lora: LoRA, x, y=None) -> Problem:
    """Validate ``x`` (and ``y``) against ``head`` and ``lora`` and project to the adapted Q, K, V.

    Every array is cast to ``x.dtype`` (the compute dtype; results come back in it). Nothing is modified.
    """
    if not isinstance(head, Head):
        raise TypeError(f"head must be a gpulora.Head, got {type(head).__name__}")
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora must be a gpulora.LoRA, got {type(lora).__name__}")
    unknown = [t for t in lora.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"adapters has unknown targets {unknown}; expected a subset of {TARGETS}")
    check_real_array("x", x, ndim=(2, 3))
    arrays = [x, head.w_q, head.w_k, head.w_v] + [a for pair in lora.adapters.values() for a in pair]
    if y is not None:
        check_real_array("y", y, ndim=(2, 3))
        arrays.append(y)
    xp = backend.namespace(*arrays)
    batched = x.ndim == 3
    if x.shape[-1] != head.d_model:
        raise ValueError(f"x must have d_model = {head.d_model} columns (rows of w_q), got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or (batched and x.shape[0] < 1):
        raise ValueError(f"x must have at least one token and one batch member, got shape {tuple(x.shape)}")
    if y is not None:
        want = x.shape[:-1] + (head.heads * head.d_v,)
        if tuple(y.shape) != want:
            raise ValueError(f"y must have shape {want} (x's leading shape, then heads * d_v), got {tuple(y.shape)}")
    for t, (b, a) in lora.adapters.items():
        d_out = head.weight(t).shape[1]
        if b.shape[0] != head.d_model or a.shape[1] != d_out:
            raise ValueError(
                f"adapters[{t!r}] must be B of shape ({head.d_model}, r) and A of shape (r, {d_out}) for "
                f"w_{t} of shape {tuple(head.weight(t).shape)}, got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
    dtype = x.dtype
    x3 = x if batched else x[None]

    def project(t):
        w = xp.astype(head.weight(t), dtype, copy=False)
        if t in lora.adapters:
            b, a = lora.adapters[t]
            w = w + lora.scaling(t) * (xp.astype(b, dtype, copy=False) @ xp.astype(a, dtype, copy=False))
        return _split_heads(xp, x3 @ w, head.heads)

    q, k, v = (project(t) for t in TARGETS)
    y4 = None
    if y is not None:
        y4 = _split_heads(xp, xp.astype(y if batched else y[None], dtype, copy=False), head.heads)
    return Problem(xp, x3, q, k, v, y4, head.beta, head.softmax_one, batched)


def adapter_grads(lora: LoRA, prob: Problem, d_proj: dict) -> dict:
    """``{target: AdapterGrad(dB, dA)}`` from ``d_proj[target]`` of shape ``(batch, H, L, d)``.

    ``dW = x^T dP`` summed over the batch (one GEMM over ``batch * L`` rows), then ``dB = s dW A^T`` and
    ``dA = s B^T dW``.
    """
    xp = prob.xp
    x2 = xp.reshape(prob.x, (-1, prob.x.shape[-1]))
    out = {}
    for t, (b, a) in lora.adapters.items():
        dp = _merge_heads(xp, d_proj[t])
        dw = x2.mT @ xp.reshape(dp, (-1, dp.shape[-1]))  # (d_model, H d)
        s = lora.scaling(t)
        out[t] = AdapterGrad(
            B=s * (dw @ xp.astype(a, x2.dtype, copy=False).mT),
            A=s * (xp.astype(b, x2.dtype, copy=False).mT @ dw),
        )
    return out


def output_layout(prob: Problem, o):
    """``o (batch, H, L, d_v)`` back to the caller's layout ``(L, H d_v)`` or ``(batch, L, H d_v)``."""
    merged = _merge_heads(prob.xp, o)
    return merged if prob.batched else merged[0]
