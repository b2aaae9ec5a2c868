import itertools
import math

import numpy as np
import pytest

from gpulora.poly.monomials import feature_dim, monomial_table


@pytest.mark.parametrize("d, g", [(1, 0), (1, 5), (2, 3), (3, 3), (4, 4), (8, 2), (5, 6)])
def test_table_enumerates_each_multi_index_once(d, g):
    t = monomial_table(d, g)
    assert t.k == math.comb(d + g, g) == feature_dim(d, g)
    exps = np.zeros((t.k, d), dtype=int)
    for j in range(1, t.k):
        assert t.parent[j] < j and t.degree[t.parent[j]] == t.degree[j] - 1
        exps[j] = exps[t.parent[j]]
        exps[j, t.coord[j]] += 1
    assert len({tuple(e) for e in exps}) == t.k  # all distinct
    assert all(e.sum() == deg for e, deg in zip(exps, t.degree))
    for e, mult in zip(exps, t.multinomial):
        assert mult == math.factorial(e.sum()) / math.prod(math.factorial(a) for a in e)
    for m in range(g + 1):
        lo, hi = t.degree_start[m], t.degree_start[m + 1]
        assert np.all(t.degree[lo:hi] == m) and hi - lo == math.comb(d + m - 1, m)


def test_multinomial_theorem():
    """sum over |a| = m of (m!/a!) q^a k^a == (q . k)^m."""
    rng = np.random.default_rng(0)
    d, g = 3, 5
    t = monomial_table(d, g)
    q, k = rng.standard_normal(d), rng.standard_normal(d)
    mono = {}
    for j in range(t.k):
        mono[j] = (1.0, 1.0) if j == 0 else (mono[t.parent[j]][0] * q[t.coord[j]], mono[t.parent[j]][1] * k[t.coord[j]])
    for m in range(g + 1):
        s = sum(t.multinomial[j] * mono[j][0] * mono[j][1] for j in range(t.k) if t.degree[j] == m)
        assert s == pytest.approx(float(q @ k) ** m, rel=1e-12, abs=1e-12)


def test_table_is_cached_and_read_only():
    assert monomial_table(4, 3) is monomial_table(4, 3)
    with pytest.raises(ValueError):
        monomial_table(4, 3).parent[0] = 5
    with pytest.raises(ValueError, match="d >= 1"):
        monomial_table(0, 2)


def test_against_itertools():
    d, g = 4, 3
    t = monomial_table(d, g)
    want = sum(1 for m in range(g + 1) for _ in itertools.combinations_with_replacement(range(d), m))
    assert t.k == want
