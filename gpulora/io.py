"""Problems on disk: :func:`save_problem` writes a head, its adapters and the inputs as one ``.npz`` file,
:func:`load_problem` reads it back (``python -m gpulora diagnose FILE.npz``).

:func:`load_problem` does not trust the file. Before any array is read it opens the archive's directory
and parses every member's ``.npy`` header (a few hundred bytes each), and refuses, with a
:class:`ProblemFileError` that says what the file is not:

- a file that is not a zip archive, or a single ``.npy`` array, or a member that is not a ``.npy`` array;
- an array of Python objects (pickled data is never loaded) or of anything but real numbers;
- an array whose header declares more bytes than its member holds (a truncated or forged file);
- arrays that declare more than ``max_bytes`` in all (default :data:`MAX_PROBLEM_BYTES`, 2 GiB): a header
  declaring 149 GiB, or a 4 MiB archive that would inflate to 4 GiB, is refused before anything is
  allocated. Raise the limit with ``max_bytes=`` (the command line's ``--max-bytes``) for real problems
  that large.

A zip member never inflates past the uncompressed size its directory entry declares (Python's
``zipfile`` stops there), so the declared sizes bound the memory the load can take.
"""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

from . import backend
from .model import TARGETS, Head, LoRA

__all__ = ["MAX_PROBLEM_BYTES", "NPZ_HELP", "NPZ_KEYS", "ProblemFileError", "inspect_npz", "load_problem",
           "save_problem"]

MAX_PROBLEM_BYTES = 1 << 31  # default limit on the bytes the arrays of one problem file may declare

NPZ_KEYS = (("w_q", "w_k", "w_v", "x", "beta", "heads", "kv_heads", "softmax_one", "alpha")
            + tuple(f"b_{t}" for t in TARGETS) + tuple(f"{m}_{t}" for t in TARGETS for m in "BA"))
REQUIRED_KEYS = ("w_q", "w_k", "w_v", "x")
_SCALAR_KEYS = ("beta", "heads", "kv_heads", "softmax_one", "alpha")

NPZ_HELP = """\
keys of the .npz file (np.savez):
  w_q, w_k    (d_model, H*d_head)   frozen query/key weights, layout x @ W
  w_v         (d_model, H*d_v)      frozen value weights
  x           (L, d_model) or (batch, L, d_model)   inputs
  beta        scalar, optional      inverse temperature (default 1/sqrt(d_head))
  heads       scalar int, optional  number of heads H packed in the columns (default 1)
  kv_heads    scalar int, optional  key/value heads H_kv (grouped-query; w_k, w_v (d_model, H_kv*d); default H)
  softmax_one scalar 0/1, optional  Softmax_1 (default 0)
  b_q, b_k, b_v                     optional biases, shaped like a column of w_q, w_k, w_v
  B_q, A_q, B_k, A_k, B_v, A_v      optional LoRA adapters, B (d_model, r), A (r, d_out), in pairs
  alpha       scalar, required with adapters: W = W0 + (alpha/r) B A
Without adapters the frozen head is diagnosed (zero adapters on --targets).
gpulora.io.save_problem(path, head, lora, x) writes such a file."""


class ProblemFileError(ValueError):
    """A problem file that :func:`load_problem` refuses; the message names the file and what it is not."""


