"""Smoke test of the asv suite (asv_bench/): a broken benchmark fails the build.

``asv check`` validates discovery and signatures; then every benchmark class is set up and each of its
methods called once on its smallest parameter combination that is not skipped, directly (no asv). The
PyTorch baseline is checked once against gpulora's exact gradients in float64, so that it is the same
problem.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import math
import pathlib
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest

import gpulora
from gpulora.testing import make_problem, rel_error

ASV_DIR = pathlib.Path(__file__).resolve().parents[1] / "asv_bench"
BENCH_DIR = ASV_DIR / "benchmarks"
PACKAGE = "gpulora_asv_benchmarks"
MODULES = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
PREFIXES = ("time_", "peakmem_", "track_")


def _package():
    """The benchmarks directory imported by file path as package :data:`PACKAGE` (relative imports work)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, BENCH_DIR / "__init__.py",
                                                      submodule_search_locations=[str(BENCH_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def _module(name):
    _package()
    return importlib.import_module(f"{PACKAGE}.{name}")


def _benchmark_classes():
    for name in MODULES:
        mod = _module(name)
        for cls_name, cls in sorted(vars(mod).items()):
            if (isinstance(cls, type) and cls.__module__ == mod.__name__ and not cls_name.startswith("_")
                    and not inspect.isabstract(cls) and any(m.startswith(PREFIXES) for m in dir(cls))):
                yield pytest.param(mod, cls, id=f"{name}.{cls_name}")


def test_suite_has_benchmarks():
    assert {"bench_chain", "bench_grad", "bench_features", "bench_products", "bench_torch", "bench_scaling",
            "bench_realhead"} <= set(MODULES)
    assert len(list(_benchmark_classes())) >= 14


@pytest.mark.skipif(shutil.which("asv") is None and importlib.util.find_spec("asv") is None,
                    reason="asv is not installed")
def test_asv_check():
    cmd = [sys.executable, "-m", "asv", "check", "--python=same"]
    # asv drops PYTHONPATH from its benchmark processes and honours ASV_PYTHONPATH: pass on the folder this
    # gpulora was imported from, so a checkout on sys.path is checked as well as an installed package.
    import gpulora

    env = dict(os.environ, ASV_PYTHONPATH=os.path.dirname(os.path.dirname(gpulora.__file__)))
    done = subprocess.run(cmd, cwd=ASV_DIR, capture_output=True, text=True, timeout=300, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "No problems found" in out, out


@pytest.mark.parametrize(("mod", "cls"), list(_benchmark_classes()))
def test_benchmark_smallest_combination(mod, cls):
    """Set up the first parameter combination (grids list their smallest values first, numpy first) that
    setup does not skip, and call every benchmark method once; check what it returns."""
    params = cls.params if isinstance(cls.params[0], list) else [cls.params]
    for combo in itertools.product(*params):
        bench = cls()
        mod.setup(*combo)
        try:
            bench.setup(*combo)
        except NotImplementedError as err:
            reason = str(err)
            continue
        break
    else:
        pytest.skip(f"every combination is skipped here: {reason}")
    methods = sorted(m for m in dir(cls) if m.startswith(PREFIXES))
    assert methods
    assert {"track_score_bound", "track_max_score"} <= set(methods), "every benchmark states its score bound"
    values = {}
    for name in methods:
        value = values[name] = getattr(bench, name)(*combo)
        if name.startswith("track_"):
            assert isinstance(value, float) and (math.isfinite(value) or name in MAY_BE_NAN), (name, value)
            assert getattr(cls, name).unit
            if "rel_error" in name:
                assert math.isnan(value) or 0 <= value < 1, (name, value)
            elif name == "track_auto_ran_poly":
                assert value in (0.0, 1.0), value
            elif not math.isnan(value):
                assert value > 0, (name, value)
    bound, max_score = values["track_score_bound"], values["track_max_score"]
    assert math.isnan(max_score) or max_score <= bound * (1 + 1e-6), (bound, max_score)


MAY_BE_NAN = {"track_rel_error_poly_vs_exact", "track_max_score", "track_poly_features_needed",
              "track_poly_over_exact_estimate"}


def test_real_head_case_runs_exact_and_poly_would_lose():
    """The M = 8 case: auto correctly runs exact, and the estimate says poly would be far slower."""
    cls = _module("bench_realhead").RealHeadLike
    bench = cls()
    bench.setup("numpy", 1024, "float32")
    assert bench.track_score_bound() == pytest.approx(8.0, rel=1e-5)
    assert 5 < bench.track_max_score() <= 8.0
    assert bench.track_auto_ran_poly() == 0.0
    assert bench.diagnosis.recommended == "exact"
    # either no polynomial fits the feature budget at all (NaN), or it would cost thousands of times more
    ratio = bench.track_poly_over_exact_estimate()
    assert math.isnan(ratio) or ratio > 1e3, ratio


def test_grids_do_not_depend_on_the_environment():
    """asv's convention: params are fixed; nothing in the suite reads the environment."""
    text = "".join(p.read_text() for p in BENCH_DIR.glob("*.py"))
    assert "os.environ" not in text and "getenv" not in text


def test_torch_baseline_is_the_same_problem():
    """TorchLoRA (autograd through SDPA) gives gpulora's exact loss and gradients in float64."""
    pytest.importorskip("torch")
    torch_mod = _module("bench_torch")
    prob = make_problem(3, L=96, d_model=16, d_head=8, d_v=8, r=4, targets="qkv", dtype=np.float64)
    model = torch_mod.TorchLoRA(prob, "cpu", __import__("torch").float64)
    loss = float(model().detach())
    ref = gpulora.lora_grad(prob.head, prob.lora, prob.x, prob.y, method="exact")
    assert loss == pytest.approx(float(ref.loss), rel=1e-12)
    for t, (b, a) in model.adapters.items():
        assert rel_error(b.grad.numpy(), ref.grads[t].B) < 1e-10, t
        assert rel_error(a.grad.numpy(), ref.grads[t].A) < 1e-10, t


def test_torch_poly_baseline_is_the_same_polynomial_attention():
    """TorchPolyLoRA (autograd through the polynomial features) has gpulora's poly loss to rounding (the same
    F~), and gradients within the approximation error (it differentiates p, the chain uses the softmax
    formula with F~)."""
    torch = pytest.importorskip("torch")
    chain_mod = _module("bench_chain")
    prob = make_problem(4, L=96, d_model=16, d_head=4, d_v=4, r=4, targets="qkv", dtype=np.float64, score_bound=1.0)
    ref = gpulora.lora_grad(prob.head, prob.lora, prob.x, prob.y, method="poly", degree=6)
    coef = gpulora.poly.coefficients.measure(ref.family, 6, ref.bound).coef
    model = chain_mod.TorchPolyLoRA(prob, "cpu", torch.float64, coef)
    assert float(model().detach()) == pytest.approx(float(ref.loss), rel=1e-12)
    for t, (b, a) in model.adapters.items():
        tol = 1e-12 if t == "v" else 1e-3  # dV has no p' in it: equal to rounding; measured 2e-5 for q, k
        assert rel_error(b.grad.numpy(), ref.grads[t].B) < tol, t
        assert rel_error(a.grad.numpy(), ref.grads[t].A) < tol, t


def test_report_script_recovers_synthetic_scaling(tmp_path):
    """asv_bench/report.py on a synthetic asv results file: exact ~ L^2, poly ~ L, so it must fit
    exponents 2 and 1, ratios 4 for poly, and the crossover where the two power laws meet."""
    spec = importlib.util.spec_from_file_location("gpulora_asv_report", ASV_DIR / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    Ls = [1024, 4096, 16384]
    common = [["'numpy'"], [str(L) for L in Ls], ["4"]]
    tail = [["'qkv'"], ["'float64'"]]
    exact = [1e-7 * L**2 for L in Ls]  # meets poly (1e-4 L) at L* = 1000
    poly = [1e-4 * L for L in Ls]
    data = {
        "commit_hash": "0" * 40, "env_name": "synthetic", "params": {"machine": "test"},
        "result_columns": ["result", "params"],
        "results": {
            "bench_grad.ExactGrad.time_lora_grad": [exact, common + tail],
            "bench_grad.PolyGrad.time_lora_grad": [poly, common + [["2"]] + tail],
            "bench_grad.PolyError.track_rel_error_poly_vs_exact": [[0.01] * 3, common + [["2"]] + tail],
        },
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    text = report.main([str(path), "--out", str(tmp_path / "r.md")])
    row = next(line for line in text.splitlines() if line.startswith("| 4 | 2 | 15 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3] == "2.00" and cells[5] == "1.00", row  # exponents
    assert cells[7].startswith("4.00, 4.00"), row  # t(4L)/t(L)
    assert float(cells[8]) == pytest.approx(1000, rel=1e-6), row  # L*
    assert "1.00e-02" in text


def test_benchmarks_md_quotes_what_report_prints_from_the_published_results():
    """The CPU tables of BENCHMARKS.md are, verbatim, report.py's output on the published results file."""
    import re

    doc = (ASV_DIR.parent / "BENCHMARKS.md").read_text()
    blocks = re.findall(r"<!-- report\.py:start (\S+) -->\n(.*?)<!-- report\.py:end -->", doc, re.S)
    assert blocks, "BENCHMARKS.md lacks the report.py markers"
    spec = importlib.util.spec_from_file_location("gpulora_asv_report_pub", ASV_DIR / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for path, quoted in blocks:
        data, res = report.load(ASV_DIR.parent / path)
        assert report.report(data, res) == quoted, "regenerate: python asv_bench/report.py " + path


# ------------------------------------------------------------------------------ the prepared GPU run


def _script(name):
    spec = importlib.util.spec_from_file_location(f"gpulora_asv_{name}", ASV_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory):
    """Every stage of asv_bench/gpu_bench.py once in this process, on NumPy at toy sizes (--dry-run)."""
    import time

    bench = _script("gpu_bench")
    out = tmp_path_factory.mktemp("gpu")
    results = {name: bench.run_stage(name, out, time.time() + 60, True) for name in bench.STAGES}
    return bench, out, results


def test_gpu_bench_dry_run_measures_every_stage(gpu_dry_run):
    bench, out, results = gpu_dry_run
    assert set(results) == {"device", "features", "products", "stages", "compare"}
    for name, res in results.items():
        assert res["status"] == "ok", (name, res.get("traceback"))
        assert json.loads((out / f"{name}.json").read_text())["status"] == "ok"
    dev = results["device"]
    assert dev["info"]["dry_run"] and dev["copy"]["gbps"] > 0 and dev["gemm_fp32"]["tflops"] > 0
    assert all(c["gbps"] > 0 and c["M"] == bench.BOUND and c["fixed_s"] > 0 for c in results["features"]["cases"])
    prods = results["products"]["cases"]
    assert {(c["op"], c["dtype"]) for c in prods} == {(op, dt) for op in ("contract", "readout")
                                                      for dt in ("float32", "float64")}
    for c in prods:  # the twins timed on NumPy; the kernels say why they cannot run without a device
        assert c["cublas"]["median_s"] > 0 and c["cublas"]["tflops"] > 0
        assert "CUDA device" in c["fused"]["error"]
    parts = results["stages"]["parts"]
    assert {"features (q and k)", "checks", "total"} <= set(parts) and len(parts) == 9
    assert len([p for p in parts if p.startswith("total, ")]) == 1  # the states' other form, measured too
    assert all("error" not in c for c in parts.values()), parts
    cases = results["compare"]["cases"]
    methods = {c["method"] for c in cases}
    assert {"poly", "exact"} <= methods and all("error" not in c for c in cases), cases
    assert sum(bool(c.get("target")) for c in cases) == 1
    assert all(c["M"] == bench.BOUND and c["median_s"] > 0 for c in cases)


def test_gpu_bench_stage_stops_at_its_deadline(tmp_path):
    """A stage past its (soft) deadline starts no new case and says so: one slow stage cannot eat the run."""
    import time

    bench = _script("gpu_bench")
    res = bench.run_stage("compare", tmp_path, time.time() - 1, True)
    assert res["status"] == "ok" and res["truncated"] and res["cases"] == []


def test_gpu_bench_arguments(tmp_path):
    bench = _script("gpu_bench")
    args = bench.parse_args(["--out", str(tmp_path), "--stages", "device,compare", "--budget", "30"])
    assert args.stage_list == ["device", "compare"] and args.budget == 30
    for bad in (["--stages", "device,warp"], ["--budget", "0"], ["--stage", "nope"]):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(bad)
        assert err.value.code == 2
    assert abs(sum(bench.STAGES.values()) - 1) < 1e-12


def test_gpu_report_makes_and_updates_the_benchmarks_section(gpu_dry_run, tmp_path):
    bench, out, results = gpu_dry_run
    report = _script("gpu_report")
    data = {"summary": {"stages": {n: {"status": "ok", "seconds": 1.0, "limit_s": 9.0} for n in results}},
            **results}
    (tmp_path / "gpu.json").write_text(json.dumps(data, default=str))
    (tmp_path / "tests.txt").write_text("3 passed, 1 skipped in 2.0s\n")
    text = report.main([str(tmp_path)])
    assert "dry run on the CPU" in text and "3 passed" in text
    for heading in ("Ceilings", "Feature map", "Low-rank products", "Stage breakdown", "poly vs exact vs PyTorch SDPA"):
        assert heading in text, heading
    assert "| L | d_head | method | g | k | M |" in text and "Target, poly" in text
    doc = tmp_path / "B.md"
    doc.write_text(f"# x\n\n{report.START}\nold\n{report.END}\n\nrest\n")
    report.main([str(tmp_path), "--update", str(doc)])
    new = doc.read_text()
    assert "old" not in new and new.endswith(f"{report.END}\n\nrest\n") and text in new


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_run_script_arguments(tmp_path):
    script = str(ASV_DIR / "gpu_run.sh")
    for bad in (["--bogus"], ["--budget", "x"], ["--budget", "0"]):
        proc = subprocess.run(["bash", script, *bad], capture_output=True, text=True, timeout=60,
                              env={**__import__("os").environ, "OUT": str(tmp_path / "o")})
        assert proc.returncode == 2 and "gpu_run:" in proc.stderr, (bad, proc.stderr)
    proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout


def test_install_env_picks_only_usable_extras():
    inst = _script("install_env")
    assert inst.cuda_major("| NVIDIA-SMI 580.65  Driver Version: 580.65  CUDA Version: 13.0 |") == 13
    assert inst.cuda_major("CUDA Version: 12.4") == 12 and inst.cuda_major("no banner") is None
    cpu = inst.commands("g.whl", None, True)
    assert cpu[0][-1] == "g.whl" and cpu[1][-2:] == ["--index-url", inst.TORCH_CPU_INDEX]
    gpu = inst.commands("g.whl", "cuda13", True)
    assert gpu[0][-1] == "g.whl[cuda13]" and gpu[1][-1] == "torch"
    assert len(inst.commands("g.whl", None, False)) == 1


def test_asv_results_live_outside_the_code_tree():
    """asv writes under asv_bench/.asv/ (git-ignored); published figures sit where no asv run writes."""
    conf = (ASV_DIR / "asv.conf.json").read_text()
    for key in ("results_dir", "env_dir", "html_dir"):
        assert f'"{key}": ".asv/' in conf, key
    assert "install_env.py" in conf and '"install_timeout"' in conf
    ignored = (ASV_DIR.parent / ".gitignore").read_text()
    assert "asv_bench/.asv/" in ignored
    assert list((ASV_DIR / "published").glob("*/*.json"))


def test_interleaved_script_prints_both_forms_and_the_cache_sweep(monkeypatch):
    """asv_bench/interleaved.py (the source of BENCHMARKS.md's A/B tables) on a toy shape: one row per shape
    with a time for each form or cache size, and the forced setting restored afterwards."""
    from gpulora.poly import chain

    il = _script("interleaved")
    monkeypatch.setattr(il, "SHAPES", [(2, 2, "qv", "float64", 64)])
    monkeypatch.setattr(il, "ROUNDS", 1)
    picked, kept = chain.lift_states, chain.CACHE_BYTES
    forms = il.forms().splitlines()
    assert len(forms) == 3 and forms[2].startswith("| 2 | 2 | qv | float64 | 64 |") and forms[2].count(" ms") == 2
    cache = il.cache().splitlines()
    assert len(cache) == 3 and cache[2].count(" ms") == 5
    assert chain.lift_states is picked and chain.CACHE_BYTES == kept


def test_gpu_report_says_which_products_path_wins():
    report = _script("gpu_report")
    case = {"L": 8, "heads": 8, "k": 3, "p": 2, "q": 2, "dtype": "float32"}
    results = {"products": {"cases": [
        {**case, "op": "contract", "cublas": {"median_s": 2e-3, "tflops": 1.0},
         "fused": {"median_s": 1e-3, "tflops": 2.0}},
        {**case, "op": "readout", "cublas": {"median_s": 1e-3, "tflops": 2.0},
         "fused": {"median_s": 4e-3, "tflops": 0.5}},
        {**case, "op": "readout", "dtype": "float64", "cublas": {"median_s": 1e-3, "tflops": 2.0},
         "fused": {"error": "needs CuPy, numba-cuda and a CUDA device"}},
    ]}}
    text = report.markdown(results)
    assert "| contract | 8 | 3 | 2 | float32 | 2 ms | 1 | 1 ms | 2 | fused |" in text
    assert "| readout | 8 | 3 | 2 | float32 | 1 ms | 2 | 4 ms | 0.5 | cuBLAS |" in text
    assert "| readout | 8 | 3 | 2 | float64 | 1 ms | 2 | needs CuPy, numba-cuda and a CUDA device | – | – |" in text
    assert "Fused kernels faster in 1 of 2 cases" in text
