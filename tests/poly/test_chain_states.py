"""The three streamed passes of the chain: any block size, targets or upstream gradient, masks, shards, memory."""

import itertools
import tracemalloc

import numpy as np
import pytest

from gpulora.exact.reference import dense_loss_grads
from gpulora.poly import chain
from gpulora.poly.coefficients import measure
from gpulora.testing import masked_polynomial_weights, rel_error

NEEDS = [set(c) for n in range(4) for c in itertools.combinations("qkv", n)]  # every subset, empty included


def _inputs(seed, L, d_head=3, d_v=4, lead=(2, 2), bound=1.5, masks=False):
    """Raw ``q, k, v, y, dO`` with ``beta max|q| max|k| <= bound``, and masks with a few padded rows."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal(lead + (L, d_head)) for _ in range(2))
    v, y, g = (rng.standard_normal(lead + (L, d_v)) for _ in range(3))
    beta = 0.7
    scale = np.sqrt(bound / beta) / np.sqrt(np.max(np.sum(q * q, -1)) ** 0.5 * np.max(np.sum(k * k, -1)) ** 0.5)
    q, k = q * scale, k * scale
    km = qm = None
    if masks:
        km = rng.random(lead[:1] + (1, L)) < 0.7  # per batch, broadcast over heads
        km[..., 0] = True
        qm = rng.random(lead[:1] + (1, L)) < 0.8
    return q, k, v, y, g, beta, km, qm


def _reference(q, k, v, target, beta, coef, *, mode, key_mask=None, query_mask=None, causal=False,
               softmax_one=False):
    """Dense loss, gradients and output with the masked ``F~`` (targets ``y`` or upstream gradient ``dO``)."""
    f = masked_polynomial_weights(beta * q @ k.mT, coef, key_mask=key_mask, query_mask=query_mask,
                                  causal=causal, softmax_one=softmax_one)
    o = f @ v
    qm = 1.0 if query_mask is None else np.asarray(query_mask)[..., :, None]
    y = target * qm if mode == "y" else o - target * qm  # then dense_loss_grads has G = o - y = dO
    return dense_loss_grads(f, q, k, v, y, beta), o


def _assert_close(got, want, name):
    assert got.shape == want.shape, name
    assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want) + 1e-14, name


@pytest.mark.parametrize("min_rows, budget", [(1, 1), (16, 1), (16, 60_000), (16, chain.DEFAULT_BUDGET)],
                         ids=["rows1", "rows16", "mid", "default"])
@pytest.mark.parametrize("mode", ["y", "grad_output"])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
def test_passes_equal_dense_formula_for_any_block(min_rows, budget, mode, masks, monkeypatch):
    """docs/math.md section 4 with F~, to float64 rounding, whatever the blocks (L = 37 leaves an unequal
    last block at every forced size), for every subset of targets, with targets or an upstream gradient."""
    monkeypatch.setattr(chain, "MIN_BLOCK_ROWS", min_rows)
    q, k, v, y, g, beta, km, qm = _inputs(1, 37, masks=masks)
    choice = measure("chebyshev", 3, 1.5)
    target = y if mode == "y" else g
    (loss, *want), o = _reference(q, k, v, target, beta, choice.coef, mode=mode, key_mask=km, query_mask=qm,
                                  softmax_one=masks)
    for need in NEEDS:
        got = chain.loss_and_grads(q, k, v, y if mode == "y" else None, beta, choice, np.float64, need=need,
                                   grad_output=None if mode == "y" else g, key_mask=km, query_mask=qm,
                                   softmax_one=masks, budget=budget)
        if mode == "y":
            assert rel_error(got[0], loss) < 1e-12
        else:
            assert got[0] is None
        for name, a, b in zip("qkv", got[1:], want):
            if name in need:
                _assert_close(a, b, (name, need))
            else:
                assert a is None
    got_o = chain.output(q, k, v, beta, choice, np.float64, key_mask=km, query_mask=qm, softmax_one=masks,
                         budget=budget)
    _assert_close(got_o, o, "o")


def test_sharded_passes_equal_one_call():
    """Map the passes over unequal token shards, reduce the states with +: the single call's results."""
    q, k, v, y, _, beta, km, qm = _inputs(2, 50, masks=True)
    choice = measure("taylor", 4, 1.5)
    want = chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, key_mask=km, query_mask=qm)
    cuts = [(0, 7), (7, 30), (30, 50)]
    keys = [chain.key_pass(k[..., a:b, :], v[..., a:b, :], choice, key_mask=km[..., a:b]) for a, b in cuts]
    key_state = keys[0] + keys[1] + keys[2]
    assert np.array_equal(key_state.count, np.broadcast_to(km.sum(-1), (2, 2)))
    parts = [chain.query_pass(q[..., a:b, :], key_state, beta, choice, y=y[..., a:b, :], query_mask=qm[..., a:b])
             for a, b in cuts]
    query_state = (parts[0][1] + parts[1][1]) + parts[2][1]
    chain.check_normaliser_ratio(query_state.worst, choice)
    grads = [chain.key_grad_pass(k[..., a:b, :], v[..., a:b, :], query_state, beta, choice, key_mask=km[..., a:b])
             for a, b in cuts]
    assert rel_error(query_state.loss, want[0]) < 1e-13
    _assert_close(np.concatenate([p[0]["dq"] for p in parts], axis=-2), want[1], "dq")
    for i, t in ((2, "dk"), (3, "dv")):
        _assert_close(np.concatenate([gr[t] for gr in grads], axis=-2), want[i], t)



