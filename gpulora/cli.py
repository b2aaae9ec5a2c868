"""The command line: ``python -m gpulora demo | phase | diagnose`` (also installed as ``gpulora``).

``demo``      exact vs poly on an embedded problem: time, loss, gradient errors, speedup, diagnosis.
``phase``     the phase-transition sweep over the score bound ``M`` and ``L``: a PNG and a CSV beside it
              (needs the ``plot`` extra: matplotlib, tqdm).
``diagnose``  the diagnosis of a problem saved as ``.npz`` (:mod:`gpulora.io`: keys, limits, ``save_problem``).

User errors (bad options, files that are not problems, values gpulora rejects) print one line
``gpulora: error: ...`` on stderr and exit with status 2. Anything else is a bug and keeps its traceback.
``--debug`` (or the environment variable ``GPULORA_DEBUG=1``) shows the traceback of user errors too.
Output is line-buffered, so a pipe sees each line when it is printed; long steps show a progress bar
when stderr is a terminal (tqdm, when installed). The work itself lives in :mod:`gpulora.phase`,
:mod:`gpulora.diagnosis` and :mod:`gpulora.io`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

from . import DEFAULT_TOL, __version__, backend
from .diagnosis import diagnose
from .io import MAX_PROBLEM_BYTES, NPZ_HELP, ProblemFileError, load_problem
from .model import TARGETS
from .validation import check_tol

__all__ = ["CLIError", "build_parser", "format_speedup", "main"]

DEBUG_ENV = "GPULORA_DEBUG"


class CLIError(Exception):
    """A user error: printed as one line ``gpulora: error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise CLIError(message)


# --- argument types -------------------------------------------------------------------------------------

def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer ``>= minimum``, else the message ``expected {what}``."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, "an integer >= 0")


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _tol(text):
    try:
        return check_tol(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r} ({err})") from None


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
    p.add_argument("--tol", type=_tol, default=None,
                   help=f"target max relative error of the polynomial p ~ exp on [-M, M], 0 < tol < 1 "
                        f"(default {DEFAULT_TOL:g})")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                   help="array library: auto = CuPy when a CUDA device is present, else NumPy (default auto)")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="input dtype (default float32)")
    _debug_option(p, default=argparse.SUPPRESS)


