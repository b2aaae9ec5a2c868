"""The functions that run on the workers: each takes blocks of ``x`` and ``y`` and returns small arrays.

Every task re-projects its own block (``prepare``: ``O(L_t d_model H d)``, small next to the attention
work) instead of shipping projections around, and returns a :class:`~gpulora.distributed.parts.Part`
tagged with the shards it covers. Adapter gradients leave the workers as ``dB, dA`` (the LoRA chain rule
``dW = x^T dP`` is a sum over tokens and batch members, so per-shard ``dB, dA`` add up to the total).
"""

from __future__ import annotations

import numpy as np

from .. import backend, dispatch
from ..adapters import Problem, adapter_grads, prepare, projection_grads
from ..exact.attention import attention_vjp
from ..model import Head, LoRA
from ..poly import causal as causal_chain
from ..poly import chain
from .parts import Part

__all__ = [
    "batch_part",
    "concat_kv",
    "exact_rows_part",
    "head_group",
    "key_value_grads_part",
    "row_norm_maxima",
    "take_rows",
]


def _problem(head: Head, lora: LoRA, xy, kind: str) -> Problem:
    """The block's problem with its upstream array as ``kind`` (``"y"``: targets, ``"grad_output"``: dO)."""
    return prepare(head, lora, xy[0], **{kind: xy[1]})


def _with_loss(values: dict, loss) -> dict:
    """``values`` plus ``"loss"`` when there is one (None with an upstream gradient)."""
    return values if loss is None else {"loss": loss, **values}


def row_norm_maxima(head: Head, lora: LoRA, xy):
    """``(max_i |q_i|^2, max_j |k_j|^2, sum_j v_j)`` per (batch member, head) of the block: NumPy
    ``(b, H_kv, n_rep)``, ``(b, H_kv, 1)`` and ``(b, H_kv, d_v)`` (the last in float64).

    The bound of the whole call, ``M = beta max_(b,h) sqrt(max_i |q_i|^2 max_j |k_j|^2)``, is the max over
    token blocks of these, then the product: the same number :func:`gpulora.poly.chain.score_bound` gives.
    The sums give the mean of ``V`` that :func:`value_spread` needs.
    """
    prob = prepare(head, lora, xy[0])
    xp, att = prob.xp, prob.attention(False)  # grouped: q (b, H_kv, n_rep, L, d), k (b, H_kv, 1, L, d)
    qn = xp.max(xp.sum(att.q * att.q, axis=-1), axis=-1)
    kn = xp.max(xp.sum(att.k * att.k, axis=-1), axis=-1)
    vs = xp.sum(xp.astype(prob.v, xp.float64), axis=-2)
    return backend.to_numpy(qn), backend.to_numpy(kn), backend.to_numpy(vs)


def value_spread(head: Head, lora: LoRA, xy, mean) -> np.ndarray:
    """``max_j |v_j - c|^2`` per (batch member, key/value head) of the block, NumPy ``(b, H_kv)`` float64, for
    the mean ``c (b, H_kv, d_v)`` of the whole sequence (0 for Softmax_1): the spread that
    :func:`gpulora.dispatch.error_estimate` bounds the output error with."""
    prob = prepare(head, lora, xy[0])
    xp = prob.xp
    v = xp.astype(prob.v, xp.float64)
    c = 0.0 if prob.softmax_one else xp.asarray(mean)[..., None, :]
    return backend.to_numpy(xp.max(xp.sum((v - c) ** 2, axis=-1), axis=-1))


def head_group(head: Head, lora: LoRA, h0: int, h1: int):
    """The head and adapters restricted to heads ``h0 .. h1 - 1`` (columns of ``w`` and ``A``).

    ``B`` is shared by all heads, so the ``dB`` of the groups add up; ``dA`` of a group is its columns.
    """
    dq, dv = head.d_head, head.d_v
    qk, v = slice(h0 * dq, h1 * dq), slice(h0 * dv, h1 * dv)
    cols = {"q": qk, "k": qk, "v": v}
    bias = {f"b_{t}": None if head.bias(t) is None else head.bias(t)[cols[t]] for t in cols}
    sub = Head(head.w_q[:, qk], head.w_k[:, qk], head.w_v[:, v], beta=head.beta, heads=h1 - h0,
               softmax_one=head.softmax_one, **bias)
    adapters = {t: (b, a[:, cols[t]]) for t, (b, a) in lora.adapters.items()}
    return sub, LoRA(adapters, alpha=lora.alpha), cols


def _grad_values(lora: LoRA, prob: Problem, d_heads: dict, cols=None, widths=None) -> dict:
    """``{"t.B": dB, "t.A": dA}`` from head-layout gradients ``d_heads[t] (b, H, L, d)``; with a head group,
    ``dA`` is placed in its columns of a full-width zero."""
    out = {}
    for t, g in adapter_grads(lora, prob, projection_grads(prob, d_heads)).items():
        out[t + ".B"] = g.B
        if cols is None:
            out[t + ".A"] = g.A
        else:
            full = prob.xp.zeros((g.A.shape[0], widths[t]), dtype=g.A.dtype)
            full[:, cols[t]] = g.A
            out[t + ".A"] = full
    return out


