"""Numba CUDA kernels of the fused low-rank products; NumPy twins
:func:`gpulora.poly.products.kron_contract_reference` and :func:`gpulora.poly.products.kron_readout_reference`.

Both are GEMMs one of whose operands is a row-wise Kronecker product, formed tile by tile in shared
memory and never in device memory:

``kron_contract``:  ``T[b, f, c q + e] = sum_j psi[b, j, f] a[b, j, c] b_[b, j, e]``
    ``Psi^T (A (x) B)``: ``(k x L) @ (L x p q)``, reduction over ``L``. Cost ``2 B L k p q`` flops.
``kron_readout``:  ``out[b, i, e] = sum_{f, c} u[b, i, f] a[b, i, c] t[b, f, c, e]``
    ``(U (x) A) @ T``: ``(L x k p) @ (k p x q)``, reduction over ``k p``. Cost ``2 B L k p q`` flops.

Design (both kernels): a ``BLOCK x BLOCK`` thread block computes a ``2 BLOCK x 2 BLOCK`` output tile,
each thread a 2 x 2 micro-tile in four float64 register accumulators (``acc_00 .. acc_11``) whatever
the input dtype: each thread sums its outputs sequentially over the whole reduction axis, so float32
accumulators would carry errors growing with ``L`` (measured on an H200 at L = 1031..5000: 1.3e-6
relative, 3x cuBLAS's blocked float32 sum); float64 accumulation leaves only the float32 rounding of
the products and of the final store. The reduction axis is walked in steps of ``TILE_J`` (contract) or
``TILE_M`` (readout): each step stages the two operand tiles in shared memory, the Kronecker one as the
products ``a * b`` (or ``u * a``) of two small row reads, then every thread runs a ``TILE``-long
multiply-add loop out of shared memory. Global loads and stores are coalesced along the contiguous axis;
the transposed readout tile is padded by one column against bank conflicts. Shared memory per block:
``2 TILE^2`` elements (16 KiB in float64 at ``BLOCK = 16``). Every global load and store is guarded.

Fused kernels or cuBLAS: the decision
-------------------------------------
The alternative is the twins themselves on CuPy: blocks of ``L`` rows have their Kronecker rows
materialised (``Lb x p q``, at most ``BLOCK_ELEMENTS`` elements) and the product goes to cuBLAS. cuBLAS
runs float64 on the FP64 tensor cores (DMMA, sm_80 and later) and float32 on tensor cores only in TF32
mode (CuPy's ``CUPY_TF32=1``, 10-bit mantissa products); plain float32 SGEMM runs on the same FP32 SIMT
units as these kernels, and cuBLAS's edge there is its register tiling (these kernels use 2 x 2 micro-tiles).
The fused kernels save the memory traffic of the materialised blocks (``L p q`` elements written and read
for ``kron_contract``; the ``Lb x p q`` products of ``kron_readout``) and the extra launches, but the
products are compute-bound once ``k p q`` is in the thousands. The two paths have not been timed
against each other on a GPU yet (the one GPU run so far checked the kernels' results only). So
:func:`gpulora.kernels.use_fused_products` returns False (the cuBLAS route) unless
``GPULORA_FUSED_PRODUCTS=1``.

**Measured by** the ``products`` stage of ``asv_bench/gpu_run.sh`` (``asv_bench/gpu_bench.py``), on the
next machine with a GPU: time and TFLOP/s (``2 L k p q / time``, CUDA events, L2 flushed) of both paths,
``kron_contract`` and ``kron_readout`` separately, float32 and float64, 8 heads, at the chain's shapes
``(L, k, p = q) = (65536, 153, 17), (65536, 969, 17), (8192, 2145, 65)`` (d_head 16 at g 2 and 3,
d_head 64 at g 2); switch the default (possibly per shape) where the fused kernels win.
"""

from __future__ import annotations

from numba import cuda

from ._launch import MAX_GRID_YZ, SIMULATOR, cdiv, kernel_array, stream_for

__all__ = [
    "BLOCK",
    "CONTRACT_SIGNATURES",
    "READOUT_SIGNATURES",
    "TILE_F",
    "TILE_I",
    "TILE_J",
    "TILE_M",
    "kron_contract_kernel",
    "kron_readout_kernel",
    "launch_kron_contract",
    "launch_kron_readout",
]

# Threads per block side; small under the simulator (every thread is a Python thread), which also makes
# small test sizes span several tiles.
BLOCK = 4 if SIMULATOR else 16
# Output tiles: each thread owns a 2 x 2 micro-tile.
TILE_F = 2 * BLOCK  # contract: rows f of T
TILE_N = 2 * BLOCK  # contract: columns c q + e of T
TILE_I = 2 * BLOCK  # readout: rows i of out
TILE_E = 2 * BLOCK  # readout: columns e of out
# Reduction steps staged in shared memory.
TILE_J = 2 * BLOCK  # contract: rows j of psi, a, b
TILE_M = 2 * BLOCK  # readout: Kronecker columns f p + c
# Row length of the transposed readout tile, padded by one against shared-memory bank conflicts.
TILE_I_PAD = TILE_I + 1

