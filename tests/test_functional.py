"""gpulora.attention / attention_vjp: every option against the dense float64 reference and torch autograd."""

import numpy as np
import pytest

import gpulora
from gpulora.exact import attention as exact
from gpulora.exact.reference import dense_attention_vjp
from gpulora.poly.coefficients import choose
from gpulora.testing import rel_error

# (batch shape, H, H_kv, L, d_head, d_v, causal, mask, softmax_one)
CASES = [
    ((), 1, 1, 1, 2, 3, False, None, False),
    ((2,), 2, 2, 9, 4, 3, False, "lengths", False),
    ((2,), 4, 2, 33, 5, 2, True, "lengths", False),
    ((3,), 3, 1, 17, 4, 4, True, "left", False),
    ((2, 2), 4, 1, 12, 3, 5, False, "random", True),
    ((1,), 6, 3, 20, 8, 8, True, None, True),
]
IDS = ["b{}-H{}-Hkv{}-L{}-dh{}-dv{}-causal{}-{}-sm1{}".format(*c) for c in CASES]


def make_mask(rng, batch, L, kind):
    """Boolean key mask of shape batch + (L,): right padding of unequal lengths (one of them 0 when there is
    room), left padding, or random holes."""
    if kind is None:
        return None
    n = int(np.prod(batch))
    if kind == "lengths":
        lengths = np.array([L, 0, L // 2, 1][:n] if n > 1 else [L // 2 + 1])
        mask = np.arange(L)[None, :] < lengths[:, None]
    elif kind == "left":
        starts = np.arange(n) * (L // (n + 1))
        mask = np.arange(L)[None, :] >= starts[:, None]
    else:
        mask = rng.random((n, L)) < 0.7
    return mask.reshape(batch + (L,))


def make_inputs(seed, case, *, scale=1.0, dtype=np.float64):
    batch, H, H_kv, L, d_head, d_v, causal, kind, softmax_one = case
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal(batch + (H, L, d_head))
    k = scale * rng.standard_normal(batch + (H_kv, L, d_head))
    v = rng.standard_normal(batch + (H_kv, L, d_v))
    g = rng.standard_normal(batch + (H, L, d_v))
    mask = make_mask(rng, batch, L, kind)
    q, k, v, g = (a.astype(dtype) for a in (q, k, v, g))
    return q, k, v, g, dict(causal=causal, key_mask=mask, softmax_one=softmax_one)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_vjp_matches_dense_reference(case):
    """docs/math.md section 2 with G = dO: out, dq, dk, dv (GQA group sums, masks, causal, Softmax_1)."""
    q, k, v, g, opts = make_inputs(1, case)
    copies = [a.copy() for a in (q, k, v, g)]
    res = gpulora.attention_vjp(q, k, v, g, method="exact", **opts)
    want = dense_attention_vjp(q, k, v, g, **opts)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (res.out, res.dq, res.dk, res.dv), want):
        assert got.shape == ref.shape and got.dtype == np.float64, name
        assert np.linalg.norm(got - ref) <= 1e-13 * np.linalg.norm(ref) + 1e-15, name
    assert res.method == "exact" and res.degree is None and res.features is None
    out = gpulora.attention(q, k, v, **opts)
    assert np.linalg.norm(out - want[0]) <= 1e-13 * np.linalg.norm(want[0]) + 1e-15
    for a, c in zip((q, k, v, g), copies):
        np.testing.assert_array_equal(a, c)  # inputs untouched


@pytest.mark.parametrize("blocks", [(4, 5), (1, 3), (7, 64)])
def test_blocked_exact_with_masks(blocks):
    """Online softmax over key blocks, with query rows whose first key blocks are all masked (left padding)."""
    case = ((3,), 4, 2, 23, 4, 3, True, "left", False)
    q, k, v, g, opts = make_inputs(2, case)
    mask = opts["key_mask"]
    n_rep = 2
    qg = q.reshape(3, 2, n_rep, 23, 4)
    kg, vg, gg = k[:, :, None], v[:, :, None], g.reshape(3, 2, n_rep, 23, 3)
    valid = mask[:, None, None, :]
    bq, bk = blocks
    _, out, dq, dk, dv = exact.attention_vjp(qg, kg, vg, 0.5, grad_output=gg, causal=True, key_valid=valid,
                                             block_q=bq, block_k=bk)
    want = dense_attention_vjp(q, k, v, g, beta=0.5, causal=True, key_mask=mask)
    for got, ref in zip((out.reshape(g.shape), dq.reshape(q.shape), dk[:, :, 0], dv[:, :, 0]), want):
        assert np.linalg.norm(got - ref) <= 1e-13 * np.linalg.norm(ref)
    out2 = exact.attention_output(qg, kg, vg, 0.5, causal=True, key_valid=valid, block_q=bq, block_k=bk)
    assert np.linalg.norm(out2.reshape(g.shape) - want[0]) <= 1e-13 * np.linalg.norm(want[0])


def test_padding_rows_are_zero_whatever_grad_output_holds():
    case = ((2,), 2, 1, 10, 3, 2, False, "lengths", False)
    q, k, v, g, opts = make_inputs(3, case)
    mask = opts["key_mask"]
    res = gpulora.attention_vjp(q, k, v, g, method="exact", **opts)
    pad = ~mask[:, None, :]  # (batch, 1, L) against (batch, H, L)
    assert np.all(res.out[np.broadcast_to(pad, res.out.shape[:-1])] == 0)
    assert np.all(res.dq[np.broadcast_to(pad, res.dq.shape[:-1])] == 0)
    assert np.all(res.dk[np.broadcast_to(pad, res.dk.shape[:-1])] == 0)
    assert np.all(res.dv[np.broadcast_to(pad, res.dv.shape[:-1])] == 0)
    # changing q, k, v, dO on padding positions changes nothing on the real ones
    rows = np.broadcast_to(pad[..., None], q.shape)
    q2 = np.where(rows, 100.0, q)
    g2 = np.where(np.broadcast_to(pad[..., None], g.shape), 7.0, g)
    res2 = gpulora.attention_vjp(q2, k, v, g2, method="exact", **opts)
    for a, b in ((res.out, res2.out), (res.dk, res2.dk), (res.dv, res2.dv)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_vjp_by_finite_differences():
    """<dO, out(q + h e)> differences against dq, dk, dv, on a tiny GQA causal problem with padding."""
    case = ((2,), 2, 1, 5, 3, 2, True, "lengths", False)
    q, k, v, g, opts = make_inputs(4, case)
    res = gpulora.attention_vjp(q, k, v, g, method="exact", **opts)
    h = 1e-6
    for name, arr, grad in (("q", q, res.dq), ("k", k, res.dk), ("v", v, res.dv)):
        fd = np.zeros(arr.shape)
        for idx in np.ndindex(arr.shape):
            vals = []
            for sign in (1, -1):
                pert = arr.copy()
                pert[idx] += sign * h
                args = {"q": q, "k": k, "v": v, name: pert}
                vals.append(np.sum(g * gpulora.attention(args["q"], args["k"], args["v"], **opts)))
            fd[idx] = (vals[0] - vals[1]) / (2 * h)
        assert np.linalg.norm(grad - fd) <= 1e-8 * np.linalg.norm(fd), name


@pytest.mark.parametrize("case", CASES[1:4], ids=IDS[1:4])
def test_against_torch_autograd(case):
    """The same attention in float64 PyTorch (SDPA with an explicit boolean mask, enable_gqa), backward(dO)."""
    torch = pytest.importorskip("torch")
    q, k, v, g, opts = make_inputs(5, case)
    res = gpulora.attention_vjp(q, k, v, g, method="exact", **opts)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    L = q.shape[-2]
    allowed = torch.ones(L, L, dtype=torch.bool)
    if opts["causal"]:
        allowed = allowed.tril()
    keep = None
    if opts["key_mask"] is not None:
        m = torch.tensor(opts["key_mask"])
        allowed = allowed & m[..., None, None, :]
        allowed = allowed | ~m[..., None, :, None]  # keep padding rows finite; they are zeroed below
        keep = m[..., None, :, None].to(torch.float64)
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed, enable_gqa=True)
    if keep is not None:
        out = out * keep
    out.backward(torch.tensor(g))
    for got, t in ((res.out, out), (res.dq, tq.grad), (res.dk, tk.grad), (res.dv, tv.grad)):
        ref = t.detach().numpy()
        assert np.linalg.norm(got - ref) <= 1e-12 * np.linalg.norm(ref) + 1e-15


HALF = [np.float16, "bfloat16"]


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_precision_round_trip(dtype):
    """float16/bfloat16 in, computed in float32, results in the input dtype, within half-precision rounding."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    case = ((2,), 4, 2, 16, 8, 4, True, "lengths", False)
    q, k, v, g, opts = make_inputs(6, case, dtype=dtype)
    res = gpulora.attention_vjp(q, k, v, g, method="exact", **opts)
    out = gpulora.attention(q, k, v, **opts)
    # the reference sees the same rounded inputs, in float64
    want = dense_attention_vjp(*(a.astype(np.float64) for a in (q, k, v, g)), **opts)
    eps = float(np.finfo(dtype).eps)
    for got, ref in zip((res.out, res.dq, res.dk, res.dv, out), want + (want[0],)):
        assert got.dtype == np.dtype(dtype)
        # float32 arithmetic (1e-6) plus one rounding of each result to the half format (eps / 2)
        assert rel_error(got.astype(np.float64), ref) <= eps


def test_mixed_dtypes_follow_numpy_promotion():
    """float32 q with float64 k, v: computed and returned in float64 (nothing is silently downcast)."""
    case = ((2,), 2, 2, 8, 4, 3, False, None, False)
    q, k, v, g, opts = make_inputs(7, case)
    q32 = q.astype(np.float32)
    res = gpulora.attention_vjp(q32, k, v, g, method="exact", **opts)
    want = dense_attention_vjp(q32.astype(np.float64), k, v, g, **opts)
    for got, ref in zip((res.out, res.dq, res.dk, res.dv), want):
        assert got.dtype == np.float64
        assert rel_error(got, ref) < 1e-13
    res32 = gpulora.attention_vjp(q32, k.astype(np.float32), v.astype(np.float32), g.astype(np.float32),
                                  method="exact")
    assert res32.dq.dtype == np.float32 and res32.out.dtype == np.float32


# (case, family, degree): the poly chain under each option
POLY_CASES = [
    (((2,), 2, 2, 15, 3, 2, False, None, False), "taylor", 4),
    (((2,), 4, 2, 21, 3, 3, True, "lengths", False), "chebyshev", 4),
    (((3,), 3, 1, 12, 2, 4, False, "left", True), "shifted_taylor", 5),
    (((1,), 2, 1, 40, 4, 2, True, None, True), "taylor", 6),
    (((2, 2), 4, 1, 70, 3, 2, True, "random", False), "shifted_taylor", 3),
    (((4,), 2, 2, 19, 2, 3, False, "lengths", True), "chebyshev", 6),
]


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
@pytest.mark.parametrize("case, family, degree", POLY_CASES,
                         ids=[f"{i}-{f}-g{g}" for i, (_, f, g) in enumerate(POLY_CASES)])
def test_poly_vjp_equals_dense_formula_with_polynomial_weights(case, family, degree):
    """docs/math.md section 4: the chain with G given equals section 2 with F~ = rownormalise(p(S))."""
    q, k, v, g, opts = make_inputs(8, case, scale=0.4)
    res = gpulora.attention_vjp(q, k, v, g, method="poly", degree=degree, family=family, **opts)
    assert res.method == "poly" and res.degree == degree and res.family == family
    choice, _ = choose(res.bound, degree=degree, family=family)
    want = dense_attention_vjp(q, k, v, g, coef=choice.coef, **opts)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (res.out, res.dq, res.dk, res.dv), want):
        assert np.linalg.norm(got - ref) <= 1e-12 * np.linalg.norm(ref), name


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]], ids=[IDS[1], IDS[2], IDS[5]])
@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_poly_vjp_holds_tol_on_bounded_problems(case, tol):
    """Bounded scores (M about 1): poly out, dq, dk, dv within 10 tol of exact."""
    q, k, v, g, opts = make_inputs(9, case, scale=0.35)
    ref = gpulora.attention_vjp(q, k, v, g, method="exact", **opts)
    res = gpulora.attention_vjp(q, k, v, g, method="poly", tol=tol, **opts)
    assert res.method == "poly" and 0 < res.bound < 3 and 0 < res.error_bound <= tol
    assert res.error_estimate == res.error_bound
    for name in ("out", "dq", "dk", "dv"):
        # measured 0.02 .. 0.3 eps with an exact upstream gradient (no residual to amplify the error)
        assert rel_error(getattr(res, name), getattr(ref, name)) <= res.error_bound, name
    out = gpulora.attention(q, k, v, method="poly", tol=tol, **opts)
    assert rel_error(out, ref.out) <= 10 * tol


def test_auto_reports_what_ran():
    case = ((2,), 2, 1, 64, 4, 4, False, None, False)
    q, k, v, g, opts = make_inputs(10, case, scale=0.3)
    res = gpulora.attention_vjp(q, k, v, g, **opts)
    assert res.method in ("exact", "poly") and res.note.startswith("auto:")


def _bad_calls():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 6, 3))
    k = rng.standard_normal((2, 2, 6, 3))
    v = rng.standard_normal((2, 2, 6, 5))
    g = rng.standard_normal((2, 4, 6, 5))
    ok = np.ones((2, 6), bool)
    return [
        ("key_mask", dict(key_mask=ok[:, :5]), ValueError),
        ("key_mask", dict(key_mask=ok[None]), ValueError),
        ("key_mask", dict(key_mask=ok.astype(np.float64)), TypeError),
        ("key_mask", dict(key_mask=[[True] * 6] * 2), TypeError),
        ("multiple of the number of key/value heads", dict(k=k[:, [0, 1, 0]], v=v[:, [0, 1, 0]]), ValueError),
        ("q", dict(q=q.astype(np.int64)), TypeError),
        ("q", dict(q=q.astype(np.complex128)), TypeError),
        ("k", dict(k=k[..., :2]), ValueError),
        ("v", dict(v=v[:, :1]), ValueError),
        ("k", dict(k=k[:, :, :5]), ValueError),
        ("grad_output", dict(grad_output=g[..., :4]), ValueError),
        ("grad_output", dict(grad_output=None), TypeError),
        ("q", dict(q=np.where(q > 1, np.nan, q)), ValueError),
        ("q", dict(q=q[0, 0]), ValueError),
        ("beta", dict(beta=-1.0), ValueError),
        ("causal", dict(causal=1), TypeError),
        ("softmax_one", dict(softmax_one="yes"), TypeError),
        ("method", dict(method="fast"), ValueError),
        ("tol", dict(tol=2.0), ValueError),
        ("degree", dict(method="exact", degree=3), ValueError),
    ], dict(q=q, k=k, v=v, grad_output=g)


@pytest.mark.parametrize("i", range(len(_bad_calls()[0])))
def test_bad_input_is_named(i):
    cases, base = _bad_calls()
    word, change, err = cases[i]
    kw = {**base, **change}
    with pytest.raises(err, match=word):
        gpulora.attention_vjp(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("grad_output"), **kw)


def test_same_answer_on_each_backend(xp):
    """NumPy in, NumPy out; CuPy in, CuPy out, equal to the NumPy result (exact and poly, masks, GQA)."""
    case = ((2,), 4, 2, 33, 4, 3, True, "lengths", False)
    q, k, v, g, opts = make_inputs(11, case, scale=0.4)
    dev = {**opts, "key_mask": xp.asarray(opts["key_mask"])}
    for method in ("exact", "poly"):
        ref = gpulora.attention_vjp(q, k, v, g, method=method, **opts)
        res = gpulora.attention_vjp(*(xp.asarray(a) for a in (q, k, v, g)), method=method, **dev)
        for name in ("out", "dq", "dk", "dv"):
            got = getattr(res, name)
            assert isinstance(got, type(xp.asarray(q))) and got.dtype == xp.float64
            assert rel_error(got, getattr(ref, name)) < 1e-12, (method, name)


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
@pytest.mark.parametrize("method", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_padding_rows_change_nothing(causal, method):
    """Padding positions may hold anything finite: no score or feature of theirs may overflow into a result."""
    case = ((2,), 2, 1, 24, 3, 2, causal, "lengths", False)
    q, k, v, g, opts = make_inputs(12, case, scale=0.4)
    pad = ~opts["key_mask"][:, None, :, None]
    kw = dict(degree=6, family="shifted_taylor") if method == "poly" else {}
    ref = gpulora.attention_vjp(q, k, v, g, method=method, **kw, **opts)
    res = gpulora.attention_vjp(np.where(pad, 1e300, q), np.where(pad, -1e300, k), np.where(pad, 1e308, v), g,
                                method=method, **kw, **opts)
    assert res.bound == ref.bound
    for name in ("out", "dq", "dk", "dv"):
        np.testing.assert_array_equal(getattr(res, name), getattr(ref, name))


def test_half_precision_overflow_is_refused():
    """Results computed in float32 that do not fit float16 raise instead of coming back as inf."""
    case = ((1,), 1, 1, 4, 2, 2, False, None, False)
    q, k, v, g, opts = make_inputs(13, case, dtype=np.float16)
    v = np.full_like(v, 6e4)
    g = np.full_like(g, 6e4)
    with pytest.raises(ValueError, match="overflows float16"):
        gpulora.attention_vjp(q, k, v, g, method="exact")
