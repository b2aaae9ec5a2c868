"""Portability without a GPU: every public entry point runs on ``array_api_strict`` arrays, the array API
standard's minimum, and gives NumPy's results in the caller's namespace.

``array_api_strict`` rejects the NumPy-only idioms that break on CuPy (implicit trailing axes, mixed
integer/slice indexing, ``np.dtype`` of a foreign dtype, NumPy functions on device arrays), so a pass here
is the CPU-side evidence that the CuPy path's array code is portable. The same arrays also serve as the
test double that counts the host reads (synchronisations on CuPy) of one call: every read of array data
goes through an ``Array`` dunder (``__bool__``, ``__float__``, ``__dlpack__``, ...) or a
:mod:`gpulora.backend` host read, and both are counted.
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest

import gpulora
from gpulora import backend
from gpulora.testing import make_problem, rel_error

xs = pytest.importorskip("array_api_strict", reason="install the test extra: array-api-strict")
_ARRAY = type(xs.asarray(0.0))

CASES = [
    dict(method="exact"),
    dict(method="exact", causal=True),
    dict(method="poly", degree=3),
    dict(method="poly", degree=3, causal=True),
    dict(method="auto"),
]
IDS = ["exact", "exact-causal", "poly", "poly-causal", "auto"]


def _pair(dtype, seed=1, **kw):
    """The same problem as NumPy and as array_api_strict arrays."""
    args = dict(L=37, d_model=8, d_head=4, d_v=3, r=2, targets="qkv", batch=2, heads=2, dtype=dtype,
                score_bound=1.0, **kw)
    return make_problem(seed, **args), make_problem(seed, xp=xs, **args)


@pytest.mark.parametrize("softmax_one", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_strict_arrays_give_numpy_results_in_their_namespace(kw, dtype, softmax_one):
    ref, p = _pair(dtype, softmax_one=softmax_one)
    want = gpulora.lora_grad(ref.head, ref.lora, ref.x, ref.y, **kw)
    got = gpulora.lora_grad(p.head, p.lora, p.x, p.y, **kw)
    assert got.method == want.method and got.degree == want.degree and got.bound == want.bound
    assert backend.namespace(got.loss) is xs and got.loss.shape == () and got.loss.dtype == p.x.dtype
    # same operations on the same numbers: agreement to a few roundings of the dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_error(got.loss, want.loss) < tol
    for t in "qkv":
        for which in "BA":
            g = getattr(got.grads[t], which)
            assert backend.namespace(g) is xs and g.dtype == p.x.dtype
            assert rel_error(g, getattr(want.grads[t], which)) < tol, (t, which)
    out = gpulora.forward(p.head, p.lora, p.x, **kw)
    assert backend.namespace(out) is xs and out.shape == tuple(ref.y.shape)
    assert rel_error(out, gpulora.forward(ref.head, ref.lora, ref.x, **kw)) < tol
    lo = gpulora.loss(p.head, p.lora, p.x, p.y, **kw)
    assert backend.namespace(lo) is xs and rel_error(lo, want.loss) < tol


@pytest.mark.parametrize("targets", ["v", "qv", "k"])
def test_strict_arrays_with_partial_targets(targets):
    args = dict(L=21, d_model=6, d_head=3, r=2, targets=targets, score_bound=1.0)
    ref, p = make_problem(2, **args), make_problem(2, xp=xs, **args)
    for causal in (False, True):
        want = gpulora.lora_grad(ref.head, ref.lora, ref.x, ref.y, method="poly", degree=4, causal=causal)
        got = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", degree=4, causal=causal)
        assert set(got.grads) == set(targets)
        for t in targets:
            assert rel_error(got.grads[t].B, want.grads[t].B) < 1e-12


def test_strict_poly_features_and_diagnose():
    rng = np.random.default_rng(3)
    z = 0.4 * rng.standard_normal((2, 9, 3))
    for side in ("query", "key"):
        got = gpulora.poly_features(xs.asarray(z), 3, family="chebyshev", bound=1.0, side=side)
        assert backend.namespace(got) is xs
        assert rel_error(got, gpulora.poly_features(z, 3, family="chebyshev", bound=1.0, side=side)) < 1e-14
    ref, p = _pair(np.float64)
    a, b = gpulora.diagnose(ref.head, ref.lora, ref.x), gpulora.diagnose(p.head, p.lora, p.x)
    assert (a.bound, a.max_score, a.degree, a.recommended) == (b.bound, b.max_score, b.degree, b.recommended)


def test_foreign_or_mixed_arrays_are_rejected_by_name():
    ref, p = _pair(np.float64)
    with pytest.raises(TypeError, match="x must be a NumPy or CuPy array"):
        gpulora.lora_grad(p.head, p.lora, ref.x.tolist(), p.y)
    with pytest.raises(TypeError, match="same library"):
        gpulora.lora_grad(p.head, p.lora, ref.x, p.y)  # NumPy x, array_api_strict weights and y
    with pytest.raises(TypeError, match="x must have dtype .*float32 or float64"):
        gpulora.lora_grad(p.head, p.lora, xs.astype(p.x, xs.int64), p.y)
    bad = xs.where(xs.arange(p.x.shape[-1]) == 2, xs.nan, p.x)
    with pytest.raises(ValueError, match="x must contain only finite"):
        gpulora.lora_grad(p.head, p.lora, bad, p.y)


def test_strict_layer_options_and_mixed_options_rejected():
    """lengths, key_mask, position_ids and rotary tables as array_api_strict arrays give the NumPy result;
    an option array from another library than x is refused by name, whichever library each comes from."""
    ref, p = _pair(np.float64)
    L = ref.x.shape[-2]

    def padded_rotary(ns, prob):
        return gpulora.lora_grad(prob.head, prob.lora, prob.x, prob.y, method="exact", lengths=ns.asarray([L, 20]),
                                 rope_theta=100.0, position_ids=ns.asarray(np.arange(L)))

    want, got = padded_rotary(np, ref), padded_rotary(xs, p)
    for t in "qkv":
        assert rel_error(got.grads[t].B, want.grads[t].B) < 1e-12
    mask = xs.asarray(np.arange(L)[None, :] < np.array([[L], [20]]))
    masked = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact", key_mask=mask, rope_theta=100.0)
    assert rel_error(masked.grads["q"].A, got.grads["q"].A) < 1e-12
    for opts in (dict(lengths=np.array([L, 20])), dict(key_mask=np.ones((2, L), bool)),
                 dict(rope_theta=100.0, position_ids=np.arange(L)),
                 dict(rope_cos=np.ones((L, 4)), rope_sin=np.zeros((L, 4)))):
        with pytest.raises(TypeError, match="same library"):
            gpulora.lora_grad(p.head, p.lora, p.x, p.y, **opts)
    with pytest.raises(TypeError, match="same library"):
        gpulora.lora_grad(ref.head, ref.lora, ref.x, ref.y, key_mask=xs.ones((2, L), dtype=xs.bool))


def test_backend_dtype_round_trip():
    for name in ("float32", "float64"):
        a = xs.zeros(2, dtype=getattr(xs, name))
        assert backend.host_dtype(a) == np.dtype(name)
        assert backend.namespace_dtype(xs, np.dtype(name)) == getattr(xs, name)
        assert backend.host_dtype(np.zeros(2, dtype=name)) == np.dtype(name)
    assert backend.to_numpy(xs.asarray([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert backend.to_float(xs.asarray(2.5)) == 2.5
    with pytest.raises(TypeError, match="array API"):
        backend.namespace(1.0)


# ---------------------------------------------------------------------------------------------- host reads

_DUNDERS = ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__dlpack__", "__array__")
_BACKEND_READS = ("to_numpy", "to_float", "synchronize")


@contextlib.contextmanager
def _count_host_reads(monkeypatch):
    """Count the host reads of array data: array_api_strict's conversion dunders and gpulora.backend's host
    reads (a read inside another counted read, e.g. ``to_float`` calling ``to_numpy``, counts once)."""
    counts = collections.Counter()
    depth = [0]

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            if not depth[0]:
                counts[name] += 1
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for name in _DUNDERS:
        if hasattr(_ARRAY, name):
            monkeypatch.setattr(_ARRAY, name, counting(name, getattr(_ARRAY, name)))
    for name in _BACKEND_READS:
        monkeypatch.setattr(backend, name, counting(name, getattr(backend, name)))
    yield counts


# One lora_grad call, as counted: the reads gpulora.grad's docstring lists (finiteness of x and y, of the
# weights and adapters, of the results; the score bound M; for poly the extreme-pair and normaliser checks
# and the error estimate). On CuPy each is a synchronisation. A change here must be deliberate.
PINNED_READS = {
    "exact": {"__bool__": 4, "to_float": 1},
    "poly": {"__bool__": 4, "to_float": 4, "to_numpy": 2},
}


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_host_reads_of_one_call_are_pinned(monkeypatch, kw):
    """The number of host reads (CuPy synchronisations) of one call is fixed and independent of L."""
    seen = []
    for L in (17, 80):
        p = make_problem(4, L=L, d_model=8, d_head=4, r=2, targets="qkv", batch=2, heads=2, xp=xs,
                         score_bound=1.0)
        with _count_host_reads(monkeypatch) as counts:
            res = gpulora.lora_grad(p.head, p.lora, p.x, p.y, **kw)
        monkeypatch.undo()
        seen.append(dict(counts))
    assert res.method == kw["method"] or kw["method"] == "auto", res.note
    assert seen[0] == seen[1] == PINNED_READS[res.method], seen


def test_host_read_counter_sees_implicit_reads(monkeypatch):
    """The double is not blind: a Python-level read of an array (``float(a)``) is counted."""
    a = xs.asarray(1.5)
    with _count_host_reads(monkeypatch) as counts:
        float(a)
        bool(a > 0)
        backend.to_float(a)
    assert dict(counts) == {"__float__": 1, "__bool__": 1, "to_float": 1}
