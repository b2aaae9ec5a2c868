"""Turn one asv results file of the gpulora suite into the markdown tables of BENCHMARKS.md.

Usage (from the repository root)::

    python asv_bench/report.py [RESULTS_JSON] [--out FILE]

``RESULTS_JSON`` defaults to the newest results file under ``asv_bench/.asv/results/`` (where asv writes);
the files BENCHMARKS.md quotes are kept under ``asv_bench/published/``. Reads the scaling study
(``bench_scaling``: ExactScaling, PolyScaling, PolyErrorScaling, CausalPolyScaling, TorchScaling; files
from before it existed carry the same data under ``bench_grad``/``bench_torch`` class names, which are
read as a fallback) at ``backend=numpy``, ``targets=qkv``, ``dtype=float64`` and prints: time over L for
exact, PyTorch and poly with the poly error beside it; the score bound ``M`` and the exact ``max |S|`` of
the inputs; time ratios when L quadruples; least-squares scaling exponents (log time on log L); the
crossover ``L*`` where poly becomes faster than exact; peak memory; effective flop rates (flops from
:mod:`gpulora.cost` over the measured median time); and the acceptance checks of issue 5. Nothing here is
measured or hard-coded: every figure comes from the results file, except ``M`` for files that predate
``track_score_bound``, where it is the suite's construction value (``SCORE_BOUND = 1``), marked "(set)".
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import pathlib
import sys

import numpy as np

from gpulora import cost
from gpulora.poly.monomials import feature_dim

HERE = pathlib.Path(__file__).resolve().parent
SEL = {"backend": "numpy", "targets": "qkv", "dtype": "float64"}
ACCEPT_L, ACCEPT_D, ACCEPT_G = 65536, 4, 4  # memory acceptance point (issue 5)
SPEEDUP_L, SPEEDUP_D = 8192, 4


def load(path):
    """``{benchmark: {params dict as a sorted tuple: (value, q25, q75)}}`` from an asv results file."""
    data = json.loads(pathlib.Path(path).read_text())
    cols = data["result_columns"]
    out = {}
    for name, row in data["results"].items():
        row = row + [None] * (len(cols) - len(row))
        rec = dict(zip(cols, row))
        params = [[ast.literal_eval(v) for v in p] for p in rec["params"]]
        names = _param_names(name, len(params))
        q25 = rec.get("stats_q_25") or [None] * len(rec["result"])
        q75 = rec.get("stats_q_75") or [None] * len(rec["result"])
        table = {}
        for combo, value, a, b in zip(itertools.product(*params), rec["result"], q25, q75):
            table[tuple(sorted(zip(names, combo)))] = (value, a, b)
        out[name] = table
    return data, out


_GRAD = ["backend", "L", "d_head", "targets", "dtype"]
_POLY = ["backend", "L", "d_head", "degree", "targets", "dtype"]
_CAUSAL = ["backend", "L", "d_head", "degree", "dtype"]
_REAL = ["backend", "L", "dtype"]
_NAMES = {
    "RealHeadLike": _REAL,
    "ExactGrad": _GRAD, "ExactScaling": _GRAD, "TorchGrad": _GRAD, "TorchScaling": _GRAD,
    "PolyGrad": _POLY, "PolyScaling": _POLY, "PolyError": _POLY, "PolyErrorScaling": _POLY,
    "CausalPolyGrad": _CAUSAL, "CausalPolyScaling": _CAUSAL,
    "PolyVsTorch": _POLY, "PolyVsTorchScaling": _POLY,
    "BridgeStep": ["backend", "L", "impl", "causal"], "BridgeStepScaling": ["backend", "L", "impl", "causal"],
}


def _param_names(name, n):
    cls = name.split(".")[-2]
    names = _NAMES.get(cls)
    return names if names and len(names) == n else [f"p{i}" for i in range(n)]


def get(res, bench, base=SEL, **kw):
    """Median (or tracked value) of ``bench`` at ``base`` (default :data:`SEL`) updated with ``kw``; None if
    absent or skipped."""
    want = {**base, **kw}
    for key, (value, _, _) in res.get(bench, {}).items():
        d = dict(key)
        if all(d.get(k, v) == v for k, v in want.items()) and value is not None:
            if isinstance(value, float) and math.isnan(value):
                return None
            return value
    return None


def axis(res, bench, name):
    vals = set()
    for key in res.get(bench, {}):
        d = dict(key)
        if all(d.get(k, v) == v for k, v in SEL.items()):
            vals.add(d[name])
    return sorted(vals)


def fit(Ls, ts):
    """Least-squares slope and intercept of ``log t`` on ``log L`` (None with fewer than 2 points)."""
    pts = [(math.log(L), math.log(t)) for L, t in zip(Ls, ts) if t]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    slope, icept = np.polyfit(x, y, 1)
    return float(slope), float(icept)


def fmt_t(t):
    if t is None:
        return "–"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def fmt(x, spec=".3g", none="–"):
    return none if x is None else format(x, spec)


# Roles of the report -> "Class.method"; the scaling class first, its pre-bench_scaling name as fallback.
_CLASSES = {"Exact": ("bench_scaling.ExactScaling", "bench_grad.ExactGrad"),
            "Poly": ("bench_scaling.PolyScaling", "bench_grad.PolyGrad"),
            "Error": ("bench_scaling.PolyErrorScaling", "bench_grad.PolyError"),
            "Causal": ("bench_scaling.CausalPolyScaling", "bench_grad.CausalPolyGrad"),
            "Torch": ("bench_scaling.TorchScaling", "bench_torch.TorchGrad")}
T_EXACT, T_POLY, T_TORCH = "Exact.time_lora_grad", "Poly.time_lora_grad", "Torch.time_lora_grad"
ERR = "Error.track_rel_error_poly_vs_exact"
T_CAUSAL = "Causal.time_lora_grad"
ERR_CAUSAL = "Causal.track_rel_error_poly_vs_exact"
MEM_POLY, MEM_EXACT = "Poly.peakmem_lora_grad", "Exact.peakmem_lora_grad"
ALLOC_POLY = "Poly.track_alloc_lora_grad"
BOUND, MAX_SCORE = "Poly.track_score_bound", "Exact.track_max_score"
SUITE_BOUND = 1.0  # common.SCORE_BOUND, the M every problem of the scaling study is built with


def resolve(res):
    """``res`` keyed by role (``"Poly.time_lora_grad"`` ...): each role's scaling-class results, or its
    fallback class's where the file has no scaling class."""
    out = dict(res)
    for role, names in _CLASSES.items():
        for cls in names:
            found = {name[len(cls) + 1:]: v for name, v in res.items() if name.startswith(cls + ".")}
            if found:
                out.update({f"{role}.{m}": v for m, v in found.items()})
                break
    return out


