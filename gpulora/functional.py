r"""Attention and its backward at the level of q, k, v: the building block for autograd bridges.

Layout (heads before tokens, as in PyTorch attention code)::

    q (..., H, L, d_head)    k (..., H_kv, L, d_head)    v (..., H_kv, L, d_v)    out, grad_output (..., H, L, d_v)

``...`` is any batch shape (possibly empty), the same for every argument. ``H_kv`` divides ``H``:
grouped-query attention (``H_kv = 1``: multi-query), where key/value head ``j`` serves the query heads
``j n_rep .. (j + 1) n_rep - 1`` with ``n_rep = H / H_kv`` (Hugging Face's ``repeat_kv``), and ``dk``,
``dv`` are summed over those heads.

For one head, ``S = beta q k^T``, ``F = rowsoftmax(S)``, ``out = F v``. The backward for an upstream gradient
``G = dloss/dout`` is the exact chain of docs/math.md section 2 with ``G`` given and ``r_i = g_i . o_i``::

    r = rowsum(G * out),  P = F * (G v^T - r 1^T),  dq = beta P k,  dk = beta P^T q,  dv = F^T G

(the paper's loss is the case ``G = out - y``); the polynomial method replaces ``F`` by the low-rank
``F~ = U Psi^T`` and evaluates the same formula as the chain of docs/math.md section 4.

**Masks.** ``causal=True`` excludes keys ``j > i``. ``key_mask`` (boolean ``(..., L)``, True = attend,
broadcast over heads) excludes the masked keys from every row, and a query row whose own position is
masked (padding) gets zero output and zero gradient, whatever ``grad_output`` holds there.

**Dtypes.** float32 and float64 run in their own precision. float16 and bfloat16 (NumPy arrays of
``ml_dtypes.bfloat16``) are computed in float32 and the results are cast back. Mixed dtypes follow NumPy's
promotion (float32 with float64 runs and returns float64): the results come in the promoted dtype of
``q``, ``k``, ``v`` (and ``grad_output``).

**Cost.** Exact: ``O(L^2 (d_head + d_v))`` time per query head, memory linear in ``L`` (blocked, see
:mod:`gpulora.exact.attention`). Poly: ``O(L k d_v d_head)`` time with ``k = C(d_head + g, g)``.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend
from .dispatch import Attention, check_options, plan, run_output, run_vjp
from .model import AttentionGrad
from .validation import (check_beta, check_finite, check_fits, check_key_mask, check_real_array, compute_dtype,
                         result_dtype)

__all__ = ["attention", "attention_vjp"]


class _Call:
    """A validated q/k/v call: the grouped :class:`~gpulora.dispatch.Attention` and how to undo the layout."""

    def __init__(self, q, k, v, grad_output, *, beta, causal, key_mask, softmax_one, pad_queries=True):
        named = {"q": q, "k": k, "v": v, "grad_output": grad_output}
        for name, a in named.items():
            if a is not None:
                check_real_array(name, a, min_ndim=3, half=True, finite=False)
        *batch, H, L, d_head = q.shape
        batch = tuple(batch)
        if key_mask is not None:
            check_key_mask(key_mask, batch, L)
        xp = backend.namespace(*(a for a in (q, k, v, grad_output, key_mask) if a is not None))
        for name, a in (("k", k), ("v", v)):
            if tuple(a.shape[:-3]) != batch or a.shape[-2] != L:
                raise ValueError(f"{name} must have shape {batch + ('H_kv', L, 'd')} (q's batch shape and L = {L} "
                                 f"tokens), got {tuple(a.shape)}")
        H_kv, d_v = k.shape[-3], v.shape[-1]
        if k.shape[-1] != d_head:
            raise ValueError(f"k must have d_head = {d_head} columns like q, got shape {tuple(k.shape)}")
        if v.shape[-3] != H_kv:
            raise ValueError(f"v must have the H_kv = {H_kv} heads of k, got shape {tuple(v.shape)}")
        if H % H_kv:
            raise ValueError(f"the number of query heads (q.shape[-3] = {H}) must be a multiple of the number of "
                             f"key/value heads (k.shape[-3] = {H_kv})")
        if L < 1 or d_head < 1 or d_v < 1 or 0 in batch:
            raise ValueError(f"q, k, v must have at least one token, batch member and column, got q "
                             f"{tuple(q.shape)}, v {tuple(v.shape)}")
        if grad_output is not None and tuple(grad_output.shape) != batch + (H, L, d_v):
            raise ValueError(f"grad_output must have the output's shape {batch + (H, L, d_v)}, "
                             f"got {tuple(grad_output.shape)}")
        beta = 1.0 / math.sqrt(d_head) if beta is None else check_beta(beta)
        check_finite(named)  # one fused reduction: one host read on CuPy
        self.result_dtype = backend.namespace_dtype(xp, result_dtype(q, k, v, grad_output))
        dtype = backend.namespace_dtype(xp, compute_dtype(q, k, v, grad_output))
        N, rep = math.prod(batch), H // H_kv

        def grouped(a, group):
            return xp.reshape(xp.astype(a, dtype, copy=False), (N, H_kv, group, L, a.shape[-1]))

        self.shapes = {"q": q.shape, "k": k.shape, "v": v.shape, "out": batch + (H, L, d_v)}
        self.grad_output = None if grad_output is None else grouped(grad_output, rep)
        key_valid = None if key_mask is None else xp.reshape(key_mask, (N, 1, 1, L))
        self.att = Attention(xp, grouped(q, rep), grouped(k, 1), grouped(v, 1), beta,
                             causal=causal, softmax_one=softmax_one, key_valid=key_valid,
                             pad_queries=pad_queries)

    def back(self, name, a):
        """``a`` in the caller's layout and result dtype (``None`` stays ``None``)."""
        if a is None:
            return None
        xp = self.att.xp
        with np.errstate(over="ignore"):  # a half-precision overflow is caught by check_fits
            return xp.astype(xp.reshape(a, self.shapes[name]), self.result_dtype, copy=False)


