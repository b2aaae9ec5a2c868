"""``gpulora.kernels.kron_contract`` / ``kron_readout`` against their NumPy twins in ``gpulora.poly.products``.

Simulator cases run in one subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (set before ``numba.cuda`` is first
imported; this pytest process keeps the real ``numba.cuda``): this file, run as a script, prints the errors
of every case as JSON and the tests below assert them case by case. Outputs are NaN-poisoned before each
launch, so an unwritten element fails. Under the simulator the tiles are 8 wide (``BLOCK = 4``), so these
sizes span several tiles on every axis, with ragged edges.

Tolerances (docs/math.md section 7), relative Frobenius error: float64 <= 1e-12; float32, the kernel's error against
the float64 twin at most twice the float32 twin's error plus one float32 epsilon.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpulora.testing import check_kernel_errors, kernel_vs_twin, simulator_results
from gpulora.poly.products import kron_contract_reference, kron_readout_reference

OPS = ("contract", "readout")

# (lead, L, k, p, q): lead = batch axes; p != q throughout.
SIM_CASES = [
    ((), 1, 2, 1, 3),
    ((2,), 7, 5, 2, 3),
    ((1,), 33, 10, 3, 4),
    ((2,), 63, 4, 4, 2),
    ((), 20, 9, 2, 9),
    ((2, 2), 7, 3, 2, 3),
    ((1,), 0, 3, 2, 3),
]
GPU_CASES = [
    ((2,), 5000, 153, 16, 8),
    ((1,), 4097, 35, 5, 33),
    ((3,), 1031, 495, 4, 4),
]


def _case_id(case):
    lead, L, k, p, q = case
    return "B{}-L{}-k{}-p{}-q{}".format("x".join(map(str, lead)) or "none", L, k, p, q)


def _inputs(case, rng):
    lead, L, k, p, q = case
    psi = rng.standard_normal(lead + (L, k))
    a = rng.standard_normal(lead + (L, p))
    b = rng.standard_normal(lead + (L, q))
    t = rng.standard_normal(lead + (k, p, q))
    return psi, a, b, t


def run_case(case, xp, op, seed=0):
    """Errors of the kernel ``op`` (arrays on ``xp``) against the NumPy twin, for float64 and float32."""
    from gpulora import kernels

    kernel, twin = {
        "contract": (lambda psi, a, b, t: kernels.kron_contract(psi, a, b),
                     lambda psi, a, b, t: kron_contract_reference(psi, a, b)),
        "readout": (lambda psi, a, b, t: kernels.kron_readout(psi, a, t),
                    lambda psi, a, b, t: kron_readout_reference(psi, a, t)),
    }[op]
    return kernel_vs_twin(kernel, twin, _inputs(case, np.random.default_rng(seed)), xp)


@pytest.fixture(scope="module")
def sim_results():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed: pip install 'gpulora[ptx]'")
    return simulator_results(__file__)


@pytest.mark.sim
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in SIM_CASES])
def test_kron_kernel_sim(case, op, sim_results):
    check_kernel_errors(sim_results[f"{op}-{_case_id(case)}"])


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in SIM_CASES + GPU_CASES])
def test_kron_kernel_gpu(case, op):
    from gpulora import kernels

    if not kernels.available():
        pytest.skip("needs CuPy, a CUDA device and numba-cuda (without the simulator)")
    import cupy

    check_kernel_errors(run_case(case, cupy, op))


def _main():
    from numba import cuda

    assert cuda.config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    print(json.dumps({f"{op}-{_case_id(c)}": run_case(c, np, op) for op in OPS for c in SIM_CASES}))


if __name__ == "__main__":
    _main()
