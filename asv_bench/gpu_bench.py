"""The GPU benchmark of gpulora in one bounded run: ceilings, feature map, stage breakdown, poly vs exact vs
PyTorch SDPA. Driven by ``asv_bench/gpu_run.sh``; writes JSON (one file per stage) under ``--out``.

Usage::

    python asv_bench/gpu_bench.py --out DIR [--stages a,b,...] [--budget SECONDS] [--dry-run]
    python asv_bench/gpu_bench.py --stage NAME --out DIR [--deadline UNIX_TIME] [--dry-run]

The first form runs every stage (``STAGES``) in its own subprocess with its own timeout (a share of
``--budget``), so a slow or hung stage cannot eat the others' time; a stage that times out or fails is
recorded with what it had written. The second form runs one stage in this process.

Timing (:func:`cuda_time`): CUDA events around each call, the L2 cache flushed before every sample (a
write of a buffer of twice its size), one warm-up call, then samples until ``min_time`` or ``max_samples``;
the median and the minimum are kept. ``--dry-run`` runs the same code on NumPy (and CPU PyTorch where
installed) at tiny sizes, with ``time.perf_counter`` and no flush: it checks the driver, not the machine.

Every case states its score bound ``M`` (the inputs are scaled so that ``beta max|q_i| max|k_j| = M``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without an install

# stage -> share of the budget (the shares sum to 1)
STAGES = {"device": 0.10, "features": 0.12, "products": 0.12, "stages": 0.16, "compare": 0.50}
BOUND = 1.0  # score bound M of every poly problem here (the bounded regime the polynomial method is for)
HEADS = 8


class Env:
    """The array module, the timer and the sizes of one run (GPU, or the NumPy dry run)."""

    def __init__(self, dry_run: bool):
        self.dry = dry_run
        if dry_run:
            self.xp = np
            self.torch_device = "cpu"
        else:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device")
            self.xp = cupy
            self.torch_device = "cuda"
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            l2 = int(props.get("l2CacheSize", 64 << 20))
            self._flush = cupy.empty(max(2 * l2, 1 << 24) // 4, dtype=cupy.float32)
        # sizes: the brief's grid on a GPU, toy sizes in the dry run
        self.lengths = [256, 512] if dry_run else [4096, 16384, 65536, 131072]
        self.exact_max_L = 512 if dry_run else 16384
        self.d_heads = [4, 8] if dry_run else [16, 64]
        self.degrees = [1, 2]
        self.target = (512, 8, 2) if dry_run else (65536, 64, 2)  # (L, d_head, g) of the 50 ms target
        # (L, k, p = q) of the low-rank products: d_head 16 at g 2 and 3 (p = 1 + d_head, as in the chain's
        # grids), d_head 64 at g 2
        self.products = [(64, 15, 5)] if dry_run else [(65536, 153, 17), (65536, 969, 17), (8192, 2145, 65)]

    def flush_l2(self):
        if not self.dry:
            self._flush.fill(0)

    def sync(self):
        if not self.dry:
            self.xp.cuda.get_current_stream().synchronize()


def cuda_time(env: Env, fn, *, min_time=0.3, max_samples=10, min_samples=3) -> dict:
    """Seconds per call of ``fn``: median and min over samples, L2 flushed before each (CUDA events)."""
    fn()
    env.sync()
    times = []
    spent = 0.0
    while len(times) < max_samples and (len(times) < min_samples or spent < min_time):
        env.flush_l2()
        if env.dry:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        else:
            start, end = env.xp.cuda.Event(), env.xp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = env.xp.cuda.get_elapsed_time(start, end) / 1e3
        times.append(dt)
        spent += dt
    return {"median_s": statistics.median(times), "min_s": min(times), "samples": len(times)}


def torch_time(env: Env, torch, fn, **kw) -> dict:
    """:func:`cuda_time` for PyTorch work (synchronised through torch on CUDA)."""
    if env.dry:
        return cuda_time(env, fn, **kw)

    def synced():
        fn()

    res = cuda_time(env, synced, **kw)
    torch.cuda.synchronize()
    return res


# ------------------------------------------------------------------------------------------ problems


def bounded_qkvy(env: Env, L, d, heads=HEADS, dtype="float32", bound=BOUND, seed=0):
    """``q, k, v, y`` of shape ``(1, heads, L, d)`` in ``env.xp`` with ``beta max|q| max|k| = bound``."""
    rng = np.random.default_rng(seed)
    q, k, v, y = (rng.standard_normal((1, heads, L, d)).astype(dtype) for _ in range(4))
    beta = 1 / math.sqrt(d)
    c = math.sqrt(bound / (beta * float(np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max())))
    q *= c
    k *= c
    return [env.xp.asarray(a) for a in (q, k, v, y)], beta


def poly_choice(degree, dtype="float32"):
    from gpulora.poly.coefficients import choose

    return choose(BOUND, degree=degree, dtype=np.dtype(dtype))


# ------------------------------------------------------------------------------------------ stages


def stage_device(env: Env, out: dict, deadline: float):
    """Device, versions, and the ceilings: copy bandwidth and cuBLAS GEMM rates (fp32, tf32)."""
    info = {"python": platform.python_version(), "numpy": np.__version__, "dry_run": env.dry}
    for mod in ("cupy", "numba", "numba_cuda", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # not installed, or broken: say so
            info[mod] = f"unavailable ({type(err).__name__})"
    if not env.dry:
        cp = env.xp
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        info.update(device=name.decode() if isinstance(name, bytes) else str(name),
                    compute_capability=dev.compute_capability, memory_gib=props["totalGlobalMem"] / 2**30,
                    l2_mib=props.get("l2CacheSize", 0) / 2**20, sms=props.get("multiProcessorCount"),
                    driver=cp.cuda.runtime.driverGetVersion(), runtime=cp.cuda.runtime.runtimeGetVersion())
    else:
        info["device"] = f"CPU dry run ({platform.processor() or platform.machine()})"
    out["info"] = info
    xp = env.xp
    n = (1 << 16) if env.dry else (1 << 28)  # 1 GiB of float32 on the GPU
    a = xp.ones(n, dtype=xp.float32)
    b = xp.empty_like(a)

    def copy():
        b[...] = a

    t = cuda_time(env, copy)
    out["copy"] = {"bytes": 2 * 4 * n, **t, "gbps": 2 * 4 * n / t["median_s"] / 1e9}
    m = 256 if env.dry else 8192
    x = xp.asarray(np.random.default_rng(0).standard_normal((m, m)).astype(np.float32))
    t = cuda_time(env, lambda: x @ x)
    out["gemm_fp32"] = {"n": m, **t, "tflops": 2 * m**3 / t["median_s"] / 1e12}
    try:
        import torch

        tx = torch.randn(m, m, device=env.torch_device)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            t = torch_time(env, torch, lambda: tx @ tx)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out["gemm_tf32"] = {"n": m, **t, "tflops": 2 * m**3 / t["median_s"] / 1e12}
    except Exception as err:
        out["gemm_tf32"] = {"error": f"{type(err).__name__}: {err}"}


def stage_features(env: Env, out: dict, deadline: float):
    """The feature map alone (the Numba kernel on CuPy): GB/s of its compulsory traffic vs the copy."""
    from gpulora import cost
    from gpulora.poly.features import feature_scales, monomial_features
    from gpulora.poly.monomials import monomial_table

    L = env.target[0]
    rows = []
    out["cases"] = rows
    for d in env.d_heads:
        for g in env.degrees:
            if time.time() > deadline:
                return
            case = {"L": L, "heads": HEADS, "d_head": d, "degree": g, "M": BOUND}
            rows.append(case)
            try:
                (q, _, _, _), beta = bounded_qkvy(env, L, d)
                choice, _ = poly_choice(g)
                table = monomial_table(d, g)
                scale = env.xp.asarray(feature_scales(choice.coef, d, "query").astype(np.float32))
                qs = beta * q
                t = cuda_time(env, lambda: monomial_features(qs, table, scale))
                nbytes = HEADS * cost.feature_map_bytes(L, d, table.k, 4)
                case.update(k=table.k, **t, bytes=nbytes, gbps=nbytes / t["median_s"] / 1e9)
                # the same call on one row: the fixed cost of a call (host work, launch), which the GB/s
                # above include; the rate net of it is the kernel's
                one = qs[..., :1, :]
                fixed = cuda_time(env, lambda: monomial_features(one, table, scale))["median_s"]
                net = t["median_s"] - fixed
                case.update(fixed_s=fixed, net_gbps=nbytes / net / 1e9 if net > 0 else None)
            except Exception as err:
                case["error"] = f"{type(err).__name__}: {err}"


def stage_products(env: Env, out: dict, deadline: float):
    """The two low-rank products alone, ``kron_contract`` and ``kron_readout``, 8 heads, float32 and float64:
    the fused Numba kernels (``gpulora.kernels``, what ``GPULORA_FUSED_PRODUCTS=1`` selects) against their
    twins in :mod:`gpulora.poly.products` (blocks of Kronecker rows through cuBLAS, the default). The
    comparison that sets :func:`gpulora.kernels.use_fused_products` (module docstring of
    ``kernels/kron.py``). The dry run times the twins on NumPy and records why the kernels cannot run."""
    from gpulora import cost, kernels
    from gpulora.poly import products

    xp = env.xp
    rows = []
    out["cases"] = rows
    rng = np.random.default_rng(0)
    for L, k, p in env.products:
        for dtype in ("float32", "float64"):
            # features in [0, 1) and unit-scale factors: the values do not change the time
            psi, a, b = (xp.asarray(rng.random((HEADS, L, n)).astype(dtype)) for n in (k, p, p))
            t = xp.asarray(rng.standard_normal((HEADS, k, p, p)).astype(dtype))
            for op in ("contract", "readout"):
                if time.time() > deadline:
                    out["truncated"] = True
                    return
                args = (psi, a, b) if op == "contract" else (psi, a, t)
                flops = HEADS * getattr(cost, f"kron_{op}_flops")(L, k, p, p)
                row = {"L": L, "heads": HEADS, "k": k, "p": p, "q": p, "dtype": dtype, "op": op}
                rows.append(row)
                for path, fn in (("cublas", getattr(products, f"kron_{op}_reference")),
                                 ("fused", getattr(kernels, f"kron_{op}"))):
                    if path == "fused" and not kernels.available():
                        row[path] = {"error": "needs CuPy, numba-cuda and a CUDA device"}
                        continue
                    try:
                        res = cuda_time(env, lambda fn=fn: fn(*args), min_time=0.1, max_samples=3)
                        row[path] = {**res, "tflops": flops / res["median_s"] / 1e12}
                    except Exception as err:
                        row[path] = {"error": f"{type(err).__name__}: {err}"}
                _write_partial(out)
            del psi, a, b, t
            if not env.dry:
                xp.get_default_memory_pool().free_all_blocks()


def stage_stages(env: Env, out: dict, deadline: float):
    """Per-stage breakdown of one poly call at the target shape, along :mod:`gpulora.poly.chain`'s three
    streamed passes: the feature maps alone; pass 1 (key features, key states ``Psi^T V``, ``T_K``); pass 2
    (query features, output and ``dQ`` readout, query states ``T_Q``); pass 3 (``dK``, ``dV`` readout); the
    run-time checks; the whole call; and passes 1, 2 and the call again with the states in the form
    :func:`gpulora.poly.chain.lift_states` did not pick (lifted or Kronecker)."""
    from gpulora.poly import chain
    from gpulora.poly.features import feature_scales, monomial_features
    from gpulora.poly.monomials import monomial_table

    L, d, g = env.target
    xp = env.xp
    (q, k, v, y), beta = bounded_qkvy(env, L, d)
    choice, compute = poly_choice(g)
    cdt = getattr(xp, np.dtype(compute).name)
    table = monomial_table(d, g)
    sq = xp.asarray(feature_scales(choice.coef, d, "query").astype(np.dtype(compute)))
    sk = xp.asarray(feature_scales(choice.coef, d, "key").astype(np.dtype(compute)))
    qs = beta * q
    out.update(L=L, heads=HEADS, d_head=d, degree=g, k=table.k, M=BOUND, compute=str(np.dtype(compute)))
    parts = {}
    out["parts"] = parts

    def measure(name, fn):
        if time.time() > deadline:
            parts[name] = {"error": "stage deadline reached"}
            return
        try:
            parts[name] = cuda_time(env, fn, max_samples=5)
        except Exception as err:
            parts[name] = {"error": f"{type(err).__name__}: {err}"}
        _write_partial(out)

    state = {}

    def pass1():
        state["keys"] = chain.key_pass(k, v, choice, compute_dtype=cdt)

    def pass2():
        state["rows"], state["queries"] = chain.query_pass(q, state["keys"], beta, choice, y=y)

    def pass3():
        chain.key_grad_pass(k, v, state["queries"], beta, choice)

    measure("features (q and k)", lambda: (monomial_features(qs, table, sq), monomial_features(k, table, sk)))
    measure("pass 1: key states", pass1)
    measure("pass 2: queries, output, dQ", pass2)
    measure("pass 3: dK, dV", pass3)
    measure("checks", lambda: chain.check_extreme_pairs(qs, k, choice))
    measure("total", lambda: chain.loss_and_grads(q, k, v, y, beta, choice, cdt))
    # the other form of the states (chain.lift_states picks by chain.LIFT_ELEMENTWISE["cupy"]): both measured
    # here set that constant from data
    forced = not chain.lift_states(d, g, d, cupy=True)
    label = "lifted" if forced else "Kronecker"
    picked = chain.lift_states
    chain.lift_states = lambda *a, **kw: forced
    try:
        measure(f"pass 1: key states, {label}", pass1)
        measure(f"pass 2: queries, output, dQ, {label}", pass2)
        measure(f"total, {label} states", lambda: chain.loss_and_grads(q, k, v, y, beta, choice, cdt))
    finally:
        chain.lift_states = picked


def _torch_sdpa(env, torch, arrays, beta, dtype, backend_name):
    """Forward + backward of ``0.5 ||SDPA(q, k, v) - y||^2`` in ``dtype`` with the SDPA ``backend_name``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (torch.as_tensor(np.asarray(_host(a)), device=env.torch_device).to(dtype).requires_grad_()
                  for a in arrays[:3])
    ty = torch.as_tensor(np.asarray(_host(arrays[3])), device=env.torch_device).to(dtype)
    kind = getattr(SDPBackend, backend_name)

    def run():
        for t in (tq, tk, tv):
            t.grad = None
        with sdpa_kernel(kind):
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=beta)
        (0.5 * ((o.float() - ty.float()) ** 2).sum()).backward()

    return run