CONTRACT_SIGNATURES = [
    f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1])" for t in ("float32", "float64")
]
READOUT_SIGNATURES = CONTRACT_SIGNATURES


@cuda.jit
def kron_contract_kernel(psi, a, b_, t):
    """``T = Psi^T (A (x) B)`` per batch item; NumPy twin ``kron_contract_reference``.

    Parameters
    ----------
    psi : float32 or float64 array of shape (B, L, k), C-contiguous
    a : array of shape (B, L, p), dtype of ``psi``
    b_ : array of shape (B, L, q), dtype of ``psi``
    t : array of shape (B, k, p * q), dtype of ``psi``
        Written: ``t[b, f, c * q + e] = sum_j psi[b, j, f] a[b, j, c] b_[b, j, e]``.

    Notes
    -----
    Launch with grid ``(ceil(p q / TILE_N), ceil(k / TILE_F), min(B, 65535))`` and block
    ``(BLOCK, BLOCK)``. Cost ``2 L k p q`` flops per batch item; each block reads its ``L x TILE_F`` slice
    of ``psi`` once and the ``p + q`` values of each row ``ceil(TILE_N / q)``-ish times through L1.
    """
    n_batch = psi.shape[0]
    L = psi.shape[1]
    k = psi.shape[2]
    q = b_.shape[2]
    pq = a.shape[2] * q
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * BLOCK + tx
    f0 = cuda.blockIdx.y * TILE_F
    n0 = cuda.blockIdx.x * TILE_N
    zero = 0.0  # float64 accumulators (module docstring)
    # [TILE_J, TILE_F]: psi rows j0.., columns f0..
    s_psi = cuda.shared.array((TILE_J, TILE_F), dtype=psi.dtype)
    # [TILE_J, TILE_N]: Kronecker rows a_j (x) b_j, columns n0..
    s_ab = cuda.shared.array((TILE_J, TILE_N), dtype=psi.dtype)
    for bz in range(cuda.blockIdx.z, n_batch, cuda.gridDim.z):
        acc_00 = zero
        acc_01 = zero
        acc_10 = zero
        acc_11 = zero
        for j0 in range(0, L, TILE_J):
            # the previous step's tiles must be fully read before they are overwritten
            cuda.syncthreads()
            for idx in range(tid, TILE_J * TILE_F, BLOCK * BLOCK):
                jj = idx // TILE_F
                ff = idx - jj * TILE_F
                j = j0 + jj
                f = f0 + ff
                if j < L and f < k:
                    s_psi[jj, ff] = psi[bz, j, f]
                else:
                    s_psi[jj, ff] = zero
            for idx in range(tid, TILE_J * TILE_N, BLOCK * BLOCK):
                jj = idx // TILE_N
                nn = idx - jj * TILE_N
                j = j0 + jj
                n = n0 + nn
                if j < L and n < pq:
                    c = n // q
                    s_ab[jj, nn] = a[bz, j, c] * b_[bz, j, n - c * q]
                else:
                    s_ab[jj, nn] = zero
            # every thread reads tiles staged by the others
            cuda.syncthreads()
            for jj in range(TILE_J):
                psi_0 = s_psi[jj, ty]
                psi_1 = s_psi[jj, ty + BLOCK]
                ab_0 = s_ab[jj, tx]
                ab_1 = s_ab[jj, tx + BLOCK]
                acc_00 += psi_0 * ab_0
                acc_01 += psi_0 * ab_1
                acc_10 += psi_1 * ab_0
                acc_11 += psi_1 * ab_1
        f = f0 + ty
        n = n0 + tx
        if f < k and n < pq:
            t[bz, f, n] = acc_00
        if f < k and n + BLOCK < pq:
            t[bz, f, n + BLOCK] = acc_01
        if f + BLOCK < k and n < pq:
            t[bz, f + BLOCK, n] = acc_10
        if f + BLOCK < k and n + BLOCK < pq:
            t[bz, f + BLOCK, n + BLOCK] = acc_11


