"""The exact path: the reference ladder's first rungs (finite differences, dense formula, independent autodiff)."""

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpulora
from gpulora.adapters import prepare
from gpulora.exact import attention
from gpulora.exact.reference import dense_loss_grads, dense_weights
from gpulora.testing import finite_difference_grads, make_problem, rel_error

# (L, targets, batch, causal, heads, softmax_one)
FD_CASES = [
    (1, "qv", None, False, 1, False),
    (7, "qv", None, False, 1, False),
    (7, "qkv", 2, False, 1, False),
    (7, "k", None, True, 1, False),
    (33, "qkv", None, True, 1, False),
    (33, "v", 2, False, 1, False),
    (7, "qkv", 2, True, 2, False),
    (7, "qk", None, False, 1, True),
]


@pytest.mark.parametrize("case", FD_CASES, ids=["L{}-{}-b{}-causal{}-H{}-sm1{}".format(*c) for c in FD_CASES])
def test_exact_grads_match_finite_differences(case):
    L, targets, batch, causal, heads, softmax_one = case
    p = make_problem(3, L=L, d_model=5, d_head=3, d_v=4, r=1, targets=targets, batch=batch, heads=heads,
                     softmax_one=softmax_one)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=causal)
    assert res.method == "exact" and res.degree is None and res.features is None
    fd = finite_difference_grads(lambda lo: float(gpulora.loss(p.head, lo, p.x, p.y, causal=causal)), p.lora)
    assert set(res.grads) == set(targets)
    for t, (gb, ga) in fd.items():
        # central differences with h = 1e-6 on O(10) losses: truncation + cancellation ~1e-9 absolute
        assert np.abs(res.grads[t].B - gb).max() <= 1e-6 * max(1.0, np.abs(gb).max()), t
        assert np.abs(res.grads[t].A - ga).max() <= 1e-6 * max(1.0, np.abs(ga).max()), t


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softmax_one", [False, True])
@pytest.mark.parametrize("blocks", [(1, 1), (13, 17), (64, 97), (97, 16)])
def test_blocked_equals_dense_reference(causal, softmax_one, blocks):
    p = make_problem(1, L=97, d_model=12, d_head=4, d_v=6, r=2, targets="qkv", batch=2, softmax_one=softmax_one)
    pr = prepare(p.head, p.lora, p.x, p.y)
    got = attention.loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta, causal=causal, softmax_one=softmax_one,
                                   block_q=blocks[0], block_k=blocks[1])
    f = dense_weights(pr.beta * pr.q @ pr.k.mT, causal=causal, softmax_one=softmax_one)
    want = dense_loss_grads(f, pr.q, pr.k, pr.v, pr.y, pr.beta)
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-13
    o = attention.attention_output(pr.q, pr.k, pr.v, pr.beta, causal=causal, softmax_one=softmax_one,
                                   block_q=blocks[0], block_k=blocks[1])
    assert rel_error(o, f @ pr.v) < 1e-13


@pytest.mark.parametrize("need", [(), ("q",), ("k",), ("v",), ("q", "v"), ("q", "k", "v")])
def test_only_needed_gradients_are_computed(need):
    p = make_problem(2, L=20, d_model=6, d_head=3, d_v=2, r=1)
    pr = prepare(p.head, p.lora, p.x, p.y)
    loss, dq, dk, dv = attention.loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta, need=need)
    assert [g is not None for g in (dq, dk, dv)] == [t in need for t in "qkv"]
    full = attention.loss_and_grads(pr.q, pr.k, pr.v, pr.y, pr.beta)
    assert float(loss) == pytest.approx(float(full[0]), rel=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_within_twice_the_plain_float32_error(causal):
    """err(gpulora float32 vs float64) <= 2 * err(dense float32 reference vs float64) + tiny."""
    p64 = make_problem(4, L=200, d_model=16, d_head=8, d_v=8, r=4, targets="qkv", batch=2)
    p32 = make_problem(4, L=200, d_model=16, d_head=8, d_v=8, r=4, targets="qkv", batch=2, dtype=np.float32)
    r64 = gpulora.lora_grad(p64.head, p64.lora, p64.x, p64.y, method="exact", causal=causal)
    r32 = gpulora.lora_grad(p32.head, p32.lora, p32.x, p32.y, method="exact", causal=causal)
    assert r32.loss.dtype == np.float32 and r32.grads["q"].B.dtype == np.float32
    pr32 = prepare(p32.head, p32.lora, p32.x, p32.y)
    pr64 = prepare(p64.head, p64.lora, p64.x, p64.y)
    f32 = dense_weights(pr32.beta * pr32.q @ pr32.k.mT, causal=causal)
    f64 = dense_weights(pr64.beta * pr64.q @ pr64.k.mT, causal=causal)
    base = dense_loss_grads(f32, pr32.q, pr32.k, pr32.v, pr32.y, pr32.beta)
    ref = dense_loss_grads(f64, pr64.q, pr64.k, pr64.v, pr64.y, pr64.beta)
    base_err = max(rel_error(b, r) for b, r in zip(base[1:], ref[1:]))
    for t in "qkv":
        for field in ("B", "A"):
            err = rel_error(getattr(r32.grads[t], field), getattr(r64.grads[t], field))
            assert err <= 2 * base_err + 1e-6, (t, field, err, base_err)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_with_one_key_has_exactly_zero_score_gradient(dtype):
    """A softmax over one key is the constant 1, so a row that sees one key (the first row under the causal
    mask; a sequence with one real token) adds exactly nothing to dQ and dK. ``r`` comes from the same
    products it is subtracted from (single key block), so the two cancel exactly in any precision;
    ``r = rowsum(G * O)`` left float32 residues of 1e-7 relative at d_head = 64."""
    rng = np.random.default_rng(0)
    L, d = 8, 64
    q, k, v, g = (rng.standard_normal((2, 1, L, d)).astype(dtype) for _ in range(4))
    causal = gpulora.attention_vjp(q, k, v, g, causal=True, method="exact")
    assert not np.any(causal.dq[..., 0, :])  # row 0 sees key 0 only
    mask = np.ones((2, L), bool)
    mask[1, 1:] = False  # the second sequence has one real token
    padded = gpulora.attention_vjp(q, k, v, g, key_mask=mask, method="exact")
    assert not np.any(padded.dq[1]) and not np.any(padded.dk[1])
    assert np.all(np.abs(padded.dq[0]) > 0)


@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 40),
    d_model=st.integers(1, 9),
    d_head=st.integers(1, 6),
    d_v=st.integers(1, 6),
    r=st.integers(1, 3),
    targets=st.sampled_from(["q", "k", "v", "qv", "qk", "kv", "qkv"]),
    batch=st.sampled_from([None, 1, 3]),
    heads=st.sampled_from([1, 2]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shapes_dtypes_and_loss_for_any_sizes(L, d_model, d_head, d_v, r, targets, batch, heads, causal, seed):
    p = make_problem(seed, L=L, d_model=d_model, d_head=d_head, d_v=d_v, r=r, targets=targets, batch=batch,
                     heads=heads)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=causal)
    assert res.loss.shape == () and res.loss.dtype == p.x.dtype
    for t, (b, a) in p.lora.adapters.items():
        assert res.grads[t].B.shape == b.shape and res.grads[t].A.shape == a.shape
        assert np.all(np.isfinite(res.grads[t].B)) and np.all(np.isfinite(res.grads[t].A))
    out = gpulora.forward(p.head, p.lora, p.x, causal=causal)
    assert out.shape == p.y.shape
    assert float(res.loss) == pytest.approx(0.5 * float(np.sum((out - p.y) ** 2)), rel=1e-12)


