"""``gpulora.distributed.lora_grad``: the LoRA gradient of one call spread over Dask workers.

Modes (chosen from how ``x`` is chunked, or forced with ``mode=``; the one that ran and why is in
``GradResult.note`` and logged on the ``gpulora.distributed`` logger):

- ``"batch"``: whole sequences per task (batch blocks, and with ``heads_per_task`` also groups of heads);
  each task runs the single-process path on its slice; loss and adapter gradients are summed in a tree.
  What moves: the blocks of ``x, y`` in, ``dB, dA`` and the loss out, per task.
- ``"tokens"``, exact: per sequence, every task projects its token block to ``(k, v)``; the blocks are
  concatenated and sent once to every task of the sequence (a broadcast of ``L (d_head + d_v)`` per
  head); each task computes its query rows against all keys (loss, ``dQ`` complete) and partial
  ``dK, dV`` over the whole sequence, which are tree-summed and split back into rows for the ``k, v``
  adapter gradients. What moves: ``O(L d)`` per task and head, like ring attention.

The bound ``M``, and with it the method, the polynomial and the compute dtype, are decided for the whole
call first (a light map-reduce of row-norm maxima), so every mode computes the same gradient as
:func:`gpulora.lora_grad` on the whole input, to rounding (summation order).

Scheduling: ``client`` (a ``distributed.Client``), else the default client if one exists, else dask's
local threaded scheduler. A worker lost mid-run makes the scheduler recompute what it held; every sum
carries the set of shards it covers and the total is checked against the full set, so a result is
either complete or an error.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

import numpy as np

from .. import backend
from ..dispatch import _checked_poly, _with_fallback, check_options, estimate_from_spread, plan_for_bound
from ..model import AdapterGrad, GradResult, Head, LoRA, check_call_types, check_parameters
from ..validation import compute_dtype, result_dtype
from . import tasks
from .parts import check_cover, combine, tree_reduce
from .shards import Shards, place, shared, split

__all__ = ["MODES", "lora_grad"]

MODES = ("auto", "batch", "tokens")
log = logging.getLogger("gpulora.distributed")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mode and its tasks: ``heads`` the head groups ``(h0, h1)`` (batch mode), ``why`` the reason."""

    mode: str
    heads: tuple
    why: str


def _head_groups(H: int, heads_per_task) -> tuple:
    if heads_per_task is None:
        return ((0, H),)
    if isinstance(heads_per_task, bool) or not isinstance(heads_per_task, int) or not 1 <= heads_per_task <= H:
        raise ValueError(f"heads_per_task must be an int in [1, heads = {H}], got {heads_per_task!r}")
    return tuple((h, min(H, h + heads_per_task)) for h in range(0, H, heads_per_task))


