"""The entry points of ``gpulora.kernels`` (re-exported by its ``__init__``; see there)."""

from __future__ import annotations

import functools
import math
import os
import re

from .. import backend

# KERNELS: name -> (@cuda.jit dispatcher, signature strings: one float32, one float64).
try:
    from . import _launch, feature_map as _feature_map_module, kron as _kron_module
except ImportError as exc:  # numba-cuda missing or broken: available() is False, compile_ptx_all raises
    _IMPORT_ERROR: ImportError | None = exc
    KERNELS: dict = {}
else:
    _IMPORT_ERROR = None
    KERNELS = {
        "feature_map": (_feature_map_module.feature_map_kernel, list(_feature_map_module.SIGNATURES)),
        "kron_contract": (_kron_module.kron_contract_kernel, list(_kron_module.CONTRACT_SIGNATURES)),
        "kron_readout": (_kron_module.kron_readout_kernel, list(_kron_module.READOUT_SIGNATURES)),
    }

__all__ = [
    "KERNELS",
    "available",
    "compile_ptx_all",
    "feature_map",
    "kron_contract",
    "kron_readout",
    "use_fused_products",
]

_FLOATS = ("float32", "float64")


# What to install: [ptx] compiles and simulates without a GPU; a GPU machine has it through [cuda12]/[cuda13].
INSTALL_HINT = ("pip install 'gpulora[ptx]' (numba-cuda with the CUDA 13 NVVM/NVRTC wheels), or on a GPU "
                "machine 'gpulora[cuda13]' / 'gpulora[cuda12]'")


def _require_numba():
    if _IMPORT_ERROR is not None:
        raise ImportError(f"gpulora.kernels needs numba-cuda ({_IMPORT_ERROR}): {INSTALL_HINT}") from _IMPORT_ERROR


