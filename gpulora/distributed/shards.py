"""How a call's input is cut into shards: dask arrays or NumPy/CuPy with a ``chunks`` argument, validated.

A *shard* is one block of ``x`` (and the matching block of ``y``) over the batch and token axes, always
whole along ``d_model``. Blocks are addressed by ``(b, t)``: batch block ``b`` (all of one batch member
lives in one block) and token block ``t``. Token blocks may be unequal (a last, smaller block when a size
does not divide ``L``): every mode is exact for any token boundaries, including boundaries that split a
causal chunk. Documented re-chunks: a dask ``x`` split along ``d_model`` is re-chunked to one block there,
and a dask ``y`` whose leading chunks differ from ``x``'s is re-chunked to ``x``'s.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

__all__ = ["Shards", "place", "shared", "split"]


@dataclasses.dataclass(frozen=True)
class Shards:
    """The blocks of one call: ``blocks[b][t]`` is the pair ``(x, y)`` of 3-D blocks
    ``(batch_b, tokens_t, d_model)`` and ``(batch_b, tokens_t, H d_v)`` (``y`` None without targets): a dask
    ``Delayed`` for dask input, a tuple of NumPy/CuPy slices (views) otherwise (see :func:`place`)."""

    blocks: list  # [n_batch_blocks][n_token_blocks]
    batch_sizes: tuple[int, ...]
    token_sizes: tuple[int, ...]
    batched: bool
    d_model: int
    sample: Any  # a 0-size array of x's block type: its namespace and dtype (NumPy or CuPy)
    rechunked: tuple[str, ...] = ()

    @property
    def token_offsets(self) -> tuple[int, ...]:
        out, o = [], 0
        for n in self.token_sizes:
            out.append(o)
            o += n
        return tuple(out)

    @property
    def L(self) -> int:
        return sum(self.token_sizes)

    @property
    def batch(self) -> int:
        return sum(self.batch_sizes)


def _is_dask(a) -> bool:
    return type(a).__module__.split(".")[0] == "dask" and hasattr(a, "chunks") and hasattr(a, "to_delayed")


def _is_int(c) -> bool:
    """An integer block size: Python or NumPy integers, as dask accepts them (not bools)."""
    return isinstance(c, numbers.Integral) and not isinstance(c, (bool, np.bool_))


def _axis_sizes(name: str, spec, n: int, axis: str) -> tuple[int, ...]:
    """Normalise one axis of ``chunks`` (int block size, tuple of sizes, or None/-1 for one block)."""
    if spec is None or (_is_int(spec) and spec == -1):
        return (n,)
    if _is_int(spec):
        spec = int(spec)
        if spec < 1:
            raise ValueError(f"{name}: the {axis} block size must be >= 1 (or -1 / None for one block), got {spec}")
        return tuple(min(spec, n - i) for i in range(0, n, spec))
    if isinstance(spec, (tuple, list)) and all(_is_int(c) for c in spec):
        sizes = tuple(int(c) for c in spec)
        if not sizes or min(sizes) < 1 or sum(sizes) != n:
            raise ValueError(
                f"{name}: the {axis} block sizes {sizes} must be positive and sum to the {axis} length {n}"
            )
        return sizes
    raise TypeError(f"{name}: each axis must be an int block size, a tuple of block sizes, or None; got {spec!r}")


def _check_leading(x, y, y_name):
    from ..validation import check_real_array

    check_real_array("x", x, ndim=(2, 3), finite=False)
    if y is not None:
        check_real_array(y_name, y, ndim=(2, 3), finite=False)


def split(x, y, chunks, d_model: int, d_y: int, y_name: str = "y") -> Shards:
    """Cut ``x`` (and ``y``) into shards.

    Parameters
    ----------
    x : dask array, or NumPy/CuPy array, of shape (L, d_model) or (batch, L, d_model)
    y : same kind, shape (L, H d_v) or (batch, L, H d_v), or None
        The targets, or the upstream gradient (``y_name = "grad_output"``): cut like ``x``.
    chunks : None, int, or tuple
        For NumPy/CuPy input: block sizes of the leading axes, dask style, ``(batch, tokens)`` for a 3-D
        ``x`` and ``(tokens,)`` or an int for a 2-D one; each entry an int block size (the last block takes
        the remainder), a tuple of sizes summing to the axis length, or ``None`` (one block). ``None``: one
        block. Must be ``None`` for dask input (its own chunks are used).
    d_model, d_y : int
        Expected widths of ``x`` and ``y`` (from the head).

    Raises
    ------
    ValueError
        Chunk sizes that do not sum to the axis length, a batch split of a 2-D ``x`` (no batch axis), wrong
        shapes. TypeError for a malformed ``chunks`` or mixed dask / non-dask input.
    """
    dask_x = _is_dask(x)
    if y is not None and _is_dask(y) != dask_x:
        raise TypeError(f"x and {y_name} must both be dask arrays or both NumPy/CuPy arrays")
    if not dask_x:
        _check_leading(x, y, y_name)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have 2 or 3 dimensions, got shape {tuple(x.shape)}")
    batched = x.ndim == 3
    if x.shape[-1] != d_model:
        raise ValueError(f"x must have d_model = {d_model} columns (rows of w_q), got shape {tuple(x.shape)}")
    want_y = tuple(x.shape[:-1]) + (d_y,)
    if y is not None and tuple(y.shape) != want_y:
        raise ValueError(f"{y_name} must have shape {want_y} (x's leading shape, then heads * d_v), got "
                         f"{tuple(y.shape)}")
    if x.shape[-2] < 1 or (batched and x.shape[0] < 1):
        raise ValueError(f"x must have at least one token and one batch member, got shape {tuple(x.shape)}")
    rechunked = []
    if dask_x:
        if chunks is not None:
            raise ValueError("chunks applies to NumPy/CuPy input; a dask array x brings its own chunks "
                             "(use x.rechunk(...))")
        if len(x.chunks[-1]) > 1:
            x = x.rechunk({x.ndim - 1: -1})
            rechunked.append("x re-chunked to one block along d_model")
        if y is not None and (y.chunks[:-1] != x.chunks[:-1] or len(y.chunks[-1]) > 1):
            y = y.rechunk(x.chunks[:-1] + (-1,))
            rechunked.append(f"{y_name} re-chunked to x's blocks")
        lead = x.chunks[:-1]
        sample = x._meta
    else:
        if chunks is None:
            spec = (None,) * (x.ndim - 1)
        elif _is_int(chunks):
            if batched:
                raise ValueError(f"chunks must be a pair (batch, tokens) for a 3-D x of shape {tuple(x.shape)}, "
                                 f"got {chunks!r}")
            spec = (chunks,)
        elif isinstance(chunks, (tuple, list)):
            spec = tuple(chunks)
            if len(spec) != x.ndim - 1:
                what = "(batch, tokens)" if batched else "(tokens,): x has no batch axis to split"
                raise ValueError(f"chunks must be {what}; got {chunks!r} for x of shape {tuple(x.shape)}")
        else:
            raise TypeError(f"chunks must be None, an int or a tuple of per-axis block sizes, got {chunks!r}")
        names = ("batch", "tokens") if batched else ("tokens",)
        lead = tuple(_axis_sizes("chunks", s, n, a) for s, n, a in zip(spec, x.shape[:-1], names))
        sample = x[(0,) * (x.ndim - 1)][:0]
        if not batched:
            x, y, lead = x[None], None if y is None else y[None], ((1,),) + lead
        return Shards(_slice_blocks(x, y, lead), lead[0], lead[1], batched, d_model, sample, ())
    if not batched:
        x = x[None]
        y = None if y is None else y[None]
        lead = ((1,),) + tuple(lead)
    import dask

    xb = x.to_delayed()[..., 0]
    yb = None if y is None else y.to_delayed()[..., 0]
    pair = dask.delayed(_pair, pure=True)
    blocks = [[pair(xb[b, t], None if yb is None else yb[b, t]) for t in range(xb.shape[1])]
              for b in range(xb.shape[0])]
    return Shards(blocks, tuple(lead[0]), tuple(lead[1]), batched, d_model, sample, tuple(rechunked))


def _pair(x, y):
    return x, y


def _slice_blocks(x, y, lead):
    """``[b][t]`` pairs of views of ``x`` and ``y`` (cut on the caller's side)."""
    out, b0 = [], 0
    for nb in lead[0]:
        row, t0 = [], 0
        for nt in lead[1]:
            sl = (slice(b0, b0 + nb), slice(t0, t0 + nt))
            row.append((x[sl], None if y is None else y[sl]))
            t0 += nt
        out.append(row)
        b0 += nb
    return out


def place(sh: Shards, client) -> list:
    """The blocks as graph inputs: NumPy/CuPy pairs scattered to the workers of ``client`` (each shard's
    ``x`` and ``y`` together on one worker, the shards spread over the workers, and nothing of them in the
    task graph), or wrapped as dask literals for the local scheduler; dask input as it is."""
    import dask

    flat = [pair for row in sh.blocks for pair in row]
    if flat and isinstance(flat[0], tuple):
        if client is not None:
            flat = client.scatter(flat, hash=False)
        else:
            flat = [dask.delayed(pair, pure=False) for pair in flat]
    n = len(sh.token_sizes)
    return [flat[i:i + n] for i in range(0, len(flat), n)]


def shared(obj, client, name: str):
    """``obj`` (the head, the adapters, the plan) as a graph input that every task may use: broadcast to
    every worker of ``client`` once (a copy on each, so a lost worker loses none), else a dask literal."""
    import dask

    if client is not None:
        return client.scatter(obj, broadcast=True, hash=False)
    return dask.delayed(obj, name=name)