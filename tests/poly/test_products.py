"""The row-wise and feature-major Kronecker products against their definition."""

import numpy as np

from gpulora.poly.products import kron_cols, kron_rows


def test_kron_rows_and_cols_match_the_definition():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 3, 7, 4)), rng.standard_normal((2, 3, 7, 5))
    want = np.einsum("...ic,...ie->...ice", a, b).reshape(2, 3, 7, 20)  # column c q + e = a_c b_e
    np.testing.assert_array_equal(kron_rows(a, b), want)
    np.testing.assert_array_equal(kron_cols(a.swapaxes(-1, -2), b.swapaxes(-1, -2)), want.swapaxes(-1, -2))