def _host(a):
    from gpulora import backend

    return backend.to_numpy(a)


def stage_compare(env: Env, out: dict, deadline: float):
    """Poly vs exact vs PyTorch SDPA (flash, bf16; efficient, fp32), forward + backward, 8 heads."""
    from gpulora import cost
    from gpulora.exact import attention
    from gpulora.poly import chain

    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    out["cases"] = rows
    xp = env.xp
    L_t, d_t, g_t = env.target
    # the target case first, so that it is measured whatever the deadline leaves
    order = [(L_t, d_t)] + [(L, d) for d in env.d_heads for L in env.lengths if (L, d) != (L_t, d_t)]
    for L, d in order:
        if time.time() > deadline:
            out["truncated"] = True
            return
        (q, k, v, y), beta = bounded_qkvy(env, L, d)
        base = {"L": L, "heads": HEADS, "d_head": d, "M": BOUND}
        exact_flops = HEADS * cost.exact_flops(L, d, d)
        for g in env.degrees:
            row = {**base, "method": "poly", "degree": g, "dtype": "float32"}
            rows.append(row)
            try:
                choice, compute = poly_choice(g)
                kf = choice.features(d)
                cdt = getattr(xp, np.dtype(compute).name)
                t = cuda_time(env, lambda: chain.loss_and_grads(q, k, v, y, beta, choice, cdt), max_samples=5)
                flops = HEADS * cost.poly_flops(L, d, d, kf)
                row.update(k=kf, compute=str(np.dtype(compute)), **t, tflops=flops / t["median_s"] / 1e12,
                           target=(L, d, g) == (L_t, d_t, g_t))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
            _write_partial(out)
        if L <= env.exact_max_L and time.time() < deadline:
            row = {**base, "method": "exact", "dtype": "float32"}
            rows.append(row)
            try:
                t = cuda_time(env, lambda: attention.loss_and_grads(q, k, v, y, beta), max_samples=3)
                row.update(**t, tflops=exact_flops / t["median_s"] / 1e12)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
        if torch is None:
            continue
        variants = [("EFFICIENT_ATTENTION", "float32")] if env.dry else [("FLASH_ATTENTION", "bfloat16"),
                                                                         ("EFFICIENT_ATTENTION", "float32")]
        for kind, dt in variants:
            if time.time() > deadline:
                break
            row = {**base, "method": f"torch_sdpa_{kind.split('_')[0].lower()}", "dtype": dt}
            rows.append(row)
            try:
                run = _torch_sdpa(env, torch, (q, k, v, y), beta, getattr(torch, dt),
                                  "MATH" if env.dry else kind)
                t = torch_time(env, torch, run, max_samples=5)
                row.update(**t, tflops=exact_flops / t["median_s"] / 1e12)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
        _write_partial(out)
        del q, k, v, y
        if not env.dry:
            xp.get_default_memory_pool().free_all_blocks()