def test_numpy_and_cupy_agree(xp):
    """Same code on both backends: CuPy in, CuPy out, same dtype; float64 results agree to rounding."""
    ref = make_problem(5, L=65, d_model=8, d_head=4, d_v=3, r=2, targets="qkv", batch=2)
    p = make_problem(5, L=65, d_model=8, d_head=4, d_v=3, r=2, targets="qkv", batch=2, xp=xp)
    a = gpulora.lora_grad(ref.head, ref.lora, ref.x, ref.y, method="exact", causal=True)
    b = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=True)
    assert type(b.loss) is type(p.x) and b.loss.shape == () and b.loss.dtype == p.x.dtype
    for t in "qkv":
        assert type(b.grads[t].B) is type(p.x)
        assert rel_error(b.grads[t].B, a.grads[t].B) < 1e-12
        assert rel_error(b.grads[t].A, a.grads[t].A) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("targets", ["qv", "qkv"])
def test_matches_torch_autograd(causal, targets):
    """An independent automatic-differentiation implementation, written directly in PyTorch."""
    torch = pytest.importorskip("torch")
    p = make_problem(6, L=33, d_model=10, d_head=4, d_v=5, r=3, targets=targets, batch=2, heads=2)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=causal)
    t = {k: torch.tensor(v) for k, v in (("x", p.x), ("y", p.y))}
    params = {n: (torch.tensor(b, requires_grad=True), torch.tensor(a, requires_grad=True))
              for n, (b, a) in p.lora.adapters.items()}
    H = p.head.heads

    def proj(name, w0):
        w = torch.tensor(w0)
        if name in params:
            b, a = params[name]
            w = w + p.lora.scaling(name) * b @ a
        z = t["x"] @ w  # (batch, L, H d)
        return z.reshape(z.shape[0], z.shape[1], H, -1).transpose(1, 2)

    q, k, v = proj("q", p.head.w_q), proj("k", p.head.w_k), proj("v", p.head.w_v)
    s = p.head.beta * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(33, 33, dtype=torch.bool).triu(1), -math.inf)
    o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(t["y"].shape)
    loss = 0.5 * ((o - t["y"]) ** 2).sum()
    loss.backward()
    assert float(res.loss) == pytest.approx(float(loss.detach()), rel=1e-12)
    for n, (b, a) in params.items():
        assert rel_error(res.grads[n].B, b.grad.numpy()) < 1e-9
        assert rel_error(res.grads[n].A, a.grad.numpy()) < 1e-9


@pytest.mark.slow
def test_memory_is_linear_in_L():
    """L = 32768: one L x L float64 array would be 8 GiB; the blocked path stays far below."""
    L = 32768
    p = make_problem(7, L=L, d_model=8, d_head=2, d_v=2, r=1, targets="qkv")
    tracemalloc.start()
    try:
        res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_square = L * L * 8
    print(f"exact L={L}: tracemalloc peak {peak / 2**20:.1f} MiB vs one L x L float64 array {one_square / 2**30:.0f} GiB")
    assert peak < one_square / 32
    assert np.isfinite(float(res.loss))
