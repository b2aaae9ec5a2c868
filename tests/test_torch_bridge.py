"""gpulora.torch: gradients equal torch autograd on the same problem written directly in torch; DLPack is
zero-copy; the autograd Functions (the LoRA loss, and attention with any upstream gradient), the PEFT
mapping and the examples work."""

import os
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="gpulora.torch needs PyTorch")
gt = pytest.importorskip("gpulora.torch")

import gpulora  # noqa: E402
from gpulora.testing import rel_error  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _torch_loss(w_q, w_k, w_v, adapters, x, y, *, alpha, heads, beta, causal, softmax_one=False):
    """The LoRA attention loss written out in torch (explicit max-subtracted softmax / Softmax_1)."""
    w = {"q": w_q, "k": w_k, "v": w_v}
    for t, (b, a) in adapters.items():
        w[t] = w[t] + (alpha / b.shape[1]) * b @ a

    def split(z):  # (..., L, H d) -> (..., H, L, d)
        return z.reshape(z.shape[:-1] + (heads, z.shape[-1] // heads)).transpose(-2, -3)

    q, k, v = (split(x @ w[t]) for t in "qkv")
    s = beta * q @ k.transpose(-1, -2)
    L = s.shape[-1]
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    if softmax_one:
        m = m.clamp(min=0)
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True) + (torch.exp(-m) if softmax_one else 0)
    o = (e / den) @ v
    o = o.transpose(-2, -3).reshape(y.shape)
    return 0.5 * ((o - y) ** 2).sum()


def _problem(seed, *, L, d_model, d_head, d_v, r, targets, heads, batch=None, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    lead = () if batch is None else (batch,)
    x = rand(*lead, L, d_model)
    x = x / x.norm(dim=-1, keepdim=True)
    w = {t: rand(d_model, heads * (d_v if t == "v" else d_head), s=scale / d_model**0.5) for t in "qkv"}
    adapters = {t: (rand(d_model, r, s=d_model**-0.5), rand(r, w[t].shape[1], s=r**-0.5)) for t in targets}
    y = rand(*lead, L, heads * d_v)
    return w, adapters, x, y


# (L, d_model, d_head, d_v, r, targets, heads, batch, causal)
CASES = [(L, 8, 4, 3, 2, targets, heads, batch, causal)
         for causal in (False, True) for targets in ("qv", "qkv") for heads, batch in ((1, None), (2, 2))
         for L in (13,)]
IDS = ["L{}-dm{}-dh{}-dv{}-r{}-{}-H{}-b{}-causal{}".format(*c) for c in CASES]


def _autograd(w, adapters, x, y, **kw):
    leaves = {t: (b.clone().requires_grad_(), a.clone().requires_grad_()) for t, (b, a) in adapters.items()}
    loss = _torch_loss(w["q"], w["k"], w["v"], leaves, x, y, **kw)
    loss.backward()
    return loss.detach(), {t: (b.grad, a.grad) for t, (b, a) in leaves.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_gradients_equal_torch_autograd(case):
    """float64: two orderings of the same sums, so ~1e-14 relative; 1e-10 leaves room for conditioning."""
    L, d_model, d_head, d_v, r, targets, heads, batch, causal = case
    w, adapters, x, y = _problem(51, L=L, d_model=d_model, d_head=d_head, d_v=d_v, r=r, targets=targets,
                                 heads=heads, batch=batch, scale=3.0)
    beta, alpha = 0.6, 3.0
    ref_loss, ref = _autograd(w, adapters, x, y, alpha=alpha, heads=heads, beta=beta, causal=causal)
    res = gt.lora_grad(w["q"], w["k"], w["v"], adapters, x, y, alpha=alpha, heads=heads, beta=beta,
                       method="exact", causal=causal)
    assert isinstance(res.loss, torch.Tensor) and res.loss.dtype == torch.float64
    assert rel_error(res.loss.numpy(), ref_loss.numpy()) < 1e-12
    for t, (gb, ga) in ref.items():
        assert isinstance(res.grads[t].B, torch.Tensor) and res.grads[t].B.shape == gb.shape
        assert rel_error(res.grads[t].B.numpy(), gb.numpy()) < 1e-10, t
        assert rel_error(res.grads[t].A.numpy(), ga.numpy()) < 1e-10, t


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softmax_one", [False, True])
def test_poly_gradients_approach_torch_autograd(causal, softmax_one):
    """Poly at tol 1e-8 on a bounded problem: within 10 tol (gpulora.poly.chain's documented factor)."""
    w, adapters, x, y = _problem(52, L=40, d_model=8, d_head=4, d_v=4, r=2, targets="qkv", heads=2, batch=2,
                                 scale=1.0)
    kw = {"alpha": 2.0, "heads": 2, "beta": 0.5, "causal": causal}
    _, ref = _autograd(w, adapters, x, y, softmax_one=softmax_one, **kw)
    res = gt.lora_grad(w["q"], w["k"], w["v"], adapters, x, y, softmax_one=softmax_one, method="poly", tol=1e-8,
                       **kw)
    assert res.method == "poly"
    for t, (gb, ga) in ref.items():
        assert rel_error(res.grads[t].B.numpy(), gb.numpy()) < 1e-7, t
        assert rel_error(res.grads[t].A.numpy(), ga.numpy()) < 1e-7, t


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_function_backward(causal):
    """attention_loss(...).backward() fills the adapters' .grad with gpulora's gradient (times the
    upstream gradient), and leaves the frozen tensors alone."""
    w, adapters, x, y = _problem(53, L=17, d_model=6, d_head=3, d_v=2, r=2, targets="qkv", heads=2, batch=2)
    kw = {"alpha": 2.0, "heads": 2, "beta": 0.7, "causal": causal}
    loss_ref, ref = _autograd(w, adapters, x, y, **kw)
    leaves = {t: (b.clone().requires_grad_(), a.clone().requires_grad_()) for t, (b, a) in adapters.items()}
    info = {}
    loss = gt.attention_loss(x, y, w["q"], w["k"], w["v"], leaves, method="exact", info=info, **kw)
    (3.0 * loss).backward()
    assert info["method"] == "exact"
    assert rel_error(loss.detach().numpy(), loss_ref.numpy()) < 1e-12
    for t, (gb, ga) in ref.items():
        assert rel_error(leaves[t][0].grad.numpy(), 3.0 * gb.numpy()) < 1e-10
        assert rel_error(leaves[t][1].grad.numpy(), 3.0 * ga.numpy()) < 1e-10
    # no adapter requires grad: the loss alone, same value
    frozen = gt.attention_loss(x, y, w["q"], w["k"], w["v"], adapters, method="exact", **kw)
    assert not frozen.requires_grad and rel_error(frozen.numpy(), loss_ref.numpy()) < 1e-12


def test_autograd_function_refuses_gradients_it_cannot_give():
    w, adapters, x, y = _problem(54, L=5, d_model=4, d_head=2, d_v=2, r=1, targets="qv", heads=1)
    leaves = {t: (b.clone().requires_grad_(), a.clone().requires_grad_()) for t, (b, a) in adapters.items()}
    with pytest.raises(ValueError, match="x require grad"):
        gt.attention_loss(x.clone().requires_grad_(), y, w["q"], w["k"], w["v"], leaves, alpha=1.0)


def test_float32_in_float32_out():
    w, adapters, x, y = _problem(55, L=9, d_model=6, d_head=3, d_v=3, r=2, targets="qv", heads=1,
                                 dtype=torch.float32)
    res = gt.lora_grad(w["q"], w["k"], w["v"], adapters, x, y, alpha=2.0, method="exact")
    assert res.loss.dtype == torch.float32 and res.grads["v"].A.dtype == torch.float32
    w64 = {t: a.double() for t, a in w.items()}
    ad64 = {t: (b.double(), a.double()) for t, (b, a) in adapters.items()}
    _, ref = _autograd(w64, ad64, x.double(), y.double(), alpha=2.0, heads=1, beta=3**-0.5, causal=False)
    # float32 against float64: a few hundred ulps of float32 at most on these sizes
    assert rel_error(res.grads["q"].B.numpy(), ref["q"][0].numpy()) < 1e-4


def test_dlpack_is_zero_copy():
    t = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    a = gt.to_array(t)
    assert isinstance(a, np.ndarray)
    assert a.__array_interface__["data"][0] == t.data_ptr()
    a[1, 2] = -7.0  # writes through: the same memory
    assert t[1, 2].item() == -7.0
    wt = gt.to_array(t.T)  # a transposed view (weight.T) stays a view, with swapped strides
    assert wt.__array_interface__["data"][0] == t.data_ptr() and wt.strides == (8, 32)
    p = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))  # requires grad: detached, same storage
    assert gt.to_array(p).__array_interface__["data"][0] == p.data_ptr()
    back = gt.to_torch(a)
    assert back.data_ptr() == a.__array_interface__["data"][0]


def test_bad_tensors_are_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        gt.to_array(torch.ones(2, 2, dtype=torch.int64), "x")
    with pytest.raises(TypeError, match="torch.Tensor"):
        gt.to_array(np.ones(2), "x")


class _PeftLinear(torch.nn.Module):
    """The attribute layout and forward of ``peft.tuners.lora.Linear`` (peft is not a test dependency):
    ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    def __init__(self, d_in, d_out, r, lora_alpha, g, bias=False):
        super().__init__()
        self.base_layer = torch.nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(d_in, r, bias=False, dtype=torch.float64)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(r, d_out, bias=False, dtype=torch.float64)})
        self.lora_dropout = torch.nn.ModuleDict({"default": torch.nn.Dropout(0.1)})
        self.scaling = {"default": lora_alpha / r}
        with torch.no_grad():
            for p in (self.base_layer.weight, self.lora_A["default"].weight, self.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[1] ** 0.5)
        self.base_layer.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](
            self.lora_dropout["default"](x))) * self.scaling["default"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_peft_layers_map_onto_head_and_lora(causal, bias):
    """Gradients of PEFT-layout modules by torch autograd (modules' own forward) == peft_backward's,
    with and without q/k/v biases (BERT-type layers have them)."""
    g = torch.Generator().manual_seed(56)
    d_model, heads, d_head, L = 8, 2, 3, 11
    q_proj = _PeftLinear(d_model, heads * d_head, 2, 8.0, g, bias=bias)
    k_proj = torch.nn.Linear(d_model, heads * d_head, bias=bias, dtype=torch.float64)  # not adapted
    v_proj = _PeftLinear(d_model, heads * d_head, 2, 8.0, g, bias=bias)
    x = torch.randn(2, L, d_model, generator=g, dtype=torch.float64)
    y = torch.randn(2, L, heads * d_head, generator=g, dtype=torch.float64)
    for m in (q_proj, k_proj, v_proj):
        m.eval()
    k_proj.requires_grad_(False)
    if bias:
        with torch.no_grad():
            for m in (q_proj.base_layer, k_proj, v_proj.base_layer):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))

    def split(z):
        return z.reshape(2, L, heads, d_head).transpose(1, 2)

    s = d_head**-0.5 * split(q_proj(x)) @ split(k_proj(x)).transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(s, dim=-1) @ split(v_proj(x))).transpose(1, 2).reshape(y.shape)
    (0.5 * ((o - y) ** 2).sum()).backward()
    want = {t: (m.lora_A["default"].weight.grad.clone(), m.lora_B["default"].weight.grad.clone())
            for t, m in (("q", q_proj), ("v", v_proj))}
    for m in (q_proj, v_proj):
        m.zero_grad(set_to_none=True)

    att = gt.from_peft(q_proj, k_proj, v_proj)
    assert set(att.adapters) == {"q", "v"} and att.alpha == pytest.approx(8.0)
    assert set(att.biases) == ({"q", "k", "v"} if bias else set())
    assert att.w_q.data_ptr() == q_proj.base_layer.weight.data_ptr()  # views, no copies
    res = gt.peft_backward(att, x, y, heads=heads, method="exact", causal=causal)
    for t, m in (("q", q_proj), ("v", v_proj)):
        assert rel_error(m.lora_A["default"].weight.grad.numpy(), want[t][0].numpy()) < 1e-10
        assert rel_error(m.lora_B["default"].weight.grad.numpy(), want[t][1].numpy()) < 1e-10
    assert res.method == "exact"
    gt.peft_backward(att, x, y, heads=heads, method="exact", causal=causal)  # accumulates, like backward()
    assert rel_error(q_proj.lora_A["default"].weight.grad.numpy(), 2 * want["q"][0].numpy()) < 1e-10
    leaves = {t: tuple(a.detach().clone().requires_grad_() for a in pair) for t, pair in att.adapters.items()}
    loss = gt.attention_loss(x, y, att.w_q, att.w_k, att.w_v, leaves, alpha=att.alpha, heads=heads,
                             method="exact", causal=causal, biases=att.biases)
    loss.backward()
    for t in ("q", "v"):
        assert rel_error(leaves[t][0].grad.T.numpy(), want[t][0].numpy()) < 1e-10
        assert rel_error(leaves[t][1].grad.T.numpy(), want[t][1].numpy()) < 1e-10
    q_proj.train()
    with pytest.raises(ValueError, match="dropout"):
        gt.from_peft(q_proj, k_proj, v_proj)


def test_example_trains():
    """examples/train_lora_torch.py runs and its loss falls."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_lora_torch.py"), "--steps", "30"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    losses = [float(v) for v in re.findall(r"loss ([0-9.eE+-]+)", out.stdout)]
    assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], out.stdout


