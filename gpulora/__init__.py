"""gpulora: exact and almost-linear-time (polynomial method) LoRA gradients of attention heads.

The public API (see README.md): :class:`Head`, :class:`LoRA`, :func:`lora_grad`, :func:`forward`,
:func:`loss`, :func:`diagnose`, :func:`poly_features`, the q/k/v-level :func:`attention` and
:func:`attention_vjp` (:mod:`gpulora.functional`), the warning category :class:`AccuracyWarning`;
problems on disk in :mod:`gpulora.io`; the subpackage :mod:`gpulora.kernels` (Numba CUDA kernels, with
``compile_ptx_all``; ``gpulora[ptx]``). Arrays are NumPy, CuPy or any other array-API-standard arrays,
float16, bfloat16 (ml_dtypes), float32 or float64 (half precision is computed in float32). The mathematics:
docs/math.md.
"""

import importlib.abc
import importlib.util
import os
import sys

from .diagnosis import Diagnosis as Diagnosis
from .diagnosis import diagnose as diagnose
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

__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Finds ``gpulora.kernels`` in the top-level ``kernels/`` folder of a source tree that lacks the
    ``gpulora/kernels`` symlink: an unpacked sdist (sdists cannot carry symlinks) or a checkout made
    without symlink support. Consulted only after the regular import system found nothing."""

    def __init__(self, folder):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(self.folder, "__init__.py"),
                                                      submodule_search_locations=[self.folder])


_here = os.path.dirname(os.path.abspath(__file__))
_top_kernels = os.path.join(os.path.dirname(_here), "kernels")
if not os.path.isdir(os.path.join(_here, "kernels")) and os.path.isfile(os.path.join(_top_kernels, "__init__.py")):
    sys.meta_path.append(_SourceTreeKernels(_top_kernels))

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
