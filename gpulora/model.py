"""The objects of the public API: frozen head weights, LoRA adapters, and the result of a gradient call.

Layout is ``x @ W`` (rows are tokens). A head maps ``x (..., L, d_model)`` to ``Q = x @ Wq + b_q (..., L, H d_head)``,
``K = x @ Wk + b_k (..., L, H_kv d_head)``, ``V = x @ Wv + b_v (..., L, H_kv d_v)``; the projection columns
are split into consecutive groups, one per head, as in a real attention layer (``H_kv < H``: grouped-query
attention). LoRA: ``W = W0 + (alpha / r) B @ A``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from . import backend
from .validation import check_alpha, check_beta, check_bool, check_finite, check_int, check_real_array

__all__ = ["KNOWN_TARGETS", "TARGETS", "TENSOR_TARGETS", "AccuracyWarning", "AdapterGrad", "AttentionGrad", "GradResult",
           "Head", "LoRA", "check_parameters"]

TARGETS = ("q", "k", "v")
TENSOR_TARGETS = ("q", "k1", "k2", "v1", "v2")  # gpulora.tensor.TensorHead
KNOWN_TARGETS = TARGETS + TENSOR_TARGETS[1:]  # what LoRA accepts; each head checks its own


class AccuracyWarning(UserWarning):
    """The result may miss the requested accuracy: a fixed ``degree=`` whose error bound exceeds ``tol``, or a
    ``method="poly"`` call whose a-posteriori estimate (:attr:`GradResult.error_estimate`) exceeds ``tol``.

    Filter it like any warning (``warnings.simplefilter("error", gpulora.AccuracyWarning)`` turns it into
    an exception). ``method="auto"`` never emits it: it runs exact instead.
    """


def check_rows(head, names) -> int:
    """Check the frozen weights ``names`` of ``head`` share ``d_model >= 1`` rows (those of ``names[0]``) and
    return ``d_model``; ``ValueError`` naming the weight otherwise."""
    first = names[0]
    d_model = getattr(head, first).shape[0]
    if d_model < 1:
        raise ValueError(f"{first} must have d_model >= 1 rows, got shape {tuple(getattr(head, first).shape)}")
    for name in names[1:]:
        if getattr(head, name).shape[0] != d_model:
            raise ValueError(f"{name} must have d_model = {d_model} rows like {first}, got shape "
                             f"{tuple(getattr(head, name).shape)}")
    return d_model


def check_columns(head, groups, detail: str = "") -> None:
    """Check each ``(name, label, n)`` of ``groups``: the weight ``name`` of ``head`` has a positive multiple of
    ``n`` columns; ``ValueError`` naming it otherwise (``detail`` is appended to the message)."""
    for name, label, n in groups:
        cols = getattr(head, name).shape[1]
        if cols == 0 or cols % n:
            raise ValueError(f"{name} must have a positive multiple of {label} = {n} columns{detail}, got {cols}")


class QueryShape:
    """``d_model`` and ``d_head`` of a head class whose query weight ``w_q (d_model, heads * d_head)`` holds
    ``heads`` consecutive column groups (:class:`Head`, :class:`gpulora.tensor.TensorHead`)."""

    @property
    def d_model(self) -> int:
        return self.w_q.shape[0]

    @property
    def d_head(self) -> int:
        return self.w_q.shape[1] // self.heads


@dataclasses.dataclass(frozen=True, eq=False)
class Head(QueryShape):
    """Frozen pretrained weights of one attention head (or of ``heads`` heads sharing the input).

    Parameters
    ----------
    w_q : array of shape (d_model, heads * d_head)
    w_k : array of shape (d_model, kv_heads * d_head)
    w_v : array of shape (d_model, kv_heads * d_v)
        NumPy or CuPy, float16, bfloat16 (ml_dtypes), float32 or float64, all from the same library.
    beta : float, optional
        Inverse temperature of ``S = beta * Q @ K^T``; ``None`` means ``1 / sqrt(d_head)``.
    heads : int
        Number of query heads ``H`` packed in the projections (default 1).
    softmax_one : bool
        Use Softmax_1, ``exp(s_ij) / (1 + sum_l exp(s_il))`` (the "outlier-free" attention), instead of
        the softmax.
    kv_heads : int, optional
        Number of key/value heads ``H_kv`` (default ``heads``); it must divide ``heads``. Grouped-query
        attention: key/value head ``j`` serves query heads ``j H/H_kv .. (j+1) H/H_kv - 1`` (Hugging Face's
        ``repeat_kv``); ``kv_heads=1`` is multi-query attention.
    b_q, b_k, b_v : arrays of shape (heads * d_head,), (kv_heads * d_head,), (kv_heads * d_v,), optional
        Projection biases: ``Q = x @ Wq + b_q`` (PEFT: ``base_layer.bias``). They shift the projections;
        the adapter gradients keep their form (docs/math.md section 2).
    """

    w_q: Any
    w_k: Any
    w_v: Any
    beta: float | None = None
    heads: int = 1
    softmax_one: bool = False
    kv_heads: int | None = None
    b_q: Any = None
    b_k: Any = None
    b_v: Any = None

    def __post_init__(self):
        for name in ("w_q", "w_k", "w_v"):
            check_real_array(name, getattr(self, name), ndim=2, half=True)
        for name in ("b_q", "b_k", "b_v"):
            if getattr(self, name) is not None:
                check_real_array(name, getattr(self, name), ndim=1, half=True)
        backend.namespace(*self.arrays().values())
        object.__setattr__(self, "heads", check_int("heads", self.heads, minimum=1))
        kv = self.heads if self.kv_heads is None else check_int("kv_heads", self.kv_heads, minimum=1)
        if self.heads % kv:
            raise ValueError(f"heads = {self.heads} must be a multiple of kv_heads = {kv} (each key/value head "
                             f"serves an equal group of query heads)")
        object.__setattr__(self, "kv_heads", kv)
        object.__setattr__(self, "softmax_one", check_bool("softmax_one", self.softmax_one))
        d_model = check_rows(self, ("w_q", "w_k", "w_v"))
        check_columns(self, (("w_q", "heads", self.heads), ("w_v", "kv_heads", kv)), " (one group per head)")
        want_k = (d_model, kv * self.d_head)
        if tuple(self.w_k.shape) != want_k:
            raise ValueError(f"w_k must have shape {want_k} (kv_heads = {kv} heads of d_head = {self.d_head}), "
                             f"got {tuple(self.w_k.shape)}")
        for t in TARGETS:
            b = self.bias(t)
            if b is not None and b.shape[0] != self.weight(t).shape[1]:
                raise ValueError(f"b_{t} must have shape ({self.weight(t).shape[1]},) like the columns of w_{t}, "
                                 f"got {tuple(b.shape)}")
        beta = 1.0 / math.sqrt(self.d_head) if self.beta is None else check_beta(self.beta)
        object.__setattr__(self, "beta", beta)

    @property
    def d_v(self) -> int:
        return self.w_v.shape[1] // self.kv_heads

    def weight(self, target: str):
        """The frozen weight of ``target`` (``"q"``, ``"k"`` or ``"v"``)."""
        return {"q": self.w_q, "k": self.w_k, "v": self.w_v}[target]

    def bias(self, target: str):
        """The bias of ``target``, or ``None``."""
        return {"q": self.b_q, "k": self.b_k, "v": self.b_v}[target]

    def arrays(self) -> dict:
        """``{name: array}`` of the weights and biases, named as in error messages."""
        out = {"w_q": self.w_q, "w_k": self.w_k, "w_v": self.w_v}
        out.update({f"b_{t}": self.bias(t) for t in TARGETS if self.bias(t) is not None})
        return out


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
            check_real_array(f"adapters[{t!r}] B", b, ndim=2, half=True)
            check_real_array(f"adapters[{t!r}] A", a, ndim=2, half=True)
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


def check_call_types(head, lora, head_type: type, head_name: str, targets=None, where: str = "") -> None:
    """``TypeError`` unless ``head`` is a ``head_type`` (named ``head_name`` in the message) and ``lora`` a
    :class:`LoRA`; with ``targets``, ``ValueError`` when ``lora`` adapts a target outside them (``where`` is
    appended to the name of the fault)."""
    if not isinstance(head, head_type):
        raise TypeError(f"head must be a {head_name}, got {type(head).__name__}")
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora must be a gpulora.LoRA, got {type(lora).__name__}")
    if targets is not None:
        unknown = [t for t in lora.targets if t not in targets]
        if unknown:
            raise ValueError(f"adapters has unknown targets {unknown}{where}; expected a subset of {targets}")


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRecord:
    """What ran: the keyword-only fields every gradient call's result carries (:class:`GradResult`,
    :class:`AttentionGrad`, :class:`gpulora.tensor.AttentionGrad`), filled from the plan
    (``gpulora.dispatch.Plan.fields``). Their meaning is documented on :class:`GradResult`."""

    method: str
    degree: int | None = None
    features: int | None = None
    bound: float = 0.0
    family: str | None = None
    compute_dtype: str | None = None
    note: str = ""
    error_bound: float = 0.0
    error_estimate: float = 0.0


@dataclasses.dataclass(frozen=True)
class GradResult(RunRecord):
    """What :func:`gpulora.lora_grad` returns.

    Attributes
    ----------
    loss : 0-d array or None
        ``0.5 * sum (O - y)^2`` over the real (unpadded) rows, in the namespace and result dtype of the call;
        ``None`` when the call gave ``grad_output`` instead of ``y``.
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
        tolerance", for how ``method="auto"`` uses it. With ``grad_output`` given there is no computed
        residual: the estimate is ``eps`` (the upstream gradient itself is exact).
    dx : array or None
        ``dloss/dx``, shaped like ``x``, when the call asked for it (``return_dx=True``).
    """

    loss: Any
    grads: dict
    dx: Any = None


@dataclasses.dataclass(frozen=True)
class AttentionGrad(RunRecord):
    """What :func:`gpulora.attention_vjp` returns: the vector-Jacobian product of attention.

    Attributes
    ----------
    dq : array of shape (..., H, L, d_head)
    dk : array of shape (..., H_kv, L, d_head)
    dv : array of shape (..., H_kv, L, d_v)
        ``dloss/dq``, ``dloss/dk``, ``dloss/dv`` for the given ``grad_output = dloss/dout`` (``dk``, ``dv``
        summed over the query heads of each key/value head).
    out : array of shape (..., H, L, d_v)
        The attention output, computed on the way.
    method, degree, features, bound, family, compute_dtype, note, error_bound, error_estimate
        As in :class:`GradResult` (``error_bound``: the polynomial's ``eps``; every weight of the
        approximate softmax is within a relative ``2 eps / (1 - eps)`` of the exact one). The upstream
        gradient is exact, so ``error_estimate`` is ``eps`` (measured errors of ``dq``, ``dk``, ``dv``:
        0.02 .. 0.3 ``eps``); 0 for exact.
    """

    dq: Any
    dk: Any
    dv: Any
    out: Any
