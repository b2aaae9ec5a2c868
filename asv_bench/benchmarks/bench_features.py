"""The feature map alone: ``monomial_features`` (the kernel's contract) and the public ``poly_features``."""

from __future__ import annotations

import math

import numpy as np

import gpulora
from gpulora import backend, cost
from gpulora.poly.coefficients import coefficients
from gpulora.poly.features import feature_scales, monomial_features
from gpulora.poly.monomials import monomial_table

from .common import BACKENDS, SCORE_BOUND, Benchmark, best_seconds, grid, setup  # noqa: F401

LENGTHS = grid([16384], [4096, 16384, 65536])
D_HEADS = grid([8], [4, 8, 16])
DEGREES = grid([2, 4], [2, 4])
DTYPES = grid(["float32", "float64"], ["float32", "float64"])


class FeatureMap(Benchmark):
    """Scaled symmetric monomials of ``L`` rows of width ``d_head`` (``k = C(d_head + g, g)`` columns)."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        xp = self.setup_backend(backend_name)
        rng = np.random.default_rng(0)
        z = rng.standard_normal((L, d_head))
        z *= math.sqrt(SCORE_BOUND) / np.linalg.norm(z, axis=-1).max()  # |z_i . z_j| <= SCORE_BOUND
        self.z = xp.asarray(z.astype(dtype))
        self.degree = degree
        self.table = monomial_table(d_head, degree)
        coef = coefficients("taylor", degree, SCORE_BOUND)
        self.scale = xp.asarray(feature_scales(coef, d_head, "key").astype(dtype))
        monomial_features(self.z[:64], self.table, self.scale)  # warm-up: lazy imports of the first call
        gpulora.poly_features(self.z[:64], degree, bound=SCORE_BOUND)
        self.bytes = cost.feature_map_bytes(L, d_head, self.table.k, np.dtype(dtype).itemsize)

    def _run(self):
        return monomial_features(self.z, self.table, self.scale)

    def time_monomial_features(self, *params):
        self._run()
        backend.synchronize()

    def time_poly_features(self, *params):
        gpulora.poly_features(self.z, self.degree, bound=SCORE_BOUND)
        backend.synchronize()

    def peakmem_monomial_features(self, *params):
        self._run()

    def track_gbps_monomial_features(self, *params):
        return self.bytes / best_seconds(self._run) / 1e9

    track_gbps_monomial_features.unit = "GB/s"
