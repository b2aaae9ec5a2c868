"""The causal chunked chain: algebra isolated from approximation, convergence, tol, failures, memory."""

import itertools
import tracemalloc

import numpy as np
import pytest

import gpulora
from gpulora.adapters import prepare
from gpulora.exact.reference import dense_loss_grads, dense_weights
from gpulora.poly import causal
from gpulora.poly.coefficients import measure
from gpulora.testing import make_problem, rel_error

NEEDS = [set(c) for n in range(4) for c in itertools.combinations("qkv", n)]  # every subset, empty included

# (L, d_head, d_v, batch, heads, softmax_one, family, degree, chunk, group); chunk 16 divides none of
# L = 1, 7, 33, 97 but does 64; group 1 and 2 carry states across several Python-level steps.
ALGEBRA_CASES = [
    (1, 2, 3, None, 1, False, "taylor", 2, 16, None),
    (7, 3, 5, 2, 1, True, "shifted_taylor", 3, 16, None),
    (33, 4, 2, 2, 2, False, "chebyshev", 4, 16, 1),
    (33, 2, 6, None, 1, True, "taylor", 5, 16, 2),
    (97, 3, 3, 3, 1, False, "shifted_taylor", 3, 16, 2),
    (97, 2, 4, 2, 2, True, "chebyshev", 3, 16, None),
    (64, 4, 4, None, 2, False, "taylor", 2, 16, 1),
    (97, 3, 2, 2, 1, True, "taylor", 3, None, None),
]


@pytest.mark.parametrize("case", ALGEBRA_CASES,
                         ids=["L{}-dh{}-dv{}-b{}-H{}-sm1{}-{}-g{}-C{}-m{}".format(*c) for c in ALGEBRA_CASES])
def test_causal_chain_equals_dense_formula_with_masked_polynomial_weights(case):
    """SPEC sections 4-5: the chunked chain is section 2 with the causal F~, to float64 rounding."""
    L, d_head, d_v, batch, heads, softmax_one, family, degree, chunk, group = case
    p = make_problem(21, L=L, d_model=7, d_head=d_head, d_v=d_v, r=2, targets="qkv", batch=batch, heads=heads,
                     softmax_one=softmax_one, score_bound=1.5)
    pr = prepare(p.head, p.lora, p.x, p.y)
    choice = measure(family, degree, 1.5)  # the polynomial itself, no degree policy
    f = dense_weights(pr.beta * pr.q @ pr.k.mT, causal=True, softmax_one=softmax_one, coef=choice.coef)
    want = dense_loss_grads(f, pr.q, pr.k, pr.v, pr.y, pr.beta)
    for need in NEEDS:
        got = causal.chunked_loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta, choice, np.float64,
                                            softmax_one=softmax_one, need=need, chunk=chunk, group=group)
        assert rel_error(got[0], want[0]) < 1e-12, need
        for name, g, w in zip("qkv", got[1:], want[1:]):
            if name in need:
                assert g.shape == w.shape
                # relative to the gradient, floored at rounding of the O(1) inputs (L = 1 gives dQ = dK = 0)
                assert np.linalg.norm(g - w) <= 1e-12 * np.linalg.norm(w) + 1e-14, (name, need)
            else:
                assert g is None
    o = causal.chunked_output(pr.q, pr.k, pr.v, pr.beta, choice, np.float64, softmax_one=softmax_one,
                              chunk=chunk, group=group)
    assert rel_error(o, f @ pr.v) < 1e-12


def test_default_chunking_matches_forced_chunking():
    """The public functions (chunk rule, group rule) agree with a forced chunk and group to rounding."""
    p = make_problem(22, L=300, d_model=8, d_head=3, d_v=3, r=2, targets="qkv", batch=2, score_bound=1.0)
    pr = prepare(p.head, p.lora, p.x, p.y)
    choice = measure("shifted_taylor", 3, 1.0)
    a = causal.loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta, choice, np.float64)
    b = causal.chunked_loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta, choice, np.float64, chunk=7, group=3)
    for x, y in zip(a, b):
        assert rel_error(x, y) < 1e-12


def test_chunk_rule():
    assert causal.chunk_size(5, 15, 4, 4) == 5  # never longer than L
    assert causal.chunk_size(10**6, 15, 4, 4) == causal.MIN_CHUNK  # k d_v d_h / (k + d_v + d_h) ~ 10
    assert causal.chunk_size(10**6, 2145, 64, 64) == causal.MAX_CHUNK
    assert causal.chunk_size(10**6, 165, 8, 8) == 64  # 10560 / 181 ~ 58


