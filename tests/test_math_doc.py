"""docs/math.md checked numerically: each test names the section whose identity or number it checks.
Small float64 problems, dense references; the whole module takes a few seconds."""

import math
import pathlib
import re

import numpy as np
import pytest

from gpulora import cost
from gpulora.poly.coefficients import FAMILIES, choose, coefficients, evaluate, measure
from gpulora.poly.features import poly_features
from gpulora.poly.monomials import feature_dim

MATH = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "math.md").read_text()
rng = np.random.default_rng(7)


def _head(L=9, d=3, d_v=2):
    q, k, v, y = (rng.standard_normal((L, w)) for w in (d, d, d_v, d_v))
    return q, k, v, y, 0.7


def softmax_weights(s):
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _loss(q, k, v, y, beta):
    f = softmax_weights(beta * q @ k.T)
    return 0.5 * np.sum((f @ v - y) ** 2)


def test_section_2_gradient_formula_and_row_sum_identity():
    q, k, v, y, beta = _head()
    f = softmax_weights(beta * q @ k.T)
    o = f @ v
    g = o - y
    r = np.sum(g * o, axis=1)
    assert np.allclose(r, np.sum(f * (g @ v.T), axis=1), rtol=1e-13)  # r_i = g_i . o_i
    p = f * (g @ v.T - r[:, None])
    analytic = {"q": beta * p @ k, "k": beta * p.T @ q, "v": f.T @ g}
    h = 1e-6
    for name, arr in (("q", q), ("k", k), ("v", v)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            up, dn = arr.copy(), arr.copy()
            up[idx] += h
            dn[idx] -= h
            plus = {"q": q, "k": k, "v": v, name: up}
            minus = {"q": q, "k": k, "v": v, name: dn}
            num[idx] = (_loss(**plus, y=y, beta=beta) - _loss(**minus, y=y, beta=beta)) / (2 * h)
        assert np.allclose(analytic[name], num, rtol=1e-6, atol=1e-8), name


def test_section_2_lora_chain_rule():
    """dB = s dW A^T and dA = s B^T dW for W = W0 + s B A, against finite differences of a loss of W."""
    w0, b, a, c = (rng.standard_normal(sh) for sh in ((5, 3), (5, 2), (2, 3), (5, 3)))
    s, h = 1.5, 1e-6

    def loss(b, a):
        w = w0 + s * b @ a
        return np.sum(c * w) + 0.25 * np.sum(w ** 4)

    w = w0 + s * b @ a
    dw = c + w ** 3
    for name, arr, analytic in (("B", b, s * dw @ a.T), ("A", a, s * b.T @ dw)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            up, dn = arr.copy(), arr.copy()
            up[idx] += h
            dn[idx] -= h
            args_up, args_dn = ((up, a), (dn, a)) if name == "B" else ((b, up), (b, dn))
            num[idx] = (loss(*args_up) - loss(*args_dn)) / (2 * h)
        assert np.allclose(analytic, num, rtol=1e-6, atol=1e-6), name


def test_section_2_exact_flop_count():
    for d, d_v in ((4, 8), (16, 16)):
        assert cost.exact_flops(100, d, d_v) == 100 ** 2 * (6 * d + 6 * d_v + 12)
        assert cost.exact_flops(100, d, d_v, causal=True) == 0.5 * 100 ** 2 * (6 * d + 6 * d_v + 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_section_3_feature_maps_multiply_to_the_polynomial(family):
    q, k = 0.4 * rng.standard_normal((6, 3)), 0.4 * rng.standard_normal((5, 3))
    g, bound = 4, 1.0
    phi = poly_features(q, g, family=family, bound=bound, side="query")
    psi = poly_features(k, g, family=family, bound=bound)
    assert phi.shape[1] == feature_dim(3, g) == math.comb(3 + g, g)
    want = evaluate(coefficients(family, g, bound), q @ k.T)
    assert np.allclose(phi @ psi.T, want, rtol=1e-12, atol=1e-14)


def test_section_3_degree_table():
    """The table of smallest degrees, row by row, as choose() gives them now."""
    cell = r" (\d+) / (\d+) / (\d+) \|"
    rows = re.findall(r"^\| ([\d.]+) \|" + cell * 3 + "$", MATH, flags=re.M)
    assert len(rows) == 4
    for row in rows:
        m, degrees = float(row[0]), [int(x) for x in row[1:]]
        got = [choose(m, tol=tol, family=fam)[0].degree for fam in ("taylor", "shifted_taylor", "chebyshev")
               for tol in (1e-1, 1e-3, 1e-6)]
        assert got == degrees, (m, got)


def test_section_3_shifted_taylor_error_is_the_poisson_tail():
    for m, g in ((0.5, 4), (1.0, 6), (2.0, 9)):
        c = measure("shifted_taylor", g, m)
        u = 2 * m  # t = -M ... the error is largest at u = t + M = 2M
        tail = 1 - math.exp(-u) * sum(u ** j / math.factorial(j) for j in range(g + 1))
        assert math.isclose(c.approx_error, tail, rel_tol=1e-6), (m, g)


def test_section_3_softmax_error_bound():
    """|F~/F - 1| <= 2 eps / (1 - eps) when p = e^s (1 + delta), |delta| <= eps."""
    s = rng.uniform(-2, 2, (20, 30))
    for eps in (1e-1, 1e-3):
        delta = rng.uniform(-eps, eps, s.shape)
        f = np.exp(s) / np.exp(s).sum(1, keepdims=True)
        ft = np.exp(s) * (1 + delta)
        ft /= ft.sum(1, keepdims=True)
        assert np.max(np.abs(ft / f - 1)) <= 2 * eps / (1 - eps)


def test_section_4_poly_flop_count():
    L, d, d_v, k = 1000, 4, 8, 126
    sides = 2 * (4 * L * k * d_v * d + 2 * L * d_v * d + 4 * L * k * d)
    want = 5 * L * k + 4 * L * k * d_v + 4 * L * k * d_v + sides
    assert cost.poly_flops(L, d, d_v, k) == want


def test_section_4_chain_contraction_for_dq():
    """Row i of P K equals (u_i (x) g_i) . T_K - r_i u_i^T Psi^T K with F~ = U Psi^T."""
    L, kf, d, d_v = 7, 5, 3, 2
    u, psi = rng.random((L, kf)), rng.random((L, kf))
    kk, v, g = rng.standard_normal((L, d)), rng.standard_normal((L, d_v)), rng.standard_normal((L, d_v))
    f = u @ psi.T
    r = rng.standard_normal(L)
    dense = (f * (g @ v.T - r[:, None])) @ kk
    t_k = np.einsum("ja,jc,je->ace", psi, v, kk)
    chain = np.einsum("ia,ic,ace->ie", u, g, t_k) - r[:, None] * (u @ (psi.T @ kk))
    assert np.allclose(dense, chain, rtol=1e-12)


def test_section_7_taylor_cancellation_factor_and_half_precision():
    for m in (1.0, 2.0, 3.0):
        kappa = measure("taylor", 30, m).kappa
        assert 0.9 < kappa / math.exp(2 * m) < 1.1, m  # kappa ~ e^(2M)
    # half precision cannot meet tol 1e-3 even at M = 1: u kappa > 1e-3 for every usable polynomial there
    for fam in FAMILIES:
        c, _ = choose(1.0, tol=1e-3, family=fam)
        assert 2.0 ** -11 * c.kappa > 1e-3, fam
