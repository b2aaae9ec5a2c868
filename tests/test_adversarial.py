"""Adversarial classes: what a hostile or careless caller can hand gpulora, and what it must get back.

Each class is one kind of attack (shapes, dtypes and ndarray subclasses, scalars, non-finite values that
appear after construction, overflow, extreme bounds, feature budgets, fixed degrees, near-perfect fits,
torch tensor kinds). Every refusal is checked for its exact exception type and for naming the argument;
every answer is either right (checked against exact or a float64 reference) or carries its error. Hostile
``.npz`` files for the command line are tested with the loader (tests/test_cli.py).
"""

import contextlib
import dataclasses
import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpulora
from gpulora.cli import main as cli_main
from gpulora.io import save_problem
from gpulora.poly.budget import FeatureBudgetError
from gpulora.poly.coefficients import choose, measure
from gpulora.testing import make_problem, rel_error

FEW = settings(max_examples=25, deadline=None)
METHODS = ("exact", "auto", "poly")


@contextlib.contextmanager
def refused(exc, *words):
    """Expect exactly ``exc`` (not a subclass) whose message contains every one of ``words``."""
    with pytest.raises(exc) as info:
        yield info
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _small(**kw):
    args = dict(L=12, d_model=6, d_head=4, d_v=3, r=2, targets="qkv")
    args.update(kw)
    return make_problem(0, **args)


def _all_entry_points(p, **kw):
    """Call every public entry point on problem ``p`` (each must raise the same way)."""
    yield lambda: gpulora.lora_grad(p.head, p.lora, p.x, p.y, **kw)
    yield lambda: gpulora.loss(p.head, p.lora, p.x, p.y, **kw)
    yield lambda: gpulora.forward(p.head, p.lora, p.x, **kw)


class TestShapes:
    def test_d_model_zero_is_refused_at_construction(self):
        w = np.zeros((0, 4))
        with refused(ValueError, "w_q", "d_model"):
            gpulora.Head(w, w, w)

    def test_y_none_names_y(self):
        p = _small()
        with refused(TypeError, "y must be"):
            gpulora.lora_grad(p.head, p.lora, p.x, None)
        with refused(TypeError, "y must be"):
            gpulora.loss(p.head, p.lora, p.x, None)

    def test_poly_features_without_coordinates_names_z(self):
        with refused(ValueError, "z must have at least one coordinate"):
            gpulora.poly_features(np.zeros((5, 0)), 2)

    @FEW
    @given(cut=st.sampled_from(["x_cols", "y_cols", "y_rows", "y_batch", "x_rank"]))
    def test_shape_mismatches_name_the_argument(self, cut):
        p = _small(batch=2)
        x, y = p.x, p.y
        name = cut.split("_")[0]
        if cut == "x_cols":
            x = x[..., :-1]
        elif cut == "y_cols":
            y = y[..., :-1]
        elif cut == "y_rows":
            y = y[:, :-1]
        elif cut == "y_batch":
            y = y[0]
        else:
            x = x[None]
        with refused(ValueError, f"{name} must have"):
            gpulora.lora_grad(p.head, p.lora, x, y)


class TestSubclasses:
    @pytest.mark.parametrize("which", ["x", "y", "w_q", "adapters['v'] A"])
    def test_matrix_is_refused(self, which):
        p = _small()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            if which == "x":
                with refused(TypeError, "x must be a plain NumPy array", "matrix"):
                    gpulora.lora_grad(p.head, p.lora, np.asmatrix(p.x), p.y)
            elif which == "y":
                with refused(TypeError, "y must be a plain NumPy array"):
                    gpulora.lora_grad(p.head, p.lora, p.x, np.asmatrix(p.y))
            elif which == "w_q":
                with refused(TypeError, "w_q must be a plain NumPy array"):
                    gpulora.Head(np.asmatrix(p.head.w_q), p.head.w_k, p.head.w_v)
            else:
                b, a = p.lora.adapters["v"]
                with refused(TypeError, "adapters['v'] A must be a plain NumPy array"):
                    gpulora.LoRA({"v": (b, np.asmatrix(a))}, alpha=1.0)

    def test_masked_array_is_refused_even_with_nan_under_the_mask(self):
        p = _small()
        x = np.ma.masked_invalid(np.where(np.arange(p.x.size).reshape(p.x.shape) == 3, np.nan, p.x))
        with refused(TypeError, "x must be a plain NumPy array", "masked"):
            gpulora.lora_grad(p.head, p.lora, x, p.y)

    def test_memmap_is_a_plain_array(self, tmp_path):
        p = _small()
        mm = np.memmap(tmp_path / "x.bin", dtype=p.x.dtype, mode="w+", shape=p.x.shape)
        mm[:] = p.x
        a = gpulora.lora_grad(p.head, p.lora, mm, p.y, method="exact")
        b = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        assert float(a.loss) == float(b.loss)