def _errors(res, ref):
    return max(max(rel_error(res.grads[t].B, ref.grads[t].B), rel_error(res.grads[t].A, ref.grads[t].A))
               for t in ref.grads)


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
@pytest.mark.parametrize("softmax_one", [False, True])
def test_causal_poly_converges_to_exact_as_degree_rises(softmax_one):
    p = make_problem(23, L=150, d_model=16, d_head=4, d_v=4, r=4, targets="qkv", batch=2, heads=2,
                     score_bound=1.0, softmax_one=softmax_one)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=True)
    runs = [gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=g, family="shifted_taylor",
                              causal=True) for g in (2, 4, 6, 8)]
    assert all(r.method == "poly" for r in runs)
    errs = [_errors(r, ref) for r in runs]
    # shifted taylor's error is the Poisson tail Pr[Poisson(2) > g]: down by > 5x per two degrees here
    assert all(b < a / 5 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_causal_tol_is_honoured(tol):
    """Relative gradient error <= 10 tol (the documented factor of gpulora.poly.chain) with causal=True."""
    p = make_problem(24, L=200, d_model=16, d_head=4, d_v=3, r=4, targets="qkv", batch=2, score_bound=1.0)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=True)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=tol, causal=True)
    assert res.method == "poly"
    assert _errors(res, ref) <= 10 * tol
    assert rel_error(res.loss, ref.loss) <= 10 * tol
    o = gpulora.forward(p.head, p.lora, p.x, method="poly", tol=tol, causal=True)
    assert rel_error(o, gpulora.forward(p.head, p.lora, p.x, causal=True)) <= 10 * tol


def test_causal_differs_from_non_causal():
    """The mask is really applied: causal and non-causal poly gradients differ at order one."""
    p = make_problem(25, L=40, d_model=8, d_head=4, d_v=4, r=2, targets="qkv", score_bound=1.0)
    a = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=6, causal=True)
    b = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=6, causal=False)
    assert _errors(a, b) > 0.05


def test_normaliser_failure_is_reported_not_silent():
    """Scores beyond the bound the polynomial was fitted on make p(s) < 0: PolynomialFailure, not NaN."""
    L, d = 40, 2
    q = np.ones((1, 1, L, d))
    k = -np.ones((1, 1, L, d))  # every score is -2, far below -M = -0.5
    v = np.ones((1, 1, L, 3))
    choice = measure("taylor", 1, 0.5)  # p(t) = 1 + t, positive only for t > -1
    with pytest.raises(gpulora.PolynomialFailure, match="normaliser"):
        causal.loss_and_grads(q, k, v, v, 1.0, choice, np.float64)
    with pytest.raises(gpulora.PolynomialFailure, match="normaliser"):
        causal.output(q, k, v, 1.0, choice, np.float64)


def test_normaliser_bound_is_per_row():
    """Row i has i + 1 keys: a late row whose normaliser is below (i + 1) p_min / 2 fails even though it is
    above the single-key bound p_min / 2 that the first row needs."""
    L = 20
    q = np.zeros((1, 1, L, 1))
    k = np.zeros((1, 1, L, 1))
    # last row: 19 keys with p(-0.95) = 0.05 (past the bound), one with p(0) = 1: D = 1.95 < 20 * 0.5 / 2
    q[..., -1, 0], k[..., :-1, 0] = 1.0, -0.95
    v = np.ones((1, 1, L, 1))
    choice = measure("taylor", 1, 0.5)  # p(t) = 1 + t >= 0.5 on [-0.5, 0.5]
    assert choice.min_value == pytest.approx(0.5)
    with pytest.raises(gpulora.PolynomialFailure):
        causal.output(q, k, v, 1.0, choice, np.float64)
    k[..., :-1, 0] = -0.2  # D_last = 19 * 0.8 + 1 >= 20 * 0.5 / 2
    causal.output(q, k, v, 1.0, choice, np.float64)


def test_auto_no_longer_falls_back_for_causal():
    p = make_problem(26, L=4096, d_model=8, d_head=2, d_v=2, r=2, targets="qv", score_bound=0.5)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto", tol=1e-3, causal=True)
    assert res.method == "poly", res.note


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
def test_numpy_and_cupy_agree(xp):
    ref = make_problem(27, L=70, d_model=8, d_head=3, d_v=4, r=2, targets="qkv", batch=2, score_bound=1.0)
    p = make_problem(27, L=70, d_model=8, d_head=3, d_v=4, r=2, targets="qkv", batch=2, score_bound=1.0, xp=xp)
    a = gpulora.lora_grad(ref.head, ref.lora, ref.x, ref.y, method="poly", degree=4, causal=True)
    b = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=4, causal=True)
    assert type(b.loss) is type(p.x) and b.method == "poly"
    for t in "qkv":
        assert rel_error(b.grads[t].B, a.grads[t].B) < 1e-12
        assert rel_error(b.grads[t].A, a.grads[t].A) < 1e-12


def _peak_bytes(L, degree):
    rng = np.random.default_rng(28)
    q, k = (0.5 * rng.standard_normal((1, 1, L, 4)) for _ in range(2))
    v, y = (rng.standard_normal((1, 1, L, 4)) for _ in range(2))
    choice = measure("shifted_taylor", degree, 1.0)
    tracemalloc.start()
    try:
        out = causal.loss_and_grads(q, k, v, y, 0.5, choice, np.float64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(np.isfinite(a).all() for a in out)
    return peak


def test_memory_stays_linear_in_L():
    """At L = 65536 (d_head 4, g 2, k = 15) the peak is far below one L x L float64 array (32 GiB) and
    grows no faster than L: the fixed part is one group's blocks (BLOCK_ELEMENTS)."""
    small, big = _peak_bytes(16384, 2), _peak_bytes(65536, 2)
    print(f"causal poly peak: L=16384 {small / 2**20:.1f} MiB, L=65536 {big / 2**20:.1f} MiB")
    assert big < 65536**2 * 8 / 200
    assert big < 4.5 * small
