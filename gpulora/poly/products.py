"""The fused low-rank products of the chain: contractions with row-wise Kronecker products.

Two operations carry the time of the polynomial gradient (docs/math.md section 4):

``kron_contract(psi, a, b)``  ->  ``T[..., f, c, e] = sum_j psi[..., j, f] a[..., j, c] b[..., j, e]``
    ``T = Psi^T (A (x) B)`` with ``(A (x) B)`` the row-wise Kronecker product, shape ``(..., k, p, q)``.
    ``T_K = kron_contract(Psi, V, K)`` and ``T_Q = kron_contract(U, G, Q)``.
    Cost ``2 L k p q`` flops.
``kron_readout(u, a, t)``  ->  ``out[..., i, e] = sum_{f, c} u[..., i, f] a[..., i, c] t[..., f, c, e]``
    ``(U (x) A) . T``, shape ``(..., L, q)``. ``(U (x) G) . T_K`` and ``(Psi (x) V) . T_Q``.
    Cost ``2 L k p q + 2 L p q`` flops.

The array-API versions below are the references of the Numba kernels in ``gpulora.kernels.kron`` and the
CPU path. They never form an ``L x (k p)`` array: they walk blocks of at most :data:`BLOCK_ELEMENTS`
``L``-rows-times-``p q`` elements, materialise the Kronecker rows of one block (``Lb x p q``) and hand the
product to the BLAS (cuBLAS on CuPy). Extra memory ``O(k p q + BLOCK_ELEMENTS)``.
"""

from __future__ import annotations

from .. import backend

__all__ = ["BLOCK_ELEMENTS", "kron_contract", "kron_contract_reference", "kron_readout", "kron_readout_reference"]

BLOCK_ELEMENTS = 1 << 21


def _row_block(L: int, width: int) -> int:
    return max(1, min(L, BLOCK_ELEMENTS // max(width, 1)))


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
        # [..., Lb, p * q]: the Kronecker rows of this block only
        ab = xp.reshape(a[..., lo:hi, :, None] * b[..., lo:hi, None, :], lead + (hi - lo, p * q))
        t += psi[..., lo:hi, :].mT @ ab
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
        # [..., Lb, p, q]
        z = xp.reshape(u[..., lo:hi, :] @ t2, lead + (hi - lo, p, q))
        out[..., lo:hi, :] = xp.sum(a[..., lo:hi, :, None] * z, axis=-2)
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
