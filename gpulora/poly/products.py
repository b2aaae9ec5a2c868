"""The low-rank products of the chain with row-wise Kronecker products.

Two operations carry the time of the polynomial gradient (docs/math.md section 4):

``kron_contract(psi, a, b)``  ->  ``T[..., f, c, e] = sum_j psi[..., j, f] a[..., j, c] b[..., j, e]``
    ``T = Psi^T (A (x) B)`` with ``(A (x) B)`` the row-wise Kronecker product, shape ``(..., k, p, q)``.
    ``T_K = kron_contract(Psi, V, K)`` and ``T_Q = kron_contract(U, G, Q)``.
    Cost ``2 L k p q`` flops.
``kron_readout(u, a, t)``  ->  ``out[..., i, e] = sum_{f, c} u[..., i, f] a[..., i, c] t[..., f, c, e]``
    ``(U (x) A) . T``, shape ``(..., L, q)``. ``(U (x) G) . T_K`` and ``(Psi (x) V) . T_Q``.
    Cost ``2 L k p q + 2 L p q`` flops.

Both are a GEMM with a block of Kronecker rows, :func:`kron_rows` (``Lb x p q``, materialised one block of
``L`` at a time), followed for the readout by the per-row contraction :func:`kron_apply`. The causal chain
(:mod:`gpulora.poly.causal`) uses these two pieces directly; the streamed chain (:mod:`gpulora.poly.chain`)
holds its blocks feature-major and uses :func:`kron_cols`, the same product over long contiguous rows. :func:`kron_contract_reference` and
:func:`kron_readout_reference` are the references of the Numba kernels in ``gpulora.kernels.kron``; they
walk blocks of at most :data:`BLOCK_ELEMENTS` ``L``-rows-times-``p q`` elements and hand the product to the
BLAS (cuBLAS on CuPy). Extra memory ``O(k p q + BLOCK_ELEMENTS)``.
"""

from __future__ import annotations

from .. import backend

__all__ = ["BLOCK_ELEMENTS", "kron_apply", "kron_cols", "kron_contract", "kron_contract_reference", "kron_readout",
           "kron_readout_reference", "kron_rows", "row_sums", "weighted_rows"]

BLOCK_ELEMENTS = 1 << 21


