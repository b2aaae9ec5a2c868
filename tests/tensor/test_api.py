"""The public tensor-attention API: LoRA gradients against finite differences for every target subset, the
tol contract of the polynomial method, auto, batches and heads, upstream gradients, bad input, CuPy."""

import itertools

import numpy as np
import pytest

import gpulora
import gpulora.tensor as T
from gpulora.poly.coefficients import DEFAULT_TOL
from gpulora.tensor.reference import dense_loss_grads, dense_scores, dense_weights
from gpulora.tensor.testing import make_problem
from gpulora.testing import finite_difference_grads, rel_error

SUBSETS = [s for n in range(1, 6) for s in itertools.combinations(T.TARGETS, n)]


def _max_error(res, ref):
    return max(max(rel_error(res.grads[t].B, ref.grads[t].B), rel_error(res.grads[t].A, ref.grads[t].A))
               for t in ref.grads)


@pytest.mark.parametrize("targets", SUBSETS, ids=lambda s: "-".join(s))
def test_exact_lora_gradients_match_finite_differences(targets):
    p = make_problem(len(targets), L=4, d_model=3, d_head=2, d_v=2, r=1, targets=targets, beta=0.9)
    res = T.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    assert res.method == "exact" and set(res.grads) == set(targets)
    fd = finite_difference_grads(lambda lo: float(T.loss(p.head, lo, p.x, p.y)), p.lora)
    for t in targets:  # central differences, h = 1e-6: rounding eps |loss| / h ~ 1e-9 on gradients of ~1e-2
        assert rel_error(res.grads[t].B, fd[t][0]) < 1e-6, t
        assert rel_error(res.grads[t].A, fd[t][1]) < 1e-6, t
    assert float(res.loss) == pytest.approx(float(T.loss(p.head, p.lora, p.x, p.y)), rel=1e-14)


def test_poly_at_high_degree_equals_exact_for_every_target():
    p = make_problem(1, L=12, d_model=6, d_head=2, d_v=3, r=2, score_bound_=0.5)
    ex = T.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    po = T.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=1e-11)
    assert po.method == "poly" and po.degree >= 8 and po.features == gpulora.poly.monomials.feature_dim(2, po.degree)
    assert _max_error(po, ex) < 1e-9
    assert rel_error(po.loss, ex.loss) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-3), (np.float64, 1e-5), (np.float32, 1e-3)])
def test_poly_holds_the_tol_contract_on_bounded_problems(dtype, tol):
    """M = 1 sits below cbrt(log L) = 1.7 at L = 128: every adapter gradient within 10 tol of exact."""
    p = make_problem(2, L=128, d_model=8, d_head=3, d_v=2, r=2, score_bound_=1.0, dtype=dtype)
    ex = T.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    po = T.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=tol)
    assert po.grads["q"].B.dtype == dtype and po.loss.dtype == dtype
    assert po.bound == pytest.approx(1.0)
    assert _max_error(po, ex) <= 10 * tol
    assert rel_error(T.forward(p.head, p.lora, p.x, method="poly", tol=tol),
                     T.forward(p.head, p.lora, p.x, method="exact")) <= 2 * tol


def test_auto_chooses_by_cost_and_falls_back_when_poly_fails(monkeypatch):
    from gpulora.tensor import chain

    p = make_problem(3, L=48, d_model=8, d_head=2, d_v=2, r=2, score_bound_=0.5)
    res = T.lora_grad(p.head, p.lora, p.x, p.y)
    assert res.method == "poly" and "ran poly" in res.note

    def fail(*args, **kwargs):
        raise gpulora.PolynomialFailure("injected normaliser failure")

    monkeypatch.setattr(chain, "check_normaliser", fail)
    res = T.lora_grad(p.head, p.lora, p.x, p.y, method="auto")
    assert res.method == "exact" and "fell back" in res.note
    with pytest.raises(gpulora.PolynomialFailure, match="injected"):
        T.lora_grad(p.head, p.lora, p.x, p.y, method="poly")
    far = make_problem(3, L=8, d_model=8, d_head=2, d_v=2, r=2, score_bound_=40.0)
    res = T.lora_grad(far.head, far.lora, far.x, far.y, method="auto")
    assert res.method == "exact" and "cannot meet" in res.note
    with pytest.raises(ValueError, match="tensor attention with score bound M .* phase transition"):
        T.lora_grad(far.head, far.lora, far.x, far.y, method="poly")