def _torch_attention(q, k, v, key_mask, causal, beta):
    """Attention written out in torch (grouped-query heads repeated, padding query rows zeroed)."""
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = beta * q @ k.transpose(-1, -2)
    L = s.shape[-1]
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[..., None, None, :], float("-inf"))
        s = s.masked_fill(~key_mask[..., None, :, None], 0.0)  # keep padding rows finite
    o = torch.softmax(s, dim=-1) @ v
    return o if key_mask is None else o * key_mask[..., None, :, None]


def _qkv(seed, batch, H, H_kv, L, d_head, d_v, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, H, L, d_head), (batch, H_kv, L, d_head), (batch, H_kv, L, d_v), (batch, H, L, d_v))
    q, k, v, d_out = (scale * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    return q, k, v, d_out


def _vjp(fn, q, k, v, d_out):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(d_out)
    return out.detach(), [t.grad for t in leaves]


# (batch, H, H_kv, L, d_head, d_v, causal, padded): MHA, GQA, MQA; unmasked and padded; awkward sizes
ATTENTION_CASES = [(2, 2, 2, 13, 4, 3, False, False), (2, 4, 2, 17, 8, 8, True, False),
                   (3, 4, 1, 9, 5, 6, True, True), (2, 6, 3, 11, 4, 4, False, True)]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "b{}-H{}-Hkv{}-L{}-dh{}-dv{}-{}-{}".format(
    *c[:6], "causal" if c[6] else "full", "padded" if c[7] else "dense"))
