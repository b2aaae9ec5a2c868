"""Tensor (three-way) attention of Alman & Song (ICLR 2024): exact and polynomial-method forward, gradients
and LoRA gradients, NumPy and CuPy.

Scores over key pairs, ``S[i, j1, j2] = beta sum_c Q[i, c] K1[j1, c] K2[j2, c]``, a softmax over the
``L^2`` pairs and values ``V1[j1] * V2[j2]``. Exact: ``O(L^3 (d_head + d_v))`` time, memory linear in ``L``.
Polynomial method: ``O(L k d_v d_head)`` time below the entry bound ``cbrt(log L)``. The maths, with the
gradient chain, is in docs/tensor.md.

Public API: :class:`TensorHead`; :func:`lora_grad`, :func:`forward`, :func:`loss` (``gpulora.LoRA``
adapters over ``"q", "k1", "k2", "v1", "v2"``; ``GradResult`` as for matrix heads), :func:`attention_vjp`
(the backward at projection level) and :func:`diagnose`.
"""

from .diagnose import TensorDiagnosis as TensorDiagnosis
from .diagnose import diagnose as diagnose
from .grad import TensorAttentionGrad as TensorAttentionGrad
from .grad import attention_vjp as attention_vjp
from .grad import forward as forward
from .grad import lora_grad as lora_grad
from .grad import loss as loss
from .model import TARGETS as TARGETS
from .model import TensorHead as TensorHead

__all__ = ["TARGETS", "TensorAttentionGrad", "TensorDiagnosis", "TensorHead", "attention_vjp", "diagnose", "forward", "lora_grad", "loss"]