class TestScalars:
    KINDS = [int, np.int32, np.int64, lambda v: np.array(v)]

    @FEW
    @given(kind=st.sampled_from(KINDS), causal=st.sampled_from([True, False, np.True_, np.False_, np.array(True)]))
    def test_numpy_scalars_are_accepted(self, kind, causal):
        p = _small()
        head = gpulora.Head(p.head.w_q, p.head.w_k, p.head.w_v, heads=kind(1), beta=np.array(0.5),
                            softmax_one=np.False_)
        lora = gpulora.LoRA(p.lora.adapters, alpha=np.float32(2.0))
        res = gpulora.lora_grad(head, lora, p.x, p.y, method="poly", degree=kind(12), tol=np.float64(1e-3),
                                causal=causal)
        ref = gpulora.lora_grad(gpulora.Head(p.head.w_q, p.head.w_k, p.head.w_v, beta=0.5),
                                gpulora.LoRA(p.lora.adapters, alpha=2.0), p.x, p.y, method="poly", degree=12,
                                tol=1e-3, causal=bool(causal))
        assert float(res.loss) == float(ref.loss)

    @pytest.mark.parametrize("value, exc, words", [
        (np.float64(1.0), TypeError, ("heads must be an int",)),
        (np.int64(0), ValueError, ("heads must be an int >= 1", "got 0")),
        ("2", TypeError, ("heads must be an int",)),
    ])
    def test_bad_heads_messages_agree_with_the_value(self, value, exc, words):
        w = np.ones((4, 2))
        with refused(exc, *words):
            gpulora.Head(w, w, w, heads=value)

    @pytest.mark.parametrize("fn", ["lora_grad", "diagnose"])
    def test_causal_must_be_a_bool(self, fn):
        p = _small()
        with refused(TypeError, "causal must be a bool"):
            if fn == "diagnose":
                gpulora.diagnose(p.head, p.lora, p.x, causal="no")
            else:
                gpulora.lora_grad(p.head, p.lora, p.x, p.y, causal="no")


class TestNonFiniteAtCallTime:
    """Weights and adapters updated in place after construction are re-checked at every call."""

    @FEW
    @given(which=st.sampled_from(["x", "y", "w_q", "w_k", "w_v", "adapters['q'] B", "adapters['k'] A",
                                  "adapters['v'] B", "adapters['v'] A"]),
           value=st.sampled_from([np.nan, np.inf, -np.inf]),
           index=st.integers(0, 1 << 16),
           method=st.sampled_from(METHODS))
    def test_every_array_every_entry_point(self, which, value, index, method):
        p = _small(score_bound=0.5)
        arrays = {**p.head.arrays(), **p.lora.arrays(), "x": p.x, "y": p.y}
        a = arrays[which]
        a.reshape(-1)[index % a.size] = value  # in place, as an optimiser step would
        calls = list(_all_entry_points(p, method=method))
        for call in calls[:2] if which == "y" else calls:  # forward takes no y
            with refused(ValueError, which, "finite") as info:
                call()
            assert "M = nan" not in str(info.value)
        if which != "y":
            with refused(ValueError, which, "finite"):
                gpulora.diagnose(p.head, p.lora, p.x)


