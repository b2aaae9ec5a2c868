"""Launch plumbing shared by the kernels: grid sizing, the CuPy stream bridge, kernel arguments.

Nothing here decides *whether* to launch (that is :func:`gpulora.kernels.use_fused_products` and
:func:`gpulora.kernels.available`); it only turns arrays and shapes into a launch.

CuPy arrays reach Numba through the CUDA Array Interface. :func:`kernel_array` imports them with
``sync=False``: every launch goes on CuPy's *current* stream (:func:`stream_for`), the stream the arrays
were produced on, so stream order already serialises the work and a host synchronisation per argument
(Numba's default when importing an interface that names a stream) would only cost time.
"""

from __future__ import annotations

from numba import cuda

__all__ = ["MAX_GRID_YZ", "SIMULATOR", "cdiv", "kernel_array", "stream_for"]

# True when NUMBA_ENABLE_CUDASIM=1 was set before numba.cuda was first imported.
SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)

# The y and z grid dimensions are limited to 65535 blocks; kernels loop over the batch with a grid stride.
MAX_GRID_YZ = 65535


def cdiv(n: int, m: int) -> int:
    """``ceil(n / m)`` for non-negative ``n`` and positive ``m``: the number of tiles of ``m`` covering ``n``."""
    return -(-n // m)


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def kernel_array(x):
    """The object to hand to a kernel for the array ``x``.

    A CuPy (or any CUDA-Array-Interface) array becomes a zero-copy Numba device view, imported without a
    stream synchronisation (see the module docstring). A NumPy array passes through, under the simulator
    only (a read-only one as a copy): on real hardware Numba would copy it to the device and back on
    every launch, silently.

    Raises
    ------
    TypeError
        For a NumPy array outside the simulator, or an object that is neither.
    """
    if hasattr(x, "__cuda_array_interface__"):
        if SIMULATOR:
            raise TypeError("device arrays cannot be used under the CUDA simulator; pass NumPy arrays")
        return cuda.as_cuda_array(x, sync=False)
    if SIMULATOR and hasattr(x, "__array_interface__"):
        # the simulator copies every argument back after the launch, which fails on read-only arrays
        return x if x.flags.writeable else x.copy()
    raise TypeError(
        f"gpulora.kernels launches need CUDA-Array-Interface arrays (CuPy), or NumPy arrays under "
        f"NUMBA_ENABLE_CUDASIM=1; got {type(x).__name__}"
    )


def stream_for(x):
    """The Numba stream to launch on for the array ``x``: CuPy's current stream for a CuPy array, else the
    default stream (``0``, also what the simulator expects)."""
    if _is_cupy(x) and not SIMULATOR:
        import cupy

        return cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    return 0
