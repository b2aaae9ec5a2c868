"""Attention on torch tensors with gpulora's forward and backward: a ``torch.autograd.Function``.

:func:`attention` takes ``q (..., H, L, d_head)``, ``k (..., H_kv, L, d_head)``, ``v (..., H_kv, L, d_v)``
(``H_kv`` divides ``H``), an optional boolean ``key_mask (..., L)`` (True = attend; padding query rows get
zero output) and ``causal``, and returns ``out (..., H, L, d_v)``. Its backward takes ``dO`` and returns
``dq, dk, dv`` through :func:`gpulora.functional.attention_vjp`; tensors cross to NumPy (CPU) or CuPy (CUDA)
without copies (DLPack, :func:`gpulora.torch.to_array`). float16 and bfloat16 tensors are computed in
float32 (one upcast copy) and the results come back in the input dtype.

**Options.** The method (``"exact"``, ``"poly"``, ``"auto"``), ``tol``, ``degree`` and ``family`` of every call
come from :func:`options` (a context manager) or :func:`set_options` (module level, per thread), unless given
to :func:`attention`. ``exact_engine`` says what runs a call that resolves to exact:

* ``"sdpa"`` (default): torch's fused ``scaled_dot_product_attention`` and torch autograd. It is the same
  exact attention and faster than gpulora's exact NumPy path at every length measured
  (``asv_bench/benchmarks/bench_bridge.py``, numbers in ``docs/pytorch.md``); padding query rows are
  zeroed as in gpulora;
* ``"gpulora"``: gpulora's exact forward and backward (blocked, memory linear in ``L``).

**What ran.** Every call (forward, and backward for the gpulora engine) is recorded as a :class:`Run`:
:func:`last_run` returns the latest, :func:`recording` collects them all, each with the layer name, the
method, the engine, the degree and the score bound.

**Cost.** Forward: one gpulora forward. Backward: one :func:`~gpulora.functional.attention_vjp` (it
recomputes the forward on the way; nothing ``L x L`` is kept between the two). Method ``"auto"`` adds the
score bound, ``O(L d_head)`` per head.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from typing import Any

import torch

from . import dispatch, functional
from .backend import namespace
from .poly.coefficients import FAMILIES
from .torch import to_array, to_torch
from .validation import check_bool, check_degree, check_fits, check_method, check_tol

__all__ = ["AttentionFunction", "Options", "Run", "attention", "last_run", "options", "recording", "set_options"]

ENGINES = ("sdpa", "gpulora")
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Options:
    """How attention calls run (see the module docstring).

    Attributes
    ----------
    method : {"auto", "exact", "poly"}
        ``"auto"`` picks the cheaper method that meets ``tol`` (exact when none does).
    tol : float or None
        Target relative error of the polynomial (``None``: gpulora's default, ``gpulora.DEFAULT_TOL``).
    degree : int or None
        A fixed polynomial degree (poly/auto).
    family : str or None
        A fixed polynomial family (poly/auto).
    exact_engine : {"sdpa", "gpulora"}
        What runs a call that resolves to exact.
    """

    method: str = "auto"
    tol: float | None = None
    degree: int | None = None
    family: str | None = None
    exact_engine: str = "sdpa"

    def __post_init__(self):
        check_method(self.method)
        if self.tol is not None:
            check_tol(self.tol)
        if self.degree is not None:
            check_degree(self.degree)
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES} or None, got {self.family!r}")
        if self.exact_engine not in ENGINES:
            raise ValueError(f"exact_engine must be one of {ENGINES}, got {self.exact_engine!r}")
        if self.method == "exact" and (self.degree is not None or self.family is not None):
            raise ValueError("degree and family apply to method='poly' or 'auto', not method='exact'")


_OPTIONS: contextvars.ContextVar[Options] = contextvars.ContextVar("gpulora_torch_options", default=Options())


def set_options(**changes) -> Options:
    """Change the options of later calls in this thread (``method=``, ``tol=``, ``degree=``, ``family=``,
    ``exact_engine=``; unnamed ones keep their value). Returns the new :class:`Options`."""
    new = dataclasses.replace(_OPTIONS.get(), **changes)
    _OPTIONS.set(new)
    return new


@contextlib.contextmanager
def options(**changes):
    """Context manager: the options of :func:`set_options` inside the ``with`` block, restored after.

    Examples
    --------
    >>> import gpulora.torch as gt
    >>> with gt.options(method="poly", tol=1e-3) as opts:
    ...     opts.method
    'poly'
    """
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


@dataclasses.dataclass(frozen=True)
class Run:
    """One attention call as it ran.

    Attributes
    ----------
    layer : str or None
        The layer's name (transformers: class name and layer index, e.g. ``"BertSelfAttention[3]"``).
    phase : {"forward", "backward"}
    method : {"exact", "poly"}
    engine : {"gpulora", "sdpa"}
    degree, features, family : polynomial degree, feature dimension and family (poly), else None
    bound : float or None
        The score bound ``M`` (None when it was not needed: exact requested, SDPA engine).
    note : str
        Why (``method="auto"``'s estimate, a fallback, the SDPA delegation).
    """

    layer: str | None
    phase: str
    method: str
    engine: str
    degree: int | None = None
    features: int | None = None
    family: str | None = None
    bound: float | None = None
    note: str = ""


_LOCK = threading.Lock()
_LAST: list[Run] = []
_RECORDERS: list[list[Run]] = []


def _record(run: Run) -> None:
    with _LOCK:
        _LAST[:] = [run]
        for log in _RECORDERS:
            log.append(run)


def last_run() -> Run | None:
    """The latest :class:`Run` in this process (forward or backward), or None before the first call."""
    with _LOCK:
        return _LAST[0] if _LAST else None


@contextlib.contextmanager
def recording():
    """Context manager yielding a list that receives every :class:`Run` made inside the block.

    Examples
    --------
    >>> import torch, gpulora.torch as gt
    >>> q = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    >>> with gt.recording() as runs, gt.options(method="exact", exact_engine="gpulora"):
    ...     gt.attention(q, q, q, causal=True).sum().backward()
    >>> [(r.phase, r.method, r.engine) for r in runs]
    [('forward', 'exact', 'gpulora'), ('backward', 'exact', 'gpulora')]
    """
    log: list[Run] = []
    with _LOCK:
        _RECORDERS.append(log)
    try:
        yield log
    finally:
        with _LOCK:
            _RECORDERS.remove(log)


@dataclasses.dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one :class:`AttentionFunction` call: ``beta``, ``causal``, the method asked
    for, the plan :func:`attention` resolved, the layer name, and (forward only) the validated arrays."""

    beta: float | None
    causal: bool
    requested: str
    plan: Any  # gpulora.dispatch.Plan
    layer: str | None
    arrays: Any = None  # gpulora.functional._Call viewing q, k, v, key_mask
    pad_queries: bool = True  # see attention()


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, float16/bfloat16 raised to float32 (a copy), other dtypes as they are (a view)."""
    t = t.detach()
    return t.float() if t.dtype in _HALF else t


def _arrays(q, k, v, key_mask):
    """NumPy (CPU) or CuPy (CUDA) views of the compute-dtype ``q``, ``k``, ``v`` and of ``key_mask`` (DLPack).

    Raises TypeError naming a non-tensor or a tensor of an unsupported dtype."""
    for name, t in (("q", q), ("k", k), ("v", v), ("key_mask", key_mask)):
        if not isinstance(t, torch.Tensor) and not (name == "key_mask" and t is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name != "key_mask" and t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    qa, ka, va = (to_array(_compute(t), n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    mask = None if key_mask is None else namespace(qa).from_dlpack(key_mask.detach())
    return qa, ka, va, mask


def _fields(p, d_head: int) -> dict:
    f = p.fields(d_head)
    return {k: f[k] for k in ("method", "degree", "features", "family", "bound", "note")}


class AttentionFunction(torch.autograd.Function):
    """``out = attention(q, k, v)`` with gpulora's forward and backward (use :func:`attention`).

    ``apply(q, k, v, key_mask, call)``: ``call`` (a ``_Call``) carries ``beta``, ``causal`` and the plan
    that :func:`attention` resolved, so that the backward runs the same method and polynomial as the forward.
    The backward is not itself differentiable: ``create_graph=True`` raises ``RuntimeError``.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask, call):
        fc = call.arrays
        ran, out = dispatch.run_output(fc.att, call.plan, call.requested)
        ctx.save_for_backward(q, k, v, key_mask)
        ctx.call = dataclasses.replace(call, plan=ran, arrays=None)
        _record(Run(call.layer, "forward", engine="gpulora", **_fields(ran, q.shape[-1])))
        return to_torch(fc.back("out", out)).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("gpulora's attention backward is not differentiable: double backward "
                               "(create_graph=True) is not supported")
        q, k, v, key_mask = ctx.saved_tensors
        call = ctx.call
        qa, ka, va, mask = _arrays(q, k, v, key_mask)
        fc = functional._Call(qa, ka, va, to_array(_compute(grad_out), "grad_output"), beta=call.beta,
                              causal=call.causal, key_mask=mask, softmax_one=False, pad_queries=call.pad_queries)
        # the forward's plan itself: its method, polynomial, compute dtype and tol (then its checks and fallback)
        ran, (_, _, dq, dk, dv), _ = dispatch.run_vjp(fc.att, call.plan, call.requested, grad_output=fc.grad_output)
        _record(Run(call.layer, "backward", engine="gpulora", **_fields(ran, q.shape[-1])))
        res = [fc.back(name, g) for name, g in (("q", dq), ("k", dk), ("v", dv))]
        check_fits(fc.result_dtype, *res)
        grads = [to_torch(g).to(t.dtype) if need else None for g, t, need in zip(res, (q, k, v), ctx.needs_input_grad)]
        return (*grads, None, None)


def _sdpa(q, k, v, key_mask, causal, beta, pad_queries=True):
    """Exact attention by torch's ``scaled_dot_product_attention`` (torch autograd), gpulora's conventions:
    grouped-query heads, padding query rows zeroed (``pad_queries``)."""
    if not q.dtype == k.dtype == v.dtype:  # mixed dtypes: torch's promotion, the result in q's dtype as gpulora's
        common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        return _sdpa(q.to(common), k.to(common), v.to(common), key_mask, causal, beta, pad_queries).to(q.dtype)
    mask = None
    if key_mask is not None:
        mask = key_mask[..., None, None, :]
        if causal:
            L = q.shape[-2]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=beta, enable_gqa=q.shape[-3] != k.shape[-3])
    return out if key_mask is None or not pad_queries else out * key_mask[..., None, :, None].to(out.dtype)


