"""The dense reference of tensor attention against central finite differences (float64), the bottom rung."""

import numpy as np
import pytest

from gpulora.tensor.reference import dense_loss_grads, dense_scores, dense_weights


def _inputs(seed, L=4, d=3, d_v=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((L, d)) for _ in range(3)] + [rng.standard_normal((L, d_v)) for _ in range(2)]


def _fd(fn, arrays, n, h=1e-6):
    out = np.zeros_like(arrays[n])
    for idx in np.ndindex(arrays[n].shape):
        vals = []
        for sign in (1, -1):
            a = [x.copy() for x in arrays]
            a[n][idx] += sign * h
            vals.append(fn(a))
        out[idx] = (vals[0] - vals[1]) / (2 * h)
    return out


@pytest.mark.parametrize("mode", ["y", "grad_output"])
def test_dense_gradients_match_finite_differences(mode):
    arrays = _inputs(0)
    rng = np.random.default_rng(1)
    kw = {mode: rng.standard_normal((4, 2))}
    beta = 0.7

    def loss(a):
        return float(dense_loss_grads(dense_weights(dense_scores(*a[:3], beta)), *a, beta, **kw)[0])

    got = dense_loss_grads(dense_weights(dense_scores(*arrays[:3], beta)), *arrays, beta, **kw)
    for n, name in enumerate(("q", "k1", "k2", "v1", "v2")):
        fd = _fd(loss, arrays, n)
        err = np.linalg.norm(got[1 + n] - fd) / np.linalg.norm(fd)
        assert err < 1e-8, (name, err)  # central differences with h = 1e-6: truncation ~1e-10, rounding ~1e-10


def test_dense_output_is_the_definition():
    """O[i] = sum_{j1,j2} softmax(S)[i, j1, j2] V1[j1] * V2[j2], written as loops."""
    q, k1, k2, v1, v2 = _inputs(2, L=3)
    beta = 0.5
    o = dense_loss_grads(dense_weights(dense_scores(q, k1, k2, beta)), q, k1, k2, v1, v2, beta,
                         y=np.zeros((3, 2)))[-1]
    for i in range(3):
        s = {(a, b): beta * np.sum(q[i] * k1[a] * k2[b]) for a in range(3) for b in range(3)}
        z = sum(np.exp(v) for v in s.values())
        want = sum(np.exp(s[a, b]) / z * v1[a] * v2[b] for a, b in s)
        np.testing.assert_allclose(o[i], want, rtol=1e-14)


def test_polynomial_weights_are_row_normalised_polynomials():
    s = np.random.default_rng(3).uniform(-1, 1, (2, 3, 3))
    coef = [1.0, 1.0, 0.5]
    f = dense_weights(s, coef=coef)
    p = 1 + s + 0.5 * s**2
    np.testing.assert_allclose(f, p / p.sum(axis=(-2, -1), keepdims=True), rtol=1e-15)
