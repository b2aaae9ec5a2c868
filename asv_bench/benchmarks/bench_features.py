"""The feature map alone: ``monomial_features`` (the kernel's contract) and the public ``poly_features``."""

from __future__ import annotations


import numpy as np

import gpulora
from gpulora import backend, cost
from gpulora.poly.coefficients import coefficients
from gpulora.poly.features import feature_scales, monomial_features
from gpulora.poly.monomials import monomial_table

from .common import BACKENDS, SCORE_BOUND, Benchmark, best_seconds, row_bounds, scaled_rows, setup  # noqa: F401

LENGTHS = [16384]
D_HEADS = [8]
DEGREES = [2, 4]
DTYPES = ["float32", "float64"]


class FeatureMap(Benchmark):
    """Scaled symmetric monomials of ``L`` rows of width ``d_head`` (``k = C(d_head + g, g)`` columns)."""

    params = [BACKENDS, LENGTHS, D_HEADS, DEGREES, DTYPES]
    param_names = ["backend", "L", "d_head", "degree", "dtype"]

    def setup(self, backend_name, L, d_head, degree, dtype):
        xp = self.setup_backend(backend_name)
        z = scaled_rows(np.random.default_rng(0), L, d_head, SCORE_BOUND)  # |z_i . z_j| <= SCORE_BOUND
        self.z = xp.asarray(z.astype(dtype))
        self.host_z = z
        self.degree = degree
        self.table = monomial_table(d_head, degree)
        coef = coefficients("taylor", degree, SCORE_BOUND)
        self.scale = xp.asarray(feature_scales(coef, d_head, "key").astype(dtype))
        monomial_features(self.z[:64], self.table, self.scale)  # warm-up: lazy imports of the first call
        gpulora.poly_features(self.z[:64], degree, bound=SCORE_BOUND)
        self.bytes = cost.feature_map_bytes(L, d_head, self.table.k, np.dtype(dtype).itemsize)

    def bounds(self):
        return row_bounds(self.host_z)

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
