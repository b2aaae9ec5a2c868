"""The chained low-rank gradient: algebra isolated from approximation, convergence, tol, failures, memory."""

import tracemalloc

import numpy as np
import pytest

import gpulora
from gpulora.adapters import prepare
from gpulora.exact.reference import dense_loss_grads, dense_weights
from gpulora.poly import causal, chain
from gpulora.poly.coefficients import measure, choose
from gpulora.testing import finite_difference_grads, make_problem, rel_error

# (L, d_head, d_v, targets, batch, heads, softmax_one, family, degree)
ALGEBRA_CASES = [
    (1, 2, 3, "qkv", None, 1, False, "taylor", 2),
    (7, 3, 5, "qv", 2, 1, False, "taylor", 3),
    (33, 4, 2, "qkv", 2, 2, False, "chebyshev", 4),
    (33, 2, 6, "k", None, 1, True, "shifted_taylor", 5),
    (97, 3, 3, "v", 3, 1, False, "chebyshev", 3),
    (64, 4, 4, "q", None, 2, True, "taylor", 2),
]


@pytest.mark.parametrize("case", ALGEBRA_CASES, ids=["L{}-dh{}-dv{}-{}-b{}-H{}-sm1{}-{}-g{}".format(*c) for c in ALGEBRA_CASES])
def test_chain_equals_dense_formula_with_polynomial_weights(case):
    """docs/math.md section 4: the chain is section 2 evaluated with F~ = rownormalise(p(S)), to float64 rounding."""
    L, d_head, d_v, targets, batch, heads, softmax_one, family, degree = case
    p = make_problem(11, L=L, d_model=7, d_head=d_head, d_v=d_v, r=2, targets=targets, batch=batch, heads=heads,
                     softmax_one=softmax_one, score_bound=1.5)
    pr = prepare(p.head, p.lora, p.x, p.y)
    choice = measure(family, degree, 1.5)  # any positive polynomial: accuracy is not under test here
    assert choice.positive
    got = chain.loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta, choice, np.float64, softmax_one=softmax_one,
                               need=targets)
    f = dense_weights(pr.beta * pr.q @ pr.k.mT, softmax_one=softmax_one, coef=choice.coef)
    want = dense_loss_grads(f, pr.q, pr.k, pr.v, pr.y, pr.beta)
    assert rel_error(got[0], want[0]) < 1e-12
    for name, g, w in zip("qkv", got[1:], want[1:]):
        if name in targets:
            # relative to the gradient, floored at rounding of the O(1) inputs (L = 1 gives dQ = dK = 0)
            assert np.linalg.norm(g - w) <= 1e-12 * np.linalg.norm(w) + 1e-14, name
        else:
            assert g is None
    o = chain.output(pr.q, pr.k, pr.v, pr.beta, choice, np.float64, softmax_one=softmax_one)
    assert rel_error(o, f @ pr.v) < 1e-12


def _errors(res, ref):
    return max(max(rel_error(res.grads[t].B, ref.grads[t].B), rel_error(res.grads[t].A, ref.grads[t].A))
               for t in ref.grads)


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
@pytest.mark.parametrize("family", ["taylor", "shifted_taylor", "chebyshev"])
def test_error_falls_as_degree_rises(family):
    p = make_problem(12, L=128, d_model=16, d_head=4, d_v=4, r=4, targets="qkv", batch=2, score_bound=1.0)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    errs = [_errors(gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=g, family=family), ref)
            for g in (2, 4, 6, 8)]
    assert all(b < a / 5 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4


def test_poly_converges_to_finite_differences_of_the_exact_loss():
    p = make_problem(13, L=9, d_model=5, d_head=3, d_v=4, r=1, targets="qkv", score_bound=1.0)
    fd = finite_difference_grads(lambda lo: float(gpulora.loss(p.head, lo, p.x, p.y)), p.lora)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=12, family="chebyshev")
    for t, (gb, ga) in fd.items():
        assert rel_error(res.grads[t].B, gb) < 1e-7 and rel_error(res.grads[t].A, ga) < 1e-7


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("bound", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tol_is_honoured(tol, bound, dtype):
    """Relative gradient error <= 10 tol (documented factor) on bounded problems; float32 adds its rounding."""
    p = make_problem(14, L=200, d_model=16, d_head=4, d_v=4, r=4, targets="qkv", batch=2, score_bound=bound,
                     dtype=dtype)
    p64 = make_problem(14, L=200, d_model=16, d_head=4, d_v=4, r=4, targets="qkv", batch=2, score_bound=bound)
    ref = gpulora.lora_grad(p64.head, p64.lora, p64.x, p64.y, method="exact")
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=tol)
    assert res.method == "poly" and res.grads["q"].B.dtype == dtype
    assert res.bound == pytest.approx(bound, rel=1e-5)
    floor = 0 if dtype == np.float64 else 2e-5  # float32 exact-path rounding on these sizes
    assert _errors(res, ref) <= 10 * tol + floor


