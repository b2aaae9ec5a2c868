"""Real-layer options of lora_grad / forward / loss: upstream gradients, dx, biases, padding, RoPE, GQA, dtypes.

Every option is checked against the dense float64 reference (gpulora.exact.reference.dense_layer) and against
PyTorch autograd in float64; dx and the adapter gradients with biases by finite differences as well.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpulora
from gpulora.exact.reference import dense_layer, rope_cos_sin_reference
from gpulora.poly.coefficients import choose
from gpulora.testing import finite_difference_grads, rel_error


@dataclasses.dataclass
class Layer:
    head: gpulora.Head
    lora: gpulora.LoRA
    x: np.ndarray
    y: np.ndarray
    g: np.ndarray  # an upstream gradient dO
    opts: dict  # layer options of the call (key_mask / lengths, rope_*)
    key_mask: np.ndarray | None  # the mask those options mean
    cos: np.ndarray | None
    sin: np.ndarray | None


def make_layer(seed=0, *, batch=2, L=11, d_model=6, heads=2, kv_heads=None, d_head=4, d_v=3, r=2,
               targets="qkv", bias=False, mask=None, rope=None, scale=1.0, dtype=np.float64):
    """A random layer and call. ``mask``: None, "key_mask" or "lengths" (unequal lengths, one of them L);
    ``rope``: None, "theta" (with position_ids) or "tables" (explicit cos/sin)."""
    rng = np.random.default_rng(seed)
    kv = heads if kv_heads is None else kv_heads

    def gauss(*shape):
        return rng.standard_normal(shape) / np.sqrt(shape[0])

    w = {"q": scale * gauss(d_model, heads * d_head), "k": scale * gauss(d_model, kv * d_head),
         "v": gauss(d_model, kv * d_v)}
    b = {t: 0.5 * (scale if t != "v" else 1.0) * rng.standard_normal(w[t].shape[1]) if bias else None
         for t in "qkv"}
    cast = (lambda a: None if a is None else a.astype(dtype))
    head = gpulora.Head(cast(w["q"]), cast(w["k"]), cast(w["v"]), heads=heads, kv_heads=kv_heads,
                        b_q=cast(b["q"]), b_k=cast(b["k"]), b_v=cast(b["v"]))
    adapters = {t: (cast(gauss(d_model, r)), cast((scale if t != "v" else 1.0) * gauss(r, w[t].shape[1])))
                for t in targets}
    lora = gpulora.LoRA(adapters, alpha=2.0 * r)
    x = cast(rng.standard_normal((batch, L, d_model)))
    y = cast(rng.standard_normal((batch, L, heads * d_v)))
    g = cast(rng.standard_normal((batch, L, heads * d_v)))
    opts, key_mask = {}, None
    if mask is not None:
        lengths = np.array([L, L // 2, 1, 0][:batch])
        key_mask = np.arange(L)[None, :] < lengths[:, None]
        opts = {"lengths": lengths} if mask == "lengths" else {"key_mask": key_mask}
    cos = sin = None
    if rope == "theta":
        pos = np.stack([np.arange(L) + 3 * i for i in range(batch)])
        opts.update(rope_theta=100.0, position_ids=pos)
        cos, sin = rope_cos_sin_reference(pos, d_head, 100.0)
    elif rope == "tables":
        cos, sin = rope_cos_sin_reference(np.arange(L)[None] * 0.7, d_head, 50.0)
        opts.update(rope_cos=cos[0], rope_sin=sin[0])
    return Layer(head, lora, x, y, g, opts, key_mask, cos, sin)


# (seed, batch, L, heads, kv_heads, targets, bias, mask, rope, causal, softmax_one)
CASES = [
    (0, 2, 11, 2, None, "qkv", True, None, None, False, False),
    (1, 2, 11, 4, 2, "qv", False, "lengths", None, True, False),
    (2, 3, 9, 3, 1, "qkv", True, "key_mask", "theta", True, False),
    (3, 2, 13, 2, 2, "k", True, "lengths", "tables", False, False),
    (4, 1, 7, 4, 1, "qkv", False, None, "theta", True, True),
    (5, 2, 8, 2, 1, "v", True, "key_mask", None, False, True),
]
IDS = ["s{}-b{}-L{}-H{}-kv{}-{}-bias{}-{}-rope{}-causal{}-sm1{}".format(*c) for c in CASES]


def _layer(case, **kw):
    seed, batch, L, heads, kv, targets, bias, mask, rope, causal, sm1 = case
    layer = make_layer(seed, batch=batch, L=L, heads=heads, kv_heads=kv, targets=targets, bias=bias, mask=mask,
                       rope=rope, **kw)
    if sm1:
        layer.head = dataclasses.replace(layer.head, softmax_one=True)
    return layer, causal


def _assert_close(got, want, rtol, name="", atol=1e-14):
    assert np.linalg.norm(np.asarray(got, np.float64) - want) <= rtol * np.linalg.norm(want) + atol, name


def _check_against_dense(case, upstream):
    """lora_grad (exact, with dx), loss and forward of ``case`` against the dense float64 reference."""
    layer, causal = _layer(case)
    up = {"y": layer.y} if upstream == "y" else {"grad_output": layer.g}
    res = gpulora.lora_grad(layer.head, layer.lora, layer.x, causal=causal, method="exact", return_dx=True,
                            **up, **layer.opts)
    loss, out, grads, dx = dense_layer(layer.head, layer.lora, layer.x, causal=causal, key_mask=layer.key_mask,
                                       cos=layer.cos, sin=layer.sin, **up)
    # a gradient that is 0 in exact arithmetic (one token: a softmax over one key is constant) is held to the
    # same 1e-12 relative to the call's largest gradient (dx included: it is never 0), not to its own 0 norm
    atol = 1e-12 * max(np.linalg.norm(a) for a in (dx, *(a for g in grads.values() for a in g)))
    for t, (db, da) in grads.items():
        _assert_close(res.grads[t].B, db, 1e-12, t + " B", atol)
        _assert_close(res.grads[t].A, da, 1e-12, t + " A", atol)
    assert res.dx.shape == layer.x.shape and res.dx.dtype == np.float64
    _assert_close(res.dx, dx, 1e-12, "dx")
    if upstream == "y":
        assert abs(float(res.loss) - loss) <= 1e-12 * loss
        _assert_close(gpulora.loss(layer.head, layer.lora, layer.x, layer.y, causal=causal, **layer.opts),
                      loss, 1e-12)
    else:
        assert res.loss is None
    o = gpulora.forward(layer.head, layer.lora, layer.x, causal=causal, **layer.opts)
    _assert_close(o, out, 1e-12, "out")


@pytest.mark.parametrize("upstream", ["y", "grad_output"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_matches_dense_reference(case, upstream):
    _check_against_dense(case, upstream)


@st.composite
def _cases(draw):
    """A random CASES entry: every layer option, in any combination."""
    heads = draw(st.integers(1, 4))
    kv = draw(st.sampled_from([None] + [n for n in range(1, heads + 1) if heads % n == 0]))
    return (draw(st.integers(0, 2**16)), draw(st.integers(1, 3)), draw(st.integers(1, 12)), heads, kv,
            draw(st.sampled_from(["q", "k", "v", "qv", "qk", "kv", "qkv"])), draw(st.booleans()),
            draw(st.sampled_from([None, "key_mask", "lengths"])), draw(st.sampled_from([None, "theta", "tables"])),
            draw(st.booleans()), draw(st.booleans()))


@settings(max_examples=40, deadline=None)
@given(case=_cases(), upstream=st.sampled_from(["y", "grad_output"]))
def test_random_layers_match_dense_reference(case, upstream):
    """Random combinations of the options above (a fuzzed differential check, kept): every gradient, dx, the
    loss and the output against the dense float64 reference."""
    _check_against_dense(case, upstream)


def _torch_layer(torch, layer, causal, upstream):
    """The same layer in float64 PyTorch: returns the loss tensor and the leaf tensors (x, adapters)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    head, lora = layer.head, layer.lora
    T = (lambda a: None if a is None else torch.tensor(np.asarray(a, dtype=np.float64)))
    x = T(layer.x).requires_grad_()
    leaves = {t: (T(b).requires_grad_(), T(a).requires_grad_()) for t, (b, a) in lora.adapters.items()}
    bsz, L, _ = layer.x.shape
    proj = {}
    for t, n in (("q", head.heads), ("k", head.kv_heads), ("v", head.kv_heads)):
        w = T(head.weight(t))
        if t in leaves:
            w = w + lora.scaling(t) * leaves[t][0] @ leaves[t][1]
        p = x @ w
        if head.bias(t) is not None:
            p = p + T(head.bias(t))
        proj[t] = p.view(bsz, L, n, -1).transpose(1, 2)
    q, k, v = proj["q"], proj["k"], proj["v"]
    if layer.cos is not None:
        cos, sin = T(layer.cos), T(layer.sin)
        rot = (lambda z: torch.cat([-z[..., z.shape[-1] // 2:], z[..., : z.shape[-1] // 2]], dim=-1))
        q = q * cos[:, None] + rot(q) * sin[:, None]
        k = k * cos[:, None] + rot(k) * sin[:, None]
    allowed = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    keep = torch.ones(bsz, L, dtype=torch.float64)
    if layer.key_mask is not None:
        m = torch.tensor(layer.key_mask)
        allowed = (allowed & m[:, None, None, :]) | ~m[:, None, :, None]
        keep = m.to(torch.float64)
    if head.softmax_one:  # a zero key with score 0 and value 0, never masked
        s = head.beta * q @ k.repeat_interleave(head.heads // head.kv_heads, 1).transpose(-1, -2)
        s = s.masked_fill(~allowed.expand(s.shape), -torch.inf)
        s = torch.cat([s, torch.zeros_like(s[..., :1])], dim=-1)
        f = torch.softmax(s, dim=-1)[..., :-1]
        o = f @ v.repeat_interleave(head.heads // head.kv_heads, 1)
    else:
        o = sdpa(q, k, v, attn_mask=allowed, scale=head.beta, enable_gqa=True)
    o = o.transpose(1, 2).reshape(bsz, L, -1) * keep[..., None]
    if upstream == "y":
        loss = 0.5 * (((o - T(layer.y)) * keep[..., None]) ** 2).sum()
    else:
        loss = (o * T(layer.g)).sum()
    loss.backward()
    return loss, x, leaves


@pytest.mark.parametrize("upstream", ["y", "grad_output"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_matches_torch_autograd(case, upstream):
    torch = pytest.importorskip("torch")
    layer, causal = _layer(case)
    up = {"y": layer.y} if upstream == "y" else {"grad_output": layer.g}
    res = gpulora.lora_grad(layer.head, layer.lora, layer.x, causal=causal, method="exact", return_dx=True,
                            **up, **layer.opts)
    loss, x, leaves = _torch_layer(torch, layer, causal, upstream)
    for t, (b, a) in leaves.items():
        _assert_close(res.grads[t].B, b.grad.numpy(), 1e-11, t + " B")
        _assert_close(res.grads[t].A, a.grad.numpy(), 1e-11, t + " A")
    _assert_close(res.dx, x.grad.numpy(), 1e-11, "dx")
    if upstream == "y":
        assert abs(float(res.loss) - loss.item()) <= 1e-12 * loss.item()


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=[IDS[2], IDS[3]])
def test_dx_and_adapter_grads_by_finite_differences(case):
    """Central differences of the loss in every entry of x and of every B, A (biases, padding, RoPE, GQA)."""
    layer, causal = _layer(case)
    layer = _shrink(layer, 5)
    res = gpulora.lora_grad(layer.head, layer.lora, layer.x, layer.y, causal=causal, method="exact",
                            return_dx=True, **layer.opts)

    def loss_of(x, lora=layer.lora):
        return float(gpulora.loss(layer.head, lora, x, layer.y, causal=causal, **layer.opts))

    h = 1e-6
    fd = np.zeros(layer.x.shape)
    for idx in np.ndindex(layer.x.shape):
        xp_, xm = layer.x.copy(), layer.x.copy()
        xp_[idx] += h
        xm[idx] -= h
        fd[idx] = (loss_of(xp_) - loss_of(xm)) / (2 * h)
    _assert_close(res.dx, fd, 1e-7, "dx")
    fdl = finite_difference_grads(lambda lora: loss_of(layer.x, lora), layer.lora)
    for t, (db, da) in fdl.items():
        _assert_close(res.grads[t].B, db, 1e-7, t + " B")
        _assert_close(res.grads[t].A, da, 1e-7, t + " A")


def _shrink(layer, L):
    """``layer`` cut to its first ``L`` tokens (mask, lengths, positions and tables with it)."""
    opts = dict(layer.opts)
    key_mask = None if layer.key_mask is None else layer.key_mask[:, :L]
    if "lengths" in opts:
        opts["lengths"] = np.minimum(opts["lengths"], L)
    if "key_mask" in opts:
        opts["key_mask"] = key_mask
    if "position_ids" in opts:
        opts["position_ids"] = opts["position_ids"][:, :L]
    for name in ("rope_cos", "rope_sin"):
        if name in opts:
            opts[name] = opts[name][:L]
    cut = (lambda a: None if a is None else a[:, :L])
    return dataclasses.replace(layer, x=layer.x[:, :L].copy(), y=layer.y[:, :L], g=layer.g[:, :L], opts=opts, key_mask=key_mask, cos=cut(layer.cos),
                               sin=cut(layer.sin))


def test_rope_matches_transformers():
    """gpulora's rotation is transformers' apply_rotary_pos_emb; its tables are LlamaRotaryEmbedding's
    (which transformers computes in float32, hence the tolerance on the tables)."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    from gpulora.rotary import apply_rotary, rotary_tables

    rng = np.random.default_rng(0)
    b, H, L, d = 2, 3, 17, 8
    q, k = rng.standard_normal((b, H, L, d)), rng.standard_normal((b, H, L, d))
    pos = np.stack([np.arange(L), np.arange(L) + 5])
    cos, sin = rotary_tables(np, L, d, np.float64, lead=(b,), position_ids=pos, rope_theta=500.0)
    tq, tk = llama.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(k), torch.tensor(cos[:, 0]),
                                        torch.tensor(sin[:, 0]))
    np.testing.assert_allclose(apply_rotary(q, cos, sin), tq.numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(apply_rotary(k, cos, sin), tk.numpy(), rtol=0, atol=1e-15)
    config = LlamaConfig(hidden_size=H * d, num_attention_heads=H, rope_theta=500.0)
    rotary = llama.LlamaRotaryEmbedding(config=config)
    hc, hs = rotary(torch.zeros(1, dtype=torch.float64), torch.tensor(pos))
    np.testing.assert_allclose(cos[:, 0], hc.numpy(), atol=2e-6)
    np.testing.assert_allclose(sin[:, 0], hs.numpy(), atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"], ids=["float16", "bfloat16"])
def test_half_precision_layer(dtype):
    """Half-precision inputs are computed in float32 and returned in their dtype, within half rounding."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    case = CASES[2]
    layer, causal = _layer(case, dtype=dtype)
    res = gpulora.lora_grad(layer.head, layer.lora, layer.x, grad_output=layer.g, causal=causal, method="exact",
                            return_dx=True, **layer.opts)
    _, _, grads, dx = dense_layer(layer.head, layer.lora, layer.x, grad_output=layer.g, causal=causal,
                                  key_mask=layer.key_mask, cos=layer.cos, sin=layer.sin)
    eps = float(np.finfo(dtype).eps)
    for t, (db, da) in grads.items():
        assert res.grads[t].B.dtype == np.dtype(dtype)
        assert rel_error(res.grads[t].B.astype(np.float64), db) <= 2 * eps
        assert rel_error(res.grads[t].A.astype(np.float64), da) <= 2 * eps
    assert res.dx.dtype == np.dtype(dtype) and rel_error(res.dx.astype(np.float64), dx) <= 2 * eps


def test_mixed_dtypes_promote():
    """float32 x with float64 weights: computed and returned in float64, equal to the all-float64 call."""
    layer, causal = _layer(CASES[1])
    x32 = layer.x.astype(np.float32)
    res = gpulora.lora_grad(layer.head, layer.lora, x32, layer.y, causal=causal, method="exact", return_dx=True,
                            **layer.opts)
    ref = gpulora.lora_grad(layer.head, layer.lora, x32.astype(np.float64), layer.y, causal=causal,
                            method="exact", return_dx=True, **layer.opts)
    assert res.loss.dtype == np.float64 and res.dx.dtype == np.float64
    for t in ref.grads:
        assert res.grads[t].B.dtype == np.float64
        assert rel_error(res.grads[t].B, ref.grads[t].B) < 1e-14
    o = gpulora.forward(layer.head, layer.lora, x32, causal=causal, **layer.opts)
    assert o.dtype == np.float64


POLY_CASES, POLY_IDS = CASES, IDS


@pytest.mark.filterwarnings("ignore::gpulora.AccuracyWarning")  # fixed degrees past tol, on purpose
@pytest.mark.parametrize("case", POLY_CASES, ids=POLY_IDS)
def test_poly_layer_equals_dense_formula_with_polynomial_weights(case):
    layer, causal = _layer(case, scale=0.5)
    res = gpulora.lora_grad(layer.head, layer.lora, layer.x, grad_output=layer.g, causal=causal, method="poly",
                            degree=4, family="shifted_taylor", return_dx=True, **layer.opts)
    choice, _ = choose(res.bound, degree=4, family="shifted_taylor")
    _, _, grads, dx = dense_layer(layer.head, layer.lora, layer.x, grad_output=layer.g, causal=causal,
                                  key_mask=layer.key_mask, cos=layer.cos, sin=layer.sin, coef=choice.coef)
    for t, (db, da) in grads.items():
        _assert_close(res.grads[t].B, db, 1e-12, t + " B")
        _assert_close(res.grads[t].A, da, 1e-12, t + " A")
    _assert_close(res.dx, dx, 1e-12, "dx")


@pytest.mark.parametrize("case", POLY_CASES[:4], ids=POLY_IDS[:4])
def test_poly_layer_holds_tol(case):
    """Bounded scores (M = 0.6 .. 2.4): every adapter gradient and dx within 10 tol of exact."""
    layer, causal = _layer(case, scale=0.2)
    tol = 1e-3
    kw = dict(causal=causal, return_dx=True, **layer.opts)
    ref = gpulora.lora_grad(layer.head, layer.lora, layer.x, layer.y, method="exact", **kw)
    res = gpulora.lora_grad(layer.head, layer.lora, layer.x, layer.y, method="poly", tol=tol, **kw)
    assert res.method == "poly"
    for t in ref.grads:
        assert rel_error(res.grads[t].B, ref.grads[t].B) <= 10 * tol
        assert rel_error(res.grads[t].A, ref.grads[t].A) <= 10 * tol
    assert rel_error(res.dx, ref.dx) <= 10 * tol
    assert rel_error(res.loss, ref.loss) <= 10 * tol


def _bad_layer_calls():
    layer = make_layer(0, batch=2, L=6, heads=2, d_head=4)
    h, lo, x, y = layer.head, layer.lora, layer.x, layer.y
    mask = np.ones((2, 6), bool)
    return [
        (dict(key_mask=mask[:, :5]), ValueError, "key_mask"),
        (dict(key_mask=mask.astype(np.int8)), TypeError, "key_mask"),
        (dict(lengths=np.array([7, 2])), ValueError, "lengths"),
        (dict(lengths=np.array([-1, 2])), ValueError, "lengths"),
        (dict(lengths=np.array([2.0, 2.0])), TypeError, "lengths"),
        (dict(lengths=np.array([2])), ValueError, "lengths"),
        (dict(lengths=np.array([2, 2]), key_mask=mask), ValueError, "key_mask or lengths"),
        (dict(position_ids=np.arange(6)), ValueError, "rope_theta"),
        (dict(rope_theta=-1.0), ValueError, "rope_theta"),
        (dict(rope_theta=1e4, position_ids=np.arange(5)), ValueError, "position_ids"),
        (dict(rope_theta=1e4, position_ids=np.arange(6.0)), TypeError, "position_ids"),
        (dict(rope_cos=np.ones((6, 4))), ValueError, "rope_sin"),
        (dict(rope_cos=np.ones((6, 3)), rope_sin=np.ones((6, 3))), ValueError, "rope_cos"),
        (dict(grad_output=y), ValueError, "not both"),
        (dict(y=None), TypeError, "y must be"),
        (dict(return_dx=1), TypeError, "return_dx"),
        (dict(y=y[..., :-1]), ValueError, "y must have shape"),
    ], (h, lo, x, y)


@pytest.mark.parametrize("i", range(len(_bad_layer_calls()[0])))
def test_bad_layer_input_is_named(i):
    cases, (h, lo, x, y) = _bad_layer_calls()
    change, exc, word = cases[i]
    kw = {"y": y, **change}
    with pytest.raises(exc, match=word):
        gpulora.lora_grad(h, lo, x, kw.pop("y"), **kw)


def test_bad_head_options_are_named():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 12))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        gpulora.Head(w, w[:, :8], w[:, :8], heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="kv_heads must be"):
        gpulora.Head(w, w, w, heads=2, kv_heads=0)
    with pytest.raises(ValueError, match="w_k must have shape"):
        gpulora.Head(w, w, w[:, :6], heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="b_q must have shape"):
        gpulora.Head(w, w, w, b_q=np.zeros(11))
    with pytest.raises(TypeError, match="b_k must have dtype"):
        gpulora.Head(w, w, w, b_k=np.zeros(12, dtype=np.int64))
    with pytest.raises(TypeError, match="w_q must have dtype"):
        gpulora.Head(w.astype(np.complex64), w, w)
    odd = gpulora.Head(w[:, :3], w[:, :3], w[:, :3])  # d_head = 3
    lo = gpulora.LoRA({"q": (rng.standard_normal((6, 1)), rng.standard_normal((1, 3)))}, alpha=1.0)
    x, y = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match="d_head must be even"):
        gpulora.lora_grad(odd, lo, x, y, rope_theta=1e4)


def test_same_answer_on_each_backend(xp):
    """NumPy in, NumPy out; CuPy in, CuPy out, equal to the NumPy result (every layer option at once)."""
    layer, causal = _layer(CASES[2], scale=0.2)
    ref = gpulora.lora_grad(layer.head, layer.lora, layer.x, grad_output=layer.g, causal=causal, return_dx=True,
                            method="exact", **layer.opts)
    dev = (lambda a: None if a is None else xp.asarray(a))
    head = dataclasses.replace(layer.head, **{n: dev(getattr(layer.head, n))
                                              for n in ("w_q", "w_k", "w_v", "b_q", "b_k", "b_v")})
    lora = gpulora.LoRA({t: (dev(b), dev(a)) for t, (b, a) in layer.lora.adapters.items()}, alpha=layer.lora.alpha)
    opts = {n: dev(a) if isinstance(a, np.ndarray) else a for n, a in layer.opts.items()}
    res = gpulora.lora_grad(head, lora, dev(layer.x), grad_output=dev(layer.g), causal=causal, return_dx=True,
                            method="exact", **opts)
    assert isinstance(res.dx, type(dev(layer.x)))
    assert rel_error(res.dx, ref.dx) < 1e-12
    for t in ref.grads:
        assert rel_error(res.grads[t].B, ref.grads[t].B) < 1e-12
        assert rel_error(res.grads[t].A, ref.grads[t].A) < 1e-12


def test_position_ids_broadcast_over_the_batch():
    """position_ids of shape (1, L) (Hugging Face's default) mean the same positions for every sequence."""
    layer, causal = _layer(CASES[4])
    L = layer.x.shape[1]
    batch2 = dataclasses.replace(layer, x=np.concatenate([layer.x, layer.x[::-1]]),
                                 g=np.concatenate([layer.g, layer.g[::-1]]))
    kw = dict(grad_output=batch2.g, causal=causal, return_dx=True, method="exact", rope_theta=100.0)
    a = gpulora.lora_grad(batch2.head, batch2.lora, batch2.x, position_ids=np.arange(L)[None], **kw)
    b = gpulora.lora_grad(batch2.head, batch2.lora, batch2.x, position_ids=np.tile(np.arange(L), (2, 1)), **kw)
    c = gpulora.lora_grad(batch2.head, batch2.lora, batch2.x, **kw)
    np.testing.assert_allclose(a.dx, b.dx, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(a.dx, c.dx, rtol=1e-14, atol=1e-15)


def test_unbatched_x_takes_the_leading_one_rotary_shapes():
    """For x of shape (L, d_model), position_ids (1, L) and cos/sin tables (1, L, d_head) (what Hugging Face
    hands over) mean what (L,) and (L, d_head) mean; a wrong shape is named once per accepted form."""
    layer, causal = _layer(CASES[4])
    x, g = layer.x[0], layer.g[0]
    L, d = x.shape[0], layer.head.d_head
    kw = dict(grad_output=g, causal=causal, return_dx=True, method="exact")
    ref = gpulora.lora_grad(layer.head, layer.lora, x, rope_theta=100.0, position_ids=np.arange(L), **kw)
    ids = gpulora.lora_grad(layer.head, layer.lora, x, rope_theta=100.0, position_ids=np.arange(L)[None], **kw)
    cos, sin = rope_cos_sin_reference(np.arange(L)[None], d, 100.0)  # (1, L, d_head)
    tables = gpulora.lora_grad(layer.head, layer.lora, x, rope_cos=cos, rope_sin=sin, **kw)
    for res in (ids, tables):
        np.testing.assert_allclose(res.dx, ref.dx, rtol=1e-13, atol=1e-15)
        for t in ref.grads:
            np.testing.assert_allclose(res.grads[t].A, ref.grads[t].A, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match=rf"position_ids must have shape \({L},\) or \(1, {L}\), got \(2, {L}\)"):
        gpulora.lora_grad(layer.head, layer.lora, x, rope_theta=100.0, position_ids=np.zeros((2, L), int), **kw)


def test_half_precision_layer_overflow_is_refused():
    layer, causal = _layer(CASES[0], dtype=np.float16)
    big = np.full_like(layer.y, 6e4)
    with pytest.raises(ValueError, match="overflows float16"):
        gpulora.lora_grad(layer.head, layer.lora, layer.x, big, method="exact")
