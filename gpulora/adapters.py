"""A real attention layer around the attention core: LoRA-merged projections with biases, rotary embeddings,
key padding and grouped-query heads, and the chain rule back to the adapters and to the input.

Forward, per projection ``t`` (``W_t = W0_t + s_t B_t A_t``, ``s_t = alpha / r_t``)::

    Q = x Wq + b_q   (..., L, H d_head)  -> heads (batch, H, L, d_head) -> rope(Q)   (rotary, if asked)
    K = x Wk + b_k   (..., L, H_kv d_head) -> heads (batch, H_kv, L, d_head) -> rope(K)
    V = x Wv + b_v   (..., L, H_kv d_v)  -> heads (batch, H_kv, L, d_v)

then attention (:mod:`gpulora.dispatch`). Backward (docs/math.md section 2): the attention core gives
``dQ, dK, dV`` in head layout; ``dQ, dK`` go back through the transpose of the rotation
(:func:`gpulora.rotary.rotary_transpose`), the heads are concatenated back along the columns, and
``dW = sum_batch x^T dP``, ``dB = s dW A^T``, ``dA = s B^T dW``; the input gradient is
``dx = sum_t dP_t W_t^T`` (merged weights). A bias shifts ``P`` and leaves these formulas unchanged.

**Padding.** ``key_mask`` (``x``'s leading shape, True = real token) or ``lengths`` (the batch shape, the
first ``lengths[b]`` tokens are real): padded keys are excluded and padded query rows get zero output and
zero gradient; the loss sums over real rows only.

**Dtypes.** The arithmetic runs in NumPy's promotion of every input's dtype, raised to float32 for
float16/bfloat16; results come back in the promoted dtype itself (so float32 ``x`` with float64 weights
gives float64 gradients: nothing is silently downcast).

Cost ``O(batch L d_model (H d_head + H_kv (d_head + d_v)))`` both ways, besides the attention.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from . import backend
from .dispatch import Attention
from .model import TARGETS, AdapterGrad, Head, LoRA, check_call_types
from .rotary import apply_rotary, rotary_tables, rotary_transpose
from .validation import check_key_mask, check_real_array, compute_dtype, result_dtype

__all__ = ["Problem", "adapter_grads", "input_grad", "output_layout", "prepare", "projection_grads"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A validated call: projections in head layout, all in the compute dtype."""

    xp: Any
    x: Any  # (batch, L, d_model)
    q: Any  # (batch, H, L, d_head), rotated
    k: Any  # (batch, H_kv, L, d_head), rotated
    v: Any  # (batch, H_kv, L, d_v)
    y: Any  # (batch, H, L, d_v) or None
    beta: float
    softmax_one: bool
    batched: bool  # whether x had a batch axis
    grad_output: Any = None  # (batch, H, L, d_v) or None
    key_valid: Any = None  # (batch, L) bool or None
    rope: tuple | None = None  # (cos, sin), each (batch or 1, 1, L, d_head)
    weights: dict = dataclasses.field(default_factory=dict)  # merged W_t (d_model, heads d), compute dtype
    result_dtype: Any = None

    def attention(self, causal: bool) -> Attention:
        """The problem in the grouped layout of :mod:`gpulora.dispatch`."""
        kv = None if self.key_valid is None else self.key_valid[:, None, None, :]
        return Attention(self.xp, self.grouped(self.q), self.k[:, :, None, ...], self.v[:, :, None, ...], self.beta,
                         causal=causal, softmax_one=self.softmax_one, key_valid=kv)

    def grouped(self, a):
        """``(batch, H, L, d)`` to the grouped layout ``(batch, H_kv, n_rep, L, d)`` (``None`` stays ``None``)."""
        if a is None:
            return None
        b, H, L, d = a.shape
        H_kv = self.k.shape[1]
        return self.xp.reshape(a, (b, H_kv, H // H_kv, L, d))

    def ungrouped(self, a):
        """The grouped layout ``(batch, H_kv, n, L, d)`` back to ``(batch, H_kv n, L, d)``."""
        return None if a is None else self.xp.reshape(a, (a.shape[0], -1) + a.shape[-2:])

    def scalar(self, value):
        """A 0-d array in the namespace and result dtype (NumPy reductions give scalars otherwise)."""
        with np.errstate(over="ignore"):
            return self.xp.asarray(value, dtype=self.result_dtype)

    def to_result(self, a):
        """``a`` in the result dtype (``None`` stays ``None``; a half-precision overflow is left to the caller's
        :func:`~gpulora.validation.check_fits`)."""
        if a is None:
            return None
        with np.errstate(over="ignore"):
            return self.xp.astype(a, self.result_dtype, copy=False)


def _split_heads(xp, a, heads):
    b, L, n = a.shape
    return xp.permute_dims(xp.reshape(a, (b, L, heads, n // heads)), (0, 2, 1, 3))


def _merge_heads(xp, a):
    b, h, L, d = a.shape
    return xp.reshape(xp.permute_dims(a, (0, 2, 1, 3)), (b, L, h * d))


def _key_valid(xp, key_mask, lengths, lead, L):
    """``(batch, L)`` boolean from ``key_mask`` (shape ``lead + (L,)``) or ``lengths`` (shape ``lead``), or None."""
    if key_mask is not None and lengths is not None:
        raise ValueError("give key_mask or lengths, not both")
    if key_mask is not None:
        check_key_mask(key_mask, lead, L)
        return xp.reshape(key_mask, (-1, L))
    if lengths is None:
        return None
    if isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
        lengths = xp.asarray(int(lengths))
    if not backend.is_array(lengths):
        raise TypeError(f"lengths must be an integer array of shape {tuple(lead)}, got {type(lengths).__name__}")
    if backend.host_dtype(lengths).kind not in "iu":
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if tuple(lengths.shape) != tuple(lead):
        raise ValueError(f"lengths must have shape {tuple(lead)} (one length per sequence), got {tuple(lengths.shape)}")
    lengths = xp.asarray(lengths)
    lo, hi = (int(backend.to_float(f(lengths))) for f in (xp.min, xp.max))  # one host read each
    if lo < 0 or hi > L:
        raise ValueError(f"lengths must lie in [0, L = {L}], got values in [{lo}, {hi}]")
    return xp.arange(L)[None, :] < xp.reshape(lengths, (-1, 1))


def prepare(head: Head, lora: LoRA, x, y=None, *, grad_output=None, key_mask=None, lengths=None,
            position_ids=None, rope_theta=None, rope_cos=None, rope_sin=None) -> Problem:
    """Validate a layer call and project ``x`` to the adapted, biased, rotated Q, K, V in head layout.

    Nothing is modified; every check names its argument.
    """
    check_call_types(head, lora, Head, "gpulora.Head", TARGETS)
    if y is not None and grad_output is not None:
        raise ValueError("give y (targets of the loss) or grad_output (an upstream gradient), not both")
    check_real_array("x", x, ndim=(2, 3), half=True)
    upstream = [(n, a) for n, a in (("y", y), ("grad_output", grad_output)) if a is not None]
    for name, a in upstream:
        check_real_array(name, a, ndim=(2, 3), half=True)
    weights = [head.weight(t) for t in TARGETS] + [head.bias(t) for t in TARGETS if head.bias(t) is not None]
    adapters = [a for pair in lora.adapters.values() for a in pair]
    # option arrays must come from the library of x (Python scalars are checked by their own rules)
    others = [a for a in (key_mask, lengths, position_ids, rope_cos, rope_sin) if backend.is_array(a)]
    xp = backend.namespace(x, *weights, *adapters, *(a for _, a in upstream), *others)
    batched = x.ndim == 3
    if x.shape[-1] != head.d_model:
        raise ValueError(f"x must have d_model = {head.d_model} columns (rows of w_q), got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or (batched and x.shape[0] < 1):
        raise ValueError(f"x must have at least one token and one batch member, got shape {tuple(x.shape)}")
    for name, a in upstream:
        want = x.shape[:-1] + (head.heads * head.d_v,)
        if tuple(a.shape) != want:
            raise ValueError(f"{name} must have shape {want} (x's leading shape, then heads * d_v), got {tuple(a.shape)}")
    for t, (b, a) in lora.adapters.items():
        d_out = head.weight(t).shape[1]
        if b.shape[0] != head.d_model or a.shape[1] != d_out:
            raise ValueError(
                f"adapters[{t!r}] must be B of shape ({head.d_model}, r) and A of shape (r, {d_out}) for "
                f"w_{t} of shape {tuple(head.weight(t).shape)}, got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
    lead, L = tuple(x.shape[:-2]), x.shape[-2]
    key_valid = _key_valid(xp, key_mask, lengths, lead, L)
    # NumPy's promotion rules decide; the namespace's own dtype objects carry the result
    out_dtype = backend.namespace_dtype(xp, result_dtype(x, *weights, *adapters, *(a for _, a in upstream)))
    dtype = backend.namespace_dtype(xp, compute_dtype(x, *weights, *adapters, *(a for _, a in upstream)))
    rope = rotary_tables(xp, L, head.d_head, dtype, lead=lead, position_ids=position_ids, rope_theta=rope_theta,
                         rope_cos=rope_cos, rope_sin=rope_sin)

    def cast(a):
        return xp.astype(a, dtype, copy=False)

    x3 = cast(x if batched else x[None, ...])
    merged = {}

    def project(t, heads):
        w = cast(head.weight(t))
        if t in lora.adapters:
            b, a = lora.adapters[t]
            w = w + lora.scaling(t) * (cast(b) @ cast(a))
        merged[t] = w
        p = x3 @ w
        if head.bias(t) is not None:
            p = p + cast(head.bias(t))
        p = _split_heads(xp, p, heads)
        return p if rope is None or t == "v" else apply_rotary(p, *rope)

    q, k, v = project("q", head.heads), project("k", head.kv_heads), project("v", head.kv_heads)

    def heads_of(a):
        return None if a is None else _split_heads(xp, cast(a if batched else a[None, ...]), head.heads)

    return Problem(xp, x3, q, k, v, heads_of(y), head.beta, head.softmax_one, batched,
                   grad_output=heads_of(grad_output), key_valid=key_valid, rope=rope, weights=merged,
                   result_dtype=out_dtype)


def projection_grads(prob: Problem, d_heads: dict) -> dict:
    """``{t: dP_t (batch, L, heads d)}``: gradients with respect to the projections ``x W_t + b_t`` from the
    head-layout gradients ``d_heads[t]`` (through the transpose of the rotation for q and k)."""
    xp = prob.xp
    out = {}
    for t, d in d_heads.items():
        if d is None:
            continue
        if prob.rope is not None and t != "v":
            d = rotary_transpose(d, *prob.rope)
        out[t] = _merge_heads(xp, d)
    return out


def adapter_grads(lora: LoRA, prob: Problem, d_proj: dict) -> dict:
    """``{target: AdapterGrad(dB, dA)}`` from :func:`projection_grads` (compute dtype; :meth:`Problem.to_result`
    casts them).

    ``dW = x^T dP`` summed over the batch (one GEMM over ``batch * L`` rows), then ``dB = s dW A^T`` and
    ``dA = s B^T dW``.
    """
    xp = prob.xp
    x2 = xp.reshape(prob.x, (-1, prob.x.shape[-1]))
    out = {}
    for t, (b, a) in lora.adapters.items():
        dp = d_proj[t]
        dw = x2.mT @ xp.reshape(dp, (-1, dp.shape[-1]))  # (d_model, heads d)
        s = lora.scaling(t)
        out[t] = AdapterGrad(
            B=s * (dw @ xp.astype(a, x2.dtype, copy=False).mT),
            A=s * (xp.astype(b, x2.dtype, copy=False).mT @ dw),
        )
    return out


def input_grad(prob: Problem, d_proj: dict):
    """``dx = sum_t dP_t W_t^T`` (merged weights) in the caller's layout of ``x`` (compute dtype)."""
    dx = sum(d_proj[t] @ prob.weights[t].mT for t in TARGETS)
    return dx if prob.batched else dx[0, ...]


def output_layout(prob: Problem, o):
    """``o (batch, H, L, d_v)`` back to the caller's layout ``(L, H d_v)`` or ``(batch, L, H d_v)``, result dtype."""
    merged = _merge_heads(prob.xp, o)
    return prob.to_result(merged if prob.batched else merged[0, ...])
