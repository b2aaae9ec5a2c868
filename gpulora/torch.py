"""PyTorch bridge: gpulora for ``torch`` tensors, zero-copy through DLPack.

Tensors go in without a copy (``numpy.from_dlpack`` for CPU tensors, ``cupy.from_dlpack`` for CUDA tensors;
a tensor that requires grad is detached first, which shares its storage) and results come back with
``torch.from_dlpack``, on the device and in the dtype of the inputs.

**Attention with gpulora's backward** (:mod:`gpulora.torch_attention`, re-exported here):
:func:`attention` is a :class:`torch.autograd.Function` over ``q, k, v`` (grouped-query heads, key padding
mask, causal; float16/bfloat16 computed in float32) whose backward is :func:`gpulora.attention_vjp`;
:func:`options` / :func:`set_options` choose the method, :func:`last_run` / :func:`recording` say what ran.
When transformers is installed, importing this module registers ``attn_implementation="gpulora"``
(:mod:`gpulora.hf_attention`), so that any transformers model, PEFT LoRA included, trains with it.

**LoRA gradients of one head** in gpulora's layout (``W = W0 + (alpha / r) B @ A``, ``x @ W``), where only
the adapters get gradients (``x``, ``y`` and the frozen weights are constants; a tensor among them that
requires grad is refused rather than silently given no gradient), float32 and float64:

* :func:`lora_grad` -- the loss and the adapter gradients as torch tensors;
* :func:`attention_loss` -- a scalar loss tensor whose ``.backward()`` fills ``B.grad`` and ``A.grad`` of the
  adapters (a :class:`torch.autograd.Function` whose backward is gpulora's gradient, computed in the
  forward call with the loss: one call, no graph, ``O(L)`` memory);
* :func:`from_peft` and :func:`peft_backward` -- map PEFT LoRA layers (``q_proj``, ``k_proj``, ``v_proj``) onto
  a gpulora Head and LoRA, ``W0 = base_layer.weight.T``, ``B = lora_A.weight.T``, ``A = lora_B.weight.T``, and
  accumulate the gradients into ``lora_A.weight.grad`` and ``lora_B.weight.grad``.

The cost is that of the gpulora call, plus nothing for the conversions. See ``docs/pytorch.md``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Mapping

import numpy as np

try:
    import torch
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "gpulora.torch needs PyTorch (pip install 'gpulora[torch]' or see https://pytorch.org); the rest of "
        "gpulora works without it"
    ) from err

from .grad import lora_grad as _lora_grad
from .grad import loss as _loss
from .model import TARGETS, AdapterGrad, GradResult, Head, LoRA

__all__ = ["AttentionFunction", "Options", "PeftAttention", "Run", "attention", "attention_loss", "from_peft",
           "head_and_lora", "last_run", "lora_grad", "options", "peft_backward", "recording", "set_options",
           "to_array", "to_torch"]

_DTYPES = (torch.float32, torch.float64)


def to_array(t, name: str = "tensor"):
    """A NumPy (CPU tensor) or CuPy (CUDA tensor) array sharing ``t``'s memory, through DLPack.

    ``t`` is detached first (same storage). Non-contiguous tensors (e.g. ``weight.T``) stay views. A tensor
    with a lazy negation or conjugation bit (``t.is_neg()``, e.g. from ``x.conj()`` views; DLPack would
    drop the bit) is resolved first, which copies it.

    Raises
    ------
    TypeError
        ``t`` is not a tensor; is sparse, quantized, complex or not float32/float64; or is on a device
        other than CPU and CUDA (e.g. ``meta``).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; pass {name}.to_dense()")
    if t.is_quantized:
        raise TypeError(f"{name} must be a float32 or float64 tensor, got the quantized {t.dtype}; dequantize it")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}; cast it with .to(torch.float32)")
    t = t.detach()
    if t.is_neg() or t.is_conj():  # lazy bits that DLPack does not carry
        t = t.resolve_neg().resolve_conj()
    if t.device.type == "cpu":
        return np.from_dlpack(t)
    if t.device.type == "cuda":
        try:
            import cupy
        except ImportError as err:
            raise ImportError(f"{name} is a CUDA tensor: gpulora needs CuPy for it (pip install cupy-cuda12x)") from err
        with cupy.cuda.Device(t.device.index):
            return cupy.from_dlpack(t)
    raise TypeError(f"{name} must be on the CPU or a CUDA device, got {t.device}")