def choose_layout(sh: Shards, H: int, mode: str, heads_per_task) -> Layout:
    """Validate the chunking against ``mode`` and decide what runs (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    nb, nt = len(sh.batch_sizes), len(sh.token_sizes)
    groups = _head_groups(H, heads_per_task)
    requested = mode
    if mode == "auto":
        mode = "tokens" if nt > 1 else "batch"
    if mode == "tokens":
        if nt < 2:
            raise ValueError(f"mode='tokens' needs x split over tokens into >= 2 blocks; x has one token block "
                             f"of {sh.L} (chunks=(..., n) or a dask array chunked along its token axis)")
        if heads_per_task is not None:
            raise ValueError("heads_per_task applies to mode='batch'; token-sharded tasks keep every head")
        return Layout("tokens", ((0, H),), f"x is split into {nt} token blocks {sh.token_sizes}")
    if nt > 1:
        raise ValueError(f"mode='batch' needs whole sequences per block, but x is split over tokens into "
                         f"{sh.token_sizes}: use mode='tokens' or chunk only the batch axis")
    if nb < 2 and len(groups) < 2:
        if requested == "batch" and sh.batch < 2:
            raise ValueError(f"a batch of {sh.batch} cannot be split over the batch axis: split x over tokens "
                             f"({'chunks=(None, n)' if sh.batched else 'chunks=n'}, mode='tokens') or over "
                             f"heads (heads_per_task)")
        why = "x is one block (no split): one task"
    else:
        why = f"{nb} batch block(s) {sh.batch_sizes} x {len(groups)} head group(s)"
    return Layout("batch", groups, why)


def _resolve_client(client):
    """``client``, else the default ``distributed`` client if there is one, else None (local threads)."""
    if client is not None:
        return client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _compute(client, obj):
    import dask

    if client is None:
        return dask.compute(obj)[0]
    return dask.compute(obj, scheduler=client)[0]


def _bound(blocks, head_d, lora_d, beta, client):
    """``(M, means)``: the score bound of the whole call and the mean of ``V`` per batch block, ``(b, H, d_v)``."""
    (fn,) = _tasks(tasks.row_norm_maxima)
    found = _compute(client, [[fn(head_d, lora_d, xy) for xy in row] for row in blocks])
    best, means = 0.0, []
    with np.errstate(over="ignore"):  # an overflowing bound is inf, as in gpulora.lora_grad
        for row in found:
            qn = tasks.max_over(m[0] for m in row)
            kn = tasks.max_over(m[1] for m in row)
            best = max(best, float(np.max(qn * kn)))
            means.append(sum(m[2] for m in row))
    return beta * float(np.sqrt(best)), means


def _spread(blocks, head_d, lora_d, means, L, client) -> float:
    """Sum over (batch, head) of ``max_j |v_j - mean|^2`` over the whole sequence (one map-reduce)."""
    (fn,) = _tasks(tasks.value_spread)
    found = _compute(client, [[fn(head_d, lora_d, xy, means[b] / L) for xy in row] for b, row in enumerate(blocks)])
    return float(sum(np.sum(tasks.max_over(row)) for row in found))


def _tasks(*fns):
    """Each of ``fns`` as a dask task constructor (``Delayed``; impure: every call is a new task)."""
    import dask

    return tuple(dask.delayed(fn, pure=False) for fn in fns)


def _batch_total(blocks, kind, lay: Layout, head_d, lora_d, plan, causal):
    (fn,) = _tasks(tasks.batch_part)
    parts, cover = [], []
    for b, row in enumerate(blocks):
        for g in lay.heads:
            heads = None if len(lay.heads) == 1 else g
            parts.append(fn(head_d, lora_d, row[0], kind, plan, causal, (b, g), heads))
            cover.append((b, g))
    return tree_reduce(parts), cover


def _tokens_exact_total(sh: Shards, blocks, kind, head_d, lora_d, causal):
    kv, cat, rows, take, strip, kvg = _tasks(tasks.key_values, tasks.concat_kv, tasks.exact_rows_part,
                                             tasks.take_rows, tasks.without_rows, tasks.key_value_grads_part)
    offsets, sizes = sh.token_offsets, sh.token_sizes
    parts, cover = [], []
    for b, row in enumerate(blocks):
        whole = cat(*[kv(head_d, lora_d, xy) for xy in row])  # one key whose data each task receives once
        per_row = [rows(head_d, lora_d, xy, kind, whole, offsets[t], causal, (b, t)) for t, xy in enumerate(row)]
        summed = tree_reduce(per_row)
        parts.append(strip(summed))
        for t, xy in enumerate(row):
            parts.append(kvg(head_d, lora_d, xy, take(summed, offsets[t], sizes[t]), ("kv", b, t)))
            cover += [(b, t), ("kv", b, t)]
    return tree_reduce(parts), cover


def _tokens_poly_total(blocks, kind, head_d, lora_d, plan_d, targets):
    keys, queries, checked, loss, kvg = _tasks(tasks.key_state_part, tasks.query_state_part,
                                               tasks.checked_query_states, tasks.loss_of_queries,
                                               tasks.poly_key_grads_part)
    parts, cover = [], []
    for b, row in enumerate(blocks):
        key_total = tree_reduce([keys(head_d, lora_d, xy, plan_d, (b, t)) for t, xy in enumerate(row)])
        query_total = tree_reduce([queries(head_d, lora_d, xy, kind, key_total, plan_d, (b, t))
                                   for t, xy in enumerate(row)])
        parts.append(loss(query_total, plan_d))
        cover += [(b, t) for t in range(len(row))]
        if {"k", "v"} & set(targets):
            state = checked(query_total, plan_d)
            parts += [kvg(head_d, lora_d, xy, state, plan_d, ("kv", b, t)) for t, xy in enumerate(row)]
            cover += [("kv", b, t) for t in range(len(row))]
    return tree_reduce(parts), cover


def _scan(parts: list, reverse=False) -> list:
    """Exclusive prefix (or suffix) sums of the ``Delayed`` parts: ``[None, p0, p0 + p1, ...]``, each a
    :func:`combine` of the previous sum and one part (``n - 2`` state-sized adds in sequence)."""
    import dask

    add = dask.delayed(combine, pure=True)
    seq = parts[::-1] if reverse else parts
    out, acc = [None], None
    for part in seq[:-1]:
        acc = part if acc is None else add(acc, part)
        out.append(acc)
    return out[::-1] if reverse else out


def _tokens_causal_poly_total(blocks, kind, head_d, lora_d, plan_d, targets):
    keys, shard, item, kvg = _tasks(tasks.key_state_part, tasks.causal_shard, tasks.item,
                                    tasks.causal_key_grads_part)
    parts, cover = [], []
    for b, row in enumerate(blocks):
        prefixes = _scan([keys(head_d, lora_d, xy, plan_d, (b, t)) for t, xy in enumerate(row)])
        out = [shard(head_d, lora_d, xy, kind, prefixes[t], plan_d, (b, t)) for t, xy in enumerate(row)]
        parts += [item(o, "part") for o in out]
        cover += [(b, t) for t in range(len(row))]
        if {"k", "v"} & set(targets):
            suffixes = _scan([item(o, "queries") for o in out], reverse=True)
            parts += [kvg(head_d, lora_d, xy, out[t], suffixes[t], plan_d, ("kv", b, t))
                      for t, xy in enumerate(row)]
            cover += [("kv", b, t) for t in range(len(row))]
    return tree_reduce(parts), cover


def _attempt(head, lora, sh: Shards, kind, lay: Layout, client, *, dtype, method, degree, tol, causal, family):
    """Place the blocks, plan from the whole call's bound in the compute ``dtype``, run the mode and check the
    result as :func:`gpulora.lora_grad` does: ``(plan, (loss, grads), error_estimate)``."""
    tag = uuid.uuid4().hex[:8]
    head_d = shared(head, client, f"gpulora-head-{tag}")
    lora_d = shared(lora, client, f"gpulora-lora-{tag}")
    blocks = place(sh, client)
    bound, means = _bound(blocks, head_d, lora_d, head.beta, client)
    group = max(h1 - h0 for h0, h1 in lay.heads)
    p = plan_for_bound(bound, method, dtype=dtype, lead=sh.batch * head.heads, L=sh.L, d_head=head.d_head,
                       d_v=head.d_v, backend_name="cupy" if backend.is_cupy(sh.sample) else "numpy",
                       causal=causal, degree=degree, tol=tol, family=family, targets=lora.targets,
                       task_lead=max(sh.batch_sizes) * group, task_L=max(sh.token_sizes))

    def run(_, p):
        if lay.mode == "batch":
            graph, cover = _batch_total(blocks, kind, lay, head_d, lora_d, p, causal)
        elif p.method == "exact":
            graph, cover = _tokens_exact_total(sh, blocks, kind, head_d, lora_d, causal)
        else:
            build = _tokens_causal_poly_total if causal else _tokens_poly_total
            plan_d = shared(p, client, f"gpulora-plan-{tag}")
            graph, cover = build(blocks, kind, head_d, lora_d, plan_d, lora.targets)
        total = check_cover(_compute(client, graph), cover).values
        grads = {t: AdapterGrad(B=total[t + ".B"], A=total[t + ".A"]) for t in lora.targets}
        return total.get("loss"), grads

    def estimate(p, residual):
        n_rep = head.heads // head.kv_heads
        return estimate_from_spread(p, sh.L * n_rep, _spread(blocks, head_d, lora_d, means, sh.L, client), residual)

    p, out = _with_fallback(run, None, p, method)
    return _checked_poly(None, p, method, out, run, estimate=estimate)


def _lost_inputs(err, sh: Shards, client) -> bool:
    """Whether ``err`` is the loss of scattered input blocks (no lineage to recompute them from)."""
    if client is None or not sh.blocks or not isinstance(sh.blocks[0][0], tuple):
        return False
    from distributed.client import FutureCancelledError

    return isinstance(err, FutureCancelledError)


def lora_grad(head: Head, lora: LoRA, x, y=None, *, grad_output=None, client=None, method="auto", degree=None,
              tol=None, causal=False, family=None, chunks=None, mode="auto", heads_per_task=None) -> GradResult:
    """Loss and adapter gradients of :func:`gpulora.lora_grad`, computed by Dask workers.

    Parameters
    ----------
    head, lora, method, degree, tol, causal, family
        As in :func:`gpulora.lora_grad` (same meaning, same result to rounding).
    x : dask array, or NumPy/CuPy array, of shape (L, d_model) or (batch, L, d_model)
        Dask: chunked over batch and/or tokens (one block along ``d_model``, else re-chunked); its blocks
        may be NumPy or CuPy (dask-cuda). NumPy/CuPy: cut by ``chunks``.
    y : same kind as ``x``, shape (L, H d_v) or (batch, L, H d_v), optional
        Targets. Dask: re-chunked to ``x``'s leading blocks if they differ.
    grad_output : same kind and shape as ``y``, optional
        The upstream gradient ``dloss/dO`` instead of ``y`` (exactly one of the two), cut like ``x``;
        ``GradResult.loss`` is then None.
    client : distributed.Client, optional
        Scheduler; default: the current default client, else dask's local threads.
    chunks : None, int or tuple
        NumPy/CuPy input only: block sizes ``(batch, tokens)`` (3-D ``x``) or ``tokens`` (2-D), dask style:
        an int block size (the last block takes the remainder, so blocks may be unequal), a tuple of sizes
        summing to the axis, or ``None`` for one block.
    mode : {"auto", "batch", "tokens"}
        ``"auto"``: ``"tokens"`` when ``x`` has several token blocks, else ``"batch"``.
    heads_per_task : int, optional
        Batch mode: split the heads into groups of this many (the last may be smaller), one task per
        (batch block, head group).

    Returns
    -------
    GradResult
        As :func:`gpulora.lora_grad`, gathered to the caller (arrays of the blocks' library); ``note``
        starts with ``"distributed <mode>: <why>"``.

    Raises
    ------
    ValueError, TypeError
        Bad input or chunking (naming the argument), as :func:`gpulora.lora_grad` for the rest.
    RuntimeError
        When a distributed sum does not cover every shard exactly once.
    """
    try:
        from distributed import Client
    except ImportError as err:
        raise ImportError(f"gpulora.distributed needs the dask extra (pip install 'gpulora[dask]'): {err}") from None
    degree, tol, causal, _ = check_options(method, degree, tol, causal, family)
    check_call_types(head, lora, Head, "gpulora.Head")
    check_parameters(head, lora)  # B and A are usually updated in place between calls
    if client is not None and not isinstance(client, Client):
        raise TypeError(f"client must be a distributed.Client or None, got {type(client).__name__}")
    if (y is None) == (grad_output is None):
        raise TypeError("give exactly one of y (targets) and grad_output (an upstream gradient dO)")
    kind = "y" if y is not None else "grad_output"
    sh = split(x, y if y is not None else grad_output, chunks, head.d_model, head.heads * head.d_v, kind)
    lay = choose_layout(sh, head.heads, mode, heads_per_task)
    if head.kv_heads != head.heads and (lay.mode == "tokens" or len(lay.heads) > 1):
        raise ValueError(f"grouped-query heads (kv_heads = {head.kv_heads} < heads = {head.heads}) run in "
                         f"mode='batch' without heads_per_task; token shards and head groups need kv_heads = heads")
    client = _resolve_client(client)
    # the dtypes of gpulora.lora_grad: NumPy's promotion of every input (float32 at least for the arithmetic)
    upstream = y if y is not None else grad_output
    dtypes = (sh.sample, np.empty((0,), np.dtype(upstream.dtype)), *head.arrays().values(), *lora.arrays().values())
    opts = dict(dtype=compute_dtype(*dtypes), method=method, degree=degree, tol=tol, causal=causal, family=family)
    retried = ""
    try:
        p, (loss_, grads), est = _attempt(head, lora, sh, kind, lay, client, **opts)
    except Exception as err:
        if not _lost_inputs(err, sh, client):
            raise
        # scattered NumPy/CuPy blocks have no lineage: a worker that died took its shards with it
        retried = f"; retried once: {type(err).__name__} (input blocks lost with a worker)"
        log.warning("gpulora.distributed: input blocks lost with a worker (%r); scattering again", err)
        p, (loss_, grads), est = _attempt(head, lora, sh, kind, lay, client, **opts)
    xp = backend.namespace(sh.sample)
    kind = lay.mode if lay.mode == "batch" else f"tokens-{p.method}{'-causal' if causal else ''}"
    note = f"distributed {kind}: {lay.why}"
    if sh.rechunked:
        note += "; " + "; ".join(sh.rechunked)
    if p.note:
        note += "; " + p.note
    note += retried
    log.info(note)
    fields = p.fields(head.d_head)
    fields["note"] = note
    loss_ = None if loss_ is None else xp.asarray(loss_, dtype=backend.namespace_dtype(xp, result_dtype(*dtypes)))
    return GradResult(loss=loss_, grads=grads, error_estimate=est, **fields)
