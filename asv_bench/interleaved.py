"""Interleaved A/B timings of ``lora_grad(method="poly")`` on a noisy machine, printed as markdown.

Two comparisons, each robust to the minutes-long phases in which a shared machine runs everything slower:

* ``forms``: the chain's states lifted against built from Kronecker products
  (:func:`gpulora.poly.chain.lift_states` forced either way), alternating inside one process;
* ``commits REV``: this checkout against a git worktree of ``REV``, alternating fresh processes;
* ``cache``: the chain's cache target for its blocks (:data:`gpulora.poly.chain.CACHE_BYTES`), 1..16 MiB,
  alternating inside one process, at the first two shapes.

Best of the alternations; one call per sample after two warm-up calls. Usage (repository root)::

    python asv_bench/interleaved.py forms
    python asv_bench/interleaved.py commits 4b181e9
    python asv_bench/interleaved.py cache

Shapes: ``(d_head, g, targets, dtype, L)`` from :data:`SHAPES` (the problem of ``benchmarks.common.problem``,
score bound M = 1).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
SHAPES = [(8, 2, "qv", "float32", 65536), (8, 4, "qv", "float32", 65536), (4, 2, "qkv", "float64", 65536),
          (16, 2, "qkv", "float32", 32768), (16, 4, "qkv", "float64", 4096)]
ROUNDS = 4


def _problem(d, g, targets, dtype, L):
    sys.path.insert(0, str(HERE))
    import numpy as np

    import gpulora
    from benchmarks.common import problem

    p = problem(np, L, d, targets, dtype)
    return lambda: gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=g)


def _seconds(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def forms() -> str:
    """Lifted against Kronecker states, alternating in this process."""
    warnings.simplefilter("ignore")
    from gpulora.poly import chain

    picked = chain.lift_states
    rows = ["| d_head | g | targets | dtype | L | lifted | Kronecker | lift_states picks |",
            "|---:|---:|---|---|---:|---:|---:|---|"]
    for d, g, t, dt, L in SHAPES:
        run, best = _problem(d, g, t, dt, L), {True: [], False: []}
        for _ in range(ROUNDS):
            for lift in (True, False):
                chain.lift_states = lambda *a, lift=lift, **kw: lift
                run()
                best[lift].append(_seconds(run))
        chain.lift_states = picked
        pick = picked(d, g, d, False, 4 if dt == "float32" else 8)
        rows.append(f"| {d} | {g} | {t} | {dt} | {L} | {min(best[True]) * 1e3:.1f} ms | "
                    f"{min(best[False]) * 1e3:.1f} ms | {'lifted' if pick else 'Kronecker'} |")
    return "\n".join(rows)


def cache() -> str:
    """The block cache target swept, alternating in this process."""
    warnings.simplefilter("ignore")
    from gpulora.poly import chain

    sizes, kept = [1, 2, 4, 8, 16], chain.CACHE_BYTES
    rows = ["| d_head | g | targets | dtype | L | " + " | ".join(f"{m} MiB" for m in sizes) + " |",
            "|---:|---:|---|---|---:|" + "---:|" * len(sizes)]
    for d, g, t, dt, L in SHAPES[:2]:
        run, best = _problem(d, g, t, dt, L), {m: [] for m in sizes}
        for _ in range(ROUNDS):
            for m in sizes:
                chain.CACHE_BYTES = m << 20
                run()
                best[m].append(_seconds(run))
        chain.CACHE_BYTES = kept
        rows.append(f"| {d} | {g} | {t} | {dt} | {L} | " + " | ".join(f"{min(best[m]) * 1e3:.1f} ms" for m in sizes)
                    + " |")
    return "\n".join(rows)


def _one(args) -> None:
    """Child process: best of two timed calls of one shape, in ms, on stdout."""
    warnings.simplefilter("ignore")
    d, g, t, dt, L = int(args[0]), int(args[1]), args[2], args[3], int(args[4])
    run = _problem(d, g, t, dt, L)
    run()
    run()
    print(min(_seconds(run) for _ in range(2)) * 1e3)


def commits(rev: str) -> str:
    """This checkout against a worktree of ``rev``, alternating fresh processes."""
    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        other = pathlib.Path(tmp) / "wt"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(other), rev], check=True)
        try:
            sha = subprocess.run(["git", "-C", str(other), "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
            rows = [f"| d_head | g | targets | dtype | L | {sha} | this checkout |", "|---:|---:|---|---|---:|---:|---:|"]
            for shape in SHAPES:
                best = {other: [], root: []}
                for _ in range(ROUNDS // 2):
                    for tree in (other, root):
                        env = dict(os.environ, PYTHONPATH=str(tree))
                        out = subprocess.run([sys.executable, str(HERE / "interleaved.py"), "_one",
                                              *map(str, shape)], env=env, check=True, capture_output=True,
                                             text=True, cwd=tree)
                        best[tree].append(float(out.stdout.split()[-1]))
                d, g, t, dt, L = shape
                rows.append(f"| {d} | {g} | {t} | {dt} | {L} | {min(best[other]):.1f} ms | {min(best[root]):.1f} ms |")
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(other)], check=False)
    return "\n".join(rows)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["forms", "commits", "cache", "_one"])
    ap.add_argument("args", nargs="*")
    a = ap.parse_args(argv)
    if a.what == "_one":
        _one(a.args)
        return ""
    text = {"forms": forms, "cache": cache}[a.what]() if a.what != "commits" else commits(a.args[0])
    print(text)
    return text


if __name__ == "__main__":
    main()