@pytest.mark.parametrize("engine", ["gpulora", "sdpa"])
def test_attention_backward_matches_torch_autograd(case, engine):
    """gt.attention's forward and its backward for a random upstream gradient == torch autograd."""
    batch, H, H_kv, L, d_head, d_v, causal, padded = case
    q, k, v, d_out = _qkv(60, batch, H, H_kv, L, d_head, d_v)
    key_mask = None
    if padded:
        key_mask = torch.arange(L)[None, :] < torch.tensor([L, L - 3, 2][:batch])[:, None]
    beta = 0.7
    ref_out, ref = _vjp(lambda q, k, v: _torch_attention(q, k, v, key_mask, causal, beta), q, k, v, d_out)
    with gt.recording() as runs:
        out, got = _vjp(lambda q, k, v: gt.attention(q, k, v, key_mask=key_mask, causal=causal, beta=beta,
                                                     method="exact", exact_engine=engine), q, k, v, d_out)
    assert rel_error(out.numpy(), ref_out.numpy()) < 1e-12
    for name, a, b in zip("qkv", got, ref):
        assert a.shape == b.shape and rel_error(a.numpy(), b.numpy()) < 1e-12, name
    want = [("forward", "gpulora"), ("backward", "gpulora")] if engine == "gpulora" else [("forward", "sdpa")]
    assert [(r.phase, r.engine) for r in runs] == want


