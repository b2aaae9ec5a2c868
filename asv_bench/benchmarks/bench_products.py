"""The fused low-rank products alone: ``kron_contract`` (``T = Psi^T (A (x) B)``) and ``kron_readout``."""

from __future__ import annotations

import numpy as np

from gpulora import backend, cost
from gpulora.poly.monomials import feature_dim
from gpulora.poly.products import kron_contract, kron_readout

from .common import BACKENDS, Benchmark, best_seconds, grid, setup  # noqa: F401

LENGTHS = grid([16384], [4096, 16384, 65536])
D_HEADS = grid([8], [4, 8, 16])
DEGREES = grid([2, 4], [2, 4])
DTYPES = grid(["float32", "float64"], ["float32", "float64"])


class KronProducts(Benchmark):
    """Products of the chain with ``k = C(d_head + g, g)`` features and ``p = q = d_head`` (``d_v = d_head``)."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        xp = self.setup_backend(backend_name)
        rng = np.random.default_rng(0)
        k = feature_dim(d_head, degree)
        p = q = d_head

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(dtype))

        self.psi, self.a, self.b, self.t = arr(L, k), arr(L, p), arr(L, q), arr(k, p, q)
        kron_contract(self.psi[:64], self.a[:64], self.b[:64])  # warm-up: lazy imports of the first call
        kron_readout(self.psi[:64], self.a[:64], self.t)
        self.flops_contract = cost.kron_contract_flops(L, k, p, q)
        self.flops_readout = cost.kron_readout_flops(L, k, p, q)

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
