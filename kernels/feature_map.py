"""Numba CUDA kernel of the symmetric-monomial feature map; NumPy twin
:func:`gpulora.poly.features.monomial_features_reference`.

``out[b, i, j] = scale[j] * z[b, i]^a(j)`` for the multi-indices ``a(j)`` of a
:class:`gpulora.poly.monomials.MonomialTable`: column 0 is the constant 1 and column ``j`` is the monomial
of column ``parent[j]`` times ``z[b, i, coord[j]]``.

Design (memory-bound: ``k`` writes per row against ``d`` reads, ``k = C(d + g, g)``):

- A block owns ``tile_rows <= TILE_L`` consecutive rows of one batch item; grid ``(row tiles, batch)``
  with a grid-stride loop over the batch beyond 65535.
- Degrees run in order. Within degree ``m`` the block's ``tile_rows * (number of degree-m columns)``
  outputs are dealt to the threads with consecutive threads on consecutive columns of one row, so the
  stores of a warp are contiguous (coalesced). ``cuda.syncthreads()`` separates degrees, because degree
  ``m`` reads the degree ``m - 1`` monomials that other threads wrote.
- *Cached* mode (``tile_rows * k <= S_ELEMS``, the default whenever ``k <= S_ELEMS``): the unscaled
  monomials of the block's rows live in shared memory, so each output costs one shared read, one
  (L1-cached) read of ``z`` and one multiply, exactly the twin's recurrence, hence bitwise-equal results.
- *Recompute* mode (``k > S_ELEMS``, e.g. ``d = 16, g = 4``): each output walks its parent chain
  (``degree`` multiplies, ``z`` and the table read through L1), since not even one row fits in shared
  memory. The product is taken in the reverse order of the twin's, so results differ by rounding only.
- ``scale`` is applied at the write; the monomials are built in the dtype of ``z`` (float32 or float64).

Cost ``O(L k)`` stores (``B L k`` elements written once), ``O(L k)`` multiplies (``O(L k g)`` in
recompute mode), ``S_ELEMS`` elements of static shared memory per block.
"""

from __future__ import annotations

from numba import cuda

from ._launch import MAX_GRID_YZ, SIMULATOR, cdiv, kernel_array, stream_for

__all__ = ["S_ELEMS", "SIGNATURES", "TILE_L", "TPB", "feature_map_kernel", "launch_feature_map", "tile_rows_for"]

# Threads per block (fewer under the simulator, where every thread is a Python thread and every
# block costs thread start-ups and barriers).
TPB = 16 if SIMULATOR else 256
# Most rows per block; small under the simulator so that small L still spans several tiles.
TILE_L = 16 if SIMULATOR else 64
# Shared monomial cache in elements: 24 KiB in float64, 12 KiB in float32.
S_ELEMS = 3072

SIGNATURES = [
    f"void({t}[:, :, ::1], int32[::1], int32[::1], int64[::1], {t}[::1], int64, int64, {t}[:, :, ::1])"
    for t in ("float32", "float64")
]


