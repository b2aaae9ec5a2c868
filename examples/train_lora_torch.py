"""Train the LoRA adapters of a small causal attention block with torch.optim.Adam and gpulora gradients.

A frozen two-head attention block (d_model 32, d_head 4) and a "teacher" built from the same block with
a hidden rank-2 update of W_q and W_v produce targets y; the student's LoRA adapters (q and v, rank 4,
PEFT-style init: A = 0) are trained to match them. The loss is a torch tensor from
``gpulora.torch.attention_loss``: ``loss.backward()`` runs gpulora's polynomial-method gradient (causal,
almost linear in L), and the optimizer does the rest. Runs in a few seconds on a CPU::

    python examples/train_lora_torch.py --steps 100
"""

from __future__ import annotations

import argparse
import time

import torch

import gpulora
import gpulora.torch as gt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--length", type=int, default=256, help="sequence length L")
    ap.add_argument("--method", default="poly", choices=["auto", "exact", "poly"])
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    d_model, heads, d_head, r, batch = 32, 2, 4, 4, 4
    dtype = torch.float64

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    # frozen weights (x @ W layout); rows of x are unit vectors, so scores stay bounded (|s| <~ 1.5)
    w_q, w_k, w_v = (randn(d_model, heads * d_head, scale=d_model**-0.5) for _ in range(3))
    x = randn(batch, args.length, d_model)
    x = x / x.norm(dim=-1, keepdim=True)
    alpha = float(r)
    kw = {"alpha": alpha, "heads": heads, "causal": True}

    # the teacher: a hidden rank-2 update of W_q and W_v; its outputs are the targets
    hidden = {t: (randn(d_model, 2, scale=0.3), randn(2, heads * d_head, scale=0.3)) for t in "qv"}
    head, lora = gt.head_and_lora(w_q, w_k, w_v, hidden, alpha=alpha, heads=heads)  # views, no copies
    y = gt.to_torch(gpulora.forward(head, lora, gt.to_array(x), causal=True))

    # the student: PEFT-style init, B random, A = 0 (the adapted head starts equal to the frozen one)
    adapters = {t: (torch.nn.Parameter(randn(d_model, r, scale=d_model**-0.5)),
                    torch.nn.Parameter(torch.zeros(r, heads * d_head, dtype=dtype))) for t in "qv"}
    opt = torch.optim.Adam([p for pair in adapters.values() for p in pair], lr=2e-2)
    start = time.perf_counter()
    every = max(1, args.steps // 10)
    for step in range(args.steps + 1):
        info = {}
        loss = gt.attention_loss(x, y, w_q, w_k, w_v, adapters, method=args.method, tol=args.tol, info=info, **kw)
        if step % every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.6e}  ({info['method']}, degree {info.get('degree')}, "
                  f"bound M = {info.get('bound', 0.0):.2f})")
        if step == args.steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"{args.steps} steps of L = {args.length}, batch {batch}, {heads} heads in "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
