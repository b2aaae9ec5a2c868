"""The feature budget: refuse, in milliseconds and before any table or array is built, a polynomial whose
feature map would not fit.

``k = C(d + g, g)`` grows like ``d^g / g!``: a pretrained head (``d_head = 32``) at a bound that needs degree
17 asks for ``k ~ 4.8e13`` features. Both limits below are checked on counts (a binomial, cheap), by
:func:`gpulora.lora_grad` (and ``forward``, ``loss``, ``diagnose``) when it plans a polynomial, by
:func:`gpulora.poly_features`, and by the monomial table itself:

:data:`MAX_FEATURES` ``= 2^20``
    Columns of one monomial table. The table is built on the host at about 1 us per column, and every
    feature row holds ``k`` numbers; past a million columns the polynomial method loses to exact at any
    length that fits in memory.
:data:`MAX_BYTES`
    The estimated peak memory of the polynomial path (:func:`poly_bytes`): 8 GiB by default, or the
    environment variable ``GPULORA_MAX_POLY_BYTES`` (read at import; the module attribute may be changed).

A refusal is a :class:`FeatureBudgetError` (a ``ValueError``) naming the feature count, the memory and what
to do instead; ``method="auto"`` then runs exact and says why in ``GradResult.note``.
"""

from __future__ import annotations

import os

from .monomials import feature_dim

__all__ = ["MAX_BYTES", "MAX_FEATURES", "FeatureBudgetError", "check_budget", "poly_bytes"]

MAX_FEATURES = 1 << 20
MAX_BYTES = int(os.environ.get("GPULORA_MAX_POLY_BYTES", 8 << 30))


class FeatureBudgetError(ValueError):
    """The feature map of the polynomial would exceed :data:`MAX_FEATURES` or :data:`MAX_BYTES`."""


def poly_bytes(lead: int, L: int, k: int, d_head: int, d_v: int, itemsize: int) -> int:
    """Estimated peak memory of the polynomial gradient of ``lead`` (batch x heads) problems of ``L`` rows,
    in the compute dtype: the larger of the streamed chains' estimates (``gpulora.poly.chain.peak_bytes``,
    ``gpulora.poly.causal.peak_bytes``; blocks of ``L``, states of ``k (1 + d_v) (1 + d_head)``, no ``L k``)."""
    from . import causal, chain  # late: the chains import the monomial table, which imports this module

    return max(chain.peak_bytes(lead, L, k, d_head, d_v, itemsize),
               causal.peak_bytes(lead, L, k, d_head, d_v, itemsize))


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} PiB"  # pragma: no cover


def check_budget(d: int, g: int, *, nbytes: int | None = None, what: str = "the polynomial") -> int:
    """``k = C(d + g, g)``, or :class:`FeatureBudgetError` when ``k > MAX_FEATURES`` or ``nbytes > MAX_BYTES``.

    ``nbytes`` is the memory the caller would need (:func:`poly_bytes`, or the size of one feature map).
    Cost ``O(g)``: nothing is allocated.
    """
    k = feature_dim(d, g)
    over_k = k > MAX_FEATURES
    over_b = nbytes is not None and nbytes > MAX_BYTES
    if over_k or over_b:
        need = "" if nbytes is None else f" and about {_human(nbytes)} of memory"
        limits = f"at most {MAX_FEATURES} features and {_human(MAX_BYTES)} (GPULORA_MAX_POLY_BYTES)"
        raise FeatureBudgetError(
            f"{what} of degree {g} in {d} coordinates needs k = C({d} + {g}, {g}) = {k:.4g} features{need}, "
            f"past the budget of {limits}; use method='exact' (or method='auto'), or make the problem "
            f"smaller for poly: a smaller d_head, a smaller score bound (normalised inputs, smaller beta), "
            f"or a looser tol (a lower degree)"
        )
    return k