def attention(q, k, v, *, key_mask=None, causal=False, beta=None, layer=None, pad_queries=True, **overrides):
    """Attention ``softmax(beta q k^T) v`` per head on torch tensors, differentiable in ``q``, ``k``, ``v``.

    Parameters
    ----------
    q : tensor of shape (..., H, L, d_head)
    k : tensor of shape (..., H_kv, L, d_head)
    v : tensor of shape (..., H_kv, L, d_v)
        One device (CPU or CUDA); float16, bfloat16, float32 or float64. ``H_kv`` divides ``H``
        (grouped-query attention: ``dk``, ``dv`` sum over each key/value head's query heads).
    key_mask : bool tensor of shape (..., L), optional
        True = attend. Masked keys are excluded; padding query rows get zero output and gradient (with
        ``pad_queries``).
    pad_queries : bool
        False: ``key_mask`` masks keys only and every query row is computed, as transformers' masks mean
        (cross-attention: query ``i`` is not key ``i``); a row without a key gets zero output.
    causal : bool
        Exclude keys ``j > i``.
    beta : float, optional
        Inverse temperature; ``None`` means ``1 / sqrt(d_head)``.
    layer : str, optional
        A name for the :class:`Run` records.
    **overrides
        ``method``, ``tol``, ``degree``, ``family``, ``exact_engine`` for this call, over :func:`options`.

    Returns
    -------
    tensor of shape (..., H, L, d_v)
        In ``q``'s dtype and on its device.

    Raises
    ------
    TypeError, ValueError
        For bad input, naming the argument (e.g. ``q``, ``key_mask``, ``k`` when ``H_kv`` does not divide
        ``H``); :class:`gpulora.PolynomialFailure` when ``method="poly"`` fails at run time.

    Examples
    --------
    >>> import torch, gpulora.torch as gt
    >>> q = torch.randn(2, 4, 16, 8, dtype=torch.float64, requires_grad=True)
    >>> kv = torch.randn(2, 2, 16, 8, dtype=torch.float64, requires_grad=True)   # 2 key/value heads
    >>> out = gt.attention(q, kv, kv, causal=True, method="exact", exact_engine="gpulora")
    >>> out.sum().backward()
    >>> out.shape, kv.grad.shape, gt.last_run().phase
    (torch.Size([2, 4, 16, 8]), torch.Size([2, 2, 16, 8]), 'backward')
    """
    opts = dataclasses.replace(_OPTIONS.get(), **overrides) if overrides else _OPTIONS.get()
    check_bool("causal", causal)
    qa, ka, va, mask = _arrays(q, k, v, key_mask)
    # validates shapes, heads, key_mask and finiteness, naming the argument; views, no copies
    pad_queries = check_bool("pad_queries", pad_queries)
    fc = functional._Call(qa, ka, va, None, beta=beta, causal=causal, key_mask=mask, softmax_one=False,
                          pad_queries=pad_queries)
    p = None
    if opts.method != "exact" or opts.exact_engine != "sdpa":
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        p = dispatch.plan(fc.att, opts.method, degree=opts.degree, tol=opts.tol, family=opts.family,
                          targets=("q", "k", "v") if training else ())
    if p is None or (p.method == "exact" and opts.exact_engine == "sdpa"):
        out = _sdpa(q, k, v, key_mask, causal, fc.att.beta, pad_queries)
        why = "exact attention run by torch's scaled_dot_product_attention (exact_engine='sdpa'), backward by torch"
        note = f"{p.note}; {why}" if p is not None and p.note else why
        _record(Run(layer, "forward", "exact", "sdpa", bound=None if p is None else p.bound, note=note))
        return out
    return AttentionFunction.apply(q, k, v, key_mask, _Call(fc.att.beta, causal, opts.method, p, layer, fc,
                                                            pad_queries))
