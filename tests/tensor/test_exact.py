"""The blocked exact path of tensor attention against the dense float64 reference."""

import numpy as np
import pytest

from gpulora.tensor import exact
from gpulora.tensor.reference import dense_loss_grads, dense_scores, dense_weights

NAMES = ("q", "k1", "k2", "v1", "v2")


def _inputs(seed, lead, L, d, d_v):
    rng = np.random.default_rng(seed)
    qk = [rng.standard_normal(lead + (L, d)) for _ in range(3)]
    v = [rng.standard_normal(lead + (L, d_v)) for _ in range(2)]
    return qk + v, rng.standard_normal(lead + (L, d_v))


CASES = [  # lead, L, d_head, d_v, (block_q, block_k1, block_k2)
    ((), 5, 3, 2, (None, None, None)),
    ((2,), 7, 2, 3, (3, 2, 4)),
    ((2, 3), 6, 4, 1, (1, 1, 1)),
    ((1,), 9, 3, 3, (2, 9, 3)),
    ((2,), 8, 2, 2, (8, 8, 8)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lead{len(c[0])}-L{c[1]}-d{c[2]}-dv{c[3]}-b{c[4]}")
@pytest.mark.parametrize("mode", ["y", "grad_output"])
def test_exact_equals_dense_reference(case, mode):
    lead, L, d, d_v, blocks = case
    arrays, t = _inputs(sum(lead) + L, lead, L, d, d_v)
    beta = 0.8
    ref = dense_loss_grads(dense_weights(dense_scores(*arrays[:3], beta)), *arrays, beta, **{mode: t})
    got = exact.loss_and_grads(*arrays, beta, **{mode: t}, block_q=blocks[0], block_k1=blocks[1],
                               block_k2=blocks[2])
    assert abs(float(got[0]) - float(ref[0])) <= 1e-13 * abs(float(ref[0]))
    for name, a, b in zip(NAMES, got[1:], ref[1:6]):
        assert a.shape == b.shape
        assert np.linalg.norm(a - b) <= 1e-13 * np.linalg.norm(b), name
    o = exact.attention_output(*arrays, beta, block_q=blocks[0], block_k1=blocks[1], block_k2=blocks[2])
    np.testing.assert_allclose(o, ref[-1], rtol=1e-13, atol=1e-15)


def test_only_the_needed_gradients_are_computed():
    arrays, y = _inputs(0, (2,), 6, 3, 2)
    full = exact.loss_and_grads(*arrays, 1.0, y=y)
    part = exact.loss_and_grads(*arrays, 1.0, y=y, need=("k2", "v1"))
    assert [g is None for g in part[1:]] == [True, True, False, False, True]
    np.testing.assert_allclose(part[3], full[3], rtol=1e-14)
    np.testing.assert_allclose(part[4], full[4], rtol=1e-14)
    assert float(exact.loss_and_grads(*arrays, 1.0, y=y, need=())[0]) == pytest.approx(float(full[0]), rel=1e-15)


def test_block_sizes_bound_the_temporaries():
    for lead, L, width in [(1, 64, 4), (1, 4096, 4), (16, 512, 64), (1, 3, 200)]:
        bq, b1, b2 = exact.block_sizes(lead, L, width)
        assert 1 <= bq <= L and 1 <= b1 <= L and 1 <= b2 <= L
        assert lead * bq * b1 * max(b2, width) <= max(exact.BLOCK_ELEMENTS, lead * max(b2, width))
    assert exact.block_sizes(1, 64, 4)[1:] == (64, 64)  # small L: one tile covers every key pair


def test_float32_is_within_float32_rounding():
    arrays, y = _inputs(4, (2,), 7, 3, 2)
    ref = exact.loss_and_grads(*arrays, 0.5, y=y)
    got = exact.loss_and_grads(*[a.astype(np.float32) for a in arrays], 0.5, y=y.astype(np.float32),
                               block_q=3, block_k1=2, block_k2=5)
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == np.float32
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_memory_is_linear_in_L(monkeypatch):
    """With a small tile budget, the peak allocation of the exact gradient is one tile plus O(L) arrays:
    from L = 64 to 192 it grows by far less than one L x L float64 matrix (an L^2 or L^3 temporary would
    add at least 295 kB at L = 192)."""
    import gc
    import tracemalloc

    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 1 << 12)
    exact.loss_and_grads(*_inputs(5, (), 8, 4, 4)[0], 0.5, y=_inputs(5, (), 8, 4, 4)[1])  # lazy imports
    peaks = []
    for L in (64, 192):
        arrays, y = _inputs(5, (), L, 4, 4)
        gc.collect()  # a collection inside the traced window would count other tests' garbage
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        exact.loss_and_grads(*arrays, 0.5, y=y)
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
    assert exact.block_sizes(1, 192, 4)[1:] != (192, 192)  # tiled, two sweeps
    assert peaks[1] - peaks[0] < 0.5 * 192 * 192 * 8, peaks  # measured: about 14 kB (the O(L) outputs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_one_key_pair_dominates_gets_its_tiny_gradient(dtype):
    """Query 1's softmax is one key pair to within e^-83, so its contributions to dQ, dK1, dK2 are ~1e-37.
    ``r`` from the same products it is subtracted from (single tile) gets them right in either precision;
    ``r = g . o`` from the rounded output left 1e-7 (float32) and 1e-16 (float64) in their place. The
    values: PyTorch autograd of the same attention in float64."""
    q, k1, k2 = np.array([[-0.3], [8.7]]), np.array([[3.4], [-2.0]]), np.array([[-1.1], [3.5]])
    v1, v2, g = np.array([[-0.7], [0.0]]), np.array([[0.2], [-1.1]]), np.array([[0.0], [0.3]])
    _, dq, dk1, dk2, _, _ = exact.loss_and_grads(*(a.astype(dtype) for a in (q, k1, k2, v1, v2)), 1.0,
                                                 grad_output=g.astype(dtype))
    np.testing.assert_allclose(dq[1, 0], -1.13742648e-37, rtol=1e-5)
    np.testing.assert_allclose(dk1[1, 0], 4.94780517e-37, rtol=1e-5)
    np.testing.assert_allclose(dk2[0, 0], 8.99600940e-37, rtol=1e-5)
