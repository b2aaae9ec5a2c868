"""The command line: ``demo``, ``phase`` and ``diagnose`` on tiny sizes, and every error path (status 2, one line)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gpulora import backend
from gpulora.cli import main
from gpulora.io import save_problem
from gpulora.phase import read_csv
from gpulora.testing import make_problem

TOL = 1e-3
FACTOR = 10  # adapter gradients within 10 tol (gpulora.lora_grad docstring)
TINY = ["--L", "256", "--d-model", "16", "--backend", "numpy"]


def _grad_errors(out):
    """The dB/dA errors of the demo's error table, by target."""
    errs, rows = {}, out.split("relative error of poly against exact")[1].splitlines()[2:]
    for line in rows:
        parts = line.split()
        if not parts or parts[0] not in "qkv":
            break
        errs[parts[0]] = (float(parts[1]), float(parts[2]))
    return errs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_demo_prints_table_errors_speedup_and_diagnosis(capsys, dtype):
    assert main(["demo", *TINY, "--dtype", dtype, "--targets", "qkv"]) == 0
    out = capsys.readouterr().out
    for needle in ("method", "exact", "poly", "chebyshev", "speedup", "gpulora diagnosis", "recommended"):
        assert needle in out, needle
    errs = _grad_errors(out)
    assert set(errs) == {"q", "k", "v"}
    assert all(0 <= e <= FACTOR * TOL for pair in errs.values() for e in pair), errs