def batch_part(head: Head, lora: LoRA, xy, kind: str, plan, causal: bool, cover, heads=None) -> Part:
    """Loss and adapter gradients of whole sequences ``x (b, L, d_model)``, with the call's ``plan``
    (same method, polynomial and compute dtype as a single-process call), for all heads or the heads
    ``h0 .. h1 - 1`` given in ``heads``. Cost: that of :func:`gpulora.lora_grad` on the block."""
    cols = widths = None
    x, y = xy
    if heads is not None:
        widths = {t: head.weight(t).shape[1] for t in lora.targets}
        head, lora, cols = head_group(head, lora, *heads)
        y = y[..., cols["v"]]
    prob = _problem(head, lora, (x, y), kind)
    att = prob.attention(causal)
    loss, _, dq, dk, dv = dispatch._vjp(att, plan, y=prob.grouped(prob.y),
                                        grad_output=prob.grouped(prob.grad_output), need=lora.targets)
    d_heads = {t: prob.ungrouped(a) for t, a in (("q", dq), ("k", dk), ("v", dv)) if t in lora.targets}
    values = _with_loss(_grad_values(lora, prob, d_heads, cols, widths), loss)
    return Part(frozenset([cover]), values)


def concat_kv(*blocks):
    """``(K, V)`` of a whole sequence from the ``(k, v)`` of its token blocks, in order."""
    xp = backend.namespace(*[a for kv in blocks for a in kv])
    return tuple(xp.concat([kv[i] for kv in blocks], axis=-2) for i in (0, 1))


def key_values(head: Head, lora: LoRA, xy):
    """``(k, v)`` of a token block, in head layout ``(b, H, L_t, d)``."""
    prob = prepare(head, lora, xy[0])
    return prob.k, prob.v


def exact_rows_part(head: Head, lora: LoRA, xy, kind: str, kv, row0: int, causal: bool, cover) -> Part:
    """Token-sharded exact: the query rows of one shard against all keys ``kv = (K, V)``.

    Returns the shard's loss, its ``q`` adapter gradients (complete for its rows), and partial ``dK``,
    ``dV`` over the whole sequence (``"dk"``, ``"dv"``), to be summed over the shards of the sequence.
    """
    prob = _problem(head, lora, xy, kind)
    need = lora.targets
    loss, _, dq, dk, dv = attention_vjp(prob.q, kv[0], kv[1], prob.beta, y=prob.y, grad_output=prob.grad_output,
                                        causal=causal, softmax_one=prob.softmax_one, need=need, row0=row0)
    values = _with_loss({}, loss)
    if "q" in need:
        values.update(_grad_values(_only(lora, "q"), prob, {"q": dq}))
    for name, a in (("dk", dk), ("dv", dv)):
        if a is not None:
            values[name] = a
    return Part(frozenset([cover]), values)


def take_rows(part: Part, row0: int, n: int):
    """Rows ``row0 .. row0 + n`` of the reduced ``"dk"`` and ``"dv"`` of ``part`` (only they travel on)."""
    return {name: part.values[name][..., row0:row0 + n, :] for name in ("dk", "dv") if name in part.values}


def without_rows(part: Part) -> Part:
    """``part`` without its whole-sequence ``"dk"``, ``"dv"`` (already split into rows by :func:`take_rows`)."""
    return Part(part.cover, {n: a for n, a in part.values.items() if n not in ("dk", "dv")})


def key_value_grads_part(head: Head, lora: LoRA, xy, rows: dict, cover) -> Part:
    """``k`` and ``v`` adapter gradients of one token block from its rows of the reduced ``dK``, ``dV``."""
    lo = _key_value_lora(lora)
    if lo is None:
        return Part(frozenset([cover]), {})
    prob = prepare(head, lo, xy[0])
    return Part(frozenset([cover]), _grad_values(lo, prob, {t: rows["d" + t] for t in lo.targets}))


def _key_value_lora(lora: LoRA):
    sub = {t: lora.adapters[t] for t in ("k", "v") if t in lora.adapters}
    return LoRA(sub, alpha=lora.alpha) if sub else None


def key_state_part(head: Head, lora: LoRA, xy, plan, cover) -> Part:
    """Token-sharded poly, pass 1: the key states of one token block (:func:`gpulora.poly.chain.key_pass`),
    ``k (1 + d_v [+ d_head + d_v d_head])`` numbers per (batch member, head), whatever the block's length."""
    prob = prepare(head, lora, xy[0])
    keys = chain.key_pass(prob.k, prob.v, plan.choice, need=lora.targets, compute_dtype=plan.compute_dtype)
    return Part(frozenset([cover]), {"keys": keys})