def to_torch(a):
    """A torch tensor sharing the memory of a NumPy or CuPy array ``a``, through DLPack."""
    if isinstance(a, np.generic) or (isinstance(a, np.ndarray) and not a.flags.writeable):
        a = np.array(a)  # DLPack exports writeable arrays only; results are small or fresh anyway
    return torch.from_dlpack(a)


def head_and_lora(w_q, w_k, w_v, adapters: Mapping[str, tuple], *, alpha, heads=1, beta=None,
                  softmax_one=False, kv_heads=None, biases: Mapping[str, Any] | None = None) -> tuple[Head, LoRA]:
    """gpulora's :class:`~gpulora.Head` and :class:`~gpulora.LoRA` viewing torch tensors (no copy).

    Parameters
    ----------
    w_q : tensor of shape (d_model, heads * d_head)
    w_k : tensor of shape (d_model, kv_heads * d_head)
    w_v : tensor of shape (d_model, kv_heads * d_v)
        Frozen weights in the ``x @ W`` layout (``nn.Linear.weight.T``).
    adapters : mapping of {"q", "k", "v"} to (B, A)
        ``B (d_model, r)``, ``A (r, d_out)`` tensors (PEFT: ``lora_A.weight.T``, ``lora_B.weight.T``).
    alpha : float
        The scaling of an adapter of rank ``r`` is ``alpha / r``.
    heads, beta, softmax_one, kv_heads
        As in :class:`gpulora.Head` (``kv_heads``: grouped-query attention; default ``heads``).
    biases : mapping of {"q", "k", "v"} to tensor of shape (d_out,), optional
        Frozen projection biases (``base_layer.bias``), constants like the weights.
    """
    biases = {} if biases is None else dict(biases)
    unknown = set(biases) - set(TARGETS)
    if unknown:
        raise ValueError(f"biases has unknown targets {sorted(unknown)}; expected a subset of {TARGETS}")
    b = {f"b_{t}": to_array(v, f"biases[{t!r}]") for t, v in biases.items() if v is not None}
    head = Head(to_array(w_q, "w_q"), to_array(w_k, "w_k"), to_array(w_v, "w_v"), beta=beta, heads=heads,
                softmax_one=softmax_one, kv_heads=kv_heads, **b)
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a dict of target -> (B, A), got {type(adapters).__name__}")
    arrays = {}
    for t, pair in adapters.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"adapters[{t!r}] must be a pair (B, A), got {type(pair).__name__}")
        arrays[t] = (to_array(pair[0], f"adapters[{t!r}] B"), to_array(pair[1], f"adapters[{t!r}] A"))
    return head, LoRA(arrays, alpha=alpha)


def _to_torch_result(res: GradResult) -> GradResult:
    grads = {t: AdapterGrad(B=to_torch(g.B), A=to_torch(g.A)) for t, g in res.grads.items()}
    return dataclasses.replace(res, loss=to_torch(res.loss), grads=grads)


