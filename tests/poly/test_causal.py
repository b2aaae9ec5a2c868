"""The causal chunked chain: algebra isolated from approximation, convergence, tol, failures, memory."""

import itertools
import tracemalloc

import numpy as np
import pytest

import gpulora
from gpulora.adapters import prepare
from gpulora.exact.reference import dense_loss_grads, dense_weights
from gpulora.poly import causal, chain
from gpulora.poly.coefficients import measure
from gpulora.testing import make_problem, masked_polynomial_weights, rel_error

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
    """docs/math.md sections 4 and 5: the chunked chain is section 2 with the causal F~, to float64 rounding."""
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
    assert peak <= causal.peak_bytes(1, L, choice.features(4), 4, 4, 8)  # the estimate the budget plans with
    return peak


def test_memory_stays_linear_in_L():
    """At L = 65536 (d_head 4, g 2, k = 15) the peak is far below one L x L float64 array (32 GiB) and
    grows no faster than L: the fixed part is one group's blocks (BLOCK_ELEMENTS)."""
    small, big = _peak_bytes(16384, 2), _peak_bytes(65536, 2)
    print(f"causal poly peak: L=16384 {small / 2**20:.1f} MiB, L=65536 {big / 2**20:.1f} MiB")
    assert big < 65536**2 * 8 / 200
    assert big < 4.5 * small


def _raw_inputs(seed, L, d_head=3, d_v=2, lead=(2, 2), bound=1.5):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal(lead + (L, d_head)) for _ in range(2))
    v, y, g = (rng.standard_normal(lead + (L, d_v)) for _ in range(3))
    beta = 0.6
    c = np.sqrt(bound / beta / (np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max()))
    km = rng.random(lead[:1] + (1, L)) < 0.7
    qm = rng.random(lead[:1] + (1, L)) < 0.8
    return q * c, k * c, v, y, g, beta, km, qm


@pytest.mark.parametrize("mode", ["y", "grad_output"])
@pytest.mark.parametrize("chunk, group", [(16, 1), (16, None), (5, 2), (None, None)])
def test_masked_causal_chain_equals_dense_formula(mode, chunk, group):
    """Key and query masks, targets or an upstream gradient (VJP): the dense causal F~ with masked keys
    and zero padded rows, to float64 rounding, for every subset of targets (L = 37: unequal last chunk)."""
    q, k, v, y, dO, beta, km, qm = _raw_inputs(31, 37)
    km[0, 0, :3] = False  # the first rows of batch 0 have no real key: zero output there
    choice = measure("chebyshev", 3, 1.5)
    f = masked_polynomial_weights(beta * q @ k.mT, choice.coef, key_mask=km, query_mask=qm, causal=True,
                                  softmax_one=chunk == 5)
    o = f @ v
    target = y * qm[..., None] if mode == "y" else o - dO * qm[..., None]
    want = dense_loss_grads(f, q, k, v, target, beta)
    for need in NEEDS:
        got = causal.chunked_loss_and_grads(q, k, v, y if mode == "y" else None, beta, choice, np.float64,
                                            need=need, chunk=chunk, group=group, key_mask=km, query_mask=qm,
                                            grad_output=None if mode == "y" else dO, softmax_one=chunk == 5)
        if mode == "y":
            assert rel_error(got[0], want[0]) < 1e-12
        else:
            assert got[0] is None
        for name, a, b in zip("qkv", got[1:], want[1:]):
            if name in need:
                assert np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(b) + 1e-14, (name, need)
            else:
                assert a is None
    got_o = causal.chunked_output(q, k, v, beta, choice, np.float64, chunk=chunk, group=group, key_mask=km,
                                  query_mask=qm, softmax_one=chunk == 5)
    assert rel_error(got_o, o) < 1e-12


def test_carried_states_let_token_shards_compose():
    """Shards of tokens: prefix key states from chain.key_pass of the earlier shards; the suffix either
    carried into the backward sweep (shards walked last to first) or added afterwards by the non-causal
    chain.key_grad_pass. Both give the single call's results, and the states handed on are the sums."""
    q, k, v, y, _, beta, km, qm = _raw_inputs(32, 50)
    choice = measure("taylor", 4, 1.5)
    want = causal.chunked_loss_and_grads(q, k, v, y, beta, choice, np.float64, key_mask=km, query_mask=qm)
    cuts = [(0, 13), (13, 31), (31, 50)]

    def piece(a, i, j):
        return a[..., i:j, :] if a.ndim == 4 else a[..., i:j]

    key_totals = [chain.key_pass(piece(k, i, j), piece(v, i, j), choice, key_mask=piece(km, i, j)) for i, j in cuts]
    prefixes = [None, key_totals[0], key_totals[0] + key_totals[1]]
    args = [tuple(piece(a, i, j) for a in (q, k, v, y)) for i, j in cuts]
    masks = [{"key_mask": piece(km, i, j), "query_mask": piece(qm, i, j)} for i, j in cuts]
    # walked last to first, the suffix carried
    suffix, results = None, [None] * 3
    for s in reversed(range(3)):
        *res, (keys, queries) = causal.chunked_loss_and_grads(*args[s], beta, choice, np.float64, chunk=8,
                                                              prefix=prefixes[s], suffix=suffix,
                                                              return_states=True, **masks[s])
        results[s], suffix = res, queries
        assert np.allclose((prefixes[s] + key_totals[s]).data if prefixes[s] else key_totals[s].data, keys.data,
                           rtol=1e-13, atol=1e-13)
    assert rel_error(sum(r[0] for r in results), want[0]) < 1e-13 and rel_error(suffix.loss, want[0]) < 1e-13
    for t in (1, 2, 3):
        assert rel_error(np.concatenate([r[t] for r in results], axis=-2), want[t]) < 1e-12
    # each shard alone, the suffix added by the non-causal pass 3
    own = [causal.chunked_loss_and_grads(*args[s], beta, choice, np.float64, prefix=prefixes[s],
                                         return_states=True, **masks[s]) for s in range(3)]
    for s in range(3):
        dk, dv = own[s][2], own[s][3]
        if s < 2:
            later = own[s + 1][4][1] if s == 1 else own[1][4][1] + own[2][4][1]
            extra = chain.key_grad_pass(args[s][1], args[s][2], later, beta, choice, key_mask=masks[s]["key_mask"])
            dk, dv = dk + extra["dk"], dv + extra["dv"]
        i, j = cuts[s]
        assert rel_error(dk, want[2][..., i:j, :]) < 1e-12 and rel_error(dv, want[3][..., i:j, :]) < 1e-12
