"""``gpulora.kernels``: the Numba CUDA kernels of gpulora and their CuPy-facing entry points.

Device code and launch geometry only; the single policy here is :func:`use_fused_products`. Every kernel
has a NumPy twin in ``gpulora.poly`` that it is tested against:

- :func:`feature_map`: ``feature_map.feature_map_kernel``; twin ``poly.features.monomial_features_reference``
- :func:`kron_contract`: ``kron.kron_contract_kernel``; twin ``poly.products.kron_contract_reference``
- :func:`kron_readout`: ``kron.kron_readout_kernel``; twin ``poly.products.kron_readout_reference``

:data:`KERNELS` registers each kernel with its float32 and float64 signatures, so that
:func:`compile_ptx_all` compiles everything to PTX on a machine without a GPU (NVVM wheel only).

Importing this package imports ``numba.cuda`` (about 0.4 s; it may locate the driver library, but it
neither initialises the driver nor queries a device). Kernels compile on their first launch per signature
and are cached by their dispatcher. The submodules are imported here, before the entry points are defined, on purpose: importing the
submodule ``gpulora.kernels.feature_map`` sets the package attribute ``feature_map`` to the module, so a
lazy import would overwrite the entry point :func:`feature_map` on its first use.
"""

# This folder is also the top-level ``kernels/`` of a source checkout. When the checkout's root is on sys.path
# (``python -m ...`` run from the root), ``import kernels`` finds this folder before the unrelated PyPI
# distribution ``kernels`` (Hugging Face's, which transformers imports). Imported under that name, this module
# hands the import over to that distribution when it is installed (the import system returns what
# ``sys.modules`` holds once the module body has run), and otherwise defines nothing.
if __spec__ is not None and __spec__.name == "gpulora.kernels":
    from ._api import KERNELS as KERNELS
    from ._api import available as available
    from ._api import compile_ptx_all as compile_ptx_all
    from ._api import feature_map as feature_map
    from ._api import kron_contract as kron_contract
    from ._api import kron_readout as kron_readout
    from ._api import use_fused_products as use_fused_products

    __all__ = ["KERNELS", "available", "compile_ptx_all", "feature_map", "kron_contract", "kron_readout",
               "use_fused_products"]
else:
    def _hand_over(name: str) -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec(name, rest)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    _hand_over(__spec__.name if __spec__ is not None else __name__)