def lora_grad(w_q, w_k, w_v, adapters: Mapping[str, tuple], x, y, *, alpha, heads=1, beta=None,
              softmax_one=False, method="auto", degree=None, tol=None, causal=False, family=None, kv_heads=None,
              biases=None) -> GradResult:
    """:func:`gpulora.lora_grad` for torch tensors: loss and adapter gradients as torch tensors.

    Parameters
    ----------
    w_q, w_k, w_v, adapters, alpha, heads, beta, softmax_one, kv_heads, biases
        As in :func:`head_and_lora`.
    x : tensor of shape (L, d_model) or (batch, L, d_model)
    y : tensor of shape (L, heads * d_v) or (batch, L, heads * d_v)
        All tensors on one device (CPU or CUDA), float32 or float64.
    method, degree, tol, causal, family
        As in :func:`gpulora.lora_grad`.

    Returns
    -------
    GradResult
        ``loss`` a 0-d tensor, ``grads[target].B`` / ``.A`` tensors shaped like the adapter's ``B`` and
        ``A``, on ``x``'s device and in its dtype; ``method``, ``degree``, ... as in gpulora.

    Examples
    --------
    >>> import torch, gpulora.torch as gt
    >>> g = torch.Generator().manual_seed(0)
    >>> w = [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    >>> b, a = torch.randn(8, 2, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    >>> x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    >>> res = gt.lora_grad(*w, {"q": (b, a)}, x, y, alpha=4.0, method="exact", causal=True)
    >>> res.grads["q"].A.shape
    torch.Size([2, 4])
    """
    head, lora = head_and_lora(w_q, w_k, w_v, adapters, alpha=alpha, heads=heads, beta=beta,
                               softmax_one=softmax_one, kv_heads=kv_heads, biases=biases)
    res = _lora_grad(head, lora, to_array(x, "x"), to_array(y, "y"), method=method, degree=degree, tol=tol,
                     causal=causal, family=family)
    return _to_torch_result(res)


class _AttentionLoss(torch.autograd.Function):
    """``loss = 0.5 ||attention(x) - y||^2`` with gpulora's adapter gradients as its backward.

    Inputs: ``(opts, x, y, w_q, w_k, w_v, B_1, A_1, B_2, A_2, ...)`` with the targets in ``opts``.
    """

    @staticmethod
    def forward(ctx, opts, x, y, w_q, w_k, w_v, *flat):
        if any(ctx.needs_input_grad[1:6]):
            names = [n for n, need in zip(("x", "y", "w_q", "w_k", "w_v"), ctx.needs_input_grad[1:6]) if need]
            raise ValueError(f"{', '.join(names)} require grad, but gpulora gives gradients for the adapters "
                             "only; pass them detached (.detach()) or frozen (requires_grad=False)")
        targets = opts["targets"]
        adapters = {t: (flat[2 * i], flat[2 * i + 1]) for i, t in enumerate(targets)}
        kw = {k: opts[k] for k in ("alpha", "heads", "beta", "softmax_one", "kv_heads", "biases")}
        run = {k: opts[k] for k in ("method", "degree", "tol", "causal", "family")}
        if any(ctx.needs_input_grad[6:]):
            res = lora_grad(w_q, w_k, w_v, adapters, x, y, **kw, **run)
            ctx.grads = [g for t in targets for g in (res.grads[t].B, res.grads[t].A)]
            info = {"method": res.method, "degree": res.degree, "features": res.features, "bound": res.bound,
                    "family": res.family, "note": res.note}
            loss = res.loss
        else:  # no adapter needs a gradient: the loss alone
            head, lora = head_and_lora(w_q, w_k, w_v, adapters, **kw)
            if run["method"] == "auto":
                run["method"] = "exact"
            loss = to_torch(_loss(head, lora, to_array(x, "x"), to_array(y, "y"), **run))
            ctx.grads = [None] * len(flat)
            info = {"method": run["method"]}
        if opts["info"] is not None:
            opts["info"].update(info)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if g is None else grad_loss * g for g in ctx.grads]
        return (None,) * 6 + tuple(grads)