def compile_ptx_all(cc=(9, 0)) -> dict[str, str]:
    """PTX of every registered kernel for every signature, for compute capability ``cc``; no GPU needed.

    Returns
    -------
    dict
        ``"<name>[<dtype>]"`` (e.g. ``"feature_map[float32]"``) -> PTX text.

    Raises
    ------
    ImportError
        If numba-cuda, or its NVVM/NVRTC libraries, are not installed; the message names the extra to
        install (:data:`INSTALL_HINT`).
    """
    _require_numba()
    from numba import cuda

    ptx = {}
    for name, (kernel, signatures) in KERNELS.items():
        pyfunc = getattr(kernel, "py_func", kernel)
        for sig in signatures:
            dtype = re.search(r"float(?:32|64)", sig).group(0)
            try:
                text, _ = cuda.compile_ptx(pyfunc, sig, cc=tuple(cc))
            except (ImportError, RuntimeError, OSError) as exc:
                if not _missing_cuda_library(exc):
                    raise
                raise ImportError(f"compiling gpulora's kernels to PTX needs the NVVM and NVRTC libraries, "
                                  f"which were not found ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                                  f"{INSTALL_HINT}") from exc
            ptx[f"{name}[{dtype}]"] = text
    return ptx


def _missing_cuda_library(exc: BaseException) -> bool:
    """True when ``exc`` says a CUDA compiler library (NVVM, NVRTC) could not be found or loaded."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("nvvm", "nvrtc", "libnotfound", "cannot open shared object"))


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the kernels can run on a real device: numba-cuda imports, CuPy sees a CUDA device, and
    the CUDA simulator is off."""
    return _IMPORT_ERROR is None and not _launch.SIMULATOR and backend.has_cuda()


def use_fused_products() -> bool:
    """Whether CuPy calls of ``gpulora.poly.products.kron_contract`` / ``kron_readout`` go to the fused
    kernels (True) or to the blocked cuBLAS twins (False).

    False unless the environment variable ``GPULORA_FUSED_PRODUCTS=1`` (read at each call) and
    :func:`available`. The default is provisional: the two paths have not been timed against each other
    on a GPU yet; the ``products`` stage of ``asv_bench/gpu_run.sh`` does that (module docstring of
    ``gpulora.kernels.kron``).
    """
    return os.environ.get("GPULORA_FUSED_PRODUCTS", "") not in ("", "0") and available()


def _float_dtype(xp, *arrays):
    dtype = xp.result_type(*arrays)
    if dtype.name not in _FLOATS:
        raise TypeError(f"gpulora.kernels needs float32 or float64 arrays, got {dtype}")
    return dtype


def _batched(xp, x, dtype, trailing: int):
    """``x`` as a C-contiguous array of shape ``(B,) + x.shape[-trailing:]`` in ``dtype``, ``B`` the product
    of the leading axes (1 when there are none)."""
    n_batch = math.prod(x.shape[: x.ndim - trailing])
    x = xp.astype(x, dtype, copy=False)
    return xp.ascontiguousarray(xp.reshape(x, (n_batch,) + x.shape[x.ndim - trailing:]))


_TABLES: dict = {}


def _device_table(table, like):
    """``(parent, coord, degree_start)`` of ``table`` beside the array ``like``: on its device (cached per
    table and device) for CuPy, the host arrays themselves for NumPy (simulator)."""
    if not backend.is_cupy(like):
        return table.parent, table.coord, table.degree_start
    import cupy

    key = (table.d, table.g, cupy.cuda.Device().id)
    if key not in _TABLES:
        tables = tuple(cupy.asarray(x) for x in (table.parent, table.coord, table.degree_start))
        # once per table and device: the copies must be complete before launches on any other stream
        cupy.cuda.get_current_stream().synchronize()
        _TABLES[key] = tables
    return _TABLES[key]


def feature_map(z, table, scale):
    """Scaled symmetric monomials of the rows of ``z`` by ``feature_map_kernel``; same result as
    ``gpulora.poly.features.monomial_features_reference``.

    Parameters
    ----------
    z : CuPy array of shape (..., L, d), float32 or float64 (NumPy under the CUDA simulator)
    table : MonomialTable for ``(d, g)``
    scale : array of shape (k,); cast to the dtype of ``z``

    Returns
    -------
    array of shape (..., L, k), dtype of ``z``
        ``out[..., a] = scale[a] * z^a``. Cost ``O(L k)`` stores.
    """
    _require_numba()
    xp = backend.namespace(z)
    if z.ndim < 2 or z.shape[-1] != table.d:
        raise ValueError(f"z must have shape (..., L, {table.d}), got {z.shape}")
    dtype = _float_dtype(xp, z)
    scale = xp.ascontiguousarray(xp.astype(xp.asarray(scale), dtype, copy=False))
    if scale.shape != (table.k,):
        raise ValueError(f"scale must have shape ({table.k},), got {scale.shape}")
    lead, L = z.shape[:-2], z.shape[-2]
    # [B, L, d]
    z3 = _batched(xp, z, dtype, 2)
    # [B, L, k]
    out = backend.empty(z3.shape[:2] + (table.k,), dtype, xp)
    _feature_map_module.launch_feature_map(z3, *_device_table(table, z3), scale, out)
    return xp.reshape(out, lead + (L, table.k))


def kron_contract(psi, a, b):
    """``T[..., f, c, e] = sum_j psi[..., j, f] a[..., j, c] b[..., j, e]`` by the fused kernel; same result
    as ``gpulora.poly.products.kron_contract_reference``.

    Parameters
    ----------
    psi : CuPy array of shape (..., L, k); a : (..., L, p); b : (..., L, q)
        float32 or float64 (the result dtype of the three), one batch shape; NumPy under the simulator.

    Returns
    -------
    array of shape (..., k, p, q)
        Cost ``2 L k p q`` flops per batch item, no ``L x p q`` array formed.
    """
    _require_numba()
    xp = backend.namespace(psi, a, b)
    lead, (L, k) = psi.shape[:-2], psi.shape[-2:]
    p, q = a.shape[-1], b.shape[-1]
    if a.shape[:-1] != lead + (L,) or b.shape[:-1] != lead + (L,):
        raise ValueError(f"psi, a, b must share (..., L): got {psi.shape}, {a.shape}, {b.shape}")
    dtype = _float_dtype(xp, psi, a, b)
    # [B, L, k], [B, L, p], [B, L, q]
    psi3, a3, b3 = (_batched(xp, x, dtype, 2) for x in (psi, a, b))
    # [B, k, p * q]
    t = backend.empty((psi3.shape[0], k, p * q), dtype, xp)
    _kron_module.launch_kron_contract(psi3, a3, b3, t)
    return xp.reshape(t, lead + (k, p, q))


def kron_readout(u, a, t):
    """``out[..., i, e] = sum_{f, c} u[..., i, f] a[..., i, c] t[..., f, c, e]`` by the fused kernel; same
    result as ``gpulora.poly.products.kron_readout_reference``.

    Parameters
    ----------
    u : CuPy array of shape (..., L, k); a : (..., L, p); t : (..., k, p, q)
        float32 or float64 (the result dtype of the three), one batch shape; NumPy under the simulator.

    Returns
    -------
    array of shape (..., L, q)
        Cost ``2 L k p q`` flops per batch item, no ``L x k p`` array formed.
    """
    _require_numba()
    xp = backend.namespace(u, a, t)
    lead, (L, k) = u.shape[:-2], u.shape[-2:]
    p, q = a.shape[-1], t.shape[-1]
    if a.shape[:-1] != lead + (L,) or t.shape != lead + (k, p, q):
        raise ValueError(f"u, a, t must have shapes (..., L, k), (..., L, p), (..., k, p, q): "
                         f"got {u.shape}, {a.shape}, {t.shape}")
    dtype = _float_dtype(xp, u, a, t)
    # [B, L, k], [B, L, p]
    u3, a3 = (_batched(xp, x, dtype, 2) for x in (u, a))
    # [B, k * p, q]
    t3 = xp.ascontiguousarray(xp.reshape(xp.astype(t, dtype, copy=False), (math.prod(lead), k * p, q)))
    # [B, L, q]
    out = backend.empty((u3.shape[0], L, q), dtype, xp)
    _kron_module.launch_kron_readout(u3, a3, t3, out)
    return xp.reshape(out, lead + (L, q))