@pytest.mark.parametrize("causal, padded", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_attention_poly_holds_tol_on_bounded_scores(causal, padded, tol):
    """Scores bounded by construction (unit q, k, beta 1.5): the poly forward and backward stay within 10 tol."""
    q, k, v, d_out = _qkv(61, 2, 4, 2, 40, 4, 4)
    q, k = (t / t.norm(dim=-1, keepdim=True) for t in (q, k))
    key_mask = (torch.arange(40)[None, :] < torch.tensor([[40], [29]])) if padded else None
    ref_out, ref = _vjp(lambda q, k, v: _torch_attention(q, k, v, key_mask, causal, 1.5), q, k, v, d_out)
    with gt.recording() as runs, gt.options(method="poly", tol=tol):
        out, got = _vjp(lambda q, k, v: gt.attention(q, k, v, key_mask=key_mask, causal=causal, beta=1.5),
                        q, k, v, d_out)
    assert [(r.phase, r.method) for r in runs] == [("forward", "poly"), ("backward", "poly")]
    assert runs[0].degree == runs[1].degree and runs[0].bound <= 1.5 + 1e-12
    assert rel_error(out.numpy(), ref_out.numpy()) <= 10 * tol
    for name, a, b in zip("qkv", got, ref):
        assert rel_error(a.numpy(), b.numpy()) <= 10 * tol, name


@pytest.mark.parametrize("method, engine", [("exact", "gpulora"), ("exact", "sdpa"), ("poly", "gpulora")])
def test_key_only_mask_computes_every_query_row(method, engine):
    """pad_queries=False (what transformers' masks mean; cross-attention): masked keys are excluded and every
    query row is computed, as SDPA with that mask computes it, forward and backward."""
    q, k, v, d_out = _qkv(63, 2, 4, 2, 12, 4, 4)
    q, k = (t / t.norm(dim=-1, keepdim=True) for t in (q, k))
    key_mask = torch.arange(12)[None, :] < torch.tensor([[12], [5]])

    def ref_fn(q, k, v):  # SDPA's semantics: keys masked, no query row zeroed
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                                                scale=1.0, enable_gqa=True)

    ref_out, ref = _vjp(ref_fn, q, k, v, d_out)
    out, got = _vjp(lambda q, k, v: gt.attention(q, k, v, key_mask=key_mask, beta=1.0, pad_queries=False,
                                                 method=method, exact_engine=engine, tol=1e-6), q, k, v, d_out)
    rtol = 1e-12 if method == "exact" else 1e-5
    assert float(out[1, :, 5:].abs().min()) > 0  # the rows at masked positions are computed
    assert rel_error(out.numpy(), ref_out.numpy()) < rtol
    for name, a, b in zip("qkv", got, ref):
        assert rel_error(a.numpy(), b.numpy()) < rtol, name


