"""Partial sums that know which shards they cover, and the tree reduction that combines them.

Every quantity the distributed modes reduce (loss, adapter gradients, key/value gradients, polynomial
states) is a sum over shards. A :class:`Part` carries its arrays together with the set of shard ids it
sums, :func:`combine` refuses to add a shard twice, and :func:`check_cover` refuses a total that misses one.
So whatever the scheduler does (a worker killed, a task rerun), the caller gets the full sum or an
error, never a partial sum.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Part", "check_cover", "combine", "nbytes", "tree_reduce"]


@dataclasses.dataclass(frozen=True)
class Part:
    """Arrays ``values[name]`` summed over the shards in ``cover`` (ids such as ``(b, t)``)."""

    cover: frozenset
    values: dict

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what moves when this part is sent to another worker)."""
        return sum(nbytes(a) for a in self.values.values())


def nbytes(obj) -> int:
    """Bytes of the arrays in ``obj``: an array, a dataclass of arrays (the chain's states, the head and
    adapters, the plan), a Part, or dicts, tuples and lists of these.

    Registered with ``dask.sizeof``, so the scheduler's placement and the workers' transfer logs count
    the real size of what the distributed modes ship.
    """
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(nbytes(a) for a in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(a) for a in obj)
    return 0


def _register_sizeof():
    try:
        from dask.sizeof import sizeof
    except ImportError:  # without the dask extra: lora_grad says so when called
        return

    from ..dispatch import Plan
    from ..model import Head, LoRA
    from ..poly.chain import KeyState, QueryState

    for cls in (Part, KeyState, QueryState, Head, LoRA, Plan):
        sizeof.register(cls)(nbytes)


def combine(*parts: Part) -> Part:
    """Sum of ``parts``: arrays of the same name added, others kept; the covers must be disjoint."""
    cover, values = set(), {}
    for p in parts:
        if cover & p.cover:
            raise RuntimeError(f"shards {sorted(cover & p.cover)} would be summed twice: refusing a wrong total")
        cover |= p.cover
        for name, a in p.values.items():
            values[name] = a if name not in values else values[name] + a
    return Part(frozenset(cover), values)


def check_cover(part: Part, expected) -> Part:
    """``part`` itself if it covers exactly the shards ``expected``; RuntimeError otherwise."""
    expected = frozenset(expected)
    if part.cover != expected:
        missing, extra = sorted(expected - part.cover), sorted(part.cover - expected)
        raise RuntimeError(f"a distributed sum is incomplete: shards missing {missing}, unexpected {extra}")
    return part


def tree_reduce(parts: list, fan_in: int = 2):
    """A dask graph summing the ``Delayed`` parts in a tree of :func:`combine` (depth ``log_fan_in n``)."""
    import dask

    add = dask.delayed(combine, pure=True)
    level = list(parts)
    if not level:
        raise ValueError("tree_reduce needs at least one part")
    while len(level) > 1:
        level = [add(*level[i:i + fan_in]) if len(level[i:i + fan_in]) > 1 else level[i]
                 for i in range(0, len(level), fan_in)]
    return level[0]


_register_sizeof()
