"""Every bad input gets a ValueError/TypeError naming the argument; inputs are never modified."""

import math

import numpy as np
import pytest

import gpulora
from gpulora.testing import make_problem


@pytest.fixture
def prob():
    return make_problem(0, L=9, d_model=6, d_head=4, d_v=3, r=2, targets="qkv", batch=2)


def _call(p, **kw):
    return gpulora.lora_grad(p.head, p.lora, p.x, p.y, **kw)


BAD_OPTIONS = [
    (dict(method="fast"), ValueError, "method"),
    (dict(method=None), ValueError, "method"),
    (dict(method="poly", degree=0), ValueError, "degree"),
    (dict(method="poly", degree=2.0), TypeError, "degree"),
    (dict(method="poly", degree=True), TypeError, "degree"),
    (dict(method="poly", degree=1000), ValueError, "degree"),
    (dict(method="poly", tol=0.0), ValueError, "tol"),
    (dict(method="poly", tol=1.5), ValueError, "tol"),
    (dict(method="poly", tol=math.nan), ValueError, "tol"),
    (dict(method="poly", tol="small"), TypeError, "tol"),
    (dict(method="exact", degree=3), ValueError, "degree"),
    (dict(method="poly", family="fourier"), ValueError, "family"),
    (dict(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("kw, exc, word", BAD_OPTIONS, ids=[str(c[0]) for c in BAD_OPTIONS])
def test_bad_options(prob, kw, exc, word):
    with pytest.raises(exc, match=word):
        _call(prob, **kw)


def _replace_x(p, x):
    return gpulora.lora_grad(p.head, p.lora, x, p.y)


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda p: p.x[..., :-1], ValueError, "x must have d_model"),
        (lambda p: p.x[0, 0], ValueError, "x must have"),
        (lambda p: p.x[None], ValueError, "x must have"),
        (lambda p: p.x.astype(np.int64), TypeError, "x must have dtype"),
        (lambda p: p.x.astype(bool), TypeError, "x must have dtype"),
        (lambda p: p.x.astype(np.complex128), TypeError, "x must have dtype"),
        (lambda p: p.x.tolist(), TypeError, "x must be a NumPy or CuPy array"),
        (lambda p: "tokens", TypeError, "x must be"),
        (lambda p: np.where(np.arange(p.x.size).reshape(p.x.shape) == 5, np.nan, p.x), ValueError, "x must contain only finite"),
        (lambda p: np.where(np.arange(p.x.size).reshape(p.x.shape) == 5, np.inf, p.x), ValueError, "x must contain only finite"),
        (lambda p: p.x[:, :0], ValueError, "at least one token"),
    ],
    ids=["d_model", "1d", "4d", "int", "bool", "complex", "list", "str", "nan", "inf", "empty"],
)
def test_bad_x(prob, make, exc, word):
    with pytest.raises(exc, match=word):
        _replace_x(prob, make(prob))


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda p: p.y[..., :-1], "y must have shape"),
        (lambda p: p.y[0], "y must have shape"),
        (lambda p: p.y[:, :-1], "y must have shape"),
        (lambda p: np.full_like(p.y, np.nan), "y must contain only finite"),
    ],
    ids=["d_v", "batch", "L", "nan"],
)
def test_bad_y(prob, make, word):
    with pytest.raises(ValueError, match=word):
        gpulora.lora_grad(prob.head, prob.lora, prob.x, make(prob))


