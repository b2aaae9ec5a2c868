"""gpulora as a Hugging Face transformers attention implementation (``attn_implementation="gpulora"``).

Importing this module (``import gpulora.torch`` does, when transformers is importable) calls :func:`register`,
which adds two entries under the name ``"gpulora"``:

* ``AttentionInterface``: :func:`attention_forward`, the function every attention layer calls with
  ``(module, query (B, H, L, d_head), key (B, H_kv, L, d_head), value (B, H_kv, L, d_v), attention_mask,
  dropout=, scaling=, is_causal=, ...)`` and that returns ``(output (B, L, H, d_v), None)``;
* ``AttentionMaskInterface``: transformers' own ``sdpa_mask``, so the model builds for ``"gpulora"`` exactly
  the masks it builds for ``"sdpa"`` (``None`` when there is no padding, else a boolean
  ``(B, 1, L, L)``). Without this entry transformers builds *no* mask for an unknown implementation and
  padding would be silently ignored.

The mask is converted by :func:`key_mask_from_hf` to what gpulora represents: a key padding mask ``(B, L)``
and a causal flag. A mask that is not of that form (a sliding window, packed sequences, any per-query
pattern, an additive bias) is refused with a ``ValueError``, as are attention dropout in training mode, a
KV cache longer than the queries, soft-capping, attention sinks and position biases. The mask masks keys
only, as transformers means it: every query row is computed as SDPA computes it (a row without any key
gets zero output), so cross-attention is right too, where query ``i`` (a decoder token) has nothing to do
with key ``i`` (an encoder token), and outputs and gradients equal SDPA's at every position.
"""

from __future__ import annotations

import math
import warnings

import torch

from . import torch_attention

__all__ = ["attention_forward", "key_mask_from_hf", "register"]

NAME = "gpulora"

# keyword arguments of the attention interface that change the maths and that gpulora does not model
_REFUSED_KWARGS = {"softcap": "logit soft-capping", "position_bias": "a position bias added to the scores",
                   "s_aux": "attention sinks", "sinks": "attention sinks"}

# boolean masks are checked block by block: at most this many elements of temporaries
_CHECK_ELEMENTS = 1 << 24


def _masking_utils():
    from transformers import masking_utils

    return masking_utils