def bound_cells(res, L, d, g=None):
    """``(M, max |S|)`` cells of the inputs at ``L``, ``d_head``: tracked values, or the suite's M "(set)"."""
    kw = {"L": L, "d_head": d} | ({"degree": g} if g is not None else {})
    m = get(res, BOUND, **kw)
    ms = get(res, MAX_SCORE, L=L, d_head=d)
    return (fmt(m, ".3g") if m is not None else f"{SUITE_BOUND:g} (set)"), fmt(ms, ".3g")


def realhead(data, res) -> str:
    """The real-head table (``bench_realhead.RealHeadLike``): the M = 8 case where poly correctly loses."""
    lines = []
    w = lines.append
    rh = "bench_realhead.RealHeadLike."
    keys = sorted({(dict(k)["L"], dict(k)["dtype"]) for k in res.get(rh + "time_auto", {})})
    if keys:
        w("#### Real-head-like LoRA problem (4 heads, d_head 16, M = 8): poly correctly loses\n")
        w("| L | dtype | M | max \\|S\\| | auto | exact | auto ran poly | features poly needs | "
          "est. poly / exact |")
        w("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for L, dt in keys:
            kw = {"backend": "numpy", "L": L, "dtype": dt}
            ran = get(res, rh + "track_auto_ran_poly", **kw)
            w(f"| {L} | {dt} | {fmt(get(res, rh + 'track_score_bound', **kw))} | "
              f"{fmt(get(res, rh + 'track_max_score', **kw))} | {fmt_t(get(res, rh + 'time_auto', **kw))} | "
              f"{fmt_t(get(res, rh + 'time_exact', **kw))} | {'–' if ran is None else ('yes' if ran else 'no')} | "
              f"{fmt(get(res, rh + 'track_poly_features_needed', **kw), '.3g')} | "
              f"{fmt(get(res, rh + 'track_poly_over_exact_estimate', **kw), '.3g')} |")
    return "\n".join(lines) + "\n" if lines else ""


def _machine(data) -> str:
    """"asv machine `name` (cpu, cores, ram, os), commit `hash`, env `name`" of a results file."""
    m = data.get("params", {})
    info = ", ".join(str(m[k]) for k in ("cpu", "num_cpu", "ram", "os") if m.get(k))
    return (f"asv machine `{m.get('machine', '?')}`" + (f" ({info})" if info else "") +
            f", commit `{str(data.get('commit_hash'))[:10]}`, env `{data.get('env_name')}`")


def chain(data, res) -> str:
    """The poly chain beside PyTorch autograd of the same polynomial attention (``bench_chain.PolyVsTorch``
    and its scaling class): asv medians, the speed-up and GFLOP/s the class measures side by side in one
    process, and the square matmul of the same dtype measured in the same run."""
    lines = []
    w = lines.append
    for cls in ("bench_chain.PolyVsTorch.", "bench_scaling.PolyVsTorchScaling."):
        keys = sorted({tuple(dict(k)[n] for n in ("L", "d_head", "degree", "targets", "dtype"))
                       for k in res.get(cls + "time_gpulora_poly", {})})
        if not keys:
            continue
        w(f"#### `{cls[:-1]}`: poly against PyTorch autograd of the same polynomial attention\n")
        w(f"{_machine(data)}. Times are asv medians; the speed-up and rates are best-of timings taken side by "
          "side in one process (`track_speedup_vs_torch_poly`, `track_gflops_*`). GFLOP/s counts the chain formula's flops "
          "(`gpulora.cost.poly_flops`); matmul is a 1024 x 1024 product of the same dtype in the same run.\n")
        w("| L | d_head | g | k | targets | dtype | M | gpulora poly | PyTorch, same polynomial | speed-up | "
          "poly GFLOP/s | matmul GFLOP/s | fraction |")
        w("|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for L, d, g, t, dt in keys:
            kw = {"backend": "numpy", "L": L, "d_head": d, "degree": g, "targets": t, "dtype": dt}

            def val(m, kw=kw):
                return get(res, cls + m, **kw)

            w(f"| {L} | {d} | {g} | {feature_dim(d, g)} | {t} | {dt} | {fmt(val('track_score_bound'))} | "
              f"{fmt_t(val('time_gpulora_poly'))} | {fmt_t(val('time_torch_poly_autograd'))} | "
              f"{fmt(val('track_speedup_vs_torch_poly'), '.2f')}x | {fmt(val('track_gflops_poly'))} | "
              f"{fmt(val('track_gflops_matmul'))} | {fmt(val('track_fraction_of_matmul'), '.2f')} |")
        w("")
    return "\n".join(lines)


def bridge(data, res) -> str:
    """One attention layer through the PyTorch bridge against SDPA (``bench_bridge.BridgeStep`` and its
    scaling class): asv medians of one forward + backward and the ratio to SDPA timed side by side."""
    lines = []
    w = lines.append
    for cls in ("bench_bridge.BridgeStep.", "bench_scaling.BridgeStepScaling."):
        keys = sorted({(dict(k)["L"], dict(k)["causal"], dict(k)["impl"]) for k in res.get(cls + "time_step", {})
                       if dict(k)["backend"] == "numpy"})
        if not keys:
            continue
        w(f"#### `{cls[:-1]}`: one 12-head layer (d_head 32, float32), forward + backward, against SDPA\n")
        w(f"{_machine(data)}. Times are asv medians; the ratio is best-of timings of the implementation and "
          "SDPA taken side by side in one process (`track_step_ratio`).\n")
        w("| L | causal | implementation | M | max \\|S\\| | step | ratio to SDPA |")
        w("|---:|---|---|---:|---:|---:|---:|")
        for L, causal_, impl in keys:
            kw = {"backend": "numpy", "L": L, "impl": impl, "causal": causal_}

            def val(m, kw=kw):
                return get(res, cls + m, base={}, **kw)

            w(f"| {L} | {causal_} | {impl} | {fmt(val('track_score_bound'))} | {fmt(val('track_max_score'))} | "
              f"{fmt_t(val('time_step'))} | {fmt(val('track_step_ratio'), '.2f')}x |")
        w("")
    return "\n".join(lines)


def report(data, res) -> str:
    if not any(name.startswith(tuple(c + "." for names in _CLASSES.values() for c in names)) for name in res):
        # a file with the real-head or chain benchmarks only
        return "\n".join(part for part in (realhead(data, res), chain(data, res), bridge(data, res)) if part)
    res = resolve(res)
    lines = []
    w = lines.append
    w(f"{_machine(data)}; backend numpy, targets qkv, float64, d_model 16, r 4, d_v = d_head, score bound "
      "M = 1. Times are asv "
      "medians of 3..10 samples (one call each); the machine was shared with other jobs, so expect "
      "±20 % noise, more on the largest calls.\n")
    Ls = axis(res, T_POLY, "L")
    ds = axis(res, T_POLY, "d_head")
    gs = axis(res, T_POLY, "degree")
    summary = []
    for d, g in itertools.product(ds, gs):
        k = feature_dim(d, g)
        w(f"\n#### d_head = {d}, degree g = {g} (k = {k} features)\n")
        w("| L | M | max \\|S\\| | exact | PyTorch SDPA | poly | exact / poly | poly rel. error | poly t(L) / t(L/4) |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        te, tt, tp = {}, {}, {}
        for L in Ls:
            te[L] = get(res, T_EXACT, L=L, d_head=d)
            tt[L] = get(res, T_TORCH, L=L, d_head=d)
            tp[L] = get(res, T_POLY, L=L, d_head=d, degree=g)
            err = get(res, ERR, L=L, d_head=d, degree=g)
            ratio = tp[L] / tp[L // 4] if tp.get(L // 4) and tp[L] else None
            sp = te[L] / tp[L] if te[L] and tp[L] else None
            m_cell, ms_cell = bound_cells(res, L, d, g)
            w(f"| {L} | {m_cell} | {ms_cell} | {fmt_t(te[L])} | {fmt_t(tt[L])} | {fmt_t(tp[L])} | "
              f"{fmt(sp, '.3g')} | {fmt(err, '.2e')} | {fmt(ratio, '.2f')} |")
        fe = fit(*zip(*[(L, t) for L, t in te.items() if t])) if any(te.values()) else None
        ft = fit(*zip(*[(L, t) for L, t in tt.items() if t])) if any(tt.values()) else None
        fp = fit(*zip(*[(L, t) for L, t in tp.items() if t])) if any(tp.values()) else None
        big = [(L, t) for L, t in tp.items() if t and L >= 8192]
        fp_big = fit(*zip(*big)) if len(big) >= 2 else None
        ratios = [tp[L] / tp[L // 4] for L in Ls if tp.get(L // 4) and tp.get(L)]
        # crossover: first measured L where poly < exact, and the intersection of the two fitted power laws
        measured = [L for L in Ls if te.get(L) and tp.get(L) and tp[L] < te[L]]
        first = measured[0] if measured else None
        slower = [L for L in Ls if te.get(L) and tp.get(L) and tp[L] >= te[L]]
        star = None
        if fe and fp and fe[0] != fp[0]:
            star = math.exp((fp[1] - fe[1]) / (fe[0] - fp[0]))
        summary.append((d, g, k, fe, ft, fp, fp_big, ratios, first, slower, star))
    w("\n#### Scaling and crossover\n")
    w("Exponents: least squares of log time on log L over every measured L (exact and PyTorch: "
      "L <= 16384; poly: all L, and L >= 8192 alone). L*: the intersection of the fitted exact and poly "
      "power laws (an extrapolation where it lies outside the measured range), beside what was measured.\n")
    w("| d_head | g | k | exact exp. | PyTorch exp. | poly exp. (all L) | poly exp. (L >= 8192) | "
      "poly t(4L)/t(L): mean, max | L* (fit) | measured |")
    w("|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for d, g, k, fe, ft, fp, fp_big, ratios, first, slower, star in summary:
        rr = f"{np.exp(np.mean(np.log(ratios))):.2f}, {max(ratios):.2f}" if ratios else "–"
        if first is not None and not [L for L in slower if L > first]:
            meas = f"poly faster from L = {first}" + (f" (slower at {max(slower)})" if slower else
                                                      " (every measured L)")
        elif first is not None:
            meas = f"mixed: faster at {first}, slower at {[L for L in slower if L > first]}"
        else:
            meas = f"poly slower at every L <= {max(slower)}" if slower else "–"
        w(f"| {d} | {g} | {k} | {fmt(fe and fe[0], '.2f')} | {fmt(ft and ft[0], '.2f')} | "
          f"{fmt(fp and fp[0], '.2f')} | {fmt(fp_big and fp_big[0], '.2f')} | {rr} | "
          f"{fmt(star, '.3g')} | {meas} |")

    w("\n#### Peak memory of poly (host)\n")
    w("`peakmem` is asv's peak RSS of the benchmark process (interpreter, NumPy, gpulora and the inputs "
      "included); `alloc` is the peak of what the call itself allocates (tracemalloc).\n")
    w("| d_head | g | L | peakmem (RSS) | alloc of the call | exact peakmem (RSS) |")
    w("|---:|---:|---:|---:|---:|---:|")
    for d, g in itertools.product(ds, gs):
        for L in (Ls[-1],) if Ls else ():
            pm = get(res, MEM_POLY, L=L, d_head=d, degree=g)
            al = get(res, ALLOC_POLY, L=L, d_head=d, degree=g)
            Le = max([x for x in axis(res, MEM_EXACT, "L")] or [None])
            em = get(res, MEM_EXACT, L=Le, d_head=d) if Le else None
            w(f"| {d} | {g} | {L} | {fmt(pm and pm / 2**20, '.0f')} MiB | {fmt(al, '.1f')} MiB | "
              f"{fmt(em and em / 2**20, '.0f')} MiB (L = {Le}) |")

    w("\n#### Effective rates (flops of gpulora/cost.py over the median time, at the largest L)\n")
    w("| d_head | g | exact GFLOP/s (L) | poly GFLOP/s (L) |")
    w("|---:|---:|---:|---:|")
    rates = {"exact": [], "poly": []}
    for d, g in itertools.product(ds, gs):
        k = feature_dim(d, g)
        Le = max([L for L in Ls if get(res, T_EXACT, L=L, d_head=d)] or [0])
        Lp = max([L for L in Ls if get(res, T_POLY, L=L, d_head=d, degree=g)] or [0])
        re_ = cost.exact_flops(Le, d, d) / get(res, T_EXACT, L=Le, d_head=d) if Le else None
        rp = cost.poly_flops(Lp, d, d, k) / get(res, T_POLY, L=Lp, d_head=d, degree=g) if Lp else None
        if re_ and g == gs[0]:
            rates["exact"].append(re_)
        if rp:
            rates["poly"].append(rp)
        w(f"| {d} | {g} | {fmt(re_ and re_ / 1e9, '.2f')} ({Le}) | {fmt(rp and rp / 1e9, '.2f')} ({Lp}) |")
    for meth, vals in rates.items():
        if vals:
            w(f"\n{meth}: median {np.median(vals) / 1e9:.2f} GFLOP/s over {len(vals)} configurations "
              f"(min {min(vals) / 1e9:.2f}, max {max(vals) / 1e9:.2f}).")

    w("\n#### method=\"auto\" check: cost.RATES against these measurements\n")
    rn = cost.RATES["numpy"]
    agree, wrong = 0, []
    for d, g in itertools.product(ds, gs):
        k = feature_dim(d, g)
        for L in Ls:
            te, tp = get(res, T_EXACT, L=L, d_head=d), get(res, T_POLY, L=L, d_head=d, degree=g)
            if not (te and tp):
                continue
            pred = "poly" if cost.poly_flops(L, d, d, k) / rn["poly"] < cost.exact_flops(L, d, d) / rn["exact"] else "exact"
            if pred == ("poly" if tp < te else "exact"):
                agree += 1
            else:
                wrong.append(f"d_head {d}, g {g}, L {L}: predicted {pred} (measured exact {fmt_t(te)}, "
                             f"poly {fmt_t(tp)})")
    w(f"With RATES[\"numpy\"] = {rn}, the cheaper method is predicted correctly at {agree} of "
      f"{agree + len(wrong)} measured points" + (": wrong at " + "; ".join(wrong) + "." if wrong else "."))

    causal(res, w)

    w("\n#### Acceptance (issue 5)\n")
    ratios_all = {(d, g): r for d, g, _, _, _, _, _, r, _, _, _ in summary}
    for label, keep in ((f"d_head = {SPEEDUP_D}", lambda d: d == SPEEDUP_D), ("every d_head", lambda d: True)):
        worst = max(((max(r), d, g) for (d, g), r in ratios_all.items() if r and keep(d)), default=None)
        if worst:
            w(f"- 4x longer sequences cost at most ~6x time for poly ({label}): worst t(4L)/t(L) = "
              f"{worst[0]:.2f} (d_head {worst[1]}, g {worst[2]}) -> {'met' if worst[0] <= 6 else 'MISSED'}.")
    te8, = [get(res, T_EXACT, L=SPEEDUP_L, d_head=SPEEDUP_D)]
    for g in gs:
        tp8 = get(res, T_POLY, L=SPEEDUP_L, d_head=SPEEDUP_D, degree=g)
        if te8 and tp8:
            w(f"- poly several times faster than exact at L = {SPEEDUP_L}, d_head = {SPEEDUP_D}, g = {g}: "
              f"{te8 / tp8:.3g}x -> {'met' if te8 / tp8 >= 3 else 'MISSED'}.")
    pm = get(res, MEM_POLY, L=ACCEPT_L, d_head=ACCEPT_D, degree=ACCEPT_G)
    al = get(res, ALLOC_POLY, L=ACCEPT_L, d_head=ACCEPT_D, degree=ACCEPT_G)
    if pm:
        w(f"- peak memory at L = {ACCEPT_L} (d_head {ACCEPT_D}, g {ACCEPT_G}) under 512 MiB: peak RSS "
          f"{pm / 2**20:.0f} MiB (call's own allocations {fmt(al, '.1f')} MiB) -> "
          f"{'met' if pm < 512 * 2**20 else 'MISSED'}.")
    extra = realhead(data, res)
    return "\n".join(lines) + "\n" + ("\n" + extra if extra else "")


def causal(res, w):
    """Causal poly: time over L with the exact (non-causal here) time beside it, the 4x ratio, the error."""
    Ls = axis(res, T_CAUSAL, "L")
    if not Ls:
        return
    w("\n#### Causal poly (`lora_grad(method=\"poly\", causal=True)`, chunked prefix/suffix states)\n")
    w("Error: worst relative adapter-gradient error against the exact causal gradient.\n")
    w("| d_head | g | k | " + " | ".join(f"L = {L}" for L in Ls) + " | t(4L)/t(L): max | exponent | rel. error |")
    w("|---:|---:|---:|" + "---:|" * len(Ls) + "---:|---:|---|")
    for d, g in itertools.product(axis(res, T_CAUSAL, "d_head"), axis(res, T_CAUSAL, "degree")):
        t = {L: get(res, T_CAUSAL, L=L, d_head=d, degree=g) for L in Ls}
        ratios = [t[L] / t[L // 4] for L in Ls if t.get(L) and t.get(L // 4)]
        f = fit(*zip(*[(L, v) for L, v in t.items() if v])) if sum(1 for v in t.values() if v) >= 2 else None
        errs = [e for L in Ls if (e := get(res, ERR_CAUSAL, L=L, d_head=d, degree=g)) is not None]
        w(f"| {d} | {g} | {feature_dim(d, g)} | " + " | ".join(fmt_t(t[L]) for L in Ls) +
          f" | {fmt(max(ratios) if ratios else None, '.2f')} | {fmt(f[0] if f else None, '.2f')} | "
          f"{fmt(max(errs) if errs else None, '.2e')} |")


def newest_results():
    files = [p for p in (HERE / ".asv" / "results").glob("*/*.json") if p.name != "machine.json"]
    if not files:
        sys.exit("no asv results under asv_bench/.asv/results/: run asv first, or pass a file such as "
                 "asv_bench/published/cpu-2core/*.json (see BENCHMARKS.md)")
    return max(files, key=lambda p: p.stat().st_mtime)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", help="asv results JSON (default: the newest)")
    ap.add_argument("--out", help="write the markdown here instead of stdout")
    args = ap.parse_args(argv)
    data, res = load(args.results or newest_results())
    text = report(data, res)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