def test_demo_targets_and_bound(capsys):
    assert main(["demo", *TINY, "--targets", "v,q", "--bound", "2", "--tol", "1e-4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert set(_grad_errors(out)) == {"q", "v"}
    assert "M = beta max|q_i| max|k_j| = 2" in out and "tol 0.0001" in out


def test_demo_causal_runs_poly_or_says_why(capsys):
    assert main(["demo", *TINY, "--causal"]) == 0
    out = capsys.readouterr().out
    assert "causal" in out
    assert "speedup" in out or "poly did not run" in out


def test_demo_past_the_transition_runs_exact_only(capsys):
    assert main(["demo", *TINY, "--bound", "40"]) == 0
    out = capsys.readouterr().out
    assert "poly did not run" in out and "no polynomial" in out and "(exact only)" in out
    assert "speedup" not in out


def test_phase_writes_png_and_consistent_csv(tmp_path, capsys):
    png = tmp_path / "phase.png"
    argv = ["phase", "--out", str(png), "--bounds", "0.5,2,20", "--lengths", "64,128,1048576",
            "--time-max-L", "128", "--error-max-L", "128", "--d-model", "8", "--d-head", "4", "--d-v", "4",
            "--no-progress", "--backend", "numpy", "--dtype", "float64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "never (no polynomial meets tol)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(tmp_path / "phase.csv")
    assert len(rows) == 9
    expected = {(m, L) for m in (0.5, 2, 20) for L in (64, 128, 1048576)}
    assert {(float(r["bound"]), int(r["L"])) for r in rows} == expected
    for r in rows:
        L, m = int(r["L"]), float(r["bound"])
        assert math.isclose(float(r["sqrt_log_L"]), math.sqrt(math.log(L)))
        assert r["exact_source"] == ("measured" if L <= 128 else "model")
        assert float(r["exact_seconds"]) > 0
        if m == 20:  # no polynomial of degree <= 40 reaches 1e-3 on [-20, 20]
            assert r["status"] == "no_polynomial" and r["winner"] == "exact" and r["degree"] == ""
            continue
        assert r["status"] == "ok"
        g, k = int(r["degree"]), int(r["features"])
        assert k == math.comb(4 + g, g)
        assert float(r["approx_error"]) <= TOL
        assert r["poly_source"] == ("measured" if L <= 128 else "model")
        if L <= 128:
            assert 0 <= float(r["grad_error"]) <= FACTOR * TOL
            tp, te = float(r["poly_seconds"]), float(r["exact_seconds"])
            assert r["basis"] == "measured" and r["winner"] == ("poly" if tp < te else "exact")
        else:
            assert r["grad_error"] == "" and r["basis"] == "model"
    # at L = 2^20 and M = 0.5 (k = 35) the modelled poly is far cheaper than the modelled exact
    big = next(r for r in rows if float(r["bound"]) == 0.5 and int(r["L"]) == 1048576)
    assert big["winner"] == "poly" and float(big["poly_seconds"]) < float(big["exact_seconds"]) / 100


def _saved(tmp_path, with_lora=True, **kw):
    p = make_problem(1, L=96, d_model=8, d_head=4, targets="qv", score_bound=1.5, **kw)
    path = tmp_path / "problem.npz"
    save_problem(path, p.head, p.lora if with_lora else None, p.x)
    return path


def test_diagnose_saved_problem(tmp_path, capsys):
    path = _saved(tmp_path)
    assert main(["diagnose", str(path), "--tol", "1e-4", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "gpulora diagnosis" in out and "L=96" in out and "tol 0.0001" in out
    bound_line = next(line for line in out.splitlines() if "bound M" in line)
    assert math.isclose(float(bound_line.split()[-1]), 1.5, rel_tol=1e-2)
    assert "exact max |S|" in out and "recommended" in out


def test_diagnose_without_adapters_and_with_np_savez(tmp_path, capsys):
    p = make_problem(2, L=64, d_model=8, d_head=4, heads=2)
    path = tmp_path / "plain.npz"
    np.savez(path, w_q=p.head.w_q, w_k=p.head.w_k, w_v=p.head.w_v, x=p.x, heads=2, beta=0.3)
    assert main(["diagnose", str(path), "--causal"]) == 0
    out = capsys.readouterr().out
    assert "no adapters" in out and "heads=2" in out and "beta=0.3" in out


def test_diagnose_help_documents_the_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("w_q", "w_k", "w_v", "x", "beta", "heads", "alpha", "B_q", "A_v", "save_problem"):
        assert key in out, key


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _error_cases(tmp_path):
    w, x = np.ones((3, 2)), np.ones((5, 3))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    good = str(_saved(tmp_path))
    return {
        "no command": [],
        "unknown command": ["frobnicate"],
        "L zero": ["demo", "--L", "0"],
        "L not int": ["demo", "--L", "many"],
        "bad targets": ["demo", "--targets", "qx"],
        "repeated targets": ["demo", "--targets", "qq"],
        "tol out of range": ["demo", "--tol", "2"],
        "negative bound": ["demo", "--bound", "-1"],
        "bad dtype": ["demo", "--dtype", "float16"],
        "phase not png": ["phase", "--out", str(tmp_path / "x.jpg")],
        "phase no folder": ["phase", "--out", str(tmp_path / "nodir" / "x.png")],
        "phase bad bounds": ["phase", "--out", str(tmp_path / "x.png"), "--bounds", "a,b"],
        "phase bad tol": ["phase", "--out", str(tmp_path / "x.png"), "--tol", "0"],
        "phase no out": ["phase"],
        "missing file": ["diagnose", str(tmp_path / "missing.npz")],
        "not an npz": ["diagnose", str(text)],
        "an npy": ["diagnose", str(npy)],
        "missing key": ["diagnose", _npz(tmp_path, "a.npz", w_q=w, w_k=w, w_v=w)],
        "unknown key": ["diagnose", _npz(tmp_path, "b.npz", w_q=w, w_k=w, w_v=w, x=x, wq=w)],
        "bad shape": ["diagnose", _npz(tmp_path, "c.npz", w_q=w, w_k=w, w_v=w, x=np.ones((5, 4)))],
        "no alpha": ["diagnose", _npz(tmp_path, "d.npz", w_q=w, w_k=w, w_v=w, x=x, B_q=np.ones((3, 1)),
                                      A_q=np.ones((1, 2)))],
        "half adapter": ["diagnose", _npz(tmp_path, "e.npz", w_q=w, w_k=w, w_v=w, x=x, alpha=1.0,
                                          B_q=np.ones((3, 1)))],
        "strings": ["diagnose", _npz(tmp_path, "f.npz", w_q=np.array(["a"]), w_k=w, w_v=w, x=x)],
        "nan input": ["diagnose", _npz(tmp_path, "g.npz", w_q=w, w_k=w, w_v=w, x=np.full((5, 3), np.nan))],
        "bad heads": ["diagnose", _npz(tmp_path, "h.npz", w_q=w, w_k=w, w_v=w, x=x, heads=1.5)],
        "diagnose bad tol": ["diagnose", good, "--tol", "0"],
    }


def test_every_error_exits_2_with_one_line(tmp_path, capsys):
    cases = _error_cases(tmp_path)
    if not backend.has_cuda():
        cases["cupy without GPU"] = ["demo", "--backend", "cupy"]
    for name, argv in cases.items():
        assert main(argv) == 2, name
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpulora: error: "), (name, cap.err)
        assert "Traceback" not in cap.err and cap.out == "", (name, cap.out)


def test_module_entry_point_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for argv in (["demo", "--L", "0"], ["diagnose", str(tmp_path / "missing.npz")]):
        proc = subprocess.run([sys.executable, "-m", "gpulora", *argv], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith("gpulora: error: ") and "Traceback" not in proc.stderr