class TestOverflow:
    """Finite inputs whose scores overflow the dtype: a ValueError, never NaN or inf."""

    @pytest.mark.parametrize("dtype, scale", [(np.float32, 7e19), (np.float64, 5e154)])
    @pytest.mark.parametrize("method", ["exact", "auto"])
    def test_scores_past_the_dtype(self, dtype, scale, method):
        p = _small(dtype=dtype)
        x = p.x * dtype(scale)
        assert np.all(np.isfinite(x))
        for call in _all_entry_points(gpulora.testing.Problem(p.head, p.lora, x, p.y), method=method):
            with no_warnings(), refused(ValueError, "overflowed", "scale x"):
                call()

    def test_poly_names_the_overflow_not_the_phase_transition(self):
        p = _small(dtype=np.float32)
        with refused(ValueError, "overflows float32"):
            gpulora.lora_grad(p.head, p.lora, p.x * np.float32(7e19), p.y, method="poly")

    def test_huge_but_representable_results_are_computed(self):
        p = _small()
        with no_warnings():
            res = gpulora.lora_grad(p.head, p.lora, p.x * 1e60, p.y, method="auto")  # scores ~1e120: hard softmax
        assert res.method == "exact" and np.isfinite(float(res.loss))
        assert all(np.all(np.isfinite(g.B)) and np.all(np.isfinite(g.A)) for g in res.grads.values())

    def test_gradients_past_the_dtype(self):
        """Small scores (q, k weights scaled down with x scaled up), values ~1e155: dW_v = x^T dV ~1e310 is
        past float64 while every input and score is finite."""
        p = _small()
        tiny = 1e-160
        head = dataclasses.replace(p.head, w_q=p.head.w_q * tiny, w_k=p.head.w_k * tiny)
        lora = gpulora.LoRA({t: (b, a * tiny if t in "qk" else a) for t, (b, a) in p.lora.adapters.items()},
                            alpha=p.lora.alpha)
        with no_warnings(), refused(ValueError, "overflowed float64"):
            gpulora.lora_grad(head, lora, p.x * 1e155, p.y, method="auto")

    def test_one_hot_rows_have_exactly_zero_score_gradients(self):
        """Scores ~1e200: every row's softmax is one key in float64, so dS = F * (dP - r) is exactly 0 and the
        q/k adapter gradients are 0; r from the same products as dP keeps them so (r = g . o once left rounding
        residues of 1e184 there, which overflowed the adapter gradients)."""
        p = _small()
        with no_warnings():
            res = gpulora.lora_grad(p.head, p.lora, p.x * 1e100, p.y, method="auto")
        assert res.method == "exact"
        assert not np.any(res.grads["q"].B) and not np.any(res.grads["k"].A)
        assert np.all(np.isfinite(res.grads["v"].B)) and np.any(res.grads["v"].B)


class TestExtremeBounds:
    @pytest.mark.parametrize("bound", [1e8, 1e30, 1e300, 800.0, 40.0])
    def test_choose_refuses_at_once_without_warnings(self, bound):
        t0 = time.perf_counter()
        with no_warnings():
            with refused(ValueError, "method='exact'"):
                choose(bound, tol=1e-3)
            with refused(ValueError, "method='exact'"):
                choose(bound, degree=5)
        assert time.perf_counter() - t0 < 0.5

    @FEW
    @given(log_bound=st.floats(-3, 300), log_tol=st.floats(-12, -0.01), degree=st.none() | st.integers(1, 40))
    def test_choose_either_meets_tol_or_refuses(self, log_bound, log_tol, degree):
        bound, tol = 10.0**log_bound, 10.0**log_tol
        with no_warnings():
            try:
                choice, dtype = choose(bound, tol=tol, degree=degree)
            except ValueError as err:
                assert "method='exact'" in str(err) or "shifted_taylor" in str(err)
                return
        assert choice.positive
        # a fixed degree keeps its rounding within max(tol, its approximation error); a chosen one meets tol
        budget = tol if degree is None else choice.approx_error + max(tol, choice.approx_error)
        assert choice.total_error(dtype) <= budget

    @pytest.mark.parametrize("bound", [1e9, 1e30, 800.0])
    def test_direct_measurement_is_warning_free(self, bound):
        with no_warnings():
            for family in ("taylor", "shifted_taylor", "chebyshev"):
                c = measure(family, 40, bound)
                assert not c.approx_error < 1

    def test_beta_1e30_auto_falls_back_poly_and_diagnose_refuse_cleanly(self):
        p = _small()
        head = gpulora.Head(p.head.w_q, p.head.w_k, p.head.w_v, beta=1e30)
        with no_warnings():
            res = gpulora.lora_grad(head, p.lora, p.x, p.y, method="auto")
            assert res.method == "exact" and "auto:" in res.note and np.isfinite(float(res.loss))
            with refused(ValueError, "M = "):
                gpulora.lora_grad(head, p.lora, p.x, p.y, method="poly")
            d = gpulora.diagnose(head, p.lora, p.x)
            assert d.recommended == "exact" and d.degree is None

    def test_auto_at_M_800_is_warning_free(self):
        p = _small(score_bound=800.0)
        with no_warnings():
            res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto")
        assert res.method == "exact"

    def test_cli_demo_and_diagnose_at_huge_bounds(self, tmp_path, capsys):
        assert cli_main(["demo", "--bound", "1e9", "--L", "64", "--d-model", "8", "--backend", "numpy"]) == 0
        assert "poly did not run" in capsys.readouterr().out
        p = _small()
        path = tmp_path / "p.npz"
        save_problem(path, gpulora.Head(p.head.w_q, p.head.w_k, p.head.w_v, beta=1e30), p.lora, p.x)
        assert cli_main(["diagnose", str(path), "--backend", "numpy"]) == 0
        assert "recommended" in capsys.readouterr().out