def test_bad_head():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4))
    with pytest.raises(ValueError, match="w_k must have"):
        gpulora.Head(w, w[:, :3], w)
    with pytest.raises(ValueError, match="w_v must have d_model"):
        gpulora.Head(w, w, w[:5])
    with pytest.raises(ValueError, match="w_q must have 2 dimensions"):
        gpulora.Head(w[0], w, w)
    with pytest.raises(ValueError, match="beta must be > 0"):
        gpulora.Head(w, w, w, beta=-1.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        gpulora.Head(w, w, w, beta=math.inf)
    with pytest.raises(TypeError, match="beta must be a real number"):
        gpulora.Head(w, w, w, beta="0.5")
    with pytest.raises(ValueError, match="multiple of heads = 3"):
        gpulora.Head(w, w, w, heads=3)
    with pytest.raises(ValueError, match="heads must be"):
        gpulora.Head(w, w, w, heads=0)
    with pytest.raises(TypeError, match="w_q must have dtype"):
        gpulora.Head(w.astype(np.int32), w, w)
    with pytest.raises(ValueError, match="w_q must contain only finite"):
        gpulora.Head(np.full_like(w, np.inf), w, w)


def test_bad_lora(prob):
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((6, 2)), rng.standard_normal((2, 4))
    with pytest.raises(ValueError, match="at least one target"):
        gpulora.LoRA({}, alpha=1.0)
    with pytest.raises(ValueError, match="unknown targets"):
        gpulora.LoRA({"o": (b, a)}, alpha=1.0)
    with pytest.raises(TypeError, match="must be a dict"):
        gpulora.LoRA([("q", (b, a))], alpha=1.0)
    with pytest.raises(TypeError, match="must be a pair"):
        gpulora.LoRA({"q": b}, alpha=1.0)
    with pytest.raises(ValueError, match="share r"):
        gpulora.LoRA({"q": (b, a[:1])}, alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        gpulora.LoRA({"q": (b, a)}, alpha=math.nan)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        gpulora.LoRA({"q": (b, a)}, alpha=None)
    with pytest.raises(ValueError, match=r"adapters\['q'\] B must contain only finite"):
        gpulora.LoRA({"q": (np.full_like(b, np.nan), a)}, alpha=1.0)
    # shapes that only conflict with the head: d_model of B, d_out of A
    bad = gpulora.LoRA({"v": (rng.standard_normal((5, 2)), rng.standard_normal((2, 3)))}, alpha=1.0)
    with pytest.raises(ValueError, match=r"adapters\['v'\] must be B of shape \(6, r\)"):
        gpulora.lora_grad(prob.head, bad, prob.x, prob.y)
    bad = gpulora.LoRA({"q": (rng.standard_normal((6, 2)), rng.standard_normal((2, 3)))}, alpha=1.0)
    with pytest.raises(ValueError, match=r"A of shape \(r, 4\)"):
        gpulora.lora_grad(prob.head, bad, prob.x, prob.y)


def test_wrong_objects(prob):
    with pytest.raises(TypeError, match="head must be a gpulora.Head"):
        gpulora.lora_grad("head", prob.lora, prob.x, prob.y)
    with pytest.raises(TypeError, match="lora must be a gpulora.LoRA"):
        gpulora.lora_grad(prob.head, {"q": None}, prob.x, prob.y)


def test_mixed_numpy_cupy_is_a_type_error(prob):
    cupy = pytest.importorskip("cupy")
    if not gpulora.backend.has_cuda():
        pytest.skip("mixing needs a CuPy array, which needs a CUDA device")
    with pytest.raises(TypeError, match="same library"):
        gpulora.lora_grad(prob.head, prob.lora, cupy.asarray(prob.x), prob.y)


def test_poly_functions_validate():
    z = np.ones((3, 2))
    with pytest.raises(ValueError, match="degree"):
        gpulora.poly_features(z, 0)
    with pytest.raises(ValueError, match="family"):
        gpulora.poly_features(z, 2, family="legendre")
    with pytest.raises(ValueError, match="side"):
        gpulora.poly_features(z, 2, side="value")
    with pytest.raises(ValueError, match="bound"):
        gpulora.poly_features(z, 2, bound=-1.0)
    with pytest.raises(TypeError, match="z must have dtype"):
        gpulora.poly_features(z.astype(int), 2)
    with pytest.raises(ValueError, match="tol"):
        p = make_problem(0, L=5, d_model=4, d_head=2, r=1)
        gpulora.diagnose(p.head, p.lora, p.x, tol=2.0)


@pytest.mark.parametrize("method", ["exact", "poly", "auto"])
def test_inputs_are_never_modified(method):
    p = make_problem(1, L=17, d_model=6, d_head=3, d_v=4, r=2, targets="qkv", batch=2, score_bound=1.0)
    arrays = [p.x, p.y, p.head.w_q, p.head.w_k, p.head.w_v] + [a for pair in p.lora.adapters.values() for a in pair]
    before = [a.copy() for a in arrays]
    flags = [a.flags.writeable for a in arrays]
    for a in arrays:
        a.flags.writeable = False  # any write raises
    try:
        gpulora.lora_grad(p.head, p.lora, p.x, p.y, method=method)
        gpulora.forward(p.head, p.lora, p.x, method=method)
        gpulora.loss(p.head, p.lora, p.x, p.y, method=method)
        gpulora.diagnose(p.head, p.lora, p.x)
    finally:
        for a, f in zip(arrays, flags):
            a.flags.writeable = f
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
