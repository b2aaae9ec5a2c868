"""The command line: ``demo``, ``phase`` and ``diagnose`` on tiny sizes, every error path (status 2, one
line), bugs that keep their traceback, hostile files, ``--version``, progress and flushing."""

import io
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from gpulora import backend
import gpulora
from gpulora import cli, phase
from gpulora.cli import format_speedup, main
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
    pytest.importorskip("matplotlib", reason="the phase figure needs matplotlib: pip install 'gpulora[plot]'")
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


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_save_and_load_give_the_same_problem(tmp_path, dtype):
    """Every part of a head round-trips (grouped-query kv_heads, biases, Softmax_1, beta) and diagnoses the
    same; bfloat16 is stored as float32, exactly."""
    from gpulora.io import load_problem

    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    cast = (lambda a: a.astype(ml_dtypes.bfloat16)) if dtype == "bfloat16" else (lambda a: a)
    w = {t: cast(rng.standard_normal((8, n)) / 3) for t, n in (("q", 8), ("k", 4), ("v", 4))}
    b = {t: cast(rng.standard_normal(w[t].shape[1])) for t in "qkv"}
    head = gpulora.Head(w["q"], w["k"], w["v"], beta=0.4, heads=2, kv_heads=1, softmax_one=True,
                        b_q=b["q"], b_k=b["k"], b_v=b["v"])
    lora = gpulora.LoRA({"q": (cast(rng.standard_normal((8, 2))), cast(rng.standard_normal((2, 8))))}, alpha=3.0)
    x = cast(rng.standard_normal((2, 16, 8)))
    save_problem(tmp_path / "p.npz", head, lora, x)
    head2, lora2, x2, note = load_problem(tmp_path / "p.npz")
    assert note == "" and (head2.heads, head2.kv_heads, head2.softmax_one, head2.beta) == (2, 1, True, 0.4)
    for name, a in {**head.arrays(), **lora.arrays(), "x": x}.items():
        b2 = {**head2.arrays(), **lora2.arrays(), "x": x2}[name]
        assert b2.dtype == (np.float32 if dtype == "bfloat16" else np.float64), name
        np.testing.assert_array_equal(b2, np.asarray(a, dtype=b2.dtype), err_msg=name)
    assert lora2.alpha == 3.0 and gpulora.diagnose(head2, lora2, x2).bound == gpulora.diagnose(head, lora, x).bound


def test_diagnose_help_documents_the_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("w_q", "w_k", "w_v", "x", "beta", "heads", "kv_heads", "softmax_one", "b_q", "alpha", "B_q", "A_v",
                "save_problem"):
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
    folders = [tmp_path / "made.png", tmp_path / "y.csv"]  # outputs that are directories
    for f in folders:
        f.mkdir()
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
        "phase out is a folder": ["phase", "--out", str(folders[0])],
        "phase csv is a folder": ["phase", "--out", str(tmp_path / "y.png"), "--lengths", "64"],
        "bound past the dtype": ["demo", "--L", "32", "--bound", "1e300"],
        "negative seed": ["demo", "--seed", "-1"],
    }


def test_every_error_exits_2_with_one_line(tmp_path, capsys):
    cases = _error_cases(tmp_path)
    if not backend.has_cuda():
        cases["cupy without GPU"] = ["demo", "--backend", "cupy"]
    named = {"bound past the dtype": "--bound", "negative seed": "--seed", "phase out is a folder": "--out",
             "phase csv is a folder": "--out"}
    for name, argv in cases.items():
        assert main(argv) == 2, name
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpulora: error: "), (name, cap.err)
        assert named.get(name, "") in lines[0], (name, lines[0])
        # the demo's two header lines come before its problem is built
        assert "Traceback" not in cap.err and (cap.out == "" or name == "bound past the dtype"), (name, cap.out)


