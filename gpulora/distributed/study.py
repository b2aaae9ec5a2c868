"""The paper study of token sharding: L = 10^8 tokens, d_head = d_v = 16, degree 2, 64 workers.

Simulates, with the operation counts of :mod:`gpulora.cost` and per-worker rates, the schedule of one
worker in two ways of splitting one head's sequence over ``P`` workers:

- **token-sharded poly** (:mod:`gpulora.distributed`): pass 1 (key states), tree reduce + broadcast of the
  key states, pass 2 (queries, ``dQ``, query states), tree reduce + broadcast of the query states,
  pass 3 (``dK``, ``dV``). Each pass's share of :func:`gpulora.cost.poly_flops` is its share of the state
  GEMM widths (pass 1: ``W_K``; pass 2: ``W_K + W_Q``; pass 3: ``W_Q``). Each reduce or broadcast is
  ``ceil(log2 P)`` messages of one state (:mod:`gpulora.distributed.traffic`) in sequence.
- **ring exact attention**: ``P`` forward steps, each computing one ``L/P x L/P`` block of scores while
  the next key/value block arrives, then ``P`` backward steps passing keys, values and their gradients;
  a step takes the longer of its compute (:func:`gpulora.cost.exact_flops` / ``P^2``, forward and backward
  parts) and its transfer (latency + bytes / bandwidth).

Run ``python -m gpulora.distributed.study --out docs/distributed.png`` (prints the table that
docs/distributed.md quotes and draws the schedule). The per-worker rates default to
:data:`MEASURED_RATES`, what ``--measure`` measured here; ``--measure`` measures them again on this machine
(one Dask worker process with one thread, float32, the study's ``d_head`` and degree), ``--rate-poly`` /
``--rate-exact`` (flop/s) put in others, e.g. a GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings

from .. import cost
from ..model import AccuracyWarning
from ..poly.chain import KeyState, QueryState
from ..poly.monomials import feature_dim
from . import traffic

__all__ = ["MEASURED_RATES", "Network", "Phase", "main", "measure_rates", "poly_schedule", "ring_schedule",
           "summary"]

# flop/s of one Dask worker (1 thread) on the 2-core CI-class x86-64 machine (shared with other jobs while
# measured), float32, d_head = d_v = 16, degree 2: ``python -m gpulora.distributed.study --measure``
# (token-sharded poly at L = 2^16, token-sharded exact at L = 4096, two shards, best of 3). No GPU rate
# has been measured: pass a GPU's with --rate-poly / --rate-exact.
MEASURED_RATES = {"poly": 8.9e9, "exact": 4.3e9}


@dataclasses.dataclass(frozen=True)
class Network:
    """Per-worker link: ``bandwidth`` bytes/s each way, ``latency`` seconds per message."""

    bandwidth: float = 25e9  # one 200 Gb/s InfiniBand NDR port per GPU
    latency: float = 5e-6

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of a worker's schedule: ``kind`` is ``"compute"`` or ``"network"``."""

    name: str
    kind: str
    start: float
    seconds: float
    nbytes: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.seconds


def _append(phases, name, kind, seconds, nbytes=0.0):
    start = phases[-1].end if phases else 0.0
    phases.append(Phase(name, kind, start, seconds, nbytes))


def poly_schedule(L, d_head, d_v, degree, workers, *, rate, net=Network(), itemsize=4, lead=1):
    """Phases of one worker's token-sharded poly gradient (all targets) for ``lead`` heads of length ``L``."""
    k = feature_dim(d_head, degree)
    shard = L / workers
    flops = lead * cost.poly_flops(shard, d_head, d_v, k)
    w_k, w_q = KeyState.width(d_v, d_head, True), QueryState.width(d_v, d_head, True)
    share = {1: w_k, 2: w_k + w_q, 3: w_q}
    whole = sum(share.values())
    s_k = lead * traffic.key_state_bytes(k, d_head, d_v, itemsize)
    s_q = lead * traffic.query_state_bytes(k, d_head, d_v, itemsize)
    hops = math.ceil(math.log2(workers)) if workers > 1 else 0
    phases = []
    _append(phases, "pass 1: key states", "compute", flops * share[1] / whole / rate)
    _append(phases, "reduce + broadcast key states", "network", 2 * hops * net.seconds(s_k), 2 * s_k)
    _append(phases, "pass 2: queries, dQ, query states", "compute", flops * share[2] / whole / rate)
    _append(phases, "reduce + broadcast query states", "network", 2 * hops * net.seconds(s_q), 2 * s_q)
    _append(phases, "pass 3: dK, dV", "compute", flops * share[3] / whole / rate)
    return phases


