"""Helpers shared by the tests, the benchmarks and the command line: seeded problems, errors, oracles.

Inputs are generated on the host with ``np.random.default_rng(seed)`` and moved with ``xp.asarray``, so
NumPy and CuPy see identical numbers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from . import backend
from .model import Head, LoRA

__all__ = ["Problem", "check_kernel_errors", "finite_difference_grads", "kernel_vs_twin", "make_problem",
           "masked_polynomial_weights", "rel_error", "simulator_results", "time_call"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A LoRA attention problem: ``head``, ``lora``, ``x``, ``y`` ready for :func:`gpulora.lora_grad`."""

    head: Head
    lora: LoRA
    x: Any
    y: Any


def _random_arrays(seed, names, targets, *, L, d_model, d_head, d_v, r, batch, heads):
    """``(x, w, adapters, y)`` float64 NumPy draws of a random problem, in this order from ``seed``: unit rows
    ``x`` of shape ``(batch?, L, d_model)``; Gaussian weights ``w[t]`` of variance ``1 / d_model`` for each
    name ``t`` of ``names`` (``heads * d_v`` columns for names starting with ``"v"``, else ``heads * d_head``);
    non-zero adapters ``(B, A)`` for each of ``targets``; targets ``y`` of shape ``(batch?, L, heads * d_v)``."""
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    x = rng.standard_normal(lead + (L, d_model))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    w = {t: rng.standard_normal((d_model, heads * (d_v if t.startswith("v") else d_head))) / math.sqrt(d_model)
         for t in names}
    adapters = {t: (rng.standard_normal((d_model, r)) / math.sqrt(d_model),
                    rng.standard_normal((r, w[t].shape[1])) / math.sqrt(r)) for t in targets}
    y = rng.standard_normal(lead + (L, heads * d_v))
    return x, w, adapters, y


def make_problem(seed=0, *, L=64, d_model=16, d_head=8, d_v=None, r=4, targets="qv", batch=None, heads=1,
                 dtype=np.float64, xp=np, score_bound=None, beta=None, softmax_one=False, alpha=None) -> Problem:
    """A random problem, optionally scaled so that ``beta * max|q_i| * max|k_j|`` equals ``score_bound``.

    Rows of ``x`` are unit vectors (normalised inputs, as the paper advises); weights are Gaussian with
    variance ``1 / d_model``; adapters are non-zero (unlike a fresh LoRA init) so every gradient term is
    exercised. With ``score_bound`` set, ``w_q``/``w_k`` and the q/k adapters are scaled by a common factor
    to hit that bound exactly.
    """
    if score_bound is not None and not score_bound > 0:
        raise ValueError(f"score_bound must be a float > 0, got {score_bound!r}")
    d_v = d_head if d_v is None else d_v
    x, w, adapters, y = _random_arrays(seed, "qkv", targets, L=L, d_model=d_model, d_head=d_head, d_v=d_v, r=r,
                                       batch=batch, heads=heads)
    alpha = float(r) if alpha is None else alpha
    beta_ = 1 / math.sqrt(d_head) if beta is None else beta
    if score_bound is not None:
        lead = x.shape[:-2]
        wq = w["q"] + (alpha / r * adapters["q"][0] @ adapters["q"][1] if "q" in adapters else 0)
        wk = w["k"] + (alpha / r * adapters["k"][0] @ adapters["k"][1] if "k" in adapters else 0)
        q = (x @ wq).reshape(lead + (L, heads, d_head))
        k = (x @ wk).reshape(lead + (L, heads, d_head))
        qn = np.linalg.norm(q, axis=-1).max(axis=-2)  # per (batch, head)
        kn = np.linalg.norm(k, axis=-1).max(axis=-2)
        c = math.sqrt(score_bound / (beta_ * float(np.max(qn * kn))))
        scaled = (w["q"], w["k"], *(adapters[t][1] for t in "qk" if t in adapters))
        big = c * max(float(np.max(np.abs(a))) for a in scaled)
        if not big < float(np.finfo(dtype).max):
            raise ValueError(f"score_bound = {score_bound:g} needs q/k weights of size {big:.3g}, past "
                             f"{np.dtype(dtype).name} (largest {float(np.finfo(dtype).max):.3g})")
        w["q"], w["k"] = w["q"] * c, w["k"] * c
        adapters = {t: (b, a * c if t in "qk" else a) for t, (b, a) in adapters.items()}

    def dev(a):
        return xp.asarray(np.asarray(a, dtype=dtype))

    head = Head(dev(w["q"]), dev(w["k"]), dev(w["v"]), beta=beta, heads=heads, softmax_one=softmax_one)
    lora = LoRA({t: (dev(b), dev(a)) for t, (b, a) in adapters.items()}, alpha=alpha)
    return Problem(head, lora, dev(x), dev(y))