def test_state_views_are_the_documented_sums():
    """KeyState.z/s_v/s_k/t_k and QueryState.r_g/r_q/t_q against the sums written out with the features."""
    q, k, v, _, g, beta, _, _ = _inputs(7, 30)
    choice = measure("chebyshev", 3, 1.5)
    psi = chain._Features(np, 3, choice, "key", np.float64)(k)
    phi = chain._Features(np, 3, choice, "query", np.float64)(beta * q)
    keys = chain.key_pass(k, v, choice)
    views = {"z": psi.sum(-2), "s_v": psi.mT @ v, "s_k": psi.mT @ k,
             "t_k": np.einsum("...jf,...jc,...je->...fce", psi, v, k)}
    for name, want in views.items():
        assert rel_error(getattr(keys, name), want) < 1e-13, name
    rows, queries = chain.query_pass(q, keys, beta, choice, grad_output=g)
    u = phi / (phi @ views["z"][..., None])
    r = np.sum(g * rows["o"], axis=-1, keepdims=True)
    views = {"r_g": u.mT @ g, "r_q": u.mT @ (r * q), "t_q": np.einsum("...jf,...jc,...je->...fce", u, g, q)}
    for name, want in views.items():
        assert rel_error(getattr(queries, name), want) < 1e-13, name
    assert rel_error(queries.stacked(False), views["r_g"]) < 1e-13
    assert rel_error(keys.stacked(False), np.concatenate([keys.z[..., None], keys.s_v], axis=-1)) == 0


def test_masked_keys_are_the_same_as_absent_keys():
    """Independent of any dense reference: masking keys out equals deleting them."""
    q, k, v, y, _, beta, _, _ = _inputs(3, 40, lead=(1, 1))
    keep = np.arange(40) % 3 != 1
    choice = measure("shifted_taylor", 3, 1.5)
    a = chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, key_mask=keep)
    o = chain.output(q, k[..., keep, :], v[..., keep, :], beta, choice, np.float64)
    assert rel_error(chain.output(q, k, v, beta, choice, np.float64, key_mask=keep), o) < 1e-13
    # dQ with the keys deleted needs matching-length targets: y rows belong to queries, keys only shrink
    rows, state = chain.query_pass(q, chain.key_pass(k[..., keep, :], v[..., keep, :], choice), beta, choice, y=y)
    assert rel_error(a[1], rows["dq"]) < 1e-13 and rel_error(a[0], state.loss) < 1e-13
    assert np.all(a[2][..., ~keep, :] == 0) and np.all(a[3][..., ~keep, :] == 0)


@pytest.mark.parametrize("softmax_one", [False, True])
def test_leading_index_without_keys_attends_to_nothing(softmax_one):
    q, k, v, y, _, beta, _, _ = _inputs(4, 20, lead=(2, 1))
    km = np.ones((2, 1, 20), dtype=bool)
    km[1] = False
    choice = measure("taylor", 3, 1.5)
    loss, dq, dk, dv = chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, key_mask=km,
                                            softmax_one=softmax_one)
    o = chain.output(q, k, v, beta, choice, np.float64, key_mask=km, softmax_one=softmax_one)
    assert np.all(o[1] == 0) and np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert rel_error(loss, 0.5 * np.sum((o - y) ** 2)) < 1e-13


def test_bad_arguments_are_named():
    q, k, v, y, g, beta, _, _ = _inputs(5, 10)
    choice = measure("taylor", 2, 1.5)
    with pytest.raises(TypeError, match="key_mask"):
        chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, key_mask=np.ones((2, 2, 10)))
    with pytest.raises(ValueError, match="query_mask"):
        chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, query_mask=np.ones((3, 10), dtype=bool))
    with pytest.raises(ValueError, match="grad_output"):
        chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, grad_output=g)
    with pytest.raises(ValueError, match="grad_output"):
        chain.loss_and_grads(q, k, v, None, beta, choice, np.float64)
    keys = chain.key_pass(k, v, choice, need=("v",))
    with pytest.raises(ValueError, match="dQ"):
        chain.query_pass(q, keys, beta, choice, y=y, need=("q",))
    with pytest.raises(ValueError, match="layouts"):
        _ = keys + chain.key_pass(k, v, choice, need=("q",))


