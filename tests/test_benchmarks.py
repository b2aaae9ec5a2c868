"""Smoke test of the asv suite (asv_bench/): a broken benchmark fails the build.

``asv check`` validates discovery and signatures; then every benchmark class is set up and each of its
methods called once on its smallest parameter combination that is not skipped, directly (no asv). The
PyTorch baseline is checked once against gpulora's exact gradients in float64, so that it is the same
problem.
"""

from __future__ import annotations

import importlib
import importlib.util
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
            if (isinstance(cls, type) and cls.__module__ == mod.__name__
                    and any(m.startswith(PREFIXES) for m in dir(cls))):
                yield pytest.param(mod, cls, id=f"{name}.{cls_name}")


def test_suite_has_benchmarks():
    assert {"bench_chain", "bench_grad", "bench_features", "bench_products", "bench_torch"} <= set(MODULES)
    assert len(list(_benchmark_classes())) >= 7


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
    for name in methods:
        value = getattr(bench, name)(*combo)
        if name.startswith("track_"):
            assert isinstance(value, float) and (math.isfinite(value) or "rel_error" in name), (name, value)
            assert getattr(cls, name).unit
            if "rel_error" in name:
                assert math.isnan(value) or 0 <= value < 1, (name, value)
            else:
                assert value > 0, (name, value)


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
