"""The command line: ``python -m gpulora demo | phase | diagnose`` (also installed as ``gpulora``).

``demo``      exact vs poly on an embedded problem: time, loss, gradient errors, speedup, diagnosis.
``phase``     the phase-transition sweep over the score bound ``M`` and ``L``: a PNG and a CSV beside it.
``diagnose``  the diagnosis of a problem saved as ``.npz`` (keys in :data:`NPZ_KEYS`; :func:`save_problem`).

Errors (bad options, unreadable files, values gpulora rejects) print one line ``gpulora: error: ...`` on
stderr and exit with status 2. The work itself lives in :mod:`gpulora.phase` and :mod:`gpulora.diagnose`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import zipfile

import numpy as np

from . import DEFAULT_TOL, LoRA, backend
from .diagnose import diagnose
from .model import TARGETS, Head
from .validation import check_tol

__all__ = ["NPZ_KEYS", "build_parser", "load_problem", "main", "save_problem"]

NPZ_HELP = """\
keys of the .npz file (np.savez):
  w_q, w_k    (d_model, H*d_head)   frozen query/key weights, layout x @ W
  w_v         (d_model, H*d_v)      frozen value weights
  x           (L, d_model) or (batch, L, d_model)   inputs
  beta        scalar, optional      inverse temperature (default 1/sqrt(d_head))
  heads       scalar int, optional  number of heads H packed in the columns (default 1)
  B_q, A_q, B_k, A_k, B_v, A_v      optional LoRA adapters, B (d_model, r), A (r, d_out), in pairs
  alpha       scalar, required with adapters: W = W0 + (alpha/r) B A
Without adapters the frozen head is diagnosed (zero adapters on --targets).
gpulora.cli.save_problem(path, head, lora, x) writes such a file."""

NPZ_KEYS = ("w_q", "w_k", "w_v", "x", "beta", "heads", "alpha") + tuple(f"{m}_{t}" for t in TARGETS for m in "BA")
_REQUIRED = ("w_q", "w_k", "w_v", "x")


class CLIError(Exception):
    """A user error: printed as one line ``gpulora: error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise CLIError(message)


# --- argument types -------------------------------------------------------------------------------------

def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _targets(text):
    t = text.strip().lower().replace(",", "")
    if not t or set(t) - set(TARGETS) or len(set(t)) != len(t):
        raise argparse.ArgumentTypeError(
            f"expected a non-empty subset of the letters q, k, v without repeats (e.g. qv, qkv), got {text!r}")
    return "".join(c for c in TARGETS if c in t)


def _list_of(kind):
    def parse(text):
        items = [s for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return sorted({kind(s) for s in items})
    return parse


def _common(p, *, dtype=True):
    p.add_argument("--tol", type=_float, default=None,
                   help=f"target max relative error of the polynomial p ~ exp on [-M, M], 0 < tol < 1 "
                        f"(default {DEFAULT_TOL:g})")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                   help="array library: auto = CuPy when a CUDA device is present, else NumPy (default auto)")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="input dtype (default float32)")