@pytest.mark.parametrize("method", ["exact", "poly"])
def test_batch_is_the_sum_of_its_members_and_heads_are_separate(method):
    p = make_problem(4, L=6, d_model=5, d_head=2, d_v=2, r=2, batch=3, heads=2, score_bound_=0.5)
    # poly: each member has its own bound, hence polynomial; at tol 1e-12 all agree with exact to ~1e-11
    kw = dict(method=method, tol=1e-12) if method == "poly" else dict(method=method)
    rtol = 1e-9 if method == "poly" else 1e-12
    whole = T.lora_grad(p.head, p.lora, p.x, p.y, **kw)
    parts = [T.lora_grad(p.head, p.lora, p.x[b], p.y[b], **kw) for b in range(3)]
    assert float(whole.loss) == pytest.approx(sum(float(r.loss) for r in parts), rel=rtol)
    for t in T.TARGETS:
        assert rel_error(whole.grads[t].B, sum(r.grads[t].B for r in parts)) < rtol
        assert rel_error(whole.grads[t].A, sum(r.grads[t].A for r in parts)) < rtol
    o = T.forward(p.head, p.lora, p.x, **kw)
    assert o.shape == (3, 6, 4)
    for h in range(2):  # head h alone: its own column groups
        cols = {t: slice(2 * h, 2 * h + 2) for t in T.TARGETS}
        one = T.TensorHead(*(p.head.weight(t)[:, cols[t]] for t in T.TARGETS), beta=p.head.beta)
        lora = gpulora.LoRA({t: (b, a[:, cols[t]]) for t, (b, a) in p.lora.adapters.items()}, alpha=p.lora.alpha)
        assert rel_error(T.forward(one, lora, p.x, **kw), o[..., 2 * h:2 * h + 2]) < rtol


def test_upstream_gradient_form():
    """grad_output=dO gives the gradients of sum(O * dO); attention_vjp is its projection-level form."""
    p = make_problem(5, L=5, d_model=3, d_head=2, d_v=2, r=1, targets=("q", "k2", "v1"), beta=0.7)
    d_o = np.random.default_rng(0).standard_normal(p.y.shape)
    res = T.lora_grad(p.head, p.lora, p.x, grad_output=d_o, method="exact")
    out = T.forward(p.head, p.lora, p.x)
    assert float(res.loss) == pytest.approx(float(np.sum(out * d_o)), rel=1e-13)
    fd = finite_difference_grads(lambda lo: float(np.sum(T.forward(p.head, lo, p.x) * d_o)), p.lora)
    for t in p.lora.targets:
        assert rel_error(res.grads[t].B, fd[t][0]) < 1e-7 and rel_error(res.grads[t].A, fd[t][1]) < 1e-7
    po = T.lora_grad(p.head, p.lora, p.x, grad_output=d_o, method="poly", tol=1e-10)
    assert _max_error(po, res) < 1e-8

    rng = np.random.default_rng(1)
    qk = [0.5 * rng.standard_normal((2, 6, 3)) for _ in range(3)]
    v = [rng.standard_normal((2, 6, 2)) for _ in range(2)]
    g = rng.standard_normal((2, 6, 2))
    ref = dense_loss_grads(dense_weights(dense_scores(*qk, 1 / 3)), *qk, *v, 1 / 3, grad_output=g)
    for method in ("exact", "poly"):
        got = T.attention_vjp(*qk, *v, g, method=method, **({"tol": 1e-12} if method == "poly" else {}))
        assert got.method == method and (got.error_estimate > 0) == (method == "poly")
        for a, b in zip((got.dq, got.dk1, got.dk2, got.dv1, got.dv2, got.out), ref[1:]):
            assert rel_error(a, b) < (1e-13 if method == "exact" else 1e-9)


