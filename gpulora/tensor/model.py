"""The frozen weights of a tensor-attention head (Alman & Song, ICLR 2024).

Layout is ``x @ W`` (rows are tokens): ``Q = x @ Wq``, ``K1 = x @ Wk1``, ``K2 = x @ Wk2`` of shape
``(..., L, H d_head)`` and ``V1 = x @ Wv1``, ``V2 = x @ Wv2`` of shape ``(..., L, H d_v)``; with ``heads = H``
the columns split into ``H`` consecutive groups, one per head, as for :class:`gpulora.Head`. Adapters are a
:class:`gpulora.LoRA` over targets among ``"q", "k1", "k2", "v1", "v2"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import backend
from ..model import TENSOR_TARGETS, QueryShape, check_columns, check_rows
from ..validation import check_beta, check_int, check_real_array

__all__ = ["TARGETS", "TensorHead"]

TARGETS = TENSOR_TARGETS


@dataclasses.dataclass(frozen=True, eq=False)
class TensorHead(QueryShape):
    """Frozen pretrained weights of one tensor-attention head (or of ``heads`` heads sharing the input).

    Parameters
    ----------
    w_q, w_k1, w_k2 : array of shape (d_model, heads * d_head)
    w_v1, w_v2 : array of shape (d_model, heads * d_v)
        NumPy or CuPy, float32 or float64, all from the same library.
    beta : float, optional
        Inverse temperature of ``S[i, j1, j2] = beta sum_c Q[i, c] K1[j1, c] K2[j2, c]``; ``None`` means
        ``1 / d_head``, the scaling of Alman & Song.
    heads : int
        Number of heads ``H`` packed in the projections (default 1).
    """

    w_q: Any
    w_k1: Any
    w_k2: Any
    w_v1: Any
    w_v2: Any
    beta: float | None = None
    heads: int = 1

    def __post_init__(self):
        names = ("w_q", "w_k1", "w_k2", "w_v1", "w_v2")
        for name in names:
            check_real_array(name, getattr(self, name), ndim=2)
        backend.namespace(*(getattr(self, n) for n in names))
        object.__setattr__(self, "heads", check_int("heads", self.heads, minimum=1))
        check_rows(self, names)
        for name, like in (("w_k1", "w_q"), ("w_k2", "w_q"), ("w_v2", "w_v1")):
            if getattr(self, name).shape != getattr(self, like).shape:
                raise ValueError(f"{name} must have the shape of {like} {tuple(getattr(self, like).shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        check_columns(self, (("w_q", "heads", self.heads), ("w_v1", "heads", self.heads)))
        beta = 1.0 / self.d_head if self.beta is None else check_beta(self.beta)
        object.__setattr__(self, "beta", beta)

    @property
    def d_v(self) -> int:
        return self.w_v1.shape[1] // self.heads

    def arrays(self) -> dict:
        """``{name: array}`` of the five frozen weights (checked finite at every call)."""
        return {f"w_{t}": self.weight(t) for t in TARGETS}

    def weight(self, target: str):
        """The frozen weight of ``target`` (one of ``"q", "k1", "k2", "v1", "v2"``)."""
        return getattr(self, f"w_{target}")
