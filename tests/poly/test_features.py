import math

import numpy as np
import pytest

import gpulora
from gpulora.poly.coefficients import coefficients, evaluate
from gpulora.poly.features import feature_scales, monomial_features_reference
from gpulora.poly.monomials import monomial_table
from gpulora.testing import rel_error

CASES = [(1, 1, "taylor"), (3, 2, "taylor"), (4, 4, "shifted_taylor"), (5, 3, "chebyshev"), (2, 7, "chebyshev")]


@pytest.mark.parametrize("d, g, family", CASES, ids=["d{}-g{}-{}".format(*c) for c in CASES])
def test_feature_pair_reproduces_the_polynomial(xp, d, g, family):
    """phi(q) . psi(k) = p(q . k) to rounding, for every family (including negative chebyshev weights)."""
    rng = np.random.default_rng(d * 10 + g)
    q, k = rng.standard_normal((2, 9, d)) * 0.5, rng.standard_normal((2, 11, d)) * 0.5
    bound = 1.5
    phi = gpulora.poly_features(xp.asarray(q), g, family=family, bound=bound, side="query")
    psi = gpulora.poly_features(xp.asarray(k), g, family=family, bound=bound)
    assert phi.shape == (2, 9, math.comb(d + g, g)) and type(phi) is type(xp.asarray(q))
    want = evaluate(coefficients(family, g, bound), q @ np.swapaxes(k, -1, -2))
    assert rel_error(phi @ psi.mT, want) < 1e-13


def test_default_taylor_features_approximate_exp():
    rng = np.random.default_rng(0)
    q, k = 0.3 * rng.standard_normal((5, 4)), 0.3 * rng.standard_normal((7, 4))
    phi, psi = gpulora.poly_features(q, 8, side="query"), gpulora.poly_features(k, 8)
    assert np.allclose(phi @ psi.T, np.exp(q @ k.T), rtol=1e-6)


def test_reference_writes_every_column_and_keeps_dtype():
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        z = rng.standard_normal((3, 33, 4)).astype(dtype)
        t = monomial_table(4, 3)
        s = feature_scales(coefficients("taylor", 3, 1.0), 4, "key").astype(dtype)
        out = monomial_features_reference(z, t, s)  # poisoned allocation: NaN if a column is skipped
        assert out.dtype == dtype and np.all(np.isfinite(out))
        # column j is scale * z^a: check against exponents rebuilt from the table
        exps = np.zeros((t.k, 4), dtype=int)
        for j in range(1, t.k):
            exps[j] = exps[t.parent[j]]
            exps[j, t.coord[j]] += 1
        want = s * np.prod(z[..., None, :].astype(np.float64) ** exps, axis=-1)
        assert rel_error(out, want) < (1e-6 if dtype == np.float32 else 1e-14)


def test_chebyshev_query_side_carries_the_signs():
    c = coefficients("chebyshev", 3, 4.0)  # c_0 < 0 at this low degree
    assert np.any(c < 0)
    sq, sk = feature_scales(c, 3, "query"), feature_scales(c, 3, "key")
    assert np.all(sk >= 0) and np.any(sq < 0) and np.allclose(np.abs(sq), sk)


@pytest.mark.parametrize("d, g", [(1, 3), (3, 2), (4, 4), (16, 2)])
def test_prefix_runs_and_degree_gathers_build_the_same_columns(d, g, monkeypatch):
    """The two construction orders of the reference (prefix runs from RUNS_MIN_ROWS rows on, degree-wise
    gathers below) give bit-identical monomials, scaled or plain, and the runs cover every column of
    degree >= 2 once, d runs per degree at most."""
    from gpulora.poly import features
    from gpulora.poly.monomials import prefix_runs

    table = monomial_table(d, g)
    runs = prefix_runs(d, g)
    assert len(runs) <= d * max(g - 1, 0)
    covered = np.concatenate([np.arange(dst, dst + stop - src) for _, src, stop, dst in runs] + [np.arange(0)])
    assert np.array_equal(np.sort(covered), np.arange(int(table.degree_start[2]), table.k))
    z = np.random.default_rng(d + g).standard_normal((2, 40, d))
    s = feature_scales(coefficients("chebyshev", g, 1.0), d, "query")
    for scale in (s, None):
        monkeypatch.setattr(features, "RUNS_MIN_ROWS", 1)
        runs_result = monomial_features_reference(z, table, scale)
        monkeypatch.setattr(features, "RUNS_MIN_ROWS", 10**9)
        gathered = monomial_features_reference(z, table, scale)
        assert np.array_equal(runs_result, gathered)
    # the plain monomials are the products written out
    a = np.stack([np.bincount(_exponents(table, j), minlength=d) for j in range(table.k)])  # [k, d]
    assert np.allclose(gathered, np.prod(z[..., None, :] ** a, axis=-1), rtol=1e-13)


def _exponents(table, j):
    """Coordinates multiplied along the parent chain of column ``j``."""
    out = []
    while j > 0:
        out.append(int(table.coord[j]))
        j = int(table.parent[j])
    return np.asarray(out, dtype=np.int64)
