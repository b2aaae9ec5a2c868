"""Bytes that the distributed modes move between workers: the state-size formulas (docs/distributed.md).

Token-sharded poly exchanges only the chain's states (:class:`gpulora.poly.chain.KeyState`,
:class:`~gpulora.poly.chain.QueryState`), per (batch member, head) and whatever the sequence length:

    key states    S_K = s k (1 + d_v + d_head + d_v d_head) + 8        (S_K, T_K only when q is adapted)
    query states  S_Q = s k (d_v + d_head + d_v d_head) + 16           (R_Q, T_Q only when k is adapted)

with ``s`` the bytes per number of the compute dtype and ``k = C(d_head + g, g)``. Each round is a tree
reduce then a broadcast over the ``P`` workers of a sequence: ``2 (P - 1)`` state transfers per round, so
``2 (P - 1) (S_K + S_Q)`` bytes per (batch member, head) in all, about ``2 (S_K + S_Q)`` received per worker.
Exact attention split over tokens moves the keys and values themselves: ring attention passes every
key/value block around the ring in the forward pass and keys, values and their gradients in the
backward pass, ``s L (3 d_head + 3 d_v) (P - 1) / P`` per worker and head, linear in ``L``.
"""

from __future__ import annotations

from ..poly.chain import KeyState, QueryState

__all__ = ["key_state_bytes", "query_state_bytes", "ring_bytes_per_worker", "tokens_poly_bytes"]


def key_state_bytes(k: int, d_head: int, d_v: int, itemsize: int, targets="qkv") -> int:
    """Bytes of one (batch member, head)'s key states: ``itemsize k W_K`` plus the key count (float64)."""
    return itemsize * k * KeyState.width(d_v, d_head, "q" in targets) + 8


def query_state_bytes(k: int, d_head: int, d_v: int, itemsize: int, targets="qkv") -> int:
    """Bytes of one (batch member, head)'s query states: ``itemsize k W_Q`` plus the loss and the normaliser
    ratio (float64)."""
    return itemsize * k * QueryState.width(d_v, d_head, "k" in targets) + 16


def tokens_poly_bytes(k: int, d_head: int, d_v: int, itemsize: int, workers: int, lead: int = 1,
                      targets="qkv") -> int:
    """Total state bytes moved by one token-sharded poly call over ``workers`` shards of each sequence:
    ``lead 2 (P - 1) (S_K + S_Q)`` (``lead`` = batch members x heads); independent of ``L``."""
    per = key_state_bytes(k, d_head, d_v, itemsize, targets)
    if set(targets) & {"k", "v"}:
        per += query_state_bytes(k, d_head, d_v, itemsize, targets)
    return lead * 2 * (workers - 1) * per


def ring_bytes_per_worker(L: int, d_head: int, d_v: int, itemsize: int, workers: int, lead: int = 1) -> float:
    """Bytes one worker receives in ring attention's forward and backward over ``workers`` token shards:
    ``lead itemsize L (3 d_head + 3 d_v) (P - 1) / P`` (keys and values in the forward; keys, values and
    their partial gradients in the backward)."""
    return lead * itemsize * L * (3 * d_head + 3 * d_v) * (workers - 1) / workers