def test_mixed_dtypes_run_on_either_engine():
    """float32 q with float64 k, v: both engines compute in the promoted float64 and return q's float32."""
    q, k, v, d_out = _qkv(65, 1, 2, 2, 8, 4, 4)
    ref_out, ref = _vjp(lambda q, k, v: _torch_attention(q, k, v, None, False, 0.5), q, k, v, d_out)
    for engine in ("gpulora", "sdpa"):
        out, got = _vjp(lambda q, k, v: gt.attention(q, k, v, beta=0.5, method="exact", exact_engine=engine),
                        q.float(), k, v, d_out.float())
        assert out.dtype == got[0].dtype == torch.float32 and got[1].dtype == torch.float64, engine
        assert rel_error(out.double().numpy(), ref_out.numpy()) < 1e-6, engine
        assert rel_error(got[1].numpy(), ref[1].numpy()) < 1e-6, engine


def test_backward_runs_the_forwards_plan():
    """The backward runs the forward's plan itself: the polynomial, the tol it was asked (no warning against
    the default 1e-3 for a tol=1e-2 degree) and the compute dtype (float64 features for float32 inputs at tol
    1e-6, as the forward chose)."""
    q, k, v, d_out = _qkv(64, 1, 2, 2, 16, 4, 4)
    q, k = (t / t.norm(dim=-1, keepdim=True) for t in (q, k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpulora.AccuracyWarning)
        with gt.recording() as runs:
            _vjp(lambda q, k, v: gt.attention(q, k, v, beta=1.0, method="poly", tol=1e-2), q, k, v, d_out)
    assert [(r.phase, r.degree) for r in runs] == [("forward", runs[0].degree), ("backward", runs[0].degree)]
    q32, k32, v32, d32 = (t.float() for t in (q, k, v, d_out))
    ref = _vjp(lambda q, k, v: _torch_attention(q, k, v, None, False, 2.0), q, k, v, d_out)[1]
    got = _vjp(lambda q, k, v: gt.attention(q, k, v, beta=2.0, method="poly", tol=1e-6), q32, k32, v32, d32)[1]
    assert rel_error(got[0].double().numpy(), ref[0].numpy()) < 5e-7  # float32 features gave 1.1e-6 here


def test_attention_auto_picks_and_records():
    q, k, v, _ = _qkv(62, 1, 2, 2, 32, 4, 4)
    with gt.options(method="auto", tol=1e-3, exact_engine="gpulora"):
        gt.attention(q, k, v, layer="block0")
    run = gt.last_run()
    assert run.layer == "block0" and run.method in ("exact", "poly") and run.note.startswith("auto")
    assert run.bound > 0


def test_attention_has_no_double_backward():
    q, k, v, _ = _qkv(63, 1, 2, 2, 8, 4, 4)
    q.requires_grad_()
    out = gt.attention(q, k, v, method="exact", exact_engine="gpulora")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


@pytest.mark.gpu
def test_cuda_tensors_round_trip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    pytest.importorskip("cupy")
    w, adapters, x, y = _problem(57, L=33, d_model=8, d_head=4, d_v=4, r=2, targets="qkv", heads=2, batch=2)
    kw = {"alpha": 2.0, "heads": 2, "beta": 0.5, "causal": True}
    _, ref = _autograd(w, adapters, x, y, **kw)
    cuda = {t: (b.cuda(), a.cuda()) for t, (b, a) in adapters.items()}
    arr = gt.to_array(x.cuda())
    assert type(arr).__module__.startswith("cupy")
    for method in ("exact", "poly"):
        res = gt.lora_grad(w["q"].cuda(), w["k"].cuda(), w["v"].cuda(), cuda, x.cuda(), y.cuda(), method=method,
                           tol=1e-8, **kw)
        assert res.grads["q"].B.is_cuda
        for t, (gb, ga) in ref.items():
            assert rel_error(res.grads[t].B.cpu().numpy(), gb.numpy()) < 1e-7, (method, t)
            assert rel_error(res.grads[t].A.cpu().numpy(), ga.numpy()) < 1e-7, (method, t)
