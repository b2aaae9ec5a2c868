"""Every registered kernel compiles to PTX for sm_80 and sm_90 without a GPU (NVVM wheel only), and the
package imports without touching CUDA.

These tests use the real ``numba.cuda`` (no simulator) in this process; they skip when numba-cuda or its
NVVM is missing, or when the whole run was started under ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

CCS = [(8, 0), (9, 0)]
DTYPES = ("float32", "float64")
# Static shared memory per block beyond which a launch fails without opting in to more.
STATIC_SHARED_LIMIT = 48 * 1024


@pytest.fixture(scope="module")
def kernels():
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed: pip install 'gpulora[ptx]'")
    if cuda.config.ENABLE_CUDASIM:
        pytest.skip("PTX needs the real numba.cuda, not the simulator (NUMBA_ENABLE_CUDASIM=1)")
    from gpulora import kernels

    def probe(x):
        x[0] = 1.0

    try:
        cuda.compile_ptx(probe, "void(float32[::1])", cc=(8, 0))
    except (ImportError, RuntimeError, OSError) as exc:
        if not kernels._api._missing_cuda_library(exc):
            raise
        pytest.skip(f"NVVM/NVRTC are not available (pip install 'gpulora[ptx]'): {exc}")
    return kernels


@pytest.fixture(scope="module", params=CCS, ids=lambda cc: "sm_{}{}".format(*cc))
def ptx(request, kernels):
    return request.param, kernels.compile_ptx_all(request.param)


def test_registry_lists_each_kernel_with_a_float32_and_a_float64_signature(kernels):
    assert set(kernels.KERNELS) == {"feature_map", "kron_contract", "kron_readout"}
    for name, (kernel, signatures) in kernels.KERNELS.items():
        assert kernel.py_func.__name__ == f"{name}_kernel"
        assert [re.search(r"float(?:32|64)", s).group(0) for s in signatures] == list(DTYPES)


def test_one_ptx_per_kernel_and_signature(ptx, kernels):
    cc, texts = ptx
    assert set(texts) == {f"{name}[{dt}]" for name in kernels.KERNELS for dt in DTYPES}
    for key, text in texts.items():
        name = key.split("[")[0]
        assert f".target sm_{cc[0]}{cc[1]}" in text, key
        entries = re.findall(r"\.entry\s+(\S+?)\(", text)
        assert len(entries) == 1 and f"{name}_kernel" in entries[0], (key, entries)


def test_arithmetic_is_in_the_signature_dtype(ptx):
    """float64 kernels compute in f64; float32 kernels multiply in f32, and the Kronecker products add their
    long sums over L in f64 accumulators (kernels/kron.py: float32 sums lost 3x to cuBLAS on an H200)."""
    _, texts = ptx
    for key, text in texts.items():
        body = text[text.index(".entry"):]
        ops = set(re.findall(r"\b((?:mul|fma|add)(?:\.rn)?)\.(f32|f64)\b", body))
        if key.endswith("[float64]"):
            assert {t for _, t in ops} == {"f64"}, (key, ops)
        elif key.startswith("feature_map"):
            assert ops == {("mul", "f32")}, (key, ops)
        else:
            assert ops == {("mul", "f32"), ("add", "f64")}, (key, ops)


def test_static_shared_memory_fits_and_nothing_spills_to_local(ptx):
    _, texts = ptx
    for key, text in texts.items():
        shared = sum(int(n) for n in re.findall(r"\.shared\s+\.align\s+\d+\s+\.b8\s+\S+\[(\d+)\]", text))
        assert 0 < shared <= STATIC_SHARED_LIMIT, (key, shared)
        assert ".local" not in text, key


def test_import_touches_no_cuda_and_fused_products_are_off_by_default(kernels):
    script = (
        "import sys, gpulora.kernels as k\n"
        "from numba.cuda.cudadrv.driver import driver\n"
        # pid is set only by a cuInit (is_initialized is also True when no driver library was found)
        "assert driver.pid is None, 'importing gpulora.kernels initialised the CUDA driver'\n"
        "assert 'cupy' not in sys.modules, 'importing gpulora.kernels imported CuPy'\n"
        "assert k.use_fused_products() is False\n"
    )
    unset = ("GPULORA_FUSED_PRODUCTS", "NUMBA_ENABLE_CUDASIM")
    env = {key: v for key, v in os.environ.items() if key not in unset}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_fused_products_follow_the_environment_variable(kernels, monkeypatch):
    monkeypatch.setenv("GPULORA_FUSED_PRODUCTS", "0")
    assert kernels.use_fused_products() is False
    monkeypatch.setenv("GPULORA_FUSED_PRODUCTS", "1")
    assert kernels.use_fused_products() is kernels.available()
