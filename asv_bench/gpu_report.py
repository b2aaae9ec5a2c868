"""Turn the output folder of ``asv_bench/gpu_run.sh`` into the "GPU figures" section of BENCHMARKS.md.

Usage::

    python asv_bench/gpu_report.py DIR                      # print the markdown section
    python asv_bench/gpu_report.py DIR --update BENCHMARKS.md  # replace the section between the markers

``DIR`` holds ``gpu.json`` (written by ``gpu_bench.py``) and, when the shell script ran them,
``tests.txt`` (the last lines of the CuPy test run) and ``stages.txt`` (each shell stage's exit code and
seconds). Every figure printed comes from those files.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
TARGET_MS = 50.0  # poly d_head 64, g 2, 8 heads, L 65536, forward + backward (issue 16)
FEATURE_SHARE = 0.70  # feature map at >= 70 % of the device copy bandwidth (issue 16)


def _ms(case):
    return case["median_s"] * 1e3 if "median_s" in case else None


def _f(x, spec=".3g"):
    return "–" if x is None else format(x, spec)


def markdown(results: dict, tests: str = "", stages: str = "") -> str:
    """The markdown section for ``results`` (the dict of ``gpu.json``)."""
    lines = []
    w = lines.append
    dev = results.get("device", {})
    info = dev.get("info", {})
    w(f"Device: **{info.get('device', '?')}**" + (f", compute capability {info['compute_capability']}, "
                                                  f"{info['memory_gib']:.0f} GiB, L2 {info['l2_mib']:.0f} MiB, "
                                                  f"{info['sms']} SMs" if "memory_gib" in info else "")
      + (" — **dry run on the CPU: these numbers say nothing about a GPU**" if info.get("dry_run") else ""))
    w("")
    w("Versions: " + ", ".join(f"{k} {info[k]}" for k in ("python", "numpy", "cupy", "numba_cuda", "torch",
                                                           "driver", "runtime") if k in info))
    w("")
    summ = results.get("summary", {}).get("stages", {})
    if summ:
        w("Stages: " + ", ".join(f"{n} {s['status']} ({s['seconds']:.0f} s of {s['limit_s']:.0f})"
                                 for n, s in summ.items()))
        w("")
    if stages.strip():
        w("Shell stages (exit code, seconds): " + "; ".join(stages.split("\n")).strip("; "))
        w("")
    if tests.strip():
        w("CuPy test suite (`pytest -m gpu`), last lines:")
        w("")
        w("```")
        w(tests.strip())
        w("```")
        w("")
    copy = dev.get("copy", {}).get("gbps")
    w("#### Ceilings (measured in the same run)")
    w("")
    w("| device copy | cuBLAS GEMM fp32 | GEMM tf32 (torch) |")
    w("|---:|---:|---:|")
    w(f"| {_f(copy, '.0f')} GB/s | {_f(dev.get('gemm_fp32', {}).get('tflops'))} TFLOP/s | "
      f"{_f(dev.get('gemm_tf32', {}).get('tflops'))} TFLOP/s |")
    w("")
    feats = results.get("features", {}).get("cases", [])
    if feats:
        w("#### Feature map (CuPy kernel), 8 heads, M = score bound of the inputs")
        w("")
        w("Fixed cost: the same call on one row (host work and launch); net GB/s: the traffic over the time "
          "less that cost.")
        w("")
        w("| L | d_head | g | k | M | time | GB/s | share of copy | fixed cost | net GB/s |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in feats:
            share = c["gbps"] / copy if copy and "gbps" in c else None
            fixed = c.get("fixed_s")
            w(f"| {c['L']} | {c['d_head']} | {c['degree']} | {c.get('k', '–')} | {c['M']:g} | {_f(_ms(c))} ms | "
              f"{_f(c.get('gbps'), '.0f')} | {_f(share and 100 * share, '.0f')} % | "
              f"{_f(fixed and fixed * 1e3)} ms | {_f(c.get('net_gbps'), '.0f')} |" if "error" not in c else
              f"| {c['L']} | {c['d_head']} | {c['degree']} | – | {c['M']:g} | {c['error'][:60]} |" + " – |" * 4)
        w("")
    prods = results.get("products", {}).get("cases", [])
    if prods:
        w("#### Low-rank products, 8 heads: fused Numba kernels against the cuBLAS twins (the default)")
        w("")
        w("| op | L | k | p = q | dtype | cuBLAS twin | TFLOP/s | fused kernel | TFLOP/s | faster |")
        w("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
        for c in prods:
            cells = []
            for path in ("cublas", "fused"):
                r = c.get(path, {})
                cells += ([f"{_f(_ms(r))} ms", _f(r.get("tflops"))] if "median_s" in r else
                          [r.get("error", "–")[:50], "–"])
            both = [c.get(path, {}).get("median_s") for path in ("cublas", "fused")]
            faster = "–" if None in both else ("fused" if both[1] < both[0] else "cuBLAS")
            w(f"| {c['op']} | {c['L']} | {c['k']} | {c['p']} | {c['dtype']} | " + " | ".join(cells)
              + f" | {faster} |")
        w("")
        timed = [c for c in prods if "median_s" in c.get("cublas", {}) and "median_s" in c.get("fused", {})]
        if timed:
            wins = sum(c["fused"]["median_s"] < c["cublas"]["median_s"] for c in timed)
            w(f"- Fused kernels faster in {wins} of {len(timed)} cases; `gpulora.kernels.use_fused_products()` "
              f"(default: the cuBLAS twins) should follow where they win.")
            w("")
    st = results.get("stages", {})
    if st.get("parts"):
        total = _ms(st["parts"].get("total", {}))
        w(f"#### Stage breakdown of one poly call: L {st['L']}, {st['heads']} heads, d_head {st['d_head']}, "
          f"g {st['degree']}, k {st['k']}, M {st['M']:g}, float32")
        w("")
        w("| stage | time | share of the total |")
        w("|---|---:|---:|")
        for name, c in st["parts"].items():
            ms = _ms(c)
            share = 100 * ms / total if ms and total and name != "total" else None
            w(f"| {name} | {_f(ms)} ms | {_f(share, '.0f')} % |" if "error" not in c else
              f"| {name} | {c['error'][:60]} | – |")
        w("")
    cases = results.get("compare", {}).get("cases", [])
    if cases:
        w("#### Forward + backward: poly vs exact vs PyTorch SDPA, 8 heads, M = score bound of the inputs")
        w("")
        w("| L | d_head | method | g | k | M | dtype | time | TFLOP/s |")
        w("|---:|---:|---|---:|---:|---:|---|---:|---:|")
        for c in sorted(cases, key=lambda c: (c["d_head"], c["L"], c["method"], c.get("degree", 0))):
            t = _ms(c)
            cell = f"{_f(t)} ms" if t is not None else c.get("error", "–")[:60]
            w(f"| {c['L']} | {c['d_head']} | {c['method']} | {c.get('degree', '–')} | {c.get('k', '–')} | "
              f"{c['M']:g} | {c['dtype']} | {cell} | {_f(c.get('tflops'))} |")
        w("")
        target = [c for c in cases if c.get("target")]
        if target and _ms(target[0]) is not None:
            t = _ms(target[0])
            c = target[0]
            w(f"- Target, poly d_head {c['d_head']}, g {c['degree']}, {c['heads']} heads, L {c['L']}, forward + "
              f"backward <= {TARGET_MS:g} ms: {t:.3g} ms -> {'met' if t <= TARGET_MS else 'MISSED'}.")
    best = max((c["gbps"] for c in feats if "gbps" in c), default=None)
    if best and copy:
        w(f"- Feature map at >= {100 * FEATURE_SHARE:.0f} % of the copy bandwidth: best {100 * best / copy:.0f} % "
          f"-> {'met' if best >= FEATURE_SHARE * copy else 'MISSED'}.")
    return "\n".join(lines).rstrip() + "\n"


def update(path: pathlib.Path, section: str) -> None:
    """Replace the text between :data:`START` and :data:`END` in ``path`` by ``section``."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{section}{END}{tail}")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="output folder of gpu_run.sh (with gpu.json)")
    ap.add_argument("--update", metavar="BENCHMARKS_MD", help="rewrite the GPU section of this file")
    args = ap.parse_args(argv)
    d = pathlib.Path(args.dir)
    if not (d / "gpu.json").exists():
        ap.error(f"{d / 'gpu.json'} does not exist: run asv_bench/gpu_run.sh first")
    results = json.loads((d / "gpu.json").read_text())
    read = (lambda name: (d / name).read_text() if (d / name).exists() else "")
    section = markdown(results, read("tests.txt"), read("stages.txt"))
    if args.update:
        update(pathlib.Path(args.update), section)
    else:
        sys.stdout.write(section)
    return section


if __name__ == "__main__":
    main()
