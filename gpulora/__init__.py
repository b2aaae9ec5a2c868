"""gpulora: exact and almost-linear-time (polynomial method) LoRA gradients of attention heads.

The public API (see README.md): :class:`Head`, :class:`LoRA`, :func:`lora_grad`, :func:`forward`,
:func:`loss`, :func:`diagnose`, :func:`poly_features`, the q/k/v-level :func:`attention` and
:func:`attention_vjp` (:mod:`gpulora.functional`), the warning category :class:`AccuracyWarning`, and the
subpackage :mod:`gpulora.kernels` (Numba CUDA kernels, with ``compile_ptx_all``). Arrays are NumPy, CuPy
or any other array-API-standard arrays, float16, bfloat16 (ml_dtypes), float32 or float64 (half precision
is computed in float32).
"""

from .diagnose import Diagnosis as Diagnosis
from .diagnose import diagnose as diagnose
from .functional import attention as attention
from .functional import attention_vjp as attention_vjp
from .grad import forward as forward
from .grad import lora_grad as lora_grad
from .grad import loss as loss
from .model import AccuracyWarning as AccuracyWarning
from .model import AdapterGrad as AdapterGrad
from .model import AttentionGrad as AttentionGrad
from .model import GradResult as GradResult
from .model import Head as Head
from .model import LoRA as LoRA
from .poly.chain import PolynomialFailure as PolynomialFailure
from .poly.coefficients import DEFAULT_TOL as DEFAULT_TOL
from .poly.features import poly_features as poly_features

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TOL",
    "AccuracyWarning",
    "AdapterGrad",
    "AttentionGrad",
    "Diagnosis",
    "GradResult",
    "Head",
    "LoRA",
    "PolynomialFailure",
    "attention",
    "attention_vjp",
    "diagnose",
    "forward",
    "lora_grad",
    "loss",
    "poly_features",
]