def attention_loss(x, y, w_q, w_k, w_v, adapters: Mapping[str, tuple], *, alpha, heads=1, beta=None,
                   softmax_one=False, method="auto", degree=None, tol=None, causal=False, family=None,
                   info: dict | None = None, kv_heads=None, biases=None):
    """The loss ``0.5 ||attention(x) - y||^2`` as a differentiable tensor: ``.backward()`` gives the adapters
    (and only them) gpulora's gradients.

    Arguments as in :func:`lora_grad`. The gradients are computed together with the loss (one gpulora call,
    kept until backward: the size of the adapters) when some adapter tensor requires grad; otherwise only the
    loss is computed. ``info``, if a dict, receives what ran (``method``, ``degree``, ``note``, ...).

    Returns
    -------
    0-d tensor
        On ``x``'s device, in its dtype.

    Raises
    ------
    ValueError
        When ``x``, ``y``, a frozen weight or a bias requires grad (gpulora does not compute those gradients).
    """
    for t, b in (biases or {}).items():
        if isinstance(b, torch.Tensor) and b.requires_grad:
            raise ValueError(f"biases[{t!r}] requires grad, but gpulora gives gradients for the adapters only; "
                             "pass it detached (.detach()) or frozen (requires_grad=False)")
    targets = tuple(t for t in TARGETS if t in adapters)
    if set(adapters) - set(targets):
        raise ValueError(f"adapters has unknown targets {sorted(set(adapters) - set(targets))}; expected a "
                         f"subset of {TARGETS}")
    opts = {"targets": targets, "alpha": alpha, "heads": heads, "beta": beta, "softmax_one": softmax_one,
            "method": method, "degree": degree, "tol": tol, "causal": causal, "family": family, "info": info,
            "kv_heads": kv_heads, "biases": biases}
    flat = [a for t in targets for a in adapters[t]]
    return _AttentionLoss.apply(opts, x, y, w_q, w_k, w_v, *flat)


@dataclasses.dataclass(frozen=True)
class PeftAttention:
    """PEFT projections viewed in gpulora's layout (views of the module's tensors, no copies).

    Attributes
    ----------
    w_q, w_k, w_v : tensors of shape (d_model, d_out)
        ``base_layer.weight.T`` (``weight`` itself for ``fan_in_fan_out`` layers such as GPT-2's Conv1D).
    adapters : dict of str to (B, A)
        ``B = lora_A.weight.T (d_model, r)``, ``A = lora_B.weight.T (r, d_out)``.
    alpha : float
        ``scaling * r``, common to the adapted projections (gpulora's scaling is ``alpha / r``).
    params : dict of str to (lora_A.weight, lora_B.weight)
        The parameters that :func:`peft_backward` gives gradients to.
    biases : dict of str to tensor
        ``base_layer.bias`` of the projections that have one (constants, like the weights).
    """

    w_q: Any
    w_k: Any
    w_v: Any
    adapters: dict
    alpha: float
    params: dict
    biases: dict = dataclasses.field(default_factory=dict)


def _is_lora_layer(module) -> bool:
    return all(hasattr(module, n) for n in ("base_layer", "lora_A", "lora_B", "scaling"))


def _base_weight(name, module):
    """``(W0 in the x @ W layout, bias or None)`` of a projection."""
    base = module.base_layer if _is_lora_layer(module) else module
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(f"{name} must be a PEFT LoRA layer or a linear layer with a 2-d weight, got "
                        f"{type(module).__name__}")
    bias = getattr(base, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.ndim != 1):
        raise TypeError(f"{name} must have a 1-d bias or none, got {type(bias).__name__}")
    return (weight if getattr(module, "fan_in_fan_out", False) else weight.T), bias


def _lookup(module, attr, key):
    """``module.<attr>[key]`` for a dict or ModuleDict attribute, ``None`` when absent."""
    container = getattr(module, attr, None)
    return container[key] if container is not None and key in container else None


