"""Several heads in one Head (heads = H): gradients vs finite differences, and vs H single-head problems.

One LoRA spans all heads (``A`` of shape ``(r, H d)``), so a multi-head problem splits exactly into H
single-head problems that share ``B`` and own the column block ``A[:, h d:(h + 1) d]`` of ``A``: the loss
is the sum of the per-head losses, ``dB`` the sum of the per-head ``dB``, ``dA`` the concatenation of the
per-head ``dA``. That identity, and the per-head outputs, are checked to rounding; finite differences of
the whole multi-head loss check the gradients independently.
"""

import numpy as np
import pytest

import gpulora
from gpulora.testing import finite_difference_grads, make_problem, rel_error

# (L, d_model, d_head, d_v, r, targets, batch, heads, causal)
CASES = [
    (6, 5, 3, 2, 2, "qkv", None, 2, False),
    (7, 4, 2, 3, 1, "qv", 2, 3, True),
    (5, 6, 2, 2, 2, "k", None, 2, True),
]
IDS = ["L{}-dm{}-dh{}-dv{}-r{}-{}-b{}-H{}-causal{}".format(*c) for c in CASES]


def _problem(case, **kw):
    L, d_model, d_head, d_v, r, targets, batch, heads, _ = case
    return make_problem(31, L=L, d_model=d_model, d_head=d_head, d_v=d_v, r=r, targets=targets, batch=batch,
                        heads=heads, score_bound=1.0, **kw)


def _fd(p, causal):
    return finite_difference_grads(lambda lo: float(gpulora.loss(p.head, lo, p.x, p.y, causal=causal)), p.lora)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multihead_gradients_match_finite_differences(case):
    """Exact to FD accuracy (h = 1e-6: rounding of the O(10) loss over 2h gives ~1e-9 absolute, measured
    1e-9..3e-8 relative on these small gradients); poly at tol 1e-7 within 10 tol of the exact loss's
    differences (the poly gradient is the formula of docs/math.md section 2 with F~, not the derivative of a poly loss)."""
    causal = case[-1]
    p = _problem(case)
    fd = _fd(p, causal)
    exact = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", causal=causal)
    poly = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=1e-7, causal=causal)
    assert poly.method == "poly"
    for t, (gb, ga) in fd.items():
        assert rel_error(exact.grads[t].B, gb) < 1e-7 and rel_error(exact.grads[t].A, ga) < 1e-7, t
        assert rel_error(poly.grads[t].B, gb) < 1e-6 and rel_error(poly.grads[t].A, ga) < 1e-6, t


def _single_heads(p):
    """The H single-head problems of a multi-head problem: column blocks of the weights, A and y."""
    head, H = p.head, p.head.heads
    dh, dv = head.d_head, head.d_v
    out = []
    for h in range(H):
        cols = {"q": slice(h * dh, (h + 1) * dh), "k": slice(h * dh, (h + 1) * dh),
                "v": slice(h * dv, (h + 1) * dv)}
        single = gpulora.Head(head.w_q[:, cols["q"]], head.w_k[:, cols["k"]], head.w_v[:, cols["v"]],
                              beta=head.beta, softmax_one=head.softmax_one)
        lora = gpulora.LoRA({t: (b, a[:, cols[t]]) for t, (b, a) in p.lora.adapters.items()}, alpha=p.lora.alpha)
        out.append((single, lora, p.y[..., cols["v"]], cols))
    return out


@pytest.mark.parametrize("softmax_one", [False, True])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multihead_equals_separate_heads(case, softmax_one):
    """Outputs per head, losses summed, dB summed, dA concatenated: to float64 rounding, exact and poly.

    Poly uses a fixed-degree taylor polynomial, whose coefficients do not depend on the bound, so the
    multi-head call (bound = max over heads) and the single-head calls use the same polynomial."""
    causal = case[-1]
    p = _problem(case, softmax_one=softmax_one)
    heads = _single_heads(p)
    for kw in ({"method": "exact"}, {"method": "poly", "degree": 6, "family": "taylor"}):
        whole = gpulora.lora_grad(p.head, p.lora, p.x, p.y, causal=causal, **kw)
        o = gpulora.forward(p.head, p.lora, p.x, causal=causal, **kw)
        parts = [gpulora.lora_grad(h, lo, p.x, y, causal=causal, **kw) for h, lo, y, _ in heads]
        assert whole.method == kw["method"]
        assert rel_error(whole.loss, sum(float(r.loss) for r in parts)) < 1e-13
        for h, lo, _, cols in heads:
            o_h = gpulora.forward(h, lo, p.x, causal=causal, **kw)
            assert rel_error(o[..., cols["v"]], o_h) < 1e-13
        for t in p.lora.adapters:
            db = sum(r.grads[t].B for r in parts)
            da = np.concatenate([r.grads[t].A for r in parts], axis=-1)
            assert rel_error(whole.grads[t].B, db) < 1e-12, (kw, t)
            assert rel_error(whole.grads[t].A, da) < 1e-12, (kw, t)


def test_heads_are_not_mixed():
    """Permuting the heads (column blocks of every weight, A and y) permutes the per-head outputs: a
    shape-correct but head-mixing layout (e.g. splitting columns with the wrong stride) would fail this."""
    p = _problem(CASES[0])
    H, dh, dv = p.head.heads, p.head.d_head, p.head.d_v
    perm_q = np.concatenate([np.arange(h * dh, (h + 1) * dh) for h in reversed(range(H))])
    perm_v = np.concatenate([np.arange(h * dv, (h + 1) * dv) for h in reversed(range(H))])
    perm = {"q": perm_q, "k": perm_q, "v": perm_v}
    head = gpulora.Head(p.head.w_q[:, perm_q], p.head.w_k[:, perm_q], p.head.w_v[:, perm_v], heads=H)
    lora = gpulora.LoRA({t: (b, a[:, perm[t]]) for t, (b, a) in p.lora.adapters.items()}, alpha=p.lora.alpha)
    a = gpulora.forward(p.head, p.lora, p.x)
    b = gpulora.forward(head, lora, p.x)
    assert rel_error(b, a[..., perm_v]) < 1e-14
    assert rel_error(b, a) > 0.1