def ring_schedule(L, d_head, d_v, workers, *, rate, net=Network(), itemsize=4, lead=1):
    """Phases of one worker's ring-attention exact gradient: ``P`` forward and ``P`` backward steps."""
    total = lead * cost.exact_flops(L, d_head, d_v)
    forward = lead * cost.exact_flops(L, d_head, d_v, targets=())
    block = L / workers
    kv = lead * block * (d_head + d_v) * itemsize
    phases = []
    for name, flops, nbytes in (("forward", forward, kv), ("backward", total - forward, 2 * kv)):
        step = flops / workers**2 / rate
        comm = net.seconds(nbytes) if workers > 1 else 0.0
        for i in range(workers):
            moved = nbytes if i < workers - 1 else 0.0
            _append(phases, f"{name} step {i + 1}", "compute" if step >= comm or not moved else "network",
                    max(step, comm if moved else 0.0), moved)
    return phases


def summary(phases) -> dict:
    """Total seconds, compute and network seconds, and bytes received by the worker."""
    return {
        "seconds": phases[-1].end,
        "compute": sum(p.seconds for p in phases if p.kind == "compute"),
        "network": sum(p.seconds for p in phases if p.kind == "network"),
        "bytes": sum(p.nbytes for p in phases),
    }


def measure_rates(d_head=16, degree=2, *, L_poly=2**16, L_exact=4096, repeat=3) -> dict:
    """Per-worker flop rates of token-sharded poly and exact on a one-worker local Dask cluster (float32):
    the flops of :mod:`gpulora.cost` over the best of ``repeat`` calls. Needs the ``dask`` extra; call it
    under ``if __name__ == "__main__"`` (worker processes are spawned)."""
    import time

    import distributed
    import numpy as np

    from ..testing import make_problem
    from .grad import lora_grad

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    rates = {}
    with cluster, distributed.Client(cluster, set_as_default=False) as client:
        for method, L in (("poly", L_poly), ("exact", L_exact)):
            p = make_problem(0, L=L, d_model=16, d_head=d_head, r=4, targets="qkv", score_bound=1.0,
                             dtype=np.float32)
            kw = {"degree": degree} if method == "poly" else {}
            best = math.inf
            for _ in range(repeat):
                t = time.perf_counter()
                with warnings.catch_warnings():  # a fixed degree for timing: its accuracy is not the point
                    warnings.simplefilter("ignore", AccuracyWarning)
                    lora_grad(p.head, p.lora, p.x, p.y, client=client, method=method, chunks=(L // 2,), **kw)
                best = min(best, time.perf_counter() - t)
            k = feature_dim(d_head, degree)
            flops = cost.poly_flops(L, d_head, d_head, k) if method == "poly" else cost.exact_flops(L, d_head, d_head)
            rates[method] = flops / best
    return rates


def _plot(poly, ring, out, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"compute": "#4878a8", "network": "#e0803a"}
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), gridspec_kw={"height_ratios": [1.2, 1, 1.1]})
    ax = axes[0]
    for i, p in enumerate(poly):
        ax.barh(0, p.seconds, left=p.start, color=colours[p.kind], edgecolor="white")
        ax.annotate(p.name, (p.start + p.seconds / 2, 0.45 + 0.28 * (i % 2)), ha="center", fontsize=7)
    ax.set_ylim(-0.6, 1.2)
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.set_title(f"token-sharded poly, one worker: {summary(poly)['seconds']:.3g} s, "
                 f"{summary(poly)['bytes'] / 1e6:.3g} MB received", fontsize=9)
    ax = axes[1]
    for p in ring:
        ax.barh(0, p.seconds, left=p.start, color=colours[p.kind], edgecolor="white", linewidth=0.3,
                alpha=0.55 if p.name.startswith("forward") else 1.0)
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    s = summary(ring)
    ax.set_title(f"ring exact attention, one worker: {s['seconds']:.3g} s ({len(ring) // 2} forward steps, light; "
                 f"{len(ring) // 2} backward steps), {s['bytes'] / 1e9:.3g} GB received", fontsize=9)
    ax = axes[2]
    names = ["poly", "ring exact"]
    sp, sr = summary(poly), summary(ring)
    ax.bar([0, 1], [sp["seconds"], sr["seconds"]], color=colours["compute"], width=0.35, label="seconds")
    ax2 = ax.twinx()
    ax2.bar([0.38, 1.38], [sp["bytes"], sr["bytes"]], color=colours["network"], width=0.35, label="bytes")
    ax.set_yscale("log")
    ax2.set_yscale("log")
    ax.set_ylim(min(sp["seconds"], sr["seconds"]) / 10, max(sp["seconds"], sr["seconds"]) * 10)
    ax2.set_ylim(min(sp["bytes"], sr["bytes"]) / 10, max(sp["bytes"], sr["bytes"]) * 10)
    for x, v, a_ in ((0, sp["seconds"], ax), (1, sr["seconds"], ax), (0.38, sp["bytes"], ax2), (1.38, sr["bytes"], ax2)):
        a_.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([0.19, 1.19], names)
    ax.set_ylabel("seconds per gradient", color=colours["compute"])
    ax2.set_ylabel("bytes received per worker", color=colours["network"])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[0].legend(handles, list(colours), loc="upper right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m gpulora.distributed.study", description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=float, default=1e8, help="L, tokens of one sequence (default 1e8)")
    parser.add_argument("--d-head", type=int, default=16)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--itemsize", type=int, default=4, help="bytes per number (4: float32)")
    parser.add_argument("--bandwidth", type=float, default=Network.bandwidth, help="bytes/s per worker")
    parser.add_argument("--latency", type=float, default=Network.latency, help="seconds per message")
    parser.add_argument("--measure", action="store_true", help="measure the per-worker rates on this machine")
    parser.add_argument("--rate-poly", type=float, default=None, help="flop/s (default: MEASURED_RATES)")
    parser.add_argument("--rate-exact", type=float, default=None, help="flop/s (default: MEASURED_RATES)")
    parser.add_argument("--out", default=None, help="PNG of the simulated schedule")
    a = parser.parse_args(argv)
    L, d, P = int(a.length), a.d_head, a.workers
    rates = dict(MEASURED_RATES)
    if a.measure:
        rates = measure_rates(d, a.degree)
        print(f"measured per-worker rates: poly {rates['poly']:.3g}, exact {rates['exact']:.3g} flop/s")
    rp = a.rate_poly or rates["poly"]
    re_ = a.rate_exact or rates["exact"]
    net = Network(a.bandwidth, a.latency)
    poly = poly_schedule(L, d, d, a.degree, P, rate=rp, net=net, itemsize=a.itemsize)
    ring = ring_schedule(L, d, d, P, rate=re_, net=net, itemsize=a.itemsize)
    k = feature_dim(d, a.degree)
    sp, sr = summary(poly), summary(ring)
    lines = [
        f"L = {L:.3g}, d_head = d_v = {d}, degree {a.degree} (k = {k}), {P} workers, {a.itemsize}-byte numbers, "
        f"one head; rates poly {rp:.3g} / exact {re_:.3g} flop/s; link {net.bandwidth:.3g} B/s, "
        f"{net.latency:.3g} s per message",
        f"state sizes per head: key {traffic.key_state_bytes(k, d, d, a.itemsize)} B, "
        f"query {traffic.query_state_bytes(k, d, d, a.itemsize)} B",
        "",
        "| | seconds | compute s | network s | bytes received per worker | flops per worker |",
        "|---|---|---|---|---|---|",
        f"| token-sharded poly | {sp['seconds']:.4g} | {sp['compute']:.4g} | {sp['network']:.3g} | "
        f"{sp['bytes']:.4g} | {cost.poly_flops(L / P, d, d, k):.4g} |",
        f"| ring exact | {sr['seconds']:.4g} | {sr['compute']:.4g} | {sr['network']:.3g} | {sr['bytes']:.4g} | "
        f"{cost.exact_flops(L, d, d) / P:.4g} |",
        "",
        "poly phases: " + "; ".join(f"{p.name} {p.seconds:.3g} s" for p in poly),
        f"ratio ring / poly: {sr['seconds'] / sp['seconds']:.3g}x time, {sr['bytes'] / sp['bytes']:.3g}x bytes",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        _plot(poly, ring, a.out, f"L = {L:.0e}, d_head = {d}, g = {a.degree}, {P} workers (simulated with "
                                 f"gpulora.cost)")
    return text


if __name__ == "__main__":
    main()