def _problem_options(p, *, L, d_model, d_head, d_v, bound):
    if L is not None:
        p.add_argument("--L", type=_positive_int, default=L, help=f"sequence length (default {L})")
    p.add_argument("--d-model", type=_positive_int, default=d_model, help=f"input width (default {d_model})")
    p.add_argument("--d-head", type=_positive_int, default=d_head, help=f"query/key width (default {d_head})")
    p.add_argument("--d-v", type=_positive_int, default=d_v, help=f"value width (default {d_v})")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--targets", type=_targets, default="qkv",
                   help="adapted projections, a subset of q, k, v: qv = the paper's partial adaptation, "
                        "qkv = full (default qkv)")
    if bound is not None:
        p.add_argument("--bound", type=_positive_float, default=bound,
                       help=f"score bound M = beta max|q_i| max|k_j|: the inputs are scaled to hit it "
                            f"(default {bound:g})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gpulora``."""
    parser = _Parser(prog="gpulora", description="Exact and polynomial-method LoRA gradients of attention "
                     "heads (Hu et al., ICLR 2025).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,phase,diagnose,survey}",
                                parser_class=_Parser)

    demo = sub.add_parser("demo", help="exact vs poly on an embedded problem: time, error, speedup, diagnosis",
                          description="Run lora_grad exactly and by the polynomial method on a random "
                          "one-head problem with normalised inputs scaled to the score bound --bound, and "
                          "print time, loss, the relative error of every adapter gradient, the speedup and "
                          "the diagnosis.")
    _problem_options(demo, L=16384, d_model=64, d_head=4, d_v=8, bound=1.0)
    demo.add_argument("--causal", action="store_true", help="causal mask (j > i excluded)")
    _common(demo)

    phase = sub.add_parser("phase", help="phase-transition sweep over M and L: PNG plus CSV",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Sweep the score bound M (inputs scaled) and the length L; for each "
                           "point record the polynomial that --tol needs, the cost of both methods (measured "
                           "wall time up to --time-max-L, cost model beyond), the measured gradient error up "
                           "to --error-max-L, and which method is cheaper. Writes the picture to --out and "
                           "the numbers to the same stem with .csv.")
    phase.add_argument("--out", required=True, help="output PNG path (the CSV goes beside it)")
    phase.add_argument("--attention", choices=("matrix", "tensor"), default="matrix",
                       help="matrix (softmax) attention, or the tensor attention of Alman & Song over key "
                            "pairs (gpulora.tensor; all five targets q,k1,k2,v1,v2; threshold cbrt(log L)) "
                            "(default matrix)")
    from .phase import DEFAULT_BOUNDS, DEFAULT_LENGTHS, DEFAULT_MAX_FEATURE_ELEMENTS

    phase.add_argument("--bounds", type=_list_of(_positive_float), default=None,
                       help=f"comma-separated score bounds M (default {','.join(map(str, DEFAULT_BOUNDS))}; "
                            f"tensor: 0.25 .. 16)")
    phase.add_argument("--lengths", type=_list_of(_positive_int), default=None,
                       help="comma-separated sequence lengths L (default 2^7 .. 2^20, powers of 2; tensor: "
                            "2^5 .. 2^16)")
    _problem_options(phase, L=None, d_model=32, d_head=4, d_v=4, bound=None)
    phase.add_argument("--time-max-L", type=_positive_int, default=None,
                       help="measure exact wall times up to this L, model beyond (default 8192; tensor 256)")
    phase.add_argument("--error-max-L", type=_positive_int, default=None,
                       help="measure the poly gradient error against exact up to this L (default 2048; "
                            "tensor 128)")
    phase.add_argument("--max-feature-elements", type=_positive_int, default=DEFAULT_MAX_FEATURE_ELEMENTS,
                       help="run poly only while L*k is at most this (default 2^24)")
    phase.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(phase)

    diag = sub.add_parser("diagnose", help="diagnose a problem saved as .npz",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Where a saved problem sits relative to the phase transition: the "
                          "score bound, the exact max|S| (small L), the threshold sqrt(log L), the "
                          "polynomial --tol needs and the estimated cost of both methods.",
                          epilog=NPZ_HELP)
    diag.add_argument("file", help="the .npz file")
    diag.add_argument("--causal", action="store_true", help="causal mask (j > i excluded)")
    diag.add_argument("--targets", type=_targets, default="qv",
                      help="targets assumed when the file has no adapters (default qv)")
    _common(diag, dtype=False)

    from . import survey

    survey.add_arguments(sub.add_parser(
        "survey", help="every attention head of a Hugging Face model on the phase diagram: table, CSV, PNG",
        description="Run a local Hugging Face model (or a packaged one) offline on text at --lengths and "
        "place every layer's every head on the phase diagram (see gpulora.survey)."))
    return parser


# --- helpers --------------------------------------------------------------------------------------------

def _xp(name):
    if name == "numpy" or (name == "auto" and not backend.has_cuda()):
        return np
    if not backend.has_cuda():
        raise CLIError("--backend cupy needs CuPy and a CUDA device; none was found")
    import cupy

    return cupy


def save_problem(path, head: Head, lora: LoRA | None, x) -> None:
    """Save ``head``, ``lora`` (or None) and ``x`` to ``path`` (.npz) with the keys ``diagnose`` reads.

    Arrays are copied to the host (CuPy) and stored in their dtype.
    """
    data = {"w_q": head.w_q, "w_k": head.w_k, "w_v": head.w_v, "x": x,
            "beta": np.float64(head.beta), "heads": np.int64(head.heads)}
    if lora is not None:
        data["alpha"] = np.float64(lora.alpha)
        for t, (b, a) in lora.adapters.items():
            data[f"B_{t}"], data[f"A_{t}"] = b, a
    np.savez(path, **{k: backend.to_numpy(v) for k, v in data.items()})


def _scalar(data, key, kind):
    v = data[key]
    if v.shape != () or v.dtype.kind not in "iuf":
        raise CLIError(f"key {key!r} must be a real scalar, got shape {v.shape} dtype {v.dtype}")
    if kind is int:
        if v.dtype.kind not in "iu" and float(v) != int(v):
            raise CLIError(f"key {key!r} must be an integer, got {v.item()!r}")
        return int(v)
    return float(v)


def load_problem(path, *, xp=np, targets="qv"):
    """Read a problem saved with the keys of :data:`NPZ_HELP`: ``(head, lora, x, note)``."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as err:
        why = "pickled data is not accepted" if "pickle" in str(err) else str(err)
        raise CLIError(f"{path}: not a .npz archive of numeric arrays ({why})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CLIError(f"{path}: a single .npy array, expected a .npz archive with keys {', '.join(_REQUIRED)}")
    with data:
        keys = set(data.files)
        unknown = sorted(keys - set(NPZ_KEYS))
        if unknown:
            raise CLIError(f"{path}: unknown keys {unknown}; expected {', '.join(NPZ_KEYS)}")
        missing = [k for k in _REQUIRED if k not in keys]
        if missing:
            raise CLIError(f"{path}: missing required keys {missing} (have {sorted(keys)})")
        try:
            arrays = {k: data[k] for k in keys}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise CLIError(f"{path}: cannot read its arrays ({err})") from None
    for k, v in arrays.items():
        if v.dtype.kind not in "iuf":
            raise CLIError(f"{path}: key {k!r} must hold real numbers, got dtype {v.dtype}")
    beta = _scalar(arrays, "beta", float) if "beta" in arrays else None
    heads = _scalar(arrays, "heads", int) if "heads" in arrays else 1
    dev = {k: xp.asarray(v) for k, v in arrays.items() if k not in ("beta", "heads", "alpha")}
    head = Head(dev["w_q"], dev["w_k"], dev["w_v"], beta=beta, heads=heads)
    adapters = {}
    for t in TARGETS:
        have = [f"{m}_{t}" in arrays for m in "BA"]
        if any(have) and not all(have):
            raise CLIError(f"{path}: adapter of {t!r} needs both B_{t} and A_{t}")
        if all(have):
            adapters[t] = (dev[f"B_{t}"], dev[f"A_{t}"])
    if adapters:
        if "alpha" not in arrays:
            raise CLIError(f"{path}: key 'alpha' is required when adapters are saved (W = W0 + (alpha/r) B A)")
        lora = LoRA(adapters, alpha=_scalar(arrays, "alpha", float))
        note = ""
    else:
        z = xp.zeros((head.d_model, 1), dtype=dev["w_q"].dtype)
        lora = LoRA({t: (z, xp.zeros((1, head.weight(t).shape[1]), dtype=z.dtype)) for t in targets}, alpha=1.0)
        note = f"no adapters in the file: the frozen head is diagnosed, costs counted for targets {targets}"
    return head, lora, dev["x"], note


def _fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


# --- subcommands ----------------------------------------------------------------------------------------

def _demo(args) -> int:
    from .phase import compare
    from .testing import make_problem

    xp = _xp(args.backend)
    name = "cupy" if xp is not np else "numpy"
    kw = dict(d_model=args.d_model, d_head=args.d_head, d_v=args.d_v, r=args.rank, targets=args.targets,
              dtype=np.dtype(args.dtype), xp=xp, score_bound=args.bound)
    tol = DEFAULT_TOL if args.tol is None else check_tol(args.tol)
    print(f"gpulora demo: one attention head, L={args.L} tokens, d_model={args.d_model}, d_head={args.d_head}, "
          f"d_v={args.d_v}, LoRA rank {args.rank} on {','.join(args.targets)}, {args.dtype}, {name}"
          f"{', causal' if args.causal else ''}")
    print(f"inputs: unit-norm rows, weights scaled so that M = beta max|q_i| max|k_j| = {args.bound:g}; "
          f"tol {tol:g}")
    compare(make_problem(args.seed, L=min(args.L, 256), **kw), tol=tol, causal=args.causal)  # warm-up
    prob = make_problem(args.seed, L=args.L, **kw)
    cmp = compare(prob, tol=tol, causal=args.causal)
    rows = [("method", "family", "degree", "features", "compute", "time (s)", "loss")]
    rows.append(("exact", "-", "-", "-", args.dtype, f"{cmp.exact_seconds:.3g}", f"{float(cmp.exact.loss):.7g}"))
    if cmp.poly is not None:
        p = cmp.poly
        rows.append(("poly", p.family, str(p.degree), str(p.features), p.compute_dtype, f"{cmp.poly_seconds:.3g}",
                     f"{float(p.loss):.7g}"))
    print()
    _table(rows)
    if cmp.poly is None:
        print(f"\npoly did not run: {cmp.poly_message}")
        print("(exact only)")
    else:
        print("\nrelative error of poly against exact (Frobenius norm)")
        err_rows = [("gradient", "dB", "dA")]
        err_rows += [(t, _fmt(b), _fmt(a)) for t, (b, a) in cmp.errors.items()]
        err_rows.append(("loss", _fmt(cmp.loss_error), ""))
        _table(err_rows)
        print(f"\nspeedup (exact time / poly time): {cmp.speedup:.1f}x")
    print()
    print(diagnose(prob.head, prob.lora, prob.x, tol=tol, causal=args.causal))
    return 0


def _table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _phase(args) -> int:
    from .phase import plot, sweep, write_csv

    out = args.out
    stem, ext = os.path.splitext(out)
    if ext.lower() != ".png":
        raise CLIError(f"--out must name a .png file, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CLIError(f"--out: folder {folder} does not exist")
    if args.tol is not None:
        check_tol(args.tol)
    xp = _xp(args.backend)
    t0 = time.perf_counter()
    if args.attention == "tensor":
        from .tensor import phase as tensor_phase

        kind = tensor_phase.TENSOR
        points = tensor_phase.sweep(
            args.bounds or tensor_phase.DEFAULT_BOUNDS, args.lengths or tensor_phase.DEFAULT_LENGTHS,
            tol=args.tol, d_model=args.d_model, d_head=args.d_head, d_v=args.d_v, rank=args.rank,
            dtype=np.dtype(args.dtype), xp=xp, seed=args.seed, time_max_L=args.time_max_L or 256,
            error_max_L=args.error_max_L or 128, max_feature_elements=args.max_feature_elements,
            progress=not args.no_progress)
    else:
        from .phase import DEFAULT_BOUNDS, DEFAULT_LENGTHS, MATRIX

        kind = MATRIX
        points = sweep(args.bounds or DEFAULT_BOUNDS, args.lengths or DEFAULT_LENGTHS, tol=args.tol,
                       d_model=args.d_model, d_head=args.d_head, d_v=args.d_v, rank=args.rank,
                       targets=args.targets, dtype=np.dtype(args.dtype), xp=xp, seed=args.seed,
                       time_max_L=args.time_max_L or 8192, error_max_L=args.error_max_L or 2048,
                       max_feature_elements=args.max_feature_elements, progress=not args.no_progress)
    csv_path = stem + ".csv"
    write_csv(points, csv_path)
    plot(points, out, kind=kind)
    measured = sum(p.basis == "measured" for p in points)
    print(f"{len(points)} points ({measured} decided by measured wall time, the rest by the cost model) "
          f"in {time.perf_counter() - t0:.1f} s")
    rows = [("M", "family", "degree", "features", "compute", "poly cheaper from L", "worst grad error")]
    for m in sorted({p.bound for p in points}):
        row = [p for p in points if p.bound == m]
        r0 = row[0]
        if r0.status in ("no_polynomial", "rounding"):
            why = "no polynomial meets tol" if r0.status == "no_polynomial" else "float64 rounding too large"
            rows.append((f"{m:g}", "-", "-", "-", "-", f"never ({why})", "-"))
            continue
        wins = [p.L for p in row if p.winner == "poly"]
        errs = [p.grad_error for p in row if p.grad_error is not None]
        rows.append((f"{m:g}", r0.family or "-", str(r0.degree), str(r0.features), r0.compute_dtype or "-",
                     str(min(wins)) if wins else "never in range", _fmt(max(errs) if errs else None)))
    _table(rows)
    print(f"wrote {out} and {csv_path}")
    return 0


def _diagnose(args) -> int:
    if args.tol is not None:
        check_tol(args.tol)
    xp = _xp(args.backend)
    try:
        head, lora, x, note = load_problem(args.file, xp=xp, targets=args.targets)
        result = diagnose(head, lora, x, tol=args.tol, causal=args.causal)
    except (ValueError, TypeError) as err:  # shapes/values gpulora rejects: name the file
        raise CLIError(f"{args.file}: {err}") from None
    print(f"gpulora diagnose {args.file}")
    if note:
        print(f"  ({note})")
    print(result)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m gpulora``; returns the exit status (0, or 2 on a user error)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "survey":
            from .survey import command

            return command(args)
        return {"demo": _demo, "phase": _phase, "diagnose": _diagnose}[args.command](args)
    except BrokenPipeError:  # output piped into e.g. head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CLIError, ValueError, TypeError, OSError, KeyError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"gpulora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpulora: interrupted", file=sys.stderr)
        return 130
