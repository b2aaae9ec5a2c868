"""Seeded tensor-attention problems for the tests, the benchmarks and the phase sweep.

Like :func:`gpulora.testing.make_problem`: inputs generated on the host with ``np.random.default_rng(seed)``
and moved with ``xp.asarray``, unit-norm rows of ``x``, Gaussian weights of variance ``1 / d_model``,
non-zero adapters on every target asked for.
"""

from __future__ import annotations

import numpy as np

from ..model import LoRA
from ..testing import Problem, _random_arrays
from .chain import score_bound
from .grad import prepare
from .model import TARGETS, TensorHead

__all__ = ["make_problem"]


def make_problem(seed=0, *, L=16, d_model=8, d_head=3, d_v=None, r=2, targets=TARGETS, batch=None, heads=1,
                 dtype=np.float64, xp=np, score_bound_=None, beta=None, alpha=None) -> Problem:
    """A random tensor-attention problem: ``Problem(head, lora, x, y)`` with a :class:`TensorHead`.

    ``targets`` is an iterable of names among ``"q", "k1", "k2", "v1", "v2"``. With ``score_bound_`` set,
    ``w_q``, ``w_k1``, ``w_k2`` and their adapters' ``A`` are scaled by a common factor ``c`` (the bound
    scales as ``c^3``) so that :func:`gpulora.tensor.chain.score_bound` equals it.
    """
    targets = tuple(targets)
    if score_bound_ is not None and not score_bound_ > 0:
        raise ValueError(f"score_bound_ must be a float > 0, got {score_bound_!r}")
    d_v = d_head if d_v is None else d_v
    x, w, adapters, y = _random_arrays(seed, TARGETS, targets, L=L, d_model=d_model, d_head=d_head, d_v=d_v, r=r,
                                       batch=batch, heads=heads)
    alpha = float(r) if alpha is None else alpha
    if score_bound_ is not None:
        head = TensorHead(*(w[t] for t in TARGETS), beta=beta, heads=heads)
        prob = prepare(head, LoRA(adapters, alpha=alpha), x)
        c = (score_bound_ / score_bound(prob.q, prob.k1, prob.k2, prob.beta)) ** (1.0 / 3.0)
        w = {t: a * c if t in ("q", "k1", "k2") else a for t, a in w.items()}
        adapters = {t: (b, a * c if t in ("q", "k1", "k2") else a) for t, (b, a) in adapters.items()}

    def dev(a):
        return xp.asarray(np.asarray(a, dtype=dtype))

    head = TensorHead(*(dev(w[t]) for t in TARGETS), beta=beta, heads=heads)
    lora = LoRA({t: (dev(b), dev(a)) for t, (b, a) in adapters.items()}, alpha=alpha)
    return Problem(head, lora, dev(x), dev(y))