def query_state_part(head: Head, lora: LoRA, xy, kind: str, keys: Part, plan, cover) -> Part:
    """Token-sharded poly, pass 2: with the key states summed over the whole sequence, the block's ``q``
    adapter gradients (its ``dQ`` rows are complete) and its query states
    (:func:`gpulora.poly.chain.query_pass`: ``U^T G``, ``U^T (r Q)``, ``T_Q``, the loss, the normaliser
    ratio). Also checks the rounding of the features at the block's own extreme rows."""
    prob = _problem(head, lora, xy, kind)
    xp, dtype = prob.xp, plan.compute_dtype
    chain.check_extreme_pairs(prob.beta * xp.astype(prob.q, dtype, copy=False),
                              xp.astype(prob.k, dtype, copy=False), plan.choice)
    need = lora.targets
    rows, state = chain.query_pass(prob.q, keys.values["keys"], prob.beta, plan.choice, y=prob.y,
                                   grad_output=prob.grad_output, softmax_one=prob.softmax_one, need=need)
    values = {"queries": state}
    if "q" in need:
        values.update(_grad_values(_only(lora, "q"), prob, {"q": rows["dq"]}))
    return Part(frozenset([cover]), values)


def checked_query_states(part: Part, plan):
    """The summed query states of ``part``, after the normaliser check over the whole sequence
    (:func:`gpulora.poly.chain.check_normaliser_ratio`; raises ``PolynomialFailure`` before any key
    gradient is computed). Only these states are broadcast to pass 3."""
    state = part.values["queries"]
    chain.check_normaliser_ratio(state.worst, plan.choice)
    return state


def loss_of_queries(part: Part, plan) -> Part:
    """``part`` with its summed query states replaced by the loss they carry, after the normaliser check."""
    checked_query_states(part, plan)
    values = {n: a for n, a in part.values.items() if n != "queries"}
    return Part(part.cover, _with_loss(values, part.values["queries"].loss))


def poly_key_grads_part(head: Head, lora: LoRA, xy, queries, plan, cover) -> Part:
    """Token-sharded poly, pass 3: the ``k``, ``v`` adapter gradients of one token block from its ``dK``,
    ``dV`` rows (:func:`gpulora.poly.chain.key_grad_pass` with the summed query states)."""
    lo = _key_value_lora(lora)
    prob = prepare(head, lora, xy[0])
    rows = chain.key_grad_pass(prob.k, prob.v, queries, prob.beta, plan.choice, need=lo.targets)
    return Part(frozenset([cover]), _grad_values(lo, prob, {t: rows["d" + t] for t in lo.targets}))


def causal_shard(head: Head, lora: LoRA, xy, kind: str, prefix: Part | None, plan, cover) -> dict:
    """Token-sharded causal poly, pass 2: the chunked causal chain on one token block, carrying in the
    ``prefix`` key states of every earlier block (:func:`gpulora.poly.causal.chunked_loss_and_grads`).

    Returns a dict: ``"part"``, the block's loss and ``q`` adapter gradients (its ``dQ`` rows are
    complete); ``"rows"``, its ``dK``, ``dV`` rows without the later blocks' queries (they stay on this
    worker for :func:`causal_key_grads_part`); ``"queries"``, a Part with the block's own query states
    (the suffix of the earlier blocks). Raises ``PolynomialFailure`` from the block's run-time checks.
    """
    prob = _problem(head, lora, xy, kind)
    need = lora.targets
    keys = None if prefix is None else prefix.values["keys"]
    loss, dq, dk, dv, (_, queries) = causal_chain.chunked_loss_and_grads(
        prob.q, prob.k, prob.v, prob.y, prob.beta, plan.choice, plan.compute_dtype, softmax_one=prob.softmax_one,
        need=need, grad_output=prob.grad_output, prefix=keys, return_states=True)
    values = _with_loss({}, loss)
    if "q" in need:
        values.update(_grad_values(_only(lora, "q"), prob, {"q": dq}))
    return {"part": Part(frozenset([cover]), values), "rows": {"dk": dk, "dv": dv},
            "queries": Part(frozenset([cover]), {"queries": queries})}


def item(d: dict, name: str):
    """``d[name]``: a task, so that only that entry of a task's result moves to another worker."""
    return d[name]


def causal_key_grads_part(head: Head, lora: LoRA, xy, shard: dict, suffix: Part | None, plan, cover) -> Part:
    """Token-sharded causal poly, pass 3: the block's ``dK``, ``dV`` rows completed with the query states of
    every later block (``suffix``; their queries see all of this block's keys: the non-causal
    :func:`gpulora.poly.chain.key_grad_pass`), then the ``k``, ``v`` adapter gradients."""
    lo = _key_value_lora(lora)
    prob = prepare(head, lora, xy[0])
    rows = {t: shard["rows"]["d" + t] for t in lo.targets}
    if suffix is not None:
        more = chain.key_grad_pass(prob.k, prob.v, suffix.values["queries"], prob.beta, plan.choice,
                                   need=lo.targets)
        rows = {t: rows[t] + more["d" + t] for t in lo.targets}
    return Part(frozenset([cover]), _grad_values(lo, prob, rows))


def _only(lora: LoRA, target: str) -> LoRA:
    return LoRA({target: lora.adapters[target]}, alpha=lora.alpha)


def max_over(blocks) -> np.ndarray:
    """Elementwise max of NumPy arrays of equal shape."""
    return np.maximum.reduce(list(blocks))
