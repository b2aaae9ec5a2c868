"""method="auto" and diagnose: the cost model's choice, the regimes, and what users are told."""

import math

import numpy as np
import pytest

import gpulora
from gpulora import cost
from gpulora.testing import make_problem, rel_error


def test_auto_runs_poly_where_it_is_cheaper_and_meets_tol():
    p = make_problem(0, L=4096, d_model=16, d_head=2, d_v=2, r=2, targets="qv", score_bound=0.5)
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto", tol=1e-3)
    assert res.method == "poly" and "ran poly" in res.note
    assert res.features == math.comb(2 + res.degree, res.degree)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    for t in "qv":
        assert rel_error(res.grads[t].B, ref.grads[t].B) < 1e-2


def test_auto_runs_exact_when_poly_is_dearer_or_infeasible():
    small = make_problem(1, L=16, d_model=8, d_head=8, d_v=8, r=2, score_bound=1.0)
    res = gpulora.lora_grad(small.head, small.lora, small.x, small.y, method="auto")
    assert res.method == "exact" and "ran exact" in res.note and res.degree is None
    big = make_problem(1, L=64, d_model=8, d_head=4, r=2, score_bound=40.0)
    res = gpulora.lora_grad(big.head, big.lora, big.x, big.y, method="auto")
    assert res.method == "exact" and "cannot meet" in res.note


def test_cost_model_scales_as_stated():
    assert cost.exact_flops(4096, 8, 8) / cost.exact_flops(1024, 8, 8) == pytest.approx(16)
    assert cost.poly_flops(4096, 8, 8, 45) / cost.poly_flops(1024, 8, 8, 45) == pytest.approx(4)
    assert cost.exact_flops(1024, 8, 8, causal=True) == pytest.approx(cost.exact_flops(1024, 8, 8) / 2)
    assert cost.poly_flops(1024, 8, 8, 45, targets=("v",)) < cost.poly_flops(1024, 8, 8, 45, targets=("q", "v"))
    assert cost.poly_flops(1024, 8, 8, 45, causal=True) > cost.poly_flops(1024, 8, 8, 45)  # in-chunk work
    t = cost.poly_seconds(1024, 8, 8, 45)
    assert cost.poly_seconds(1024, 8, 8, 45, float64_features=True) == pytest.approx(2 * t)


@pytest.mark.parametrize("bound, regime", [(0.5, "below"), (3.5, "transition"), (30.0, "above")])
def test_diagnose_regimes_and_table(bound, regime):
    p = make_problem(2, L=256, d_model=16, d_head=4, d_v=4, r=2, targets="qkv", batch=2, score_bound=bound)
    d = gpulora.diagnose(p.head, p.lora, p.x, tol=1e-3)
    assert d.bound == pytest.approx(bound, rel=1e-9)
    assert d.max_score is not None and 0 < d.max_score <= d.bound * (1 + 1e-12)
    assert d.threshold == pytest.approx(math.sqrt(math.log(256)))
    assert regime in d.regime
    text = str(d)
    for word in ("bound M", "sqrt(log L)", "regime", "recommended", "est. cost exact"):
        assert word in text
    if regime == "above":
        assert d.degree is None and d.recommended == "exact"
        assert any("trained attention heads" in n for n in d.notes)
    else:
        assert d.features == math.comb(4 + d.degree, d.degree)


def test_diagnose_float32_says_when_features_need_float64():
    p = make_problem(3, L=128, d_model=8, d_head=2, d_v=2, r=2, score_bound=6.0, dtype=np.float32)
    d = gpulora.diagnose(p.head, p.lora, p.x, tol=1e-3)
    assert d.compute_dtype == "float64" and any("float64" in n for n in d.notes)


def test_diagnose_skips_the_exact_max_when_L_is_large():
    p = make_problem(4, L=9000, d_model=8, d_head=2, d_v=2, r=1, batch=1, score_bound=1.0)
    d = gpulora.diagnose(p.head, p.lora, p.x)
    assert d.max_score is None and "not computed" in str(d)


def test_auto_falls_back_to_exact_when_poly_fails_at_run_time(monkeypatch):
    from gpulora.poly import chain

    def fail(*args, **kwargs):
        raise chain.PolynomialFailure("injected normaliser failure")

    p = make_problem(5, L=4096, d_model=16, d_head=2, d_v=2, r=2, targets="qv", score_bound=0.5)
    assert gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto").method == "poly"
    monkeypatch.setattr(chain, "check_normaliser_ratio", fail)  # what the streamed chain calls
    res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto")
    assert res.method == "exact" and "fell back" in res.note
    exact_out = gpulora.forward(p.head, p.lora, p.x, method="exact")
    assert rel_error(gpulora.forward(p.head, p.lora, p.x, method="auto"), exact_out) == 0
    assert float(gpulora.loss(p.head, p.lora, p.x, p.y, method="auto")) == float(res.loss)
    with pytest.raises(gpulora.PolynomialFailure, match="injected"):
        gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly")


@pytest.mark.parametrize("causal", [False, True])
def test_exact_max_score_equals_the_dense_maximum(causal):
    from gpulora.adapters import prepare
    from gpulora.diagnosis import exact_max_score

    p = make_problem(6, L=97, d_model=8, d_head=3, r=2, targets="qk", batch=2, heads=2, score_bound=3.0)
    pr = prepare(p.head, p.lora, p.x)
    s = np.abs(pr.beta * pr.q @ np.swapaxes(pr.k, -1, -2))
    if causal:
        s = np.tril(s)  # keys j <= i only
    assert exact_max_score(pr.q, pr.k, pr.beta, causal=causal) == pytest.approx(float(s.max()), rel=1e-14)