def attention(q, k, v, *, beta=None, causal=False, key_mask=None, method="exact", degree=None, tol=None,
              softmax_one=False, family=None):
    """Attention output ``softmax(beta q k^T) v`` per head, exactly or by the polynomial method.

    Parameters
    ----------
    q : array of shape (..., H, L, d_head)
    k : array of shape (..., H_kv, L, d_head)
    v : array of shape (..., H_kv, L, d_v)
        NumPy or CuPy, float16, bfloat16 (ml_dtypes), float32 or float64 (see the module docstring for
        the dtype rules); ``H_kv`` divides ``H``.
    beta : float, optional
        Inverse temperature; ``None`` means ``1 / sqrt(d_head)``.
    causal : bool
        Exclude keys ``j > i``.
    key_mask : boolean array of shape (..., L), optional
        True = attend. Masked keys are excluded; padding query rows get zero output.
    method : {"exact", "poly", "auto"}
        As in :func:`gpulora.lora_grad`.
    degree, tol, family
        The polynomial (poly/auto), as in :func:`gpulora.lora_grad`.
    softmax_one : bool
        Softmax_1: ``exp(s_ij) / (1 + sum_l exp(s_il))``.

    Returns
    -------
    array of shape (..., H, L, d_v)
        In the namespace of the inputs and their promoted dtype.

    Raises
    ------
    ValueError, TypeError
        For bad input, naming the argument.
    """
    degree, tol, causal, softmax_one = check_options(method, degree, tol, causal, family, softmax_one)
    call = _Call(q, k, v, None, beta=beta, causal=causal, key_mask=key_mask, softmax_one=softmax_one)
    p = plan(call.att, method, degree=degree, tol=tol, family=family, targets=())
    _, out = run_output(call.att, p, method)
    out = call.back("out", out)
    check_fits(call.result_dtype, out)
    return out


def attention_vjp(q, k, v, grad_output, *, beta=None, causal=False, key_mask=None, method="auto", degree=None,
                  tol=None, softmax_one=False, family=None) -> AttentionGrad:
    """The backward of :func:`attention`: ``(dq, dk, dv)`` for an upstream gradient ``grad_output``.

    Parameters
    ----------
    q, k, v, beta, causal, key_mask, method, degree, tol, softmax_one, family
        As in :func:`attention` (``method`` defaults to ``"auto"``: the cheaper method that meets ``tol``).
    grad_output : array of shape (..., H, L, d_v)
        ``dloss/dout``. Its padding rows (``key_mask`` False) are ignored.

    Returns
    -------
    AttentionGrad
        ``dq``, ``dk``, ``dv`` shaped like ``q``, ``k``, ``v`` (``dk``, ``dv`` summed over each key/value
        head's query heads), ``out`` (the forward output, computed on the way), and the plan that ran:
        ``method``, ``degree``, ``features``, ``bound``, ``family``, ``compute_dtype``, ``note``. Arrays in the
        namespace of the inputs and their promoted dtype; ``error_bound`` and ``error_estimate`` (poly). Cost:
        one forward and one backward pass.

    Raises
    ------
    ValueError, TypeError
        For bad input, naming the argument; when a result overflows the dtype (float16 results past 65504
        included); :class:`gpulora.PolynomialFailure` when ``method="poly"`` fails at run time.
    """
    degree, tol, causal, softmax_one = check_options(method, degree, tol, causal, family, softmax_one)
    if grad_output is None:
        raise TypeError("grad_output must be an array of the output's shape (..., H, L, d_v), got None")
    call = _Call(q, k, v, grad_output, beta=beta, causal=causal, key_mask=key_mask, softmax_one=softmax_one)
    p = plan(call.att, method, degree=degree, tol=tol, family=family)
    p, (_, out, dq, dk, dv), est = run_vjp(call.att, p, method, grad_output=call.grad_output)
    res = AttentionGrad(dq=call.back("q", dq), dk=call.back("k", dk), dv=call.back("v", dv),
                        out=call.back("out", out), error_estimate=est, **p.fields(q.shape[-1]))
    check_fits(call.result_dtype, res.dq, res.dk, res.dv, res.out)
    return res
