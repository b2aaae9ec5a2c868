"""The fused low-rank products alone: ``kron_contract`` (``T = Psi^T (A (x) B)``) and ``kron_readout``."""

from __future__ import annotations

import numpy as np

from gpulora import backend, cost
from gpulora.poly.coefficients import coefficients
from gpulora.poly.features import feature_scales, monomial_features
from gpulora.poly.monomials import monomial_table
from gpulora.poly.products import kron_contract, kron_readout

from .common import BACKENDS, SCORE_BOUND, Benchmark, best_seconds, row_bounds, scaled_rows, setup  # noqa: F401

LENGTHS = [16384]
D_HEADS = [8]
DEGREES = [2, 4]
DTYPES = ["float32", "float64"]


class KronProducts(Benchmark):
    """Products of the chain with ``k = C(d_head + g, g)`` features and ``p = q = d_head`` (``d_v = d_head``).

    ``psi`` are the key features of rows scaled to the score bound ``SCORE_BOUND`` (the scaling of the
    feature columns matters for nothing here but realism); ``a``, ``b``, ``t`` are Gaussian."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        xp = self.setup_backend(backend_name)
        rng = np.random.default_rng(0)
        table = monomial_table(d_head, degree)
        k, p, q = table.k, d_head, d_head

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(dtype))

        self.host_z = scaled_rows(rng, L, d_head, SCORE_BOUND)
        scale = feature_scales(coefficients("taylor", degree, SCORE_BOUND), d_head, "key")
        self.psi = monomial_features(xp.asarray(self.host_z.astype(dtype)), table, xp.asarray(scale.astype(dtype)))
        self.a, self.b, self.t = arr(L, p), arr(L, q), arr(k, p, q)
        kron_contract(self.psi[:64], self.a[:64], self.b[:64])  # warm-up: lazy imports of the first call
        kron_readout(self.psi[:64], self.a[:64], self.t)
        self.flops_contract = cost.kron_contract_flops(L, k, p, q)
        self.flops_readout = cost.kron_readout_flops(L, k, p, q)

    def bounds(self):
        return row_bounds(self.host_z)

    def _contract(self):
        return kron_contract(self.psi, self.a, self.b)

    def _readout(self):
        return kron_readout(self.psi, self.a, self.t)

    def time_kron_contract(self, *params):
        self._contract()
        backend.synchronize()

    def time_kron_readout(self, *params):
        self._readout()
        backend.synchronize()

    def track_gflops_kron_contract(self, *params):
        return self.flops_contract / best_seconds(self._contract) / 1e9

    track_gflops_kron_contract.unit = "GFLOP/s"

    def track_gflops_kron_readout(self, *params):
        return self.flops_readout / best_seconds(self._readout) / 1e9

    track_gflops_kron_readout.unit = "GFLOP/s"
