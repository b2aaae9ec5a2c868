"""``gpulora.kernels.feature_map`` against its NumPy twin ``monomial_features_reference``.

Simulator cases run in one subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (the variable must be set before
``numba.cuda`` is first imported, and this pytest process keeps the real ``numba.cuda`` for the PTX and
GPU tests): this file, run as a script, prints the errors of every case as JSON, and the tests below assert
them case by case. Outputs are NaN-poisoned before each launch, so an unwritten element fails.

Tolerances (docs/math.md section 7): float64, max elementwise relative error <= 1e-12; float32, the kernel's error
against the float64 twin at most twice the float32 twin's error plus one float32 epsilon.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpulora import backend
from gpulora.testing import check_kernel_errors, kernel_vs_twin, simulator_results
from gpulora.poly.features import monomial_features_reference
from gpulora.poly.monomials import monomial_table


# (lead, L, d, g, mode): lead = batch axes; mode "auto" = the entry point, "recompute" = parent-chain
# mode, "rows3" = cached mode with 3 rows per block (the shared cache sets the tile).
SIM_CASES = [
    ((), 1, 1, 1, "auto"),
    ((2,), 7, 3, 2, "auto"),
    ((1,), 33, 4, 3, "auto"),
    ((2,), 63, 3, 1, "auto"),
    ((), 63, 1, 3, "auto"),
    ((2, 3), 7, 3, 2, "auto"),
    ((2,), 33, 3, 3, "recompute"),
    ((1,), 7, 4, 2, "rows3"),
    ((1,), 0, 3, 2, "auto"),
]
GPU_CASES = [
    ((2,), 4097, 8, 3, "auto"),
    ((1,), 300, 16, 4, "auto"),  # k = 4845 > S_ELEMS: recompute mode
    ((2,), 1000, 4, 2, "recompute"),
]


def _case_id(case):
    lead, L, d, g, mode = case
    return "B{}-L{}-d{}-g{}-{}".format("x".join(map(str, lead)) or "none", L, d, g, mode)


def _max_rel(x, ref):
    """Max elementwise relative error (NaN if ``x`` has a NaN); 0 for empty arrays."""
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(x - ref) / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)))


def _kernel(z, table, scale, mode):
    """Features of ``z`` by the kernel: through the entry point, or the launcher with a forced mode."""
    from gpulora import kernels
    from gpulora.kernels.feature_map import launch_feature_map

    if mode == "auto":
        return kernels.feature_map(z, table, scale)
    xp = backend.namespace(z)
    out = backend.empty(z.shape[:-1] + (table.k,), z.dtype, xp)
    parent, coord, starts = (xp.asarray(a) for a in (table.parent, table.coord, table.degree_start))
    if mode == "recompute":
        launch_feature_map(z, parent, coord, starts, scale, out, cached=False)
    else:
        launch_feature_map(z, parent, coord, starts, scale, out, cached=True, tile_rows=3)
    return out


def run_case(case, xp, seed=0):
    """Errors of the kernel (arrays on ``xp``) against the NumPy twin, for float64 and float32 inputs."""
    lead, L, d, g, mode = case
    rng = np.random.default_rng(seed)
    table = monomial_table(d, g)
    z = 0.8 * rng.standard_normal(lead + (L, d))
    scale = rng.uniform(-1.5, 1.5, table.k)
    return kernel_vs_twin(lambda z_, s_: _kernel(z_, table, s_, mode),
                          lambda z_, s_: monomial_features_reference(z_, table, s_), (z, scale), xp, error=_max_rel)


@pytest.fixture(scope="module")
def sim_results():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed: pip install 'gpulora[ptx]'")
    return simulator_results(__file__)


@pytest.mark.sim
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in SIM_CASES])
def test_feature_map_kernel_sim(case, sim_results):
    check_kernel_errors(sim_results[_case_id(case)])


@pytest.mark.gpu
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in SIM_CASES + GPU_CASES])
def test_feature_map_kernel_gpu(case):
    from gpulora import kernels

    if not kernels.available():
        pytest.skip("needs CuPy, a CUDA device and numba-cuda (without the simulator)")
    import cupy

    check_kernel_errors(run_case(case, cupy))


def _main():
    from numba import cuda

    assert cuda.config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    print(json.dumps({_case_id(c): run_case(c, np) for c in SIM_CASES}))


if __name__ == "__main__":
    _main()
