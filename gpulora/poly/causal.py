r"""The causal chained LoRA gradient of the polynomial method, in time almost linear in L.

Same contract as :mod:`gpulora.poly.chain`, with the mask ``j <= i`` (SPEC section 5). With
``phi_i = phi(beta q_i)``, ``psi_j = psi(k_j)`` (:mod:`gpulora.poly.features`, ``phi_i . psi_j = p(s_ij)``),
per leading index (batch, head):

    D_i  = phi_i . sum_{j<=i} psi_j   (+1 for Softmax_1),     u_i = phi_i / D_i,   F~_ij = u_i . psi_j  (j <= i)
    o~_i = u_i . sum_{j<=i} psi_j (x) v_j,                    g_i = o~_i - y_i,    r_i = g_i . o~_i
    dQ_i = beta [ (u_i (x) g_i) . sum_{j<=i} psi_j (x) v_j (x) k_j  -  r_i u_i . sum_{j<=i} psi_j (x) k_j ]
    dK_j = beta [ (psi_j (x) v_j) . sum_{i>=j} u_i (x) g_i (x) q_i  -  psi_j . sum_{i>=j} u_i (x) (r_i q_i) ]
    dV_j = psi_j . sum_{i>=j} u_i (x) g_i

which is the exact-gradient formula of SPEC section 2 with the causal ``F~ = rownormalise(mask * p(S))`` in
place of ``F``, to rounding, whatever the degree (tested against the dense formula).

**Chunks** (the chunked linear-attention pattern). The rows are cut into chunks of ``C``. Inside a chunk
the masked weights are formed densely, ``A = tril(Phi_c Psi_c^T)`` (``C x C``), and the SPEC-2 formula is
applied to that block: ``F~_c = A / D``, ``P_c = F~_c * (G_c V_c^T - r)``, contributions ``F~_c V_c``,
``beta P_c K_c`` (to dQ), ``beta P_c^T Q_c`` (to dK), ``F~_c^T G_c`` (to dV). Between chunks the
prefix states over keys

    z = sum psi_j (k),  S_V = sum psi_j (x) v_j (k, d_v),  S_K = sum psi_j (x) k_j (k, d_head),
    T_K = sum psi_j (x) v_j (x) k_j (k, d_v, d_head)

are carried forward (one sweep that also gives ``D``, ``O~``, ``G``, ``r`` and dQ), and the suffix states
over queries ``R_G = sum u_i (x) g_i``, ``R_Q = sum u_i (x) (r_i q_i)``, ``T_Q = sum u_i (x) g_i (x) q_i``
backward (a second sweep for dK, dV). A chunk only sees the states of the chunks strictly before (after)
it, so the two parts never overlap. Several chunks are processed at once as a *group* (per-chunk states,
then an exclusive cumulative sum over the group's chunks plus the carried state), so the number of
Python-level steps is ``L / (C m)`` rather than ``L / C``.

**Chunk size rule.** Per row, the in-chunk work costs about ``C (k + 3 d_v + 2 d_head)`` and the state
work ``4 k d_v d_head``; ``C`` is the power of two nearest ``k d_v d_head / (k + d_v + d_head)`` (so the
in-chunk part stays a fraction of the state part), clipped to ``[16, 512]`` and to ``L``. The group size
``m`` is the largest keeping ``batch H m max(k d_v d_head, C d_v d_head, C k, C^2)`` within
:data:`BLOCK_ELEMENTS` (at least one chunk).

**Cost** ``O(batch H L k d_v d_head + batch H L C (k + d_v + d_head))`` time;
``O(batch H L (k + d_v + d_head) + BLOCK_ELEMENTS)`` memory (features and the per-row ``D``, ``G``, ``r``
kept for the second sweep, plus one group's states and blocks); never an ``L x L`` array.

**Run-time checks.** :func:`gpulora.poly.chain.check_extreme_pairs` measures the rounding of the features
at the most negative scores, as in the non-causal chain. Row ``i`` sums ``i + 1`` keys, so ``D_i >= (i + 1) p_min`` with ``p_min`` the minimum
of ``p`` on ``[-M, M]``; :func:`gpulora.poly.chain.check_normaliser` is applied with that per-row bound
once the forward sweep is done (one host read) and raises :class:`~gpulora.poly.chain.PolynomialFailure`
before any gradient is returned.
"""