def from_peft(q_proj, k_proj, v_proj, *, adapter_name: str = "default") -> PeftAttention:
    """Map the PEFT layers of one attention block onto gpulora's layout.

    Parameters
    ----------
    q_proj, k_proj, v_proj : torch.nn.Module
        Each either a PEFT LoRA layer (``peft.tuners.lora.Linear``: ``base_layer``, ``lora_A``, ``lora_B``,
        ``scaling``, ``lora_dropout``) or a plain linear layer (not adapted, frozen).
    adapter_name : str
        The PEFT adapter to use (``"default"`` unless named otherwise).

    Returns
    -------
    PeftAttention
        Pass ``w_q, w_k, w_v, adapters, alpha`` to :func:`lora_grad` or :func:`attention_loss`, or the
        whole object to :func:`peft_backward`.

    Raises
    ------
    ValueError
        For a layer with merged adapters, DoRA, active dropout (gpulora computes the
        dropout-free gradient: call ``.eval()`` or use ``lora_dropout=0``), or adapters whose
        ``scaling * r`` differ (gpulora's single ``alpha``).
    """
    weights, biases, adapters, params, alphas = {}, {}, {}, {}, {}
    for t, module in zip(TARGETS, (q_proj, k_proj, v_proj)):
        name = f"{t}_proj"
        weights[t], bias = _base_weight(name, module)
        if bias is not None:
            biases[t] = bias.detach()
        if not _is_lora_layer(module):
            continue
        if adapter_name not in module.lora_A:
            raise ValueError(f"{name} has no adapter {adapter_name!r}; it has {sorted(module.lora_A.keys())}")
        if getattr(module, "merged", False):
            raise ValueError(f"{name} has its adapters merged into the base weight; unmerge them first")
        if _lookup(module, "use_dora", adapter_name):
            raise ValueError(f"{name} uses DoRA, which gpulora does not model")
        drop = _lookup(module, "lora_dropout", adapter_name)
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and drop.training:
            raise ValueError(f"{name} has active LoRA dropout (p = {drop.p}); gpulora computes the dropout-free "
                             "gradient: call .eval() on the model or use lora_dropout=0")
        a_w, b_w = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight  # (r, in), (out, r)
        adapters[t] = (a_w.T, b_w.T)
        params[t] = (a_w, b_w)
        alphas[t] = float(module.scaling[adapter_name]) * a_w.shape[0]
    if not adapters:
        raise ValueError(f"none of q_proj, k_proj, v_proj has a LoRA adapter {adapter_name!r}")
    alpha = next(iter(alphas.values()))
    if any(abs(a - alpha) > 1e-12 * abs(alpha) for a in alphas.values()):
        raise ValueError(f"the adapters' scaling * r differ ({alphas}); gpulora uses one alpha with scaling "
                         "alpha / r per adapter")
    return PeftAttention(weights["q"], weights["k"], weights["v"], adapters, alpha, params, biases)


def peft_backward(att: PeftAttention, x, y, *, heads=1, beta=None, softmax_one=False, method="auto",
                  degree=None, tol=None, causal=False, family=None, kv_heads=None) -> GradResult:
    """Accumulate gpulora's gradients into ``lora_A.weight.grad`` (``+= dB.T``) and ``lora_B.weight.grad``
    (``+= dA.T``) of the PEFT layers, like ``loss.backward()`` would; returns the torch
    :class:`~gpulora.GradResult`. Arguments as in :func:`lora_grad` (the projections' biases come from
    ``att``)."""
    res = lora_grad(att.w_q, att.w_k, att.w_v, att.adapters, x, y, alpha=att.alpha, heads=heads, beta=beta,
                    softmax_one=softmax_one, method=method, degree=degree, tol=tol, causal=causal, family=family,
                    kv_heads=kv_heads, biases=att.biases)
    with torch.no_grad():
        for t, (a_w, b_w) in att.params.items():
            for p, g in ((a_w, res.grads[t].B.T), (b_w, res.grads[t].A.T)):
                g = g.to(p.dtype)
                p.grad = g.clone() if p.grad is None else p.grad + g
    return res


# attention on torch tensors (autograd Function, options, run records), from gpulora.torch_attention; looked up
# on first use, because that module imports the converters above (either module may be imported first)
_ATTENTION_NAMES = ("AttentionFunction", "Options", "Run", "attention", "last_run", "options", "recording",
                    "set_options")


def __getattr__(name):
    if name in _ATTENTION_NAMES:
        from . import torch_attention

        return getattr(torch_attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if importlib.util.find_spec("transformers") is not None:
    from . import hf_attention  # noqa: E402,F401  (importing it registers attn_implementation="gpulora")