def test_inputs_are_not_modified():
    p = make_problem(6, L=6, d_model=4, d_head=2, r=1, score_bound_=0.5)
    arrays = [p.x, p.y] + [p.head.weight(t) for t in T.TARGETS] + [a for pair in p.lora.adapters.values() for a in pair]
    before = [a.copy() for a in arrays]
    for method in ("exact", "poly", "auto"):
        T.lora_grad(p.head, p.lora, p.x, p.y, method=method)
        T.forward(p.head, p.lora, p.x, method=method)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_named():
    p = make_problem(7, L=4, d_model=4, d_head=2, r=1)
    w = p.head.w_q
    with pytest.raises(ValueError, match="w_k2 must have the shape of w_q"):
        T.TensorHead(w, w, w[:, :1], p.head.w_v1, p.head.w_v2)
    with pytest.raises(ValueError, match="w_v2 must have the shape of w_v1"):
        T.TensorHead(w, w, w, p.head.w_v1, p.head.w_v1[:, :1])
    with pytest.raises(ValueError, match="w_v1 must have d_model"):
        T.TensorHead(w, w, w, p.head.w_v1[:2], p.head.w_v2[:2])
    with pytest.raises(ValueError, match="w_k1 must contain only finite"):
        T.TensorHead(w, np.full_like(w, np.nan), w, p.head.w_v1, p.head.w_v2)
    with pytest.raises(TypeError, match="w_q must have dtype"):
        T.TensorHead(w.astype(np.int64), w, w, p.head.w_v1, p.head.w_v2)
    with pytest.raises(ValueError, match="heads must be"):
        T.TensorHead(w, w, w, p.head.w_v1, p.head.w_v2, heads=0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        T.TensorHead(w, w, w, p.head.w_v1, p.head.w_v2, beta=-1.0)
    with pytest.raises(TypeError, match="head must be a gpulora.tensor.TensorHead"):
        T.lora_grad(gpulora.Head(w, w, w), p.lora, p.x, p.y)
    with pytest.raises(ValueError, match=r"unknown targets \['k'\] for a tensor head"):
        T.lora_grad(p.head, gpulora.LoRA({"k": p.lora.adapters["q"]}, alpha=1.0), p.x, p.y)
    with pytest.raises(ValueError, match="x must have d_model = 4"):
        T.lora_grad(p.head, p.lora, p.x[:, :3], p.y)
    with pytest.raises(ValueError, match="y must have shape"):
        T.lora_grad(p.head, p.lora, p.x, p.y[:2])
    with pytest.raises(ValueError, match="grad_output must have shape"):
        T.lora_grad(p.head, p.lora, p.x, grad_output=p.y[:2])
    with pytest.raises(ValueError, match="either y .* or grad_output"):
        T.lora_grad(p.head, p.lora, p.x, p.y, grad_output=p.y)
    with pytest.raises(ValueError, match="y must be an array"):
        T.lora_grad(p.head, p.lora, p.x)
    with pytest.raises(ValueError, match="y must contain only finite"):
        T.lora_grad(p.head, p.lora, p.x, np.full_like(p.y, np.inf))
    with pytest.raises(ValueError, match="method must be one of"):
        T.lora_grad(p.head, p.lora, p.x, p.y, method="fast")
    with pytest.raises(ValueError, match="tol must satisfy"):
        T.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=2.0)
    with pytest.raises(ValueError, match="degree applies"):
        T.forward(p.head, p.lora, p.x, method="exact", degree=3)
    with pytest.raises(ValueError, match="adapters\\['q'\\] must be B of shape"):
        T.forward(p.head, gpulora.LoRA({"q": (p.lora.adapters["q"][0][:2], p.lora.adapters["q"][1])}, alpha=1.0), p.x)
    q = np.zeros((4, 2))
    with pytest.raises(ValueError, match="k2 must have shape"):
        T.attention_vjp(q, q, q[:3], q, q, q)
    with pytest.raises(TypeError, match="v1 must have the dtype of q"):
        T.attention_vjp(q, q, q, q.astype(np.float32), q, q)


def test_lora_targets_depend_on_the_head_kind():
    b, a = np.ones((4, 1)), np.ones((1, 2))
    with pytest.raises(ValueError, match="unknown targets"):
        gpulora.LoRA({"k3": (b, a)}, alpha=1.0)
    lora = gpulora.LoRA({"v2": (b, a), "q": (b, a), "k1": (b, a)}, alpha=1.0)
    assert lora.targets == ("q", "k1", "v2")
    w = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"unknown targets \['k1', 'v2'\]; expected a subset of \('q', 'k', 'v'\)"):
        gpulora.lora_grad(gpulora.Head(w, w, w), lora, np.ones((3, 4)), np.ones((3, 2)))


