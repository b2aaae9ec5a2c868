r"""Rotary position embeddings in the Hugging Face LLaMA convention (rotate-half), and their transpose.

For a head vector ``x`` of even width ``d`` at position ``p``, with ``x = [x1, x2]`` split in halves::

    rope(x) = x * cos + rotate_half(x) * sin,      rotate_half([x1, x2]) = [-x2, x1]
    cos = cos([p f, p f]),  sin = sin([p f, p f]),  f_m = theta^(-2m / d),  m = 0 .. d/2 - 1

(``LlamaRotaryEmbedding`` with the default rope type, ``apply_rotary_pos_emb``). Coordinates ``m`` and
``m + d/2`` are rotated by the angle ``p f_m``: an orthogonal map, so row norms (and the score bound ``M``)
are unchanged. Its transpose, for the backward through it, is
``rope^T(g) = g * cos - rotate_half(g * sin)``. Cost ``O(L d)`` per head.

The tables are computed in float64 here; Hugging Face computes them in float32 whatever the model's dtype,
so a float64 model agrees with its tables to float32 accuracy only (pass ``rope_cos``/``rope_sin``
explicitly for a bit-for-bit match).
"""

from __future__ import annotations

import math
import numbers

from . import backend
from .validation import check_real_array

__all__ = ["apply_rotary", "rotary_tables", "rotary_transpose"]


def _rotate_half(xp, x):
    h = x.shape[-1] // 2
    return xp.concat([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` for ``x (..., L, d)`` and tables broadcasting against it."""
    xp = backend.namespace(x, cos, sin)
    return x * cos + _rotate_half(xp, x) * sin


def rotary_transpose(g, cos, sin):
    """The transpose of :func:`apply_rotary` applied to ``g``: ``g * cos - rotate_half(g * sin)``."""
    xp = backend.namespace(g, cos, sin)
    return g * cos - _rotate_half(xp, g * sin)


def _one_of(shapes) -> str:
    """``"(a,), (b, c) or (d, e)"``."""
    text = [str(tuple(s)) for s in shapes]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def rotary_tables(xp, L: int, d_head: int, dtype, *, lead=(), position_ids=None, rope_theta=None,
                  rope_cos=None, rope_sin=None):
    """Validated ``(cos, sin)`` of shape ``(N, 1, L, d_head)`` (``N`` = the flattened ``lead`` or 1), or ``None``.

    The arrays must come from ``xp`` (the caller checks the namespace of all its arguments together).

    Either ``rope_theta`` (a float > 0; ``position_ids`` integers of shape ``(L,)``, ``(1, L)`` (one 1 per
    leading axis of ``x``, at least one) or ``lead + (L,)``, default ``0 .. L-1``), or explicit ``rope_cos``
    and ``rope_sin`` of shape ``(L, d_head)``, ``(1, L, d_head)`` (likewise) or ``lead + (L, d_head)``.
    ``d_head`` must be even. Nothing given: ``None`` (no rotation).
    """
    given = {n: a for n, a in (("rope_theta", rope_theta), ("position_ids", position_ids), ("rope_cos", rope_cos),
                               ("rope_sin", rope_sin)) if a is not None}
    if not given:
        return None
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin must be given together")
    if rope_cos is not None and (rope_theta is not None or position_ids is not None):
        raise ValueError("give either rope_theta (with optional position_ids) or rope_cos and rope_sin, not both")
    if rope_cos is None and rope_theta is None:
        raise ValueError("position_ids need rope_theta (the rotary base, e.g. 10000.0)")
    if d_head % 2:
        raise ValueError(f"rotary embeddings rotate pairs of coordinates: d_head must be even, got {d_head}")
    # (L,), one leading 1 per leading axis of x (at least one: (1, L) for unbatched x too), or lead + (L,)
    shapes = list(dict.fromkeys([(L,), (1,) * max(len(lead), 1) + (L,), tuple(lead) + (L,)]))
    if rope_cos is not None:
        tables = []
        for name, a in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            check_real_array(name, a, half=True)
            if tuple(a.shape) not in [s + (d_head,) for s in shapes]:
                raise ValueError(f"{name} must have shape {_one_of([s + (d_head,) for s in shapes])}, "
                                 f"got {tuple(a.shape)}")
            tables.append(xp.reshape(xp.astype(a, dtype, copy=False), (-1, 1, L, d_head)))
        return tables[0], tables[1]
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real):
        raise TypeError(f"rope_theta must be a real number > 0, got {type(rope_theta).__name__}")
    if not (math.isfinite(rope_theta) and rope_theta > 0):
        raise ValueError(f"rope_theta must be a finite real number > 0, got {rope_theta!r}")
    if position_ids is None:
        pos = xp.astype(xp.arange(L), xp.float64)[None, ...]
    else:
        try:
            backend.namespace(position_ids)  # NumPy, CuPy or another array API standard array
        except TypeError:
            raise TypeError(f"position_ids must be an integer NumPy or CuPy array, got {type(position_ids).__name__}") from None
        if backend.host_dtype(position_ids).kind not in "iu":
            raise TypeError(f"position_ids must have an integer dtype, got {position_ids.dtype}")
        if tuple(position_ids.shape) not in shapes:
            raise ValueError(f"position_ids must have shape {_one_of(shapes)}, got {tuple(position_ids.shape)}")
        pos = xp.reshape(xp.astype(position_ids, xp.float64), (-1, L))
    inv_freq = float(rope_theta) ** (-xp.astype(xp.arange(0, d_head, 2), xp.float64) / d_head)
    ang = pos[..., None] * inv_freq  # [N or 1, L, d_head / 2]
    emb = xp.concat([ang, ang], axis=-1)[:, None, ...]
    return xp.astype(xp.cos(emb), dtype), xp.astype(xp.sin(emb), dtype)