def test_block_rows_follow_the_budget():
    def per_row(k, w, itemsize):
        return itemsize * (4 * k + 4 * w)

    for L, lead, k, w, itemsize in [(65536, 1, 45, 81, 4), (65536, 1, 4845, 289, 8), (65536, 8, 495, 81, 8),
                                    (300, 1, 45, 81, 4)]:
        for budget in (1 << 20, chain.DEFAULT_BUDGET, 1 << 34):
            rows = chain.block_rows(L, lead, k, w, itemsize, budget)
            assert 1 <= rows <= L
            assert rows == min(L, chain.MIN_BLOCK_ROWS) or lead * rows * per_row(k, w, itemsize) <= budget
            # never fewer rows than the budget and the speed floor allow
            assert rows >= min(L, budget // (lead * per_row(k, w, itemsize)), chain.FAST_MIN_ROWS)
    # without the cache rule (CuPy) the blocks fill the budget
    assert chain.block_rows(65536, 1, 45, 81, 4, cache_bytes=None) == 65536
    rows = chain.block_rows(65536, 1, 4845, 289, 8, cache_bytes=None)
    assert rows * per_row(4845, 289, 8) <= chain.DEFAULT_BUDGET < (rows + 1) * per_row(4845, 289, 8)
    assert chain.block_rows(65536, 1, 4845, 289, 8, budget=1) == chain.MIN_BLOCK_ROWS
    assert chain.block_rows(5, 1, 4845, 289, 8, budget=1) == 5


def _peak(L, budget):
    q, k, v, y, _, beta, _, _ = _inputs(6, L, d_head=4, d_v=4, lead=(1, 1), bound=1.0)
    choice = measure("taylor", 4, 1.0)  # k = 70
    chain.loss_and_grads(q[..., :20, :], k[..., :20, :], v[..., :20, :], y[..., :20, :], beta, choice,
                         np.float64)  # caches (monomial table, coefficients) outside the measurement
    tracemalloc.start()
    try:
        chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, budget=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_peak_memory_follows_the_budget_not_L_k():
    """With a 256 KiB budget the peak is the O(L (d_head + d_v)) rows plus a few budgets, far below the
    L x k features (L = 16384, k = 70: 8.75 MiB each), and grows with L only through the rows."""
    budget = 1 << 18
    small, big = _peak(4096, budget), _peak(16384, budget)
    rows = 16384 * 4 * 8  # one (L, 4) float64 array
    assert big < 16384 * 70 * 8 / 2
    # the estimate the feature budget (gpulora.poly.budget) plans with is an upper bound
    assert small <= chain.peak_bytes(1, 4096, 70, 4, 4, 8, budget)
    assert big <= chain.peak_bytes(1, 16384, 70, 4, 4, 8, budget)
    assert big - small < 12 * (rows - 4096 * 4 * 8)


@pytest.mark.parametrize("d, g", [(1, 2), (3, 1), (3, 2), (4, 3), (8, 2)])
def test_raise_index_multiplies_by_one_coordinate(d, g):
    """``up[m, c]`` is the column of ``z^a(m) z_c`` in the table of degree ``g + 1``: exponents rebuilt from the
    parent chains, every pair checked; the table of degree ``g`` is a prefix of that of ``g + 1``."""
    from gpulora.poly.monomials import monomial_table, raise_index

    small, big = monomial_table(d, g), monomial_table(d, g + 1)
    assert np.array_equal(big.parent[:small.k], small.parent) and np.array_equal(big.coord[:small.k], small.coord)
    exps = np.zeros((big.k, d), dtype=int)
    for j in range(1, big.k):
        exps[j] = exps[big.parent[j]]
        exps[j, big.coord[j]] += 1
    assert len({tuple(e) for e in exps}) == big.k  # each monomial once
    up = raise_index(d, g)
    assert up.shape == (small.k, d)
    for m, c in itertools.product(range(small.k), range(d)):
        want = exps[m].copy()
        want[c] += 1
        assert np.array_equal(exps[up[m, c]], want), (m, c)


@pytest.mark.parametrize("need", [("q", "k", "v"), ("q", "v"), ("k",), ("k", "v")])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
def test_lifted_and_kronecker_states_agree(need, masks, monkeypatch):
    """The two ways of building the states (lifted monomials, or the Kronecker right-hand side the GPU takes)
    give the same states and gradients to float64 rounding, whichever :func:`chain.lift_states` would pick."""
    q, k, v, y, g, beta, km, qm = _inputs(5, 41, d_head=4, d_v=3, masks=masks)
    choice = measure("chebyshev", 3, 1.5)
    out = {}
    for lift in (True, False):
        monkeypatch.setattr(chain, "lift_states", lambda *a, lift=lift, **kw: lift)
        keys = chain.key_pass(k, v, choice, need=need, key_mask=km)
        rows, state = chain.query_pass(q, keys, beta, choice, y=y, query_mask=qm, need=need)
        out[lift] = (keys.data, state.data, chain.loss_and_grads(q, k, v, y, beta, choice, np.float64, need=need,
                                                                  key_mask=km, query_mask=qm))
    for a, b in zip(out[True][:2], out[False][:2]):
        _assert_close(a, b, "states")
    for a, b in zip(out[True][2], out[False][2]):
        if b is None:
            assert a is None
        else:
            _assert_close(a, b, "grads")