# ------------------------------------------------------------------------------------------ driver

_PARTIAL: dict = {}


def _write_partial(out):
    """Write what a stage has so far (a later timeout keeps it)."""
    path = _PARTIAL.get("path")
    if path:
        pathlib.Path(path).write_text(json.dumps(out, indent=1, default=str))


def run_stage(name: str, out_dir: pathlib.Path, deadline: float, dry_run: bool) -> dict:
    """Run stage ``name`` in this process; write ``out_dir/name.json``; return its dict."""
    out = {"stage": name, "started": time.time()}
    path = out_dir / f"{name}.json"
    _PARTIAL["path"] = str(path)
    try:
        env = Env(dry_run)
        globals()[f"stage_{name}"](env, out, deadline)
        out["status"] = "ok"
    except Exception as err:
        out["status"] = "error"
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc(limit=8)
    out["seconds"] = time.time() - out["started"]
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


def run_all(stages, out_dir: pathlib.Path, budget: float, dry_run: bool) -> dict:
    """Each stage in a subprocess with ``budget * share`` seconds (unused time passes on to later stages)."""
    t0 = time.time()
    summary = {"budget_s": budget, "stages": {}}
    total_share = sum(STAGES[s] for s in stages)
    left_share = total_share
    for name in stages:
        remaining = budget - (time.time() - t0)
        limit = max(5.0, remaining * STAGES[name] / left_share)
        left_share -= STAGES[name]
        # the stage starts no new case after its soft deadline (80 % of its time: room for the last case
        # to finish); the hard timeout kills it at its limit
        soft = time.time() + 0.8 * limit
        cmd = [sys.executable, __file__, "--stage", name, "--out", str(out_dir), "--deadline", f"{soft:.0f}"]
        if dry_run:
            cmd.append("--dry-run")
        start = time.time()
        try:
            proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            log = proc.stdout[-4000:] + proc.stderr[-4000:]
        except subprocess.TimeoutExpired as err:
            status, log = "timeout", f"killed after {limit:.0f} s\n" + str(err.stderr or "")[-4000:]
        (out_dir / f"{name}.log").write_text(log)
        summary["stages"][name] = {"status": status, "seconds": time.time() - start, "limit_s": limit}
        print(f"gpu_bench: stage {name}: {status} in {time.time() - start:.0f} s (limit {limit:.0f} s)",
              flush=True)
    results = {"summary": summary}
    for name in stages:
        path = out_dir / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else {"status": "missing"}
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    from gpu_report import markdown  # noqa: E402  (beside this file)

    (out_dir / "gpu.md").write_text(markdown(results))
    return results


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "./gpu-results"), help="output folder")
    ap.add_argument("--stage", choices=sorted(STAGES), help="run this one stage in this process")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages (default: all)")
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for all stages together")
    ap.add_argument("--deadline", type=float, default=None, help="(with --stage) unix time to stop by")
    ap.add_argument("--dry-run", action="store_true", help="NumPy and CPU PyTorch at toy sizes: check the driver")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {sorted(STAGES)}")
    if not args.budget > 0:
        ap.error(f"--budget must be > 0, got {args.budget}")
    args.stage_list = stages
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    if args.stage:
        deadline = args.deadline if args.deadline is not None else time.time() + args.budget
        res = run_stage(args.stage, out_dir, deadline, args.dry_run)
        return 0 if res["status"] == "ok" else 1
    res = run_all(args.stage_list, out_dir, args.budget, args.dry_run)
    return 0 if all(s["status"] == "ok" for s in res["summary"]["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