def save_problem(path, head: Head, lora: LoRA | None, x) -> None:
    """Save ``head`` (its weights, biases, ``beta``, ``heads``, ``kv_heads``, ``softmax_one``), ``lora`` (or
    None) and ``x`` to ``path`` (.npz, keys :data:`NPZ_KEYS`); :func:`load_problem` gives them back.

    Arrays are copied to the host (CuPy) and stored uncompressed in their dtype, except bfloat16, which
    ``.npz`` cannot hold: it is stored as float32, exactly (and loads as float32; gpulora computes half
    precision in float32 either way). ``np.savez`` appends ``.npz`` to a path without it. Cost: one pass over
    the arrays.
    """
    data = {"w_q": head.w_q, "w_k": head.w_k, "w_v": head.w_v, "x": x, "beta": np.float64(head.beta),
            "heads": np.int64(head.heads), "kv_heads": np.int64(head.kv_heads),
            "softmax_one": np.int64(head.softmax_one)}
    data.update({f"b_{t}": head.bias(t) for t in TARGETS if head.bias(t) is not None})
    if lora is not None:
        data["alpha"] = np.float64(lora.alpha)
        for t, (b, a) in lora.adapters.items():
            data[f"B_{t}"], data[f"A_{t}"] = b, a

    def host(a):
        a = backend.to_numpy(a)
        return a.astype(np.float32) if a.dtype.kind == "V" or a.dtype.name == "bfloat16" else a

    np.savez(path, **{k: host(v) for k, v in data.items()})


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def _npy_header(member):
    """``(shape, dtype)`` from the header of an open ``.npy`` stream; ValueError if it is not one."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]}, which np.savez does not write for "
                         f"numeric arrays")
    return shape, dtype


def inspect_npz(path, *, max_bytes: int = MAX_PROBLEM_BYTES) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays of the ``.npz`` file ``path``, read from their headers only.

    Cost: the archive's directory and one ``.npy`` header per member; no array data is read.

    Raises
    ------
    ProblemFileError
        If ``path`` is not a ``.npz`` archive of real numeric arrays, or its arrays declare more than
        ``max_bytes`` bytes in all (see the module docstring).
    """
    if not os.path.exists(path):
        raise ProblemFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ProblemFileError(f"{path}: a directory, not a .npz file")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise ProblemFileError(f"{path}: a single .npy array (np.save), not a .npz archive (np.savez) with the "
                               f"keys {', '.join(REQUIRED_KEYS)}")
    if not zipfile.is_zipfile(path):
        raise ProblemFileError(f"{path}: not a .npz archive (not a zip file; np.savez writes .npz archives)")
    arrays, total = {}, 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if not name.endswith(".npy") or "/" in name:
                    raise ProblemFileError(f"{path}: not a .npz archive of arrays: member {name!r} is not a "
                                           f".npy file")
                key = name[:-4]
                with archive.open(info) as member:
                    try:
                        shape, dtype = _npy_header(member)
                    except ValueError as err:
                        raise ProblemFileError(f"{path}: member {name!r} is not a .npy array ({err})") from None
                if dtype.hasobject:
                    raise ProblemFileError(f"{path}: key {key!r} holds Python objects (dtype {dtype}), not "
                                           f"numbers; pickled data is never loaded")
                if dtype.kind not in "iuf":
                    raise ProblemFileError(f"{path}: key {key!r} holds {dtype} values, not real numbers")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > max_bytes:
                    raise ProblemFileError(f"{path}: key {key!r} declares a {shape} {dtype} array of "
                                           f"{_size(nbytes)}, more than the limit of {_size(max_bytes)} "
                                           f"(max_bytes, the command line's --max-bytes)")
                if nbytes > info.file_size:
                    raise ProblemFileError(f"{path}: key {key!r} is not a complete array: its header declares "
                                           f"{shape} {dtype} ({_size(nbytes)}) but the member holds "
                                           f"{_size(info.file_size)}")
                total += nbytes
                arrays[key] = (shape, dtype)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as err:
        raise ProblemFileError(f"{path}: not a readable .npz archive ({err})") from None
    if total > max_bytes:
        raise ProblemFileError(f"{path}: its arrays declare {_size(total)} in all, more than the limit of "
                               f"{_size(max_bytes)} (max_bytes, the command line's --max-bytes)")
    return arrays