class TestFeatureBudget:
    def _pretrained_like(self):
        # the shape of a MiniLM head: d_head 32, bound 7.5, L 256 (the case that used to run for minutes)
        return make_problem(0, L=256, d_model=48, d_head=32, r=4, score_bound=7.5, targets="qv")

    def test_poly_refuses_in_milliseconds_and_says_why(self):
        p = self._pretrained_like()
        t0 = time.perf_counter()
        with refused(FeatureBudgetError, "features", "memory", "method='exact'"):
            gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly")
        assert time.perf_counter() - t0 < 1.0

    def test_auto_falls_back_with_the_reason(self):
        p = self._pretrained_like()
        res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto")
        assert res.method == "exact" and "feature budget" in res.note

    def test_poly_features_refuses_before_building_a_table(self):
        t0 = time.perf_counter()
        with refused(FeatureBudgetError, "poly_features of z", "features", "memory"):
            gpulora.poly_features(np.ones((4, 16)), 30)
        assert time.perf_counter() - t0 < 0.5

    def test_memory_budget(self, monkeypatch):
        import gpulora.poly.budget as budget

        monkeypatch.setattr(budget, "MAX_BYTES", 1 << 10)
        p = _small(score_bound=0.5)
        with refused(FeatureBudgetError, "KiB", "GPULORA_MAX_POLY_BYTES"):
            gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly")
        res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto")
        assert res.method == "exact" and "feature budget" in res.note
        d = gpulora.diagnose(p.head, p.lora, p.x)
        assert d.recommended == "exact" and any("features" in n for n in d.notes)


class TestFixedDegree:
    """A fixed degree carries its error bound; past tol it warns (poly) or is not run (auto)."""

    @pytest.mark.parametrize("degree", [1, 2, 3])
    def test_low_degree_at_M_2_warns_and_reports_its_bound(self, degree):
        p = _small(score_bound=2.0, L=64)
        ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        with pytest.warns(gpulora.AccuracyWarning, match=f"degree={degree}"):
            res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=degree, tol=1e-6,
                                    family="shifted_taylor")
        assert res.error_bound > 1e-6
        err = max(rel_error(res.grads[t].B, ref.grads[t].B) for t in "qkv")
        assert err > 1e-6  # the warning is not a false alarm

    def test_warning_can_be_made_an_error(self):
        p = _small(score_bound=2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", gpulora.AccuracyWarning)
            with refused(gpulora.AccuracyWarning, "tol="):
                gpulora.forward(p.head, p.lora, p.x, method="poly", degree=2, family="shifted_taylor")

    def test_auto_never_runs_such_a_degree(self):
        p = _small(score_bound=2.0)
        with no_warnings():
            res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto", degree=2, tol=1e-6)
        assert res.method == "exact" and "degree=2" in res.note

    @pytest.mark.parametrize("M, tol", [(0.5, 1e-3), (2.0, 1e-6)])
    def test_tol_driven_bound_meets_tol(self, M, tol):
        p = _small(score_bound=M)
        with no_warnings():
            res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", tol=tol)
        assert 0 < res.error_bound <= tol and res.error_estimate >= res.error_bound
        ex = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
        assert ex.error_bound == 0 and ex.error_estimate == 0


class TestNearPerfectFit:
    """The poly error of O~ is absolute (about tol |V|): relative to a small residual it grows without bound."""

    @pytest.mark.parametrize("M, tol, causal, softmax_one", [(1.0, 1e-3, False, False), (0.5, 1e-2, False, False),
                                                             (2.0, 1e-4, True, False), (1.0, 1e-3, False, True)])
    def test_estimate_upper_bounds_the_measured_error(self, M, tol, causal, softmax_one):
        p = make_problem(0, L=256, d_model=16, d_head=4, score_bound=M, targets="qkv", softmax_one=softmax_one)
        o = gpulora.forward(p.head, p.lora, p.x, method="exact", causal=causal)
        rng = np.random.default_rng(1)
        for noise in (1.0, 1e-2, 1e-4, 1e-6):
            y = o + noise * rng.standard_normal(o.shape)
            ex = gpulora.lora_grad(p.head, p.lora, p.x, y, method="exact", causal=causal)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gpulora.AccuracyWarning)
                po = gpulora.lora_grad(p.head, p.lora, p.x, y, method="poly", tol=tol, causal=causal)
            err = max(max(rel_error(po.grads[t].B, ex.grads[t].B), rel_error(po.grads[t].A, ex.grads[t].A))
                      for t in "qkv")
            # measured on these problems: the estimate is 3..40 times the error where it is finite
            assert err <= po.error_estimate, (noise, err, po.error_estimate)
            assert po.error_estimate == math.inf or po.error_estimate <= 100 * err, (noise, err, po.error_estimate)

    def test_poly_warns_and_auto_reruns_exact(self):
        # long enough for auto to prefer poly on cost (tests/test_auto_diagnose.py)
        p = make_problem(0, L=1024, d_model=16, d_head=2, d_v=2, r=2, targets="qv", score_bound=0.5)
        o = gpulora.forward(p.head, p.lora, p.x, method="exact")
        y = o + 1e-6 * np.random.default_rng(1).standard_normal(o.shape)
        with pytest.warns(gpulora.AccuracyWarning, match="a-posteriori"):
            po = gpulora.lora_grad(p.head, p.lora, p.x, y, method="poly", tol=1e-3)
        assert po.error_estimate > 10 * 1e-3
        with no_warnings():
            au = gpulora.lora_grad(p.head, p.lora, p.x, y, method="auto", tol=1e-3)
            far = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto", tol=1e-3)
        assert au.method == "exact" and "a-posteriori" in au.note and "reran exact" in au.note
        assert far.method == "poly" and far.error_estimate <= 10 * 1e-3
        ex = gpulora.lora_grad(p.head, p.lora, p.x, y, method="exact")
        assert all(rel_error(au.grads[t].B, ex.grads[t].B) == 0 for t in "qv")
        with pytest.warns(gpulora.AccuracyWarning):
            gpulora.loss(p.head, p.lora, p.x, y, method="poly", tol=1e-3)