def _debug_option(p, default):
    p.add_argument("--debug", action="store_true", default=default,
                   help=f"show the traceback of user errors too (also: environment {DEBUG_ENV}=1)")


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
    p.add_argument("--seed", type=_seed, default=0, help="random seed, an integer >= 0 (default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gpulora``."""
    parser = _Parser(prog="gpulora", description="Exact and polynomial-method LoRA gradients of attention "
                     "heads (Hu et al., ICLR 2025).",
                     epilog="User errors print one line 'gpulora: error: ...' and exit with status 2; other "
                     f"errors are bugs and keep their traceback. --debug or {DEBUG_ENV}=1 shows the "
                     "traceback of user errors too.")
    parser.add_argument("--version", action="version", version=f"gpulora {__version__}")
    _debug_option(parser, default=False)
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
    from .phase import DEFAULT_BOUNDS, DEFAULT_MAX_FEATURE_ELEMENTS

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
    diag.add_argument("--max-bytes", type=_positive_int, default=MAX_PROBLEM_BYTES,
                      help="refuse files whose arrays declare more bytes than this, checked from their "
                           "headers before loading (default %(default)s = 2 GiB)")
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
        raise CLIError("--backend cupy needs a CUDA device and CuPy (pip install 'gpulora[cuda13]', or "
                       "'gpulora[cuda12]' for a CUDA 12 driver); none was found")
    import cupy

    return cupy


def _fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


def format_speedup(exact_seconds: float, poly_seconds: float) -> str:
    """``"poly 27x faster"`` / ``"poly 2.6x slower"``: the time ratio with two significant digits (whole
    numbers from 100 on), always as a factor of at least 1."""
    ratio = exact_seconds / poly_seconds
    factor = ratio if ratio >= 1 else 1 / ratio
    digits = f"{factor:.0f}" if factor >= 100 else f"{factor:.2g}"
    return f"poly {digits}x {'faster' if ratio >= 1 else 'slower'}"


def _require(module: str, what: str, extra: str) -> None:
    """CLIError naming the extra to install when ``module`` is not importable."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise CLIError(f"{what} needs {module}, which is not installed: pip install 'gpulora[{extra}]'")


@contextlib.contextmanager
def _rejected_values(prefix=""):
    """Turn a ``ValueError`` of gpulora's validation of user-chosen values into a :class:`CLIError`."""
    try:
        yield
    except ValueError as err:
        raise CLIError(f"{prefix}{err}") from err


def check_outputs(option: str, *paths) -> None:
    """Refuse, before any work, output ``paths`` of ``option`` that cannot be written: a folder that does not
    exist, or a path that is a directory. Raises :class:`CLIError` (a user error, exit 2)."""
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CLIError(f"{option}: folder {folder} does not exist")
        if os.path.isdir(path):
            raise CLIError(f"{option}: {path} is a directory, not a file to write")


# --- subcommands ----------------------------------------------------------------------------------------

def _demo(args) -> int:
    from .phase import compare, progress_bar
    from .testing import make_problem

    xp = _xp(args.backend)
    name = "cupy" if xp is not np else "numpy"
    kw = dict(d_model=args.d_model, d_head=args.d_head, d_v=args.d_v, r=args.rank, targets=args.targets,
              dtype=np.dtype(args.dtype), xp=xp, score_bound=args.bound)
    tol = DEFAULT_TOL if args.tol is None else args.tol
    print(f"gpulora demo: one attention head, L={args.L} tokens, d_model={args.d_model}, d_head={args.d_head}, "
          f"d_v={args.d_v}, LoRA rank {args.rank} on {','.join(args.targets)}, {args.dtype}, {name}"
          f"{', causal' if args.causal else ''}")
    print(f"inputs: unit-norm rows, weights scaled so that M = beta max|q_i| max|k_j| = {args.bound:g}; "
          f"tol {tol:g}")
    with _rejected_values(), progress_bar(total=5, desc="demo", unit="step") as bar:
        def step(what):
            bar.set_postfix_str(what, refresh=False)
            bar.update()

        bar.set_postfix_str("warm-up")
        with _rejected_values("--bound: "):  # weights that give M past the dtype
            warm = make_problem(args.seed, L=min(args.L, 256), **kw)
        compare(warm, tol=tol, causal=args.causal)
        prob = make_problem(args.seed, L=args.L, **kw)
        cmp = compare(prob, tol=tol, causal=args.causal, on_step=step)
        step("diagnosis")
        diagnosis = diagnose(prob.head, prob.lora, prob.x, tol=tol, causal=args.causal)
        bar.update()
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
        print(f"\nspeedup (exact time / poly time): {format_speedup(cmp.exact_seconds, cmp.poly_seconds)}")
    print()
    print(diagnosis)
    return 0


def _table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _phase(args) -> int:
    _require("matplotlib", "python -m gpulora phase (the figure)", "plot")
    from .phase import boundary_text, plot, summary_rows, sweep, write_csv

    out = args.out
    stem, ext = os.path.splitext(out)
    if ext.lower() != ".png":
        raise CLIError(f"--out must name a .png file, got {out!r}")
    check_outputs("--out", out, stem + ".csv")
    xp = _xp(args.backend)
    t0 = time.perf_counter()
    if args.attention == "tensor":
        from .tensor import phase as tensor_phase

        kind = tensor_phase.TENSOR
        with _rejected_values():
            points = tensor_phase.sweep(
                args.bounds or tensor_phase.DEFAULT_BOUNDS, args.lengths or tensor_phase.DEFAULT_LENGTHS,
                tol=args.tol, d_model=args.d_model, d_head=args.d_head, d_v=args.d_v, rank=args.rank,
                dtype=np.dtype(args.dtype), xp=xp, seed=args.seed, time_max_L=args.time_max_L or 256,
                error_max_L=args.error_max_L or 128, max_feature_elements=args.max_feature_elements,
                progress=not args.no_progress)
    else:
        from .phase import DEFAULT_BOUNDS, DEFAULT_LENGTHS, MATRIX

        kind = MATRIX
        with _rejected_values():
            points = sweep(args.bounds or DEFAULT_BOUNDS, args.lengths or DEFAULT_LENGTHS, tol=args.tol,
                           d_model=args.d_model, d_head=args.d_head, d_v=args.d_v, rank=args.rank,
                           targets=args.targets, dtype=np.dtype(args.dtype), xp=xp, seed=args.seed,
                           time_max_L=args.time_max_L or 8192, error_max_L=args.error_max_L or 2048,
                           max_feature_elements=args.max_feature_elements,
                           progress=not args.no_progress)
    csv_path = stem + ".csv"
    write_csv(points, csv_path)
    plot(points, out, kind=kind)
    measured = sum(p.basis == "measured" for p in points)
    print(f"{len(points)} points ({measured} decided by measured wall time, the rest by the cost model) "
          f"in {time.perf_counter() - t0:.1f} s")
    _table(summary_rows(points))
    print(f"boundary: {boundary_text(points)}")
    print(f"wrote {out} and {csv_path}")
    return 0


def _diagnose(args) -> int:
    xp = _xp(args.backend)
    try:
        head, lora, x, note = load_problem(args.file, xp=xp, targets=args.targets, max_bytes=args.max_bytes)
    except ProblemFileError as err:  # names the file and what it is not
        raise CLIError(str(err)) from err
    except (ValueError, TypeError) as err:  # arrays that Head / LoRA reject
        raise CLIError(f"{args.file}: not a valid problem: {err}") from err
    with _rejected_values(f"{args.file}: "):  # shapes/values gpulora rejects: name the file
        result = diagnose(head, lora, x, tol=args.tol, causal=args.causal)
    print(f"gpulora diagnose {args.file}")
    if note:
        print(f"  ({note})")
    print(result)
    return 0


def _debug_requested(argv) -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def main(argv=None) -> int:
    """Entry point of ``python -m gpulora``; returns the exit status (0, or 2 on a user error).

    User errors (:class:`CLIError`: bad options, files that are not problems, values gpulora rejects)
    print one line and return 2, unless ``--debug`` or ``GPULORA_DEBUG=1`` asks for the traceback. Any
    other exception is a bug and propagates with its traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a pipe sees each line as it is printed
        sys.stdout.reconfigure(line_buffering=True)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "survey":
            from .survey import command

            with _rejected_values():  # SurveyError and gpulora's rejections of the user's values
                return command(args)
        return {"demo": _demo, "phase": _phase, "diagnose": _diagnose}[args.command](args)
    except BrokenPipeError:  # output piped into e.g. head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CLIError as err:
        if _debug_requested(argv):
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"gpulora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpulora: interrupted", file=sys.stderr)
        return 130
