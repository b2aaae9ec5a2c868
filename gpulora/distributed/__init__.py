"""Scale-out on Dask: batch-, head- and token-parallel LoRA gradients (see :mod:`gpulora.distributed.grad`).

Needs the ``dask`` extra (``pip install gpulora[dask]``); imported lazily, so ``import gpulora`` does not
need Dask. Guide and the state-size formula: docs/distributed.md.
"""

from .grad import MODES as MODES
from .grad import lora_grad as lora_grad

__all__ = ["MODES", "lora_grad"]
