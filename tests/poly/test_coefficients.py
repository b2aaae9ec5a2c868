import math

import numpy as np
import pytest

from gpulora.poly.coefficients import (DEFAULT_TOL, FAMILIES, MAX_DEGREE, choose, coefficients, evaluate,
                                       feasible_bound, measure)

# docs/math.md section 3, measured in float64: smallest degree with max relative error <= tol on [-M, M]
MATH_DOC_DEGREES = {
    0.5: {"taylor": (2, 4, 7), "shifted_taylor": (2, 5, 9), "chebyshev": (1, 3, 6)},
    1: {"taylor": (3, 6, 9), "shifted_taylor": (4, 8, 12), "chebyshev": (2, 5, 7)},
    2: {"taylor": (7, 10, 14), "shifted_taylor": (7, 11, 17), "chebyshev": (5, 7, 10)},
    4: {"taylor": (14, 17, 21), "shifted_taylor": (12, 18, 25), "chebyshev": (9, 11, 15)},
}


@pytest.mark.parametrize("M", sorted(MATH_DOC_DEGREES))
@pytest.mark.parametrize("family", FAMILIES)
def test_smallest_degrees_match_the_math_doc_table(M, family):
    for tol, want in zip((1e-1, 1e-3, 1e-6), MATH_DOC_DEGREES[M][family]):
        choice, _ = choose(M, tol=tol, family=family)
        assert choice.degree == want


def test_families_are_what_they_say():
    g, M = 6, 1.5
    assert np.allclose(coefficients("taylor", g, M), [1 / math.factorial(m) for m in range(g + 1)])
    # shifted taylor: e^-M sum (t + M)^m / m!, all coefficients positive
    c = coefficients("shifted_taylor", g, M)
    t = np.linspace(-3, 3, 7)
    want = math.exp(-M) * sum((t + M) ** m / math.factorial(m) for m in range(g + 1))
    assert np.all(c > 0) and np.allclose(evaluate(c, t), want, rtol=1e-13)
    # chebyshev interpolates exp at the Chebyshev points of [-M, M]
    c = coefficients("chebyshev", g, M)
    nodes = M * np.cos((2 * np.arange(g + 1) + 1) * np.pi / (2 * g + 2))
    assert np.allclose(evaluate(c, nodes), np.exp(nodes), rtol=1e-12)


def test_shifted_taylor_error_is_monotone_poisson_tail():
    M = 3.0
    errs = [measure("shifted_taylor", g, M).approx_error for g in range(1, 30)]
    assert all(b <= a for a, b in zip(errs, errs[1:]))
    # relative error at t = -M is the Poisson(2M) tail beyond g
    g = 10
    tail = 1 - sum(math.exp(-2 * M) * (2 * M) ** i / math.factorial(i) for i in range(g + 1))
    assert measure("shifted_taylor", g, M).approx_error == pytest.approx(tail, rel=1e-6)


def test_taylor_odd_degree_goes_negative_and_is_refused():
    c = measure("taylor", 3, 4.0)
    assert not c.positive
    with pytest.raises(ValueError, match="not positive"):
        choose(4.0, degree=3, family="taylor")
    choice, _ = choose(4.0, degree=3)  # another family is positive at that degree
    assert choice.positive


def test_precision_choice_follows_the_rounding_estimate():
    # docs/math.md section 7: float32 holds tol 1e-3 to about M = 6 (our estimate is conservative), float64 to ~15
    c, dt = choose(1.0, tol=1e-3, dtype=np.float32)
    assert dt == np.float32
    c, dt = choose(6.0, tol=1e-3, dtype=np.float32)
    assert dt == np.float64 and c.total_error(np.float64) <= 1e-3
    with pytest.raises(ValueError, match="phase transition|rounding"):
        choose(30.0, tol=1e-3, dtype=np.float64)


def test_choice_meets_tol_on_a_fine_grid():
    for M in (0.1, 0.7, 2.5, 5.0):
        for tol in (1e-2, 1e-4, 1e-7):
            c, dt = choose(M, tol=tol)
            t = np.linspace(-M, M, 10001)
            err = np.max(np.abs(evaluate(c.coef, t) - np.exp(t)) / np.exp(t))
            assert err <= 1.01 * tol and c.total_error(dt) <= tol


def test_degenerate_bound_and_limits():
    c, _ = choose(0.0, tol=1e-3)
    assert c.degree >= 1 and c.positive
    assert DEFAULT_TOL == 1e-3 and MAX_DEGREE >= 30
    with pytest.raises(ValueError, match="family"):
        choose(1.0, family="pade")


@pytest.mark.parametrize("tol", [1e-300, 1e-17])
def test_tol_below_float64_rounding_is_named_as_such(tol):
    """A tol no evaluation can meet (feasible_bound < 0) is refused for what it is, at any bound, not with a
    negative limit on M."""
    assert feasible_bound(tol) < 0
    for bound in (0.0, 0.5):
        with pytest.raises(ValueError, match="below float64 rounding"):
            choose(bound, tol=tol)