def _scalar(path, arrays, key, kind):
    v = arrays[key]
    if v.shape != ():
        raise ProblemFileError(f"{path}: key {key!r} must be a scalar, got shape {v.shape}")
    if kind is int:
        if v.dtype.kind not in "iu" and float(v) != int(v):
            raise ProblemFileError(f"{path}: key {key!r} must be an integer, got {v.item()!r}")
        return int(v)
    return float(v)


def load_problem(path, *, xp=np, targets="qv", max_bytes: int = MAX_PROBLEM_BYTES):
    """Read a problem saved with the keys of :data:`NPZ_KEYS` (:func:`save_problem`, or ``np.savez``).

    Parameters
    ----------
    path : str or path-like
        The ``.npz`` file.
    xp : module
        Array library the arrays are placed in (``numpy`` or ``cupy``).
    targets : str
        Targets of the zero adapters used when the file has none (the frozen head is diagnosed).
    max_bytes : int
        Limit on the bytes that the file's arrays may declare in all, checked before reading
        (default :data:`MAX_PROBLEM_BYTES`).

    Returns
    -------
    head : Head
    lora : LoRA
    x : array
    note : str
        Empty, or says that the file had no adapters.

    Raises
    ------
    ProblemFileError
        (a ``ValueError``) if the file is not a readable problem; the message names the file and what it is not.
    ValueError, TypeError
        If the arrays are not a valid problem for :class:`Head` / :class:`LoRA`.
    """
    declared = inspect_npz(path, max_bytes=max_bytes)
    keys = set(declared)
    unknown = sorted(keys - set(NPZ_KEYS))
    if unknown:
        raise ProblemFileError(f"{path}: not a gpulora problem: unknown keys {unknown}; expected {', '.join(NPZ_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise ProblemFileError(f"{path}: not a gpulora problem: missing required keys {missing} "
                               f"(have {sorted(keys)})")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in keys}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ProblemFileError(f"{path}: not a readable .npz archive: cannot read its arrays ({err})") from None
    beta = _scalar(path, arrays, "beta", float) if "beta" in arrays else None
    heads = _scalar(path, arrays, "heads", int) if "heads" in arrays else 1
    kv_heads = _scalar(path, arrays, "kv_heads", int) if "kv_heads" in arrays else None
    softmax_one = _scalar(path, arrays, "softmax_one", int) if "softmax_one" in arrays else 0
    if softmax_one not in (0, 1):
        raise ProblemFileError(f"{path}: key 'softmax_one' must be 0 or 1, got {softmax_one}")
    dev = {k: xp.asarray(v) for k, v in arrays.items() if k not in _SCALAR_KEYS}
    head = Head(dev["w_q"], dev["w_k"], dev["w_v"], beta=beta, heads=heads, kv_heads=kv_heads,
                softmax_one=bool(softmax_one), b_q=dev.get("b_q"), b_k=dev.get("b_k"), b_v=dev.get("b_v"))
    adapters = {}
    for t in TARGETS:
        have = [f"{m}_{t}" in arrays for m in "BA"]
        if any(have) and not all(have):
            raise ProblemFileError(f"{path}: not a complete problem: the adapter of {t!r} needs both B_{t} and A_{t}")
        if all(have):
            adapters[t] = (dev[f"B_{t}"], dev[f"A_{t}"])
    if adapters:
        if "alpha" not in arrays:
            raise ProblemFileError(f"{path}: not a complete problem: key 'alpha' is required when adapters are "
                                   f"saved (W = W0 + (alpha/r) B A)")
        return head, LoRA(adapters, alpha=_scalar(path, arrays, "alpha", float)), dev["x"], ""
    z = xp.zeros((head.d_model, 1), dtype=dev["w_q"].dtype)
    lora = LoRA({t: (z, xp.zeros((1, head.weight(t).shape[1]), dtype=z.dtype)) for t in targets}, alpha=1.0)
    note = f"no adapters in the file: the frozen head is diagnosed, costs counted for targets {targets}"
    return head, lora, dev["x"], note