def test_float32_input_gets_float64_features_when_rounding_demands():
    p = make_problem(15, L=64, d_model=8, d_head=2, d_v=2, r=2, targets="qv", score_bound=6.0, dtype=np.float32)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=1e-3)
    assert res.compute_dtype == "float64" and res.grads["q"].B.dtype == np.float32


@pytest.mark.parametrize("impl", [chain, causal], ids=["chain", "causal"])
@pytest.mark.parametrize("M, family", [(8.0, "chebyshev"), (10.0, "taylor"), (6.0, "shifted_taylor")])
def test_rounding_failure_is_reported_not_silent(M, family, impl):
    """A tol-1e-3 polynomial forced into float32 past its precision, all scores at -M (worst cancellation):
    the run-time check raises instead of returning garbage (the public path would have chosen float64)."""
    choice, compute = choose(M, tol=1e-3, family=family, dtype=np.float32)
    assert compute == np.float64  # what the a-priori estimate asks for
    L = 50
    q = np.zeros((1, 1, L, 2), np.float32)
    q[..., 0] = np.sqrt(M)
    v = np.ones((1, 1, L, 2), np.float32)
    with pytest.raises(gpulora.PolynomialFailure, match="rounding"):
        impl.loss_and_grads(q, -q, v, v, 1.0, choice, np.float32)
    # in the precision the estimate chose, the same input passes
    impl.loss_and_grads(q, -q, v, v, 1.0, choice, np.float64)


def test_normaliser_check_catches_non_positive_rows():
    choice = measure("taylor", 4, 1.0)
    den = np.array([[[[1.0], [0.0]]]])
    with pytest.raises(gpulora.PolynomialFailure, match="normaliser"):
        chain.check_normaliser(den, 1.0, choice)
    chain.check_normaliser(np.array([[[[1.0], [0.6]]]]), 1.0, choice)  # above half the bound: fine


def test_public_path_refuses_what_rounding_forbids():
    p = make_problem(16, L=50, d_model=8, d_head=2, d_v=2, r=2, targets="qv", score_bound=12.0)
    with pytest.raises(ValueError, match="only to a relative error"):
        gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=30, family="taylor")
    with pytest.raises(ValueError, match="phase transition"):
        gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=1e-6)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto", tol=1e-6)
    assert res.method == "exact" and "cannot meet" in res.note


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
def test_numpy_and_cupy_agree(xp):
    ref = make_problem(17, L=70, d_model=8, d_head=3, d_v=4, r=2, targets="qkv", batch=2, score_bound=1.0)
    p = make_problem(17, L=70, d_model=8, d_head=3, d_v=4, r=2, targets="qkv", batch=2, score_bound=1.0, xp=xp)
    a = gpulora.lora_grad(ref.head, ref.lora, ref.x, ref.y, method="poly", degree=4)
    b = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=4)
    assert type(b.loss) is type(p.x) and b.method == "poly"
    for t in "qkv":
        assert rel_error(b.grads[t].B, a.grads[t].B) < 1e-12


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
@pytest.mark.slow
def test_memory_stays_linear_at_L_65536():
    L = 65536
    p = make_problem(18, L=L, d_model=8, d_head=4, d_v=4, r=2, targets="qkv", score_bound=1.0)
    tracemalloc.start()
    try:
        res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"poly L={L} g=4 k={res.features}: tracemalloc peak {peak / 2**20:.1f} MiB")
    assert res.features == 70
    assert peak < 512 * 2**20 and peak < L * L * 8 / 64