def test_diagnose_reports_the_tensor_threshold():
    p = make_problem(8, L=40, d_model=6, d_head=2, r=1, score_bound_=1.0)
    d = T.diagnose(p.head, p.lora, p.x, tol=1e-4)
    assert d.bound == pytest.approx(1.0)
    assert d.max_score is not None and d.max_score <= d.bound * (1 + 1e-12)
    assert d.threshold == pytest.approx(np.log(40) ** (1 / 3))
    assert d.degree is not None and d.features == gpulora.poly.monomials.feature_dim(2, d.degree)
    text = str(d)
    assert "cbrt(log L)" in text and "tensor" in text and "max|k1 * k2|" in text
    far = make_problem(8, L=40, d_model=6, d_head=2, r=1, score_bound_=30.0)
    d = T.diagnose(far.head, far.lora, far.x)
    assert d.recommended == "exact" and "above the threshold" in d.regime


def test_numpy_and_cupy_agree(xp):
    """Same answer, same dtype on both backends (CuPy: skipped without a device)."""
    host = make_problem(9, L=16, d_model=6, d_head=2, d_v=2, r=2, score_bound_=0.8)
    dev = make_problem(9, L=16, d_model=6, d_head=2, d_v=2, r=2, score_bound_=0.8, xp=xp)
    for method in ("exact", "poly"):
        a = T.lora_grad(host.head, host.lora, host.x, host.y, method=method, tol=1e-6)
        b = T.lora_grad(dev.head, dev.lora, dev.x, dev.y, method=method, tol=1e-6)
        assert type(b.loss) is type(dev.x) and b.loss.dtype == dev.x.dtype
        assert b.degree == a.degree
        for t in T.TARGETS:
            assert type(b.grads[t].B) is type(dev.x)
            assert rel_error(b.grads[t].B, a.grads[t].B) < 1e-10 and rel_error(b.grads[t].A, a.grads[t].A) < 1e-10


def test_every_public_tensor_name_imports():
    for name in T.__all__:
        assert getattr(T, name) is not None, name
    assert T.TARGETS == ("q", "k1", "k2", "v1", "v2") and DEFAULT_TOL == 1e-3


def test_error_contract():
    """error_bound / error_estimate on every result; a fixed degree over tol warns (poly) or runs exact
    (auto); near a perfect fit auto reruns exact; NaN put into an adapter in place is caught at call time;
    finite inputs whose scores overflow raise instead of returning NaN."""
    import warnings

    p = make_problem(10, L=24, d_model=6, d_head=2, d_v=2, r=1, score_bound_=1.0)
    ex = T.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    po = T.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=1e-4)
    assert ex.error_bound == ex.error_estimate == 0.0
    assert 0 < po.error_bound <= 1e-4 and po.error_bound <= po.error_estimate < 10 * 1e-4
    assert _max_error(po, ex) <= po.error_estimate

    with pytest.warns(gpulora.AccuracyWarning, match="degree=1"):
        low = T.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=1, tol=1e-4)
    assert low.method == "poly" and low.error_bound > 1e-4
    auto = T.lora_grad(p.head, p.lora, p.x, p.y, method="auto", degree=1, tol=1e-4)
    assert auto.method == "exact" and "degree=1" in auto.note

    fit = T.forward(p.head, p.lora, p.x, method="exact") + 1e-9  # residual far below the output error
    with pytest.warns(gpulora.AccuracyWarning, match="a-posteriori"):
        near = T.lora_grad(p.head, p.lora, p.x, fit, method="poly", tol=1e-3)
    assert near.error_estimate > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = T.lora_grad(p.head, p.lora, p.x, fit, method="auto", tol=1e-3)
    assert auto.method == "exact" and "reran exact" in auto.note

    b, a = p.lora.adapters["k1"]
    b = b.copy()
    lora = gpulora.LoRA({**p.lora.adapters, "k1": (b, a)}, alpha=p.lora.alpha)
    b[0, 0] = np.nan  # after LoRA was built, as a training loop would
    with pytest.raises(ValueError, match=r"adapters\['k1'\] B must contain only finite"):
        T.lora_grad(p.head, lora, p.x, p.y)

    big = make_problem(10, L=8, d_model=6, d_head=2, d_v=2, r=1, dtype=np.float32)
    head = T.TensorHead(*(big.head.weight(t) * np.float32(1e15 if t in ("q", "k1", "k2") else 1) for t in T.TARGETS))
    with pytest.raises(ValueError, match="overflow"):
        T.lora_grad(head, big.lora, big.x, big.y, method="auto")