def test_module_entry_point_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for argv in (["demo", "--L", "0"], ["diagnose", str(tmp_path / "missing.npz")]):
        proc = subprocess.run([sys.executable, "-m", "gpulora", *argv], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith("gpulora: error: ") and "Traceback" not in proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"gpulora {gpulora.__version__}"
    proc = subprocess.run([sys.executable, "-m", "gpulora", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gpulora {gpulora.__version__}"


@pytest.mark.parametrize("exact, poly, want", [(26.0, 1.0, "poly 26x faster"), (1.0, 26.3, "poly 26x slower"),
                                               (2.0, 0.8, "poly 2.5x faster"), (0.45, 1.0, "poly 2.2x slower"),
                                               (1.0, 1.0, "poly 1x faster"), (531.0, 1.0, "poly 531x faster"),
                                               (1.0, 0.0095, "poly 105x faster")])
def test_speedup_has_significant_digits(exact, poly, want):
    assert format_speedup(exact, poly) == want


def test_internal_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_demo", broken)
    with pytest.raises(KeyError):
        main(["demo"])
    monkeypatch.setattr(cli, "_demo", lambda args: {}["also a bug"])
    with pytest.raises(KeyError):
        main(["demo", "--L", "64"])


def test_debug_shows_user_errors_with_traceback(monkeypatch, tmp_path, capsys):
    missing = str(tmp_path / "missing.npz")
    assert main(["diagnose", missing]) == 2
    with pytest.raises(cli.CLIError, match="no such file"):
        main(["diagnose", missing, "--debug"])
    with pytest.raises(cli.CLIError):
        main(["--debug", "demo", "--L", "0"])
    monkeypatch.setenv("GPULORA_DEBUG", "1")
    with pytest.raises(cli.CLIError):
        main(["diagnose", missing])
    out = capsys.readouterr()
    assert "--debug" in cli.build_parser().format_help() and "GPULORA_DEBUG" in cli.build_parser().format_help()
    assert out.out == ""


def _npy_header(shape, descr="<f4"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _archive(path, members, compression=zipfile.ZIP_STORED):
    w = np.ones((3, 2))
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for key in ("w_q", "w_k", "w_v"):
            buf = io.BytesIO()
            np.save(buf, w)
            z.writestr(key + ".npy", buf.getvalue())
        for name, chunks in members.items():
            with z.open(name, "w", force_zip64=True) as m:
                for c in chunks:
                    m.write(c)
    return str(path)


def _one_line_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpulora: error: ") and "Traceback" not in err
    return err


def test_hostile_files_are_refused_from_their_headers(tmp_path, capsys):
    # a header declaring 149 GiB in a file of about a kilobyte
    forged = _archive(tmp_path / "forged.npz", {"x.npy": [_npy_header((40000, 1000000)), bytes(64)]})
    err = _one_line_error(["diagnose", forged], capsys)
    assert "declares a (40000, 1000000) float32 array of 149 GiB" in err and "limit of 2 GiB" in err
    # an archive that inflates to 64 times its size (the 4 GiB case with a 4 MiB file, scaled down), refused
    # against a lowered limit before a byte is inflated
    bomb = _archive(tmp_path / "bomb.npz", {"x.npy": [_npy_header((1 << 19, 4))] + [bytes(1 << 20)] * 8},
                    compression=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < (1 << 20) // 8
    err = _one_line_error(["diagnose", bomb, "--max-bytes", str(1 << 20)], capsys)
    assert "declares a (524288, 4) float32 array of 8 MiB, more than the limit of 1 MiB" in err
    # within the limit but the header promises more than the member holds
    short = _archive(tmp_path / "short.npz", {"x.npy": [_npy_header((1000, 3)), bytes(100)]})
    err = _one_line_error(["diagnose", short], capsys)
    assert "is not a complete array" in err and "(1000, 3)" in err
    # the sum over members counts too
    two = _archive(tmp_path / "two.npz", {"x.npy": [_npy_header((100, 3), "<f8"), bytes(2400)],
                                          "B_q.npy": [_npy_header((100, 3), "<f8"), bytes(2400)]})
    err = _one_line_error(["diagnose", two, "--max-bytes", "4000"], capsys)
    assert "in all, more than the limit" in err


def test_each_file_error_says_what_the_file_is_not(tmp_path, capsys):
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    assert "not a .npz archive (not a zip file" in _one_line_error(["diagnose", readme], capsys)
    assert "a directory, not a .npz file" in _one_line_error(["diagnose", str(tmp_path)], capsys)
    np.save(tmp_path / "a.npy", np.ones(3))
    assert "a single .npy array (np.save), not a .npz archive" in _one_line_error(
        ["diagnose", str(tmp_path / "a.npy")], capsys)
    np.savez(tmp_path / "obj.npz", x=np.array([{}], dtype=object))
    assert "holds Python objects" in _one_line_error(["diagnose", str(tmp_path / "obj.npz")], capsys)
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:
        z.writestr("notes.txt", "hello")
    assert "member 'notes.txt' is not a .npy file" in _one_line_error(["diagnose", str(tmp_path / "other.npz")],
                                                                      capsys)
    np.savez(tmp_path / "complex.npz", x=np.ones(3, dtype=complex))
    assert "complex128 values, not real numbers" in _one_line_error(["diagnose", str(tmp_path / "complex.npz")],
                                                                    capsys)


def test_missing_plot_extra_is_named(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    err = _one_line_error(["phase", "--out", str(tmp_path / "p.png")], capsys)
    assert "pip install 'gpulora[plot]'" in err


def test_progress_bar_only_on_a_terminal(monkeypatch):
    assert isinstance(phase.progress_bar(3, "x"), phase._NoProgress)  # pytest's stderr is not a terminal
    tqdm = pytest.importorskip("tqdm", reason="progress bars need tqdm: pip install 'gpulora[plot]'")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = phase.progress_bar(3, "x")
    assert isinstance(bar, tqdm.tqdm)
    bar.close()
    assert isinstance(phase.progress_bar(3, "x", enabled=False), phase._NoProgress)


def test_piped_output_arrives_line_by_line():
    """The header reaches a pipe while the demo is still computing (no block buffering until the end)."""
    proc = subprocess.Popen([sys.executable, "-m", "gpulora", "demo", "--L", "4096", "--d-model", "16",
                             "--backend", "numpy"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        still_running = proc.poll() is None
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("gpulora demo:")
    assert still_running and "speedup" in rest