@cuda.jit
def feature_map_kernel(z, parent, coord, degree_start, scale, tile_rows, cached, out):
    """Scaled symmetric monomials of the rows of ``z``; NumPy twin ``monomial_features_reference``.

    Parameters
    ----------
    z : float32 or float64 array of shape (B, L, d), C-contiguous
    parent, coord : int32 arrays of shape (k,)
        The monomial table (``parent[0] == coord[0] == -1``).
    degree_start : int64 array of shape (g + 2,)
        First column of each degree; ``degree_start[g + 1] == k``.
    scale : array of shape (k,), dtype of ``z``
    tile_rows : int
        Rows per block; ``tile_rows * k <= S_ELEMS`` when ``cached``.
    cached : int
        1: keep the unscaled monomials in shared memory; 0: recompute each from its parent chain.
    out : array of shape (B, L, k), dtype of ``z``
        Written: ``out[b, i, j] = scale[j] * z[b, i]^a(j)`` for every ``b, i, j``.

    Notes
    -----
    Launch with grid ``(ceil(L / tile_rows), min(B, 65535))``, any 1-D block. Cost per block
    ``tile_rows * k`` coalesced stores; ``S_ELEMS`` elements of shared memory.
    """
    n_batch = z.shape[0]
    L = z.shape[1]
    k = out.shape[2]
    g = degree_start.shape[0] - 2
    tx = cuda.threadIdx.x
    row0 = cuda.blockIdx.x * tile_rows
    one = z.dtype.type(1.0)
    # [tile_rows, k] row-major: the unscaled monomials of this block's rows (cached mode only)
    s_mono = cuda.shared.array(S_ELEMS, dtype=z.dtype)
    for bz in range(cuda.blockIdx.y, n_batch, cuda.gridDim.y):
        # the previous batch item's monomials may still be read by slower threads
        cuda.syncthreads()
        for r in range(tx, tile_rows, cuda.blockDim.x):
            i = row0 + r
            if i < L:
                if cached:
                    s_mono[r * k] = one
                out[bz, i, 0] = scale[0] * one
        for m in range(1, g + 1):
            lo = degree_start[m]
            width = degree_start[m + 1] - lo
            # degree m reads the degree m - 1 monomials written by other threads
            cuda.syncthreads()
            for item in range(tx, tile_rows * width, cuda.blockDim.x):
                r = item // width
                j = lo + (item - r * width)
                i = row0 + r
                if i < L:
                    if cached:
                        v = s_mono[r * k + parent[j]] * z[bz, i, coord[j]]
                        s_mono[r * k + j] = v
                    else:
                        v = z[bz, i, coord[j]]
                        c = parent[j]
                        while c > 0:
                            v *= z[bz, i, coord[c]]
                            c = parent[c]
                    out[bz, i, j] = scale[j] * v


def tile_rows_for(k: int, cached: bool) -> int:
    """Rows per block: as many as the shared cache holds (at most ``TILE_L``) when ``cached``, else ``TILE_L``."""
    return max(1, min(TILE_L, S_ELEMS // k)) if cached else TILE_L


def launch_feature_map(z, parent, coord, degree_start, scale, out, *, cached=None, tile_rows=None, stream=None):
    """Launch :func:`feature_map_kernel` for ``z (B, L, d) -> out (B, L, k)``.

    Parameters
    ----------
    z : array of shape (B, L, d), float32 or float64, C-contiguous (CuPy; NumPy under the simulator)
    parent, coord : int32 arrays of shape (k,); degree_start : int64 array of shape (g + 2,)
        The monomial table, on the device of ``z``.
    scale : array of shape (k,), dtype of ``z``
    out : array of shape (B, L, k), dtype of ``z``, C-contiguous; every element is written.
    cached : bool, optional
        Shared-memory monomial cache; default: whenever one row fits (``k <= S_ELEMS``).
    tile_rows : int, optional
        Rows per block; default :func:`tile_rows_for`. Must satisfy ``tile_rows * k <= S_ELEMS`` when cached.
    stream : numba stream, optional
        Default: CuPy's current stream for CuPy arrays (:func:`gpulora.kernels._launch.stream_for`).
    """
    n_batch, L, _ = z.shape
    k = out.shape[2]
    if cached is None:
        cached = k <= S_ELEMS
    if tile_rows is None:
        tile_rows = tile_rows_for(k, cached)
    if tile_rows < 1 or (cached and tile_rows * k > S_ELEMS):
        raise ValueError(f"tile_rows={tile_rows} does not fit the shared cache of {S_ELEMS} elements for k={k}")
    if n_batch == 0 or L == 0:
        return out
    if stream is None:
        stream = stream_for(z)
    grid = (cdiv(L, tile_rows), min(n_batch, MAX_GRID_YZ))
    args = [kernel_array(x) for x in (z, parent, coord, degree_start, scale)]
    feature_map_kernel[grid, TPB, stream](*args, int(tile_rows), int(bool(cached)), kernel_array(out))
    return out