def _row_block(L: int, width: int) -> int:
    return max(1, min(L, BLOCK_ELEMENTS // max(width, 1)))


def kron_rows(a, b, xp=None):
    """Row-wise Kronecker product of ``a (..., L, p)`` and ``b (..., L, q)``: ``(..., L, p q)``, column
    ``c q + e`` holding ``a[..., c] b[..., e]``. Cost ``O(L p q)`` time and memory.

    One broadcast product ``a[..., :, None] * b[..., None, :]`` (measured 2-3x faster in NumPy 2 than
    ``repeat(a) * tile(b)``, which allocates and fills two ``L x p q`` arrays). Where the caller can hold its
    rows feature-major, :func:`kron_cols` is several times faster still.
    """
    xp = backend.namespace(a, b) if xp is None else xp
    return xp.reshape(a[..., :, None] * b[..., None, :], a.shape[:-1] + (a.shape[-1] * b.shape[-1],))


def kron_cols(a, b, xp=None):
    """The feature-major Kronecker product: ``a (..., p, L)``, ``b (..., q, L)`` to ``(..., p q, L)``, row
    ``c q + e`` holding ``a[..., c, :] b[..., e, :]``; that is, ``kron_rows(a^T, b^T)^T``. One broadcast
    product whose inner loop runs over ``L`` contiguous elements (15x faster in NumPy than building the
    row-major ``L x p q`` array with ``repeat`` and ``tile`` at ``p = q = 9``). Cost ``O(L p q)``."""
    xp = backend.namespace(a, b) if xp is None else xp
    return xp.reshape(a[..., :, None, :] * b[..., None, :, :], a.shape[:-2] + (a.shape[-2] * b.shape[-2], a.shape[-1]))


def kron_apply(z, a, xp=None):
    """``out[..., i, e] = sum_c a[..., i, c] z[..., i, c, e]`` for the grid ``z (..., L, p, q)`` (or its
    flattening ``(..., L, p q)``, column ``c q + e``) and ``a (..., L, p)``: the per-row half of the
    readout, ``(..., L, q)``, as a batch of ``(1, p) @ (p, q)`` matmuls (6x faster in NumPy than a
    broadcast product summed over ``p``). Cost ``O(L p q)``. ``xp``: the namespace, when the caller knows it
    (saves the probe in loops over blocks; likewise in :func:`kron_rows` and :func:`row_sums`)."""
    xp = backend.namespace(z, a) if xp is None else xp
    if z.ndim == a.ndim:
        z = xp.reshape(z, z.shape[:-1] + (a.shape[-1], z.shape[-1] // a.shape[-1]))
    return (a[..., None, :] @ z)[..., 0, :]


def weighted_rows(w, x, xp=None):
    """``out[..., c, i] = sum_a w[..., a, i] x[..., a, c, i]`` for ``w (..., p, L)`` and ``x (..., p, q, L)``:
    the per-row half of a feature-major readout, ``(..., q, L)``. ``einsum`` where the namespace has one
    (NumPy, CuPy: about half the time of the broadcast product summed over ``p`` in NumPy, which the array
    API standard's minimum gets). Cost ``O(L p q)``."""
    xp = backend.namespace(w, x) if xp is None else xp
    einsum = getattr(xp, "einsum", None)
    if einsum is not None:
        return einsum("...ai,...aci->...ci", w, x)
    return xp.sum(w[..., :, None, :] * x, axis=-3)


def row_sums(a, xp=None):
    """``sum(a, axis=-1)`` of ``a (..., L, n)`` as a matrix-vector product, shape ``(..., L, 1)``: NumPy's
    reduction over a short last axis is 5-8x slower than the BLAS. Cost ``O(L n)``."""
    xp = backend.namespace(a) if xp is None else xp
    return a @ xp.ones((a.shape[-1], 1), dtype=a.dtype)


def kron_contract_reference(psi, a, b):
    """``T = Psi^T (A (x) B)`` of shape ``(..., k, p, q)`` from ``psi (..., L, k)``, ``a (..., L, p)``,
    ``b (..., L, q)``; blocked over ``L``. Cost ``O(L k p q)`` time, ``O(k p q)`` extra memory."""
    xp = backend.namespace(psi, a, b)
    L, k = psi.shape[-2:]
    p, q = a.shape[-1], b.shape[-1]
    lead = psi.shape[:-2]
    t = xp.zeros(lead + (k, p * q), dtype=psi.dtype)
    step = _row_block(L, p * q)
    for lo in range(0, L, step):
        hi = min(L, lo + step)
        t += psi[..., lo:hi, :].mT @ kron_rows(a[..., lo:hi, :], b[..., lo:hi, :])
    return xp.reshape(t, lead + (k, p, q))


def kron_readout_reference(u, a, t):
    """``out = (U (x) A) . T`` of shape ``(..., L, q)`` from ``u (..., L, k)``, ``a (..., L, p)``,
    ``t (..., k, p, q)``; blocked over ``L``. Cost ``O(L k p q)`` time, ``O(L q)`` memory for the output."""
    xp = backend.namespace(u, a, t)
    L, k = u.shape[-2:]
    p, q = t.shape[-2:]
    lead = u.shape[:-2]
    t2 = xp.reshape(t, t.shape[:-3] + (k, p * q))
    out = backend.empty(lead + (L, q), u.dtype, xp)
    step = _row_block(L, p * q)
    for lo in range(0, L, step):
        hi = min(L, lo + step)
        out[..., lo:hi, :] = kron_apply(u[..., lo:hi, :] @ t2, a[..., lo:hi, :])
    return out


def kron_contract(psi, a, b):
    """:func:`kron_contract_reference`, or ``gpulora.kernels`` for CuPy arrays where that path is chosen."""
    if backend.is_cupy(psi):
        from .. import kernels

        if kernels.use_fused_products():
            return kernels.kron_contract(psi, a, b)
    return kron_contract_reference(psi, a, b)


def kron_readout(u, a, t):
    """:func:`kron_readout_reference`, or ``gpulora.kernels`` for CuPy arrays where that path is chosen."""
    if backend.is_cupy(u):
        from .. import kernels

        if kernels.use_fused_products():
            return kernels.kron_readout(u, a, t)
    return kron_readout_reference(u, a, t)