@cuda.jit
def kron_readout_kernel(u, a, t, out):
    """``out = (U (x) A) . T`` per batch item; NumPy twin ``kron_readout_reference``.

    Parameters
    ----------
    u : float32 or float64 array of shape (B, L, k), C-contiguous
    a : array of shape (B, L, p), dtype of ``u``
    t : array of shape (B, k * p, q), dtype of ``u``
        The 3-tensor ``(B, k, p, q)`` with its first two axes merged (row ``f * p + c``).
    out : array of shape (B, L, q), dtype of ``u``
        Written: ``out[b, i, e] = sum_{f, c} u[b, i, f] a[b, i, c] t[b, f * p + c, e]``.

    Notes
    -----
    Launch with grid ``(ceil(L / TILE_I), ceil(q / TILE_E), min(B, 65535))`` and block
    ``(BLOCK, BLOCK)``. Cost ``2 L k p q`` flops per batch item. Threads whose ``e >= q`` idle, so for
    ``q`` well below ``TILE_E`` a fraction ``1 - q / TILE_E`` of the block does no work.
    """
    n_batch = u.shape[0]
    L = u.shape[1]
    k = u.shape[2]
    p = a.shape[2]
    q = out.shape[2]
    kp = k * p
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * BLOCK + tx
    i0 = cuda.blockIdx.x * TILE_I
    e0 = cuda.blockIdx.y * TILE_E
    zero = 0.0  # float64 accumulators (module docstring)
    # [TILE_M, TILE_I_PAD]: Kronecker rows u_i (x) a_i, transposed, padded against bank conflicts
    s_w = cuda.shared.array((TILE_M, TILE_I_PAD), dtype=u.dtype)
    # [TILE_M, TILE_E]: rows m0.. of t, columns e0..
    s_t = cuda.shared.array((TILE_M, TILE_E), dtype=u.dtype)
    for bz in range(cuda.blockIdx.z, n_batch, cuda.gridDim.z):
        acc_00 = zero
        acc_01 = zero
        acc_10 = zero
        acc_11 = zero
        for m0 in range(0, kp, TILE_M):
            # the previous step's tiles must be fully read before they are overwritten
            cuda.syncthreads()
            for idx in range(tid, TILE_I * TILE_M, BLOCK * BLOCK):
                ii = idx // TILE_M
                mm = idx - ii * TILE_M
                i = i0 + ii
                m = m0 + mm
                if i < L and m < kp:
                    f = m // p
                    s_w[mm, ii] = u[bz, i, f] * a[bz, i, m - f * p]
                else:
                    s_w[mm, ii] = zero
            for idx in range(tid, TILE_M * TILE_E, BLOCK * BLOCK):
                mm = idx // TILE_E
                ee = idx - mm * TILE_E
                m = m0 + mm
                e = e0 + ee
                if m < kp and e < q:
                    s_t[mm, ee] = t[bz, m, e]
                else:
                    s_t[mm, ee] = zero
            # every thread reads tiles staged by the others
            cuda.syncthreads()
            for mm in range(TILE_M):
                w_0 = s_w[mm, ty]
                w_1 = s_w[mm, ty + BLOCK]
                t_0 = s_t[mm, tx]
                t_1 = s_t[mm, tx + BLOCK]
                acc_00 += w_0 * t_0
                acc_01 += w_0 * t_1
                acc_10 += w_1 * t_0
                acc_11 += w_1 * t_1
        i = i0 + ty
        e = e0 + tx
        if i < L and e < q:
            out[bz, i, e] = acc_00
        if i < L and e + BLOCK < q:
            out[bz, i, e + BLOCK] = acc_01
        if i + BLOCK < L and e < q:
            out[bz, i + BLOCK, e] = acc_10
        if i + BLOCK < L and e + BLOCK < q:
            out[bz, i + BLOCK, e + BLOCK] = acc_11


def launch_kron_contract(psi, a, b_, t, *, stream=None):
    """Launch :func:`kron_contract_kernel`: ``psi (B, L, k), a (B, L, p), b_ (B, L, q) -> t (B, k, p q)``.

    All arrays C-contiguous, one dtype (float32 or float64), CuPy (NumPy under the simulator). Every
    element of ``t`` is written, zero when ``L == 0``. ``stream`` defaults to CuPy's current stream.
    """
    n_batch, _, k = psi.shape
    pq = a.shape[2] * b_.shape[2]
    if n_batch == 0 or k == 0 or pq == 0:
        return t
    if stream is None:
        stream = stream_for(psi)
    grid = (cdiv(pq, TILE_N), cdiv(k, TILE_F), min(n_batch, MAX_GRID_YZ))
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"k={k} needs more than {MAX_GRID_YZ} row tiles")
    kron_contract_kernel[grid, (BLOCK, BLOCK), stream](*[kernel_array(x) for x in (psi, a, b_, t)])
    return t


def launch_kron_readout(u, a, t, out, *, stream=None):
    """Launch :func:`kron_readout_kernel`: ``u (B, L, k), a (B, L, p), t (B, k p, q) -> out (B, L, q)``.

    All arrays C-contiguous, one dtype (float32 or float64), CuPy (NumPy under the simulator). Every
    element of ``out`` is written, zero when ``k p == 0``. ``stream`` defaults to CuPy's current stream.
    """
    n_batch, L, _ = u.shape
    q = out.shape[2]
    if n_batch == 0 or L == 0 or q == 0:
        return out
    if stream is None:
        stream = stream_for(u)
    grid = (cdiv(L, TILE_I), cdiv(q, TILE_E), min(n_batch, MAX_GRID_YZ))
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"q={q} needs more than {MAX_GRID_YZ} column tiles")
    kron_readout_kernel[grid, (BLOCK, BLOCK), stream](*[kernel_array(x) for x in (u, a, t, out)])
    return out