class TestTorchTensorKinds:
    @pytest.fixture(autouse=True)
    def _torch(self):
        self.torch = pytest.importorskip("torch")
        self.gt = pytest.importorskip("gpulora.torch")

    def _tensors(self):
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        w = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        b, a = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
        x = torch.randn(10, 6, generator=g, dtype=torch.float64)
        y = torch.randn(10, 4, generator=g, dtype=torch.float64)
        return w, {"q": (b, a)}, x, y

    def test_negative_bit_is_kept(self):
        torch = self.torch
        w, ad, x, y = self._tensors()
        neg = torch._neg_view(x)
        assert neg.is_neg()
        got = self.gt.lora_grad(*w, ad, neg, y, alpha=2.0, method="exact")
        want = self.gt.lora_grad(*w, ad, (-x).clone(), y, alpha=2.0, method="exact")
        assert torch.equal(got.grads["q"].B, want.grads["q"].B) and float(got.loss) == float(want.loss)

    @pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta", "complex", "quantized", "int"])
    def test_unsupported_kinds_name_the_argument(self, kind):
        torch = self.torch
        w, ad, x, y = self._tensors()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # beta/deprecation notices of torch itself
            bad = {"sparse_coo": lambda: x.to_sparse(), "sparse_csr": lambda: x.to_sparse_csr(),
                   "meta": lambda: torch.empty(x.shape, dtype=x.dtype, device="meta"),
                   "complex": lambda: x.to(torch.complex128),
                   "quantized": lambda: torch.quantize_per_tensor(x.float(), 0.1, 0, torch.qint8),
                   "int": lambda: x.to(torch.int64)}[kind]()
            with refused(TypeError, "x must"):
                self.gt.lora_grad(*w, ad, bad, y, alpha=2.0, method="exact")


def test_every_row_padding_gets_an_honest_estimate():
    """All keys padded: output and gradients are exactly 0, nothing is approximated (E = 0), so the
    estimate is the polynomial's bound: no AccuracyWarning under poly, no exact rerun under auto."""
    import warnings

    rng = np.random.default_rng(3)
    L, dm, d = 8, 4, 4
    head = gpulora.Head(*(rng.standard_normal((dm, d)) for _ in range(3)))
    lora = gpulora.LoRA({t: (rng.standard_normal((dm, 2)), rng.standard_normal((2, d))) for t in "qv"}, alpha=2.0)
    x, y = rng.standard_normal((2, L, dm)), rng.standard_normal((2, L, d))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpulora.AccuracyWarning)
        res = gpulora.lora_grad(head, lora, x, y, method="poly", lengths=np.array([0, 0]))
        auto = gpulora.lora_grad(head, lora, x, y, method="auto", lengths=np.array([0, 0]))
    assert res.error_estimate == res.error_bound and auto.method == "poly"
    assert float(res.loss) == 0.0 and all(not np.any(g.B) and not np.any(g.A) for g in res.grads.values())