def rel_error(a, b) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||`` (host floats; ``0`` when both vanish)."""
    a = backend.to_numpy(a).astype(np.float64)
    b = backend.to_numpy(b).astype(np.float64)
    nb = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / nb) if nb > 0 else float(diff)


def finite_difference_grads(loss_fn, lora: LoRA, h=1e-6) -> dict:
    """Central differences of ``loss_fn(lora) -> float`` in every entry of every ``B`` and ``A`` (NumPy float64).

    ``O(#params)`` loss evaluations: tiny problems only.
    """
    out = {}
    for t, (b, a) in lora.adapters.items():
        grads = []
        for which, arr in (("B", b), ("A", a)):
            g = np.zeros(arr.shape)
            for idx in np.ndindex(arr.shape):
                vals = []
                for sign in (1, -1):
                    pert = np.array(arr, dtype=np.float64)
                    pert[idx] += sign * h
                    pair = (pert, a) if which == "B" else (b, pert)
                    vals.append(loss_fn(LoRA({**lora.adapters, t: pair}, alpha=lora.alpha)))
                g[idx] = (vals[0] - vals[1]) / (2 * h)
            grads.append(g)
        out[t] = tuple(grads)
    return out


def time_call(fn, *, min_time=0.2, max_repeat=3, timer=time.perf_counter):
    """Call ``fn()`` until ``min_time`` seconds are spent or ``max_repeat`` calls (at least one); each call
    ends with :func:`gpulora.backend.synchronize` before the clock stops. Returns the last result and the
    fastest time in seconds."""
    best, spent, out = math.inf, 0.0, None
    for _ in range(max_repeat):
        t0 = timer()
        out = fn()
        backend.synchronize()
        dt = timer() - t0
        best, spent = min(best, dt), spent + dt
        if spent >= min_time:
            break
    return out, best


def kernel_vs_twin(kernel, twin, inputs, xp, *, error=rel_error) -> dict:
    """Errors of ``kernel`` against its NumPy ``twin`` (docs/math.md section 7), as a JSON-able dict.

    ``inputs`` (host arrays) are run in float64 and rounded to float32. The kernel gets ``xp`` copies with
    every :func:`gpulora.backend.empty` allocation NaN-poisoned (an unwritten element shows); its float64
    output is compared with the float64 twin, and its float32 output with the twin on the float32 inputs
    widened to float64 (the arithmetic error alone), beside the float32 twin's own error. Check the dict
    with :func:`check_kernel_errors`.
    """
    x64 = [np.asarray(a, dtype=np.float64) for a in inputs]
    x32 = [a.astype(np.float32) for a in x64]
    ref64 = twin(*x64)
    ref32_in64 = twin(*[a.astype(np.float64) for a in x32])
    twin32 = twin(*x32)
    with backend.poisoned():
        out64 = backend.to_numpy(kernel(*[xp.asarray(a) for a in x64]))
        out32 = backend.to_numpy(kernel(*[xp.asarray(a) for a in x32]))
    return {
        "shape_ok": out64.shape == ref64.shape and out32.shape == ref64.shape,
        "dtype_ok": out64.dtype == np.float64 and out32.dtype == np.float32,
        "finite": bool(np.isfinite(out64).all() and np.isfinite(out32).all()),
        "err64": error(out64, ref64),
        "err32_kernel": error(out32.astype(np.float64), ref32_in64),
        "err32_twin": error(twin32.astype(np.float64), ref32_in64),
    }


def check_kernel_errors(res: dict) -> None:
    """Assert a :func:`kernel_vs_twin` result: right shapes and dtypes, every element written and finite,
    float64 within 1e-12, float32 at most twice the float32 twin's error plus one float32 epsilon."""
    assert res["shape_ok"] and res["dtype_ok"], res
    assert res["finite"], f"unwritten (NaN-poisoned) or non-finite output: {res}"
    assert res["err64"] <= 1e-12, res
    assert res["err32_kernel"] <= 2 * res["err32_twin"] + float(np.finfo(np.float32).eps), res


def simulator_results(script, *, timeout=600) -> dict:
    """Run ``script`` with ``NUMBA_ENABLE_CUDASIM=1`` (set before ``numba.cuda`` is first imported, so this
    process keeps the real target) and return the JSON object on the last line of its output."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"simulator run of {script} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def masked_polynomial_weights(s, coef, *, key_mask=None, query_mask=None, causal=False, softmax_one=False):
    """Dense ``F~`` with masks (host NumPy, small ``L``): ``p(s)`` on the real keys (``j <= i`` if causal),
    rows normalised (``+1`` for Softmax_1), padded query rows and rows without a key all zero.

    ``s (..., L, L)`` scores; masks are boolean, broadcastable to ``(..., L)``, True for real tokens. With
    :func:`gpulora.exact.reference.dense_loss_grads` (and zero targets on padded rows) this is the
    reference of the masked polynomial chains. ``O(L^2)`` memory.
    """
    w = np.zeros_like(s)
    for c in reversed(list(coef)):  # Horner
        w = w * s + c
    L = s.shape[-1]
    keep = np.ones(s.shape, dtype=bool)
    if causal:
        keep &= np.arange(L)[None, :] <= np.arange(L)[:, None]
    if key_mask is not None:
        keep &= np.asarray(key_mask)[..., None, :]
    w = np.where(keep, w, 0.0)
    den = np.sum(w, axis=-1, keepdims=True) + (1.0 if softmax_one else 0.0)
    f = np.where(den != 0, w / np.where(den != 0, den, 1.0), 0.0)
    if query_mask is not None:
        f = np.where(np.asarray(query_mask)[..., :, None], f, 0.0)
    return f
