"""The objects of the public API: frozen head weights, LoRA adapters, and the result of a gradient call.

Layout is ``x @ W`` (rows are tokens). A head maps ``x (..., L, d_model)`` to ``Q = x @ Wq (..., L, H d_head)``,
``K = x @ Wk``, ``V = x @ Wv (..., L, H d_v)``; with ``heads = H > 1`` the projection columns are split into
``H`` consecutive groups, one per head, as in a real attention layer. LoRA: ``W = W0 + (alpha / r) B @ A``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from . import backend
from .validation import check_alpha, check_beta, check_bool, check_finite, check_int, check_real_array

__all__ = ["KNOWN_TARGETS", "TARGETS", "TENSOR_TARGETS", "AccuracyWarning", "AdapterGrad", "GradResult", "Head", "LoRA",
           "check_parameters"]

TARGETS = ("q", "k", "v")
TENSOR_TARGETS = ("q", "k1", "k2", "v1", "v2")  # gpulora.tensor.TensorHead
KNOWN_TARGETS = TARGETS + TENSOR_TARGETS[1:]  # what LoRA accepts; each head checks its own


class AccuracyWarning(UserWarning):
    """The result may miss the requested accuracy: a fixed ``degree=`` whose error bound exceeds ``tol``, or a
    ``method="poly"`` call whose a-posteriori estimate (:attr:`GradResult.error_estimate`) exceeds ``tol``.

    Filter it like any warning (``warnings.simplefilter("error", gpulora.AccuracyWarning)`` turns it into
    an exception). ``method="auto"`` never emits it: it runs exact instead.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
    """Frozen pretrained weights of one attention head (or of ``heads`` heads sharing the input).

    Parameters
    ----------
    w_q, w_k : array of shape (d_model, heads * d_head)
    w_v : array of shape (d_model, heads * d_v)
        NumPy or CuPy, float32 or float64, all from the same library.
    beta : float, optional
        Inverse temperature of ``S = beta * Q @ K^T``; ``None`` means ``1 / sqrt(d_head)``.
    heads : int
        Number of heads ``H`` packed in the projections (default 1).
    softmax_one : bool
        Use Softmax_1, ``exp(s_ij) / (1 + sum_l exp(s_il))`` (the "outlier-free" attention), instead of
        the softmax.
    """

    w_q: Any
    w_k: Any
    w_v: Any
    beta: float | None = None
    heads: int = 1
    softmax_one: bool = False

    def __post_init__(self):
        for name in ("w_q", "w_k", "w_v"):
            check_real_array(name, getattr(self, name), ndim=2)
        backend.namespace(self.w_q, self.w_k, self.w_v)
        object.__setattr__(self, "heads", check_int("heads", self.heads, minimum=1))
        object.__setattr__(self, "softmax_one", check_bool("softmax_one", self.softmax_one))
        d_model = self.w_q.shape[0]
        if d_model < 1:
            raise ValueError(f"w_q must have d_model >= 1 rows, got shape {tuple(self.w_q.shape)}")
        for name in ("w_k", "w_v"):
            if getattr(self, name).shape[0] != d_model:
                raise ValueError(
                    f"{name} must have d_model = {d_model} rows like w_q, got shape {getattr(self, name).shape}"
                )
        if self.w_k.shape != self.w_q.shape:
            raise ValueError(f"w_k must have the shape of w_q {self.w_q.shape}, got {self.w_k.shape}")
        for name in ("w_q", "w_v"):
            cols = getattr(self, name).shape[1]
            if cols == 0 or cols % self.heads:
                raise ValueError(
                    f"{name} must have a positive multiple of heads = {self.heads} columns, got {cols}"
                )
        beta = 1.0 / math.sqrt(self.d_head) if self.beta is None else check_beta(self.beta)
        object.__setattr__(self, "beta", beta)

    @property
    def d_model(self) -> int:
        return self.w_q.shape[0]

    @property
    def d_head(self) -> int:
        return self.w_q.shape[1] // self.heads

    @property
    def d_v(self) -> int:
        return self.w_v.shape[1] // self.heads

    def weight(self, target: str):
        """The frozen weight of ``target`` (``"q"``, ``"k"`` or ``"v"``)."""
        return {"q": self.w_q, "k": self.w_k, "v": self.w_v}[target]

    def arrays(self) -> dict:
        """``{name: array}`` of the weights, named as in error messages."""
        return {"w_q": self.w_q, "w_k": self.w_k, "w_v": self.w_v}