def register() -> None:
    """Register ``"gpulora"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Raises ``ImportError`` when transformers is not installed (``import gpulora.torch`` calls this only
    when it is).
    """
    masking_utils = _masking_utils()
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    masking_utils.AttentionMaskInterface.register(NAME, masking_utils.sdpa_mask)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The boolean ``(B, L_q, L_k)`` "may attend" of a 4-D boolean or additive mask (``(B, 1 or H, L_q, L_k)``)."""
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        blocked = (mask == -math.inf) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool(torch.all(blocked | (mask == 0))):
            raise ValueError("attention_mask is an additive mask with values other than 0 and -inf (a bias on the "
                             "scores, e.g. ALiBi); gpulora attends with a key mask and a causal flag only")
        allowed = ~blocked
    else:
        raise TypeError(f"attention_mask must be boolean or floating point, got {mask.dtype}")
    if allowed.shape[1] != 1 and not bool(torch.all(allowed == allowed[:, :1])):
        raise ValueError("attention_mask differs between heads; gpulora's key mask is shared by the heads")
    return allowed[:, 0]


def _matches(allowed, valid, causal) -> bool:
    """Whether ``allowed[b, i, j] == valid[b, j] (and j <= i if causal)`` everywhere, checked in row blocks."""
    B, Lq, Lk = allowed.shape
    rows = max(1, _CHECK_ELEMENTS // max(1, B * Lk))
    j = torch.arange(Lk, device=allowed.device)
    for i0 in range(0, Lq, rows):
        want = valid[:, None, :].expand(B, min(rows, Lq - i0), Lk)
        if causal:
            i = torch.arange(i0, i0 + want.shape[1], device=allowed.device)
            want = want & (j[None, :] <= i[:, None])
        if not bool(torch.equal(allowed[:, i0:i0 + rows], want)):
            return False
    return True


def key_mask_from_hf(attention_mask, *, causal: bool, batch: int, q_len: int, kv_len: int):
    """Convert the mask a transformers model hands its attention function to ``(key_mask, causal)``.

    Parameters
    ----------
    attention_mask : None or tensor of shape (B or 1, 1 or H, L_q, L_k)
        Boolean (True = attend) or additive (0 = attend, ``-inf`` or the dtype's minimum = excluded).
    causal : bool
        The layer's causality when there is no mask (transformers then relies on ``is_causal``); with a
        mask, the hint of which form to try first.
    batch, q_len, kv_len : int
        ``B``, ``L_q`` and ``L_k`` of the query and key tensors.

    Returns
    -------
    key_mask : None or bool tensor of shape (B, L_k)
        ``None`` when no key is masked. True = attend.
    causal : bool

    Raises
    ------
    ValueError
        For a mask that is not "key padding, then optionally causal" (a sliding window, packed sequences,
        any other per-query pattern, an additive bias, per-head masks), of the wrong shape, or
        ``L_q != L_k`` (a KV cache, or cross-attention between sequences of different lengths).
    TypeError
        For a mask that is not a tensor (e.g. flex attention's ``BlockMask``) or of an unsupported dtype.

    Cost: ``O(B L_q L_k)`` element checks in blocks (the mask transformers built has that size already);
    nothing when ``attention_mask`` is ``None``.
    """
    if q_len != kv_len:
        raise ValueError(f"gpulora attends L queries to L keys, but the layer has {q_len} queries and {kv_len} "
                         f"keys (a KV cache in generation: run it with use_cache=False; or cross-attention between "
                         f"sequences of different lengths): use attn_implementation='sdpa' for this model")
    if attention_mask is None:
        return None, bool(causal) and q_len > 1
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if len(shape) != 4 or shape[-2:] != (q_len, kv_len) or shape[0] not in (1, batch):
        raise ValueError(f"attention_mask must have shape (batch, 1 or heads, {q_len}, {kv_len}) with batch "
                         f"{batch} or 1, got {tuple(attention_mask.shape)}")
    allowed = _allowed(attention_mask).expand(batch, q_len, kv_len)
    valid = allowed.any(dim=-2)
    for c in ((True, False) if causal else (False, True)):
        if _matches(allowed, valid, c):
            return (None if bool(valid.all()) else valid), c and q_len > 1
    raise ValueError("attention_mask is not a key padding mask with or without a causal triangle (a sliding "
                     "window, packed sequences or another per-query pattern); gpulora cannot represent it. Use "
                     "attn_implementation='sdpa' for this model")


def _layer_name(module) -> str:
    idx = getattr(module, "layer_idx", None)
    return type(module).__name__ + ("" if idx is None else f"[{idx}]")


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention interface for gpulora (registered as ``"gpulora"``).

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (its ``is_causal`` is read when ``is_causal`` is not given).
    query : tensor of shape (B, H, L, d_head)
    key : tensor of shape (B, H_kv, L, d_head)
    value : tensor of shape (B, H_kv, L, d_v)
        ``H_kv`` divides ``H`` (grouped-query attention).
    attention_mask : None or 4-D tensor
        See :func:`key_mask_from_hf`.
    dropout : float
        Must be 0: attention dropout in training mode is refused (set the config's attention dropout to
        0, or call ``model.eval()``).
    scaling : float, optional
        ``beta``; ``None`` means ``1 / sqrt(d_head)``.

    Returns
    -------
    (output, None)
        ``output`` of shape (B, L, H, d_v), contiguous; no attention weights.

    The method (``exact``, ``poly``, ``auto``), ``tol`` and ``degree`` come from
    :func:`gpulora.torch.options`; what ran is in :func:`gpulora.torch.last_run`.
    """
    if dropout:
        raise ValueError(f"{_layer_name(module)} asks for attention dropout p = {dropout} (training mode); gpulora "
                         "computes attention without dropout. Set the config's attention dropout to 0 (e.g. "
                         "attention_probs_dropout_prob=0.0 or attention_dropout=0.0) or call model.eval()")
    for name, what in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{_layer_name(module)} uses {what} ({name}=...), which gpulora does not compute; use "
                             "attn_implementation='sdpa' for this model")
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"query, key, value must be 4-D (batch, heads, L, d), got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    if attention_mask is None and window is not None and causal and kv_len > window:
        raise ValueError(f"{_layer_name(module)} has a sliding window of {window} < L = {kv_len}; gpulora cannot "
                         "represent it")
    key_mask, causal = key_mask_from_hf(attention_mask, causal=causal, batch=batch, q_len=q_len, kv_len=kv_len)
    out = torch_attention.attention(query, key, value, key_mask=key_mask, causal=causal, beta=scaling,
                                    layer=_layer_name(module), pad_queries=False)
    return out.transpose(1, 2).contiguous(), None


try:
    register()
except (ImportError, AttributeError) as _err:  # a transformers without the attention and mask interfaces
    warnings.warn(f"gpulora: could not register attn_implementation='gpulora' with the installed transformers "
                  f"({_err}); transformers >= 5 is needed", stacklevel=2)
