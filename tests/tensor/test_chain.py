"""The polynomial method for tensor attention: the chain is the dense formula with polynomial weights to
rounding; the bound covers every score; the approximation converges in the degree; run-time checks."""

import numpy as np
import pytest

import gpulora
from gpulora.poly.coefficients import choose, measure
from gpulora.tensor import chain
from gpulora.tensor.reference import dense_loss_grads, dense_scores, dense_weights

NAMES = ("q", "k1", "k2", "v1", "v2")


def _inputs(seed, lead=(2,), L=6, d=3, d_v=2, scale=0.6):
    rng = np.random.default_rng(seed)
    qk = [scale * rng.standard_normal(lead + (L, d)) for _ in range(3)]
    v = [rng.standard_normal(lead + (L, d_v)) for _ in range(2)]
    return qk + v, rng.standard_normal(lead + (L, d_v))


@pytest.mark.parametrize("family", ["taylor", "shifted_taylor", "chebyshev"])
@pytest.mark.parametrize("g", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", ["y", "grad_output"])
def test_chain_equals_dense_formula_with_polynomial_weights(family, g, mode):
    """Algebra apart from approximation: any degree, whatever its accuracy, to float64 rounding."""
    arrays, t = _inputs(g, L=7 if g % 2 else 5, d=3 if g < 5 else 2, scale=0.45)
    beta = 0.5
    m = chain.score_bound(*arrays[:3], beta)
    c = measure(family, g, m)
    assert c.positive  # M < 1: every family is positive at every degree
    f = dense_weights(dense_scores(*arrays[:3], beta), coef=c.coef)
    ref = dense_loss_grads(f, *arrays, beta, **{mode: t})
    got = chain.loss_and_grads(*arrays, beta, c, np.float64, **{mode: t})
    assert abs(float(got[0]) - float(ref[0])) <= 1e-13 * abs(float(ref[0]))
    for name, a, b in zip(NAMES, got[1:], ref[1:6]):
        assert np.linalg.norm(a - b) <= 1e-13 * np.linalg.norm(b), name
    np.testing.assert_allclose(chain.output(*arrays, beta, c, np.float64), ref[-1], rtol=1e-13, atol=1e-15)


def test_need_subsets_agree_with_the_full_chain():
    arrays, y = _inputs(1)
    c = measure("shifted_taylor", 4, chain.score_bound(*arrays[:3], 1.0))
    full = chain.loss_and_grads(*arrays, 1.0, c, np.float64, y=y)
    for need in (("q",), ("k1",), ("k2",), ("v1",), ("v2",), ("k1", "v2")):
        part = chain.loss_and_grads(*arrays, 1.0, c, np.float64, y=y, need=need)
        for name, a, b in zip(NAMES, part[1:], full[1:]):
            if name in need:
                np.testing.assert_allclose(a, b, rtol=1e-14)
            else:
                assert a is None


def test_score_bound_covers_every_score_and_beats_the_product_of_norms():
    for seed in range(5):
        arrays, _ = _inputs(seed, lead=(2, 2), L=8, d=5, scale=1.0)
        q, k1, k2 = arrays[:3]
        m = chain.score_bound(q, k1, k2, 0.3)
        assert np.abs(dense_scores(q, k1, k2, 0.3)).max() <= m * (1 + 1e-12)
        naive = 0.3 * np.max(np.linalg.norm(q, axis=-1).max(-1) * np.linalg.norm(k1, axis=-1).max(-1)
                             * np.linalg.norm(k2, axis=-1).max(-1))
        assert m <= naive


def test_poly_converges_as_the_degree_rises():
    arrays, y = _inputs(7, L=8, d=2, scale=0.6)
    beta = 1.0
    m = chain.score_bound(*arrays[:3], beta)
    from gpulora.tensor import exact

    ref = exact.loss_and_grads(*arrays, beta, y=y)
    errs = []
    for g in range(1, 16, 2):
        c = measure("shifted_taylor", g, m)
        got = chain.loss_and_grads(*arrays, beta, c, np.float64, y=y)
        errs.append(max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(got[1:], ref[1:])))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5 and errs[0] > 1e-2, errs


def test_rounding_failure_is_reported_not_silent():
    """All scores at -M with a polynomial that needs float64, forced into float32: the check raises."""
    M = 8.0
    choice, compute = choose(M, tol=1e-3, family="chebyshev", dtype=np.float32)
    assert compute == np.float64
    L = 6
    q = np.zeros((1, L, 2), np.float32)
    q[..., 0] = M ** (1 / 3)
    v = np.ones((1, L, 2), np.float32)
    with pytest.raises(gpulora.PolynomialFailure, match="rounding"):
        chain.loss_and_grads(q, q, -q, v, v, 1.0, choice, np.float32, y=v)
    chain.loss_and_grads(q, q, -q, v, v, 1.0, choice, np.float64, y=v)


def test_normaliser_failure_is_reported():
    """Scores far outside the fitted interval make an odd Taylor polynomial negative: raise, never NaN."""
    choice = measure("taylor", 3, 0.5)
    L = 5
    q = np.zeros((1, L, 1))
    q[..., 0] = 3.0
    v = np.ones((1, L, 1))
    with pytest.raises(gpulora.PolynomialFailure):
        chain.output(q, q, -q, v, v, 1.0, choice, np.float64)