from __future__ import annotations

import math

from .. import backend
from .chain import PolynomialFailure, check_extreme_pairs, check_normaliser
from .coefficients import PolyChoice
from .features import feature_scales, monomial_features
from .monomials import monomial_table

__all__ = ["BLOCK_ELEMENTS", "PolynomialFailure", "chunk_size", "chunked_loss_and_grads", "chunked_output",
           "loss_and_grads", "output"]

BLOCK_ELEMENTS = 1 << 17  # 1 MiB of float64 per temporary: cache-sized groups measured fastest
MIN_CHUNK, MAX_CHUNK = 16, 512


def chunk_size(L: int, k: int, d_head: int, d_v: int) -> int:
    """The default chunk size ``C`` (see the module docstring): ``k d_v d_head / (k + d_v + d_head)``
    rounded to a power of two, clipped to ``[16, 512]`` and to ``L``."""
    balance = k * d_v * d_head / (k + d_v + d_head)
    c = 2 ** round(math.log2(max(balance, 1.0)))
    return max(1, min(L, max(MIN_CHUNK, min(MAX_CHUNK, c))))


def _group_size(lead: int, n_chunks: int, c: int, k: int, d_head: int, d_v: int) -> int:
    per_chunk = lead * max(k * d_v * d_head, c * d_v * d_head, c * k, c * c)
    return max(1, min(n_chunks, BLOCK_ELEMENTS // per_chunk))


def _exclusive(xp, carry: dict, name: str, parts, reverse=False):
    """States before each chunk of a group: ``carry[name] + sum of parts of the earlier chunks``.

    ``parts (B, m, ...)`` are per-chunk sums; ``carry[name] (B, ...)`` the state carried from the previous
    groups (zero when absent), advanced in place past this group. ``reverse`` sums the later chunks
    instead (suffix states). Returns the states ``(B, m, ...)``; the sums are sequential over chunks.
    """
    if name not in carry:
        carry[name] = xp.zeros(parts.shape[:1] + parts.shape[2:], dtype=parts.dtype)
    if reverse:
        parts = xp.flip(parts, axis=1)
    total = xp.cumulative_sum(parts, axis=1)
    states = xp.concat([xp.zeros_like(parts[:, :1, ...]), total[:, :-1, ...]], axis=1) + carry[name][:, None, ...]
    carry[name] = carry[name] + total[:, -1, ...]
    return xp.flip(states, axis=1) if reverse else states


def _kron_rows(xp, a, b):
    """Row-wise Kronecker product of ``a (..., C, p)`` and ``b (..., C, q)``: ``(..., C, p q)``."""
    return xp.reshape(a[..., :, None] * b[..., None, :], a.shape[:-1] + (a.shape[-1] * b.shape[-1],))


def _readout(xp, w, a, t):
    """``out_i = (w_i (x) a_i) . t`` for ``w (..., C, k)``, ``a (..., C, p)``, ``t (..., k, p q)``: ``(..., C, q)``."""
    p = a.shape[-1]
    z = w @ t  # [..., C, p * q]
    z = xp.reshape(z, z.shape[:-1] + (p, z.shape[-1] // p))
    return xp.sum(a[..., None] * z, axis=-2)


class _Sweep:
    """Padded, chunked layout of one call: features, and the arrays the two sweeps share."""

    def __init__(self, q, k, v, beta, choice: PolyChoice, compute_dtype, softmax_one, chunk, group):
        xp = backend.namespace(q, k, v)
        self.xp = xp
        self.softmax_one = softmax_one
        self.lead = q.shape[:-2]
        L, d_head, d_v = q.shape[-2], q.shape[-1], v.shape[-1]
        B = math.prod(self.lead)
        table = monomial_table(d_head, choice.degree)
        nk = table.k
        c = chunk_size(L, nk, d_head, d_v) if chunk is None else max(1, int(chunk))
        n = -(-L // c)
        m = _group_size(B, n, c, nk, d_head, d_v) if group is None else max(1, min(n, int(group)))
        self.L, self.C, self.n, self.m, self.B, self.k = L, c, n, m, B, nk
        self.d_head, self.d_v, self.beta = d_head, d_v, beta
        self.dtype = compute_dtype
        self.choice = choice
        lp = n * c

        def padded(a):  # (B, n, C, d) in the compute dtype, zero rows past L
            a = xp.reshape(xp.astype(a, compute_dtype, copy=False), (B, L, a.shape[-1]))
            if lp > L:
                a = xp.concat([a, xp.zeros((B, lp - L, a.shape[-1]), dtype=compute_dtype)], axis=1)
            return xp.reshape(a, (B, n, c, a.shape[-1]))

        self.padded = padded
        self.q, self.k_, self.v = padded(q), padded(k), padded(v)
        sq = xp.asarray(feature_scales(choice.coef, d_head, "query"), dtype=compute_dtype)
        sk = xp.asarray(feature_scales(choice.coef, d_head, "key"), dtype=compute_dtype)
        # [B, n, C, k]; the constant monomial is 1 on padded rows too: zero them (no key, no query there)
        qs = beta * self.q
        self.phi = monomial_features(qs, table, sq)
        self.psi = monomial_features(self.k_, table, sk)
        # before the padded rows are zeroed (there phi . psi = p(0) still holds)
        check_extreme_pairs(*(xp.reshape(a, (B, lp, a.shape[-1])) for a in (qs, self.k_, self.phi, self.psi)),
                            choice)
        if lp > L:
            last = L - (n - 1) * c
            self.phi[:, -1, last:, :] = 0
            self.psi[:, -1, last:, :] = 0
        rows = xp.reshape(xp.arange(lp), (n, c, 1))
        # [n, C, 1]: 1 on padded rows, so that their (zero) normaliser never divides 0 by 0
        self.pad = xp.astype(rows >= L, compute_dtype)
        self.tril = xp.arange(c)[:, None] >= xp.arange(c)[None, :]  # [C, C]

    def groups(self, reverse=False):
        starts = range(0, self.n, self.m)
        for c0 in (reversed(starts) if reverse else starts):
            yield c0, min(self.n, c0 + self.m)

    def unpad(self, a):
        """``(B, n, C, d)`` back to ``lead + (L, d)``."""
        xp = self.xp
        a = xp.reshape(a, (self.B, self.n * self.C, a.shape[-1]))[:, : self.L, ...]
        return xp.reshape(a, self.lead + (self.L, a.shape[-1]))

    def check(self, den):
        """:func:`check_normaliser` on the real rows of ``den (B, n, C, 1)``: row ``i`` needs ``(i + 1) p_min``."""
        xp = self.xp
        den = xp.reshape(den, (self.B, self.n * self.C))[:, : self.L, ...]
        lower = xp.astype(xp.arange(1, self.L + 1), self.dtype) * self.choice.min_value
        check_normaliser(den, lower, self.choice)

    def forward(self, c0, c1, carry, y=None, need=()):
        """One group of the forward sweep.

        ``carry``: dict of the prefix states before chunk ``c0`` (advanced in place). Overwrites ``phi``
        with ``u = phi / D`` for the backward sweep. Returns ``(o, den, out)``: the output and the
        normaliser (without the Softmax_1 one) of the group's rows, and, when ``y`` is given, ``out`` with
        ``g``, ``r`` and the parts of ``dq`` (complete), ``dk`` and ``dv`` (in-chunk only) that ``need`` asks.
        """
        xp, beta = self.xp, self.beta
        phi, psi, v = self.phi[:, c0:c1, ...], self.psi[:, c0:c1, ...], self.v[:, c0:c1, ...]
        # [B, m, C, C]: in-chunk polynomial weights, masked to j <= i
        a = xp.where(self.tril, phi @ psi.mT, 0.0)
        z = _exclusive(xp, carry, "z", xp.sum(psi, axis=-2))  # [B, m, k]
        den = phi @ z[..., None] + xp.sum(a, axis=-1, keepdims=True) + self.pad[c0:c1, ...]  # [B, m, C, 1]
        raw_den = den - self.pad[c0:c1, ...]
        if self.softmax_one:
            den = den + 1.0
        u = phi / den
        self.phi[:, c0:c1, ...] = u
        f = a / den  # [B, m, C, C]: the block of F~
        s_v = _exclusive(xp, carry, "s_v", psi.mT @ v)  # [B, m, k, d_v]
        o = u @ s_v + f @ v
        if y is None:
            return o, raw_den, None
        g = o - y
        r = xp.sum(g * o, axis=-1, keepdims=True)  # [B, m, C, 1]
        out = {"g": g, "r": r}
        if need & {"q", "k"}:
            p = f * (g @ v.mT - r)  # [B, m, C, C]: dloss/dS on the block
        if "q" in need:
            kk = self.k_[:, c0:c1, ...]
            t_k = _exclusive(xp, carry, "t_k", psi.mT @ _kron_rows(xp, v, kk))  # [B, m, k, d_v d_head]
            s_k = _exclusive(xp, carry, "s_k", psi.mT @ kk)  # [B, m, k, d_head]
            out["dq"] = beta * (_readout(xp, u, g, t_k) - r * (u @ s_k) + p @ kk)
        if "k" in need:
            out["dk"] = beta * (p.mT @ self.q[:, c0:c1, ...])
        if "v" in need:
            out["dv"] = f.mT @ g
        return o, raw_den, out

    def backward(self, c0, c1, carry, g, r, need):
        """One group of the backward sweep: the suffix-state parts of dK and dV (``carry`` as in forward)."""
        xp, beta = self.xp, self.beta
        u, psi = self.phi[:, c0:c1, ...], self.psi[:, c0:c1, ...]
        out = {}
        if "v" in need:
            r_g = _exclusive(xp, carry, "r_g", u.mT @ g, reverse=True)  # [B, m, k, d_v]
            out["dv"] = psi @ r_g
        if "k" in need:
            qq = self.q[:, c0:c1, ...]
            t_q = _exclusive(xp, carry, "t_q", u.mT @ _kron_rows(xp, g, qq), reverse=True)
            r_q = _exclusive(xp, carry, "r_q", u.mT @ (r * qq), reverse=True)  # [B, m, k, d_head]
            out["dk"] = beta * (_readout(xp, psi, self.v[:, c0:c1, ...], t_q) - psi @ r_q)
        return out


def chunked_output(q, k, v, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False, chunk=None,
                   group=None):
    """:func:`output` with the chunk size ``C`` and the group size ``m`` (chunks per step) forced (tests)."""
    sw = _Sweep(q, k, v, beta, choice, compute_dtype, softmax_one, chunk, group)
    xp = sw.xp
    o = backend.empty((sw.B, sw.n, sw.C, sw.d_v), sw.dtype, xp)
    den = backend.empty((sw.B, sw.n, sw.C, 1), sw.dtype, xp)
    carry = {}
    for c0, c1 in sw.groups():
        o[:, c0:c1, ...], den[:, c0:c1, ...], _ = sw.forward(c0, c1, carry)
    sw.check(den)
    return xp.astype(sw.unpad(o), q.dtype, copy=False)


def chunked_loss_and_grads(q, k, v, y, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False,
                           need=("q", "k", "v"), chunk=None, group=None):
    """:func:`loss_and_grads` with the chunk size ``C`` and the group size ``m`` (chunks per step) forced."""
    need = set(need)
    sw = _Sweep(q, k, v, beta, choice, compute_dtype, softmax_one, chunk, group)
    xp, shape = sw.xp, (sw.B, sw.n, sw.C)
    yc = sw.padded(y)
    g = backend.empty(shape + (sw.d_v,), sw.dtype, xp)
    r = backend.empty(shape + (1,), sw.dtype, xp)
    den = backend.empty(shape + (1,), sw.dtype, xp)
    width = {"q": sw.d_head, "k": sw.d_head, "v": sw.d_v}
    grads = {t: backend.empty(shape + (width[t],), sw.dtype, xp) for t in need}
    loss = xp.zeros((), dtype=xp.float64)
    carry = {}
    for c0, c1 in sw.groups():
        _, den[:, c0:c1, ...], out = sw.forward(c0, c1, carry, yc[:, c0:c1, ...], need)
        g[:, c0:c1, ...], r[:, c0:c1, ...] = out["g"], out["r"]
        loss = loss + 0.5 * xp.sum(xp.astype(out["g"], xp.float64) ** 2)
        for t in need:
            grads[t][:, c0:c1, ...] = out["d" + t]
    sw.check(den)
    if need & {"k", "v"}:
        carry = {}
        for c0, c1 in sw.groups(reverse=True):
            out = sw.backward(c0, c1, carry, g[:, c0:c1, ...], r[:, c0:c1, ...], need)
            for t, part in out.items():
                grads[t[1]][:, c0:c1, ...] += part
    result = [sw.unpad(grads[t]) if t in need else None for t in ("q", "k", "v")]
    return tuple(None if a is None else xp.astype(a, q.dtype, copy=False) for a in [loss] + result)


def output(q, k, v, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False):
    """Causal ``O~`` of shape ``(..., L, d_v)`` in ``q.dtype``; row ``i`` attends to keys ``j <= i``.

    Parameters and returns as :func:`gpulora.poly.chain.output`. Cost ``O(L k d_v + L C k)`` per leading
    index; raises :class:`PolynomialFailure` when a normaliser falls below ``(i + 1) p_min / 2``.
    """
    return chunked_output(q, k, v, beta, choice, compute_dtype, softmax_one=softmax_one)


def loss_and_grads(q, k, v, y, beta, choice: PolyChoice, compute_dtype, *, softmax_one=False,
                   need=("q", "k", "v")):
    """Causal loss and gradients with respect to ``Q``, ``K``, ``V`` by the chunked chain above.

    Parameters
    ----------
    q, k : arrays of shape (..., L, d_head)
    v, y : arrays of shape (..., L, d_v)
        Same namespace and dtype; leading axes (batch, heads) are independent problems.
    beta : float
        Inverse temperature, folded into the query features.
    choice : PolyChoice
        The polynomial ``p ~ exp`` (:func:`gpulora.poly.coefficients.choose`).
    compute_dtype : dtype
        Dtype of the features, states and products; results come back in ``q.dtype``.
    softmax_one : bool
        Softmax_1: 1 joins every normaliser.
    need : iterable of {"q", "k", "v"}
        Gradients to compute; the states of the others are skipped.

    Returns
    -------
    (loss, dq, dk, dv)
        ``loss`` a 0-d array (summed over leading axes), each gradient shaped like its input or ``None``.
        Cost ``O(L k d_v d_head + L C (k + d_v + d_head))`` time per leading index, memory linear in ``L``.

    Raises
    ------
    PolynomialFailure
        When a normaliser ``D_i`` is not finite or below ``(i + 1) p_min / 2``.
    """
    return chunked_loss_and_grads(q, k, v, y, beta, choice, compute_dtype, softmax_one=softmax_one, need=need)