@dataclasses.dataclass(frozen=True, eq=False)
class LoRA:
    """Low-rank adapters ``W = W0 + (alpha / r) B @ A`` for a non-empty subset of the targets of a head.

    Parameters
    ----------
    adapters : mapping of str to (B, A)
        Target name (``"q"``, ``"k"``, ``"v"``) to a pair ``B (d_model, r)``, ``A (r, d_out)``; ``r`` may
        differ between targets. ``{"q", "v"}`` is the paper's partial adaptation, ``{"q", "k", "v"}`` its
        full adaptation. PEFT: ``B = lora_A.weight.T``, ``A = lora_B.weight.T``.
        Tensor heads (:class:`gpulora.tensor.TensorHead`) take ``"q"``, ``"k1"``, ``"k2"``, ``"v1"``,
        ``"v2"`` instead; each head checks the targets it has.
    alpha : float
        LoRA scaling numerator; the scaling of an adapter of rank ``r`` is ``alpha / r``.
    """

    adapters: Mapping[str, tuple]
    alpha: float

    def __post_init__(self):
        if not isinstance(self.adapters, Mapping):
            raise TypeError(f"adapters must be a dict of target -> (B, A), got {type(self.adapters).__name__}")
        if not self.adapters:
            raise ValueError(f"adapters must name at least one target of {TARGETS}")
        unknown = [t for t in self.adapters if t not in KNOWN_TARGETS]
        if unknown:
            raise ValueError(f"adapters has unknown targets {unknown}; expected a subset of {TARGETS} "
                             f"(or of {TENSOR_TARGETS} for a tensor head)")
        arrays = []
        for t, pair in self.adapters.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"adapters[{t!r}] must be a pair (B, A), got {type(pair).__name__}")
            b, a = pair
            check_real_array(f"adapters[{t!r}] B", b, ndim=2)
            check_real_array(f"adapters[{t!r}] A", a, ndim=2)
            if b.shape[1] < 1 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"adapters[{t!r}]: B of shape (d_model, r) and A of shape (r, d_out) must share r >= 1, "
                    f"got B {tuple(b.shape)} and A {tuple(a.shape)}"
                )
            arrays += [b, a]
        backend.namespace(*arrays)
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "adapters", {t: tuple(self.adapters[t]) for t in KNOWN_TARGETS if t in self.adapters})

    @property
    def targets(self) -> tuple[str, ...]:
        """The adapted targets, in q, k, v (then k1, k2, v1, v2) order."""
        return tuple(self.adapters)

    def scaling(self, target: str) -> float:
        """``alpha / r`` of the adapter of ``target``."""
        return self.alpha / self.adapters[target][0].shape[1]

    def arrays(self) -> dict:
        """``{name: array}`` of every ``B`` and ``A``, named as in error messages."""
        out = {}
        for t, (b, a) in self.adapters.items():
            out[f"adapters[{t!r}] B"], out[f"adapters[{t!r}] A"] = b, a
        return out


def check_parameters(head: Head, lora: LoRA) -> None:
    """Re-check at call time that the weights and adapters are finite: they may have been changed in place
    since :class:`Head` and :class:`LoRA` were built (the usual training loop updates ``B`` and ``A`` in
    place). One fused reduction over all of them, one host read on CuPy; ``O(d_model (d + r))``.

    Raises
    ------
    ValueError
        Naming the first array that holds NaN or inf.
    """
    check_finite({**head.arrays(), **lora.arrays()})


@dataclasses.dataclass(frozen=True)
class AdapterGrad:
    """Gradients of the loss with respect to one adapter's ``B`` (d_model, r) and ``A`` (r, d_out)."""

    B: Any
    A: Any


@dataclasses.dataclass(frozen=True)
class GradResult:
    """What :func:`gpulora.lora_grad` returns.

    Attributes
    ----------
    loss : 0-d array
        ``0.5 * sum (O - y)^2``, in the namespace and dtype of ``x``.
    grads : dict of str to AdapterGrad
        One entry per adapted target.
    method : str
        ``"exact"`` or ``"poly"``: what actually ran.
    degree, features : int or None
        Polynomial degree ``g`` and feature dimension ``k = C(d_head + g, g)`` (poly only).
    bound : float
        ``M = beta * max_i |q_i| * max_j |k_j|``, the bound on ``max |S|`` that was used.
    family : str or None
        The polynomial family (poly only).
    compute_dtype : str or None
        The dtype the polynomial features were computed in (poly only; float64 when float32 rounding
        would exceed the tolerance).
    note : str
        Why ``method="auto"`` chose what it did (empty otherwise).
    error_bound : float
        A-priori bound ``eps`` on the relative error of ``p ~ exp`` on ``[-M, M]``: the measured
        approximation error plus the estimated rounding in ``compute_dtype`` (poly; 0 for exact). Every
        attention weight is then within a relative ``2 eps / (1 - eps)`` and every output row within
        ``2 eps / (1 - eps) * max_j |v_j - mean(v)|``.
    error_estimate : float
        A-posteriori estimate of the relative (Frobenius) error of the gradients, for this call:
        ``eps + E / (|G~| - E)`` with ``|G~|`` the norm of the computed residual ``O~ - y`` and ``E`` the
        bound above on the output error summed over rows (``inf`` when ``|G~| <= E``: the residual may be
        all approximation error, near a perfect fit). Poly only, 0 for exact. See README, "Precision and
        tolerance", for how ``method="auto"`` uses it.
    """

    loss: Any
    grads: dict
    method: str
    degree: int | None = None
    features: int | None = None
    bound: float = 0.0
    family: str | None = None
    compute_dtype: str | None = None
    note: str = ""
    error_bound: float = 0.0
    error_estimate: float = 0.0
