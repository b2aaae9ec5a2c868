"""gpulora.distributed on a real two-process Dask cluster: every mode equals the single-process gradient.

One ``distributed.LocalCluster`` (2 worker processes x 1 thread, NaN-poisoned allocations) is started by
this module and shut down at its end. Every mode is compared with :func:`gpulora.lora_grad` on the whole
input in float64: the only difference is the order of the sums over shards, so ``1e-12`` relative (the
measured differences are ~1e-15) with the same method, polynomial and compute dtype chosen.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest

import gpulora
from gpulora.testing import make_problem, rel_error

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
gd = pytest.importorskip("gpulora.distributed")
from gpulora.distributed.parts import Part, check_cover, combine  # noqa: E402
from gpulora.poly.causal import chunk_size  # noqa: E402

RTOL = 1e-12


@pytest.fixture(scope="module")
def client():
    old = os.environ.get("GPULORA_POISON")
    os.environ["GPULORA_POISON"] = "1"  # the worker processes inherit it: NaN-filled backend.empty there too
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()
        if old is None:
            os.environ.pop("GPULORA_POISON")
        else:
            os.environ["GPULORA_POISON"] = old


def _assert_same(res, ref):
    assert res.method == ref.method and res.degree == ref.degree and res.family == ref.family
    # the bound is a max of row norms: equal up to the summation order of |q_i|^2 over d_head
    assert res.bound == pytest.approx(ref.bound, rel=1e-15)
    assert res.error_bound == pytest.approx(ref.error_bound, rel=RTOL)
    assert res.error_estimate == pytest.approx(ref.error_estimate, rel=RTOL)
    assert (res.loss is None) == (ref.loss is None)
    if ref.loss is not None:
        assert rel_error(np.asarray(res.loss), np.asarray(ref.loss)) < RTOL
    assert set(res.grads) == set(ref.grads)
    for t, g in ref.grads.items():
        assert res.grads[t].B.shape == g.B.shape and res.grads[t].A.shape == g.A.shape
        assert rel_error(res.grads[t].B, g.B) < RTOL, t
        assert rel_error(res.grads[t].A, g.A) < RTOL, t


PROBLEM = dict(L=45, d_model=12, d_head=4, d_v=3, r=2, targets="qkv", batch=3, heads=2, score_bound=1.0)
# (mode, chunks, heads_per_task): batch blocks, head groups, unequal token shards
LAYOUTS = [
    ("batch", (1, None), None),
    ("batch", ((2, 1), None), 1),
    ("batch", (None, None), 1),
    ("tokens", (None, 20), None),  # 20, 20, 5: unequal, and boundaries inside the causal chunks of 16
    ("tokens", ((1, 2), (7, 38)), None),
]
IDS = ["{}-{}-h{}".format(*c).replace(" ", "") for c in LAYOUTS]


@pytest.mark.parametrize("method", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_mode_equals_single_process(client, layout, causal, method):
    mode, chunks, hpt = layout
    p = make_problem(3, **PROBLEM)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method=method, causal=causal)
    res = gd.lora_grad(p.head, p.lora, p.x, p.y, client=client, method=method, causal=causal, chunks=chunks,
                       heads_per_task=hpt)
    assert res.note.startswith(f"distributed {mode}")
    _assert_same(res, ref)
    if mode == "tokens" and method == "poly" and causal:
        c = chunk_size(PROBLEM["L"], res.features, PROBLEM["d_head"], PROBLEM["d_v"])
        sizes = chunks[1] if isinstance(chunks[1], tuple) else (chunks[1],) * (PROBLEM["L"] // chunks[1])
        assert any(o % c for o in np.cumsum(sizes)[:-1]), "no shard boundary splits a causal chunk"


@pytest.mark.parametrize("method", ["exact", "poly"])
@pytest.mark.parametrize("targets", ["q", "v", "k"])
def test_single_targets_and_unbatched_x(client, targets, method):
    """2-D ``x`` split over tokens, one adapted target (only its gradients computed and reduced)."""
    p = make_problem(5, L=40, d_model=8, d_head=4, r=3, targets=targets, score_bound=0.5)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method=method, causal=True)
    res = gd.lora_grad(p.head, p.lora, p.x, p.y, client=client, method=method, causal=True, chunks=((9, 31),))
    _assert_same(res, ref)


@pytest.mark.parametrize("method", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_one_token_sharded(client, causal, method):
    p = make_problem(4, L=37, d_model=8, d_head=4, d_v=2, r=2, targets="qkv", batch=2, score_bound=1.0,
                     softmax_one=True)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method=method, causal=causal)
    res = gd.lora_grad(p.head, p.lora, p.x, p.y, client=client, method=method, causal=causal,
                       chunks=(1, (10, 5, 22)))
    _assert_same(res, ref)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_token_sharded_poly(client, causal):
    """float32 in, float32 out, the same compute dtype as one process; sums over shards in another order
    differ by float32 rounding (``4 sqrt(eps)``, as the suite's same-algorithm rule)."""
    p = make_problem(6, L=64, d_model=8, d_head=4, r=2, targets="qkv", batch=2, score_bound=1.0,
                     dtype=np.float32)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", causal=causal)
    res = gd.lora_grad(p.head, p.lora, p.x, p.y, client=client, method="poly", causal=causal, chunks=(None, 24))
    assert res.compute_dtype == ref.compute_dtype and res.loss.dtype == np.float32
    rtol = 4 * np.sqrt(np.finfo(np.float32).eps)
    for t, g in ref.grads.items():
        assert res.grads[t].B.dtype == np.float32
        assert rel_error(res.grads[t].B, g.B) < rtol and rel_error(res.grads[t].A, g.A) < rtol, t


def test_a_posteriori_check_over_shards(client):
    """Near a perfect fit the error estimate (from the spread of V over the whole sequence, gathered from
    the shards) exceeds 10 tol: ``auto`` reruns exact as one process does, ``poly`` warns."""
    p = make_problem(14, L=48, d_model=8, d_head=4, r=2, targets="qv", batch=2, score_bound=0.5)
    y = gpulora.forward(p.head, p.lora, p.x, method="exact") + 1e-9
    ref = gpulora.lora_grad(p.head, p.lora, p.x, y, method="auto")
    res = gd.lora_grad(p.head, p.lora, p.x, y, client=client, method="auto", chunks=(None, 20))
    assert "reran exact" in ref.note and "reran exact" in res.note
    _assert_same(res, ref)
    with pytest.warns(gpulora.AccuracyWarning):
        res = gd.lora_grad(p.head, p.lora, p.x, y, client=client, method="poly", chunks=(None, 20))
    assert res.error_estimate > 10 * gpulora.DEFAULT_TOL


@pytest.mark.parametrize("method", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("chunks", [(1, None), (None, (9, 17, 11))], ids=["batch", "tokens"])
def test_grad_output_every_mode(client, chunks, causal, method):
    """An upstream gradient instead of targets: the same vector-Jacobian product as one process, no loss."""
    p = make_problem(15, L=37, d_model=8, d_head=4, d_v=3, r=2, targets="qkv", batch=2, heads=2, score_bound=1.0)
    d_out = np.random.default_rng(15).standard_normal(p.y.shape)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, grad_output=d_out, method=method, causal=causal)
    res = gd.lora_grad(p.head, p.lora, p.x, grad_output=d_out, client=client, method=method, causal=causal,
                       chunks=chunks)
    assert res.loss is None
    _assert_same(res, ref)


def test_grouped_query_heads_in_batch_mode(client):
    """kv_heads < heads (grouped-query attention) runs batch-parallel; token shards refuse it by name."""
    rng = np.random.default_rng(16)
    d_model, d, H, H_kv, L = 8, 4, 4, 2, 30
    w = lambda n: rng.standard_normal((d_model, n)) / np.sqrt(d_model)  # noqa: E731
    head = gpulora.Head(w(H * d), w(H_kv * d), w(H_kv * d), heads=H, kv_heads=H_kv)
    lora = gpulora.LoRA({"q": (w(2), rng.standard_normal((2, H * d))), "v": (w(2), rng.standard_normal((2, H_kv * d)))},
                        alpha=2.0)
    x = rng.standard_normal((3, L, d_model))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = rng.standard_normal((3, L, H * d))
    ref = gpulora.lora_grad(head, lora, x, y, method="exact", causal=True)
    res = gd.lora_grad(head, lora, x, y, client=client, method="exact", causal=True, chunks=(1, None))
    _assert_same(res, ref)
    with pytest.raises(ValueError, match="grouped-query heads"):
        gd.lora_grad(head, lora, x, y, client=client, method="exact", chunks=(None, 10))


def test_dask_arrays_rechunked_and_logged(client, caplog):
    """Dask input: ``x`` split along d_model and ``y`` chunked unlike ``x`` are re-chunked, and the note
    (also logged) says so; ``method="auto"`` decides once for the whole call."""
    p = make_problem(7, **PROBLEM)
    x = da.from_array(p.x, chunks=(2, 20, 5))
    y = da.from_array(p.y, chunks=(3, 15, 6))
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="auto")
    with caplog.at_level("INFO", logger="gpulora.distributed"):
        res = gd.lora_grad(p.head, p.lora, x, y, client=client, method="auto")
    _assert_same(res, ref)
    assert "re-chunked" in res.note and "auto:" in res.note
    assert res.note.startswith("distributed tokens")
    assert any(r.getMessage() == res.note for r in caplog.records)


def test_local_scheduler_without_client():
    """``client=None`` and no default client: dask's local threads, same result."""
    p = make_problem(8, **PROBLEM)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly", causal=True)
    res = gd.lora_grad(p.head, p.lora, p.x, p.y, method="poly", causal=True, chunks=(1, None))
    _assert_same(res, ref)


@pytest.mark.parametrize("batch", [None, 1], ids=["2-D x", "batch 1"])
def test_default_mode_runs_an_unsplit_x_as_one_task(client, batch):
    """mode="auto" (the default) on an x that is one block, 2-D or a batch of 1: one task, the one-process
    answer (only an explicit mode="batch" asks for a batch to split)."""
    p = make_problem(12, L=20, d_model=6, d_head=3, r=2, targets="qkv", batch=batch, score_bound=1.0)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="poly")
    res = gd.lora_grad(p.head, p.lora, p.x, p.y, client=client, method="poly")
    assert "one task" in res.note
    _assert_same(res, ref)


@pytest.mark.parametrize("chunks", [(None, 7), (1, None)], ids=["tokens", "batch"])
def test_mixed_dtypes_compute_and_return_as_one_process(client, chunks):
    """float32 x and y with float64 weights and adapters: float64 arithmetic and results (NumPy's promotion
    of every input), as gpulora.lora_grad, not x's float32."""
    p = make_problem(13, L=30, d_model=6, d_head=3, r=2, targets="qkv", batch=2, score_bound=1.0)
    x32, y32 = p.x.astype(np.float32), p.y.astype(np.float32)
    ref = gpulora.lora_grad(p.head, p.lora, x32, y32, method="poly")
    res = gd.lora_grad(p.head, p.lora, x32, y32, client=client, method="poly",
                       chunks=(chunks[0], np.int64(chunks[1])) if chunks[1] else chunks)
    assert ref.compute_dtype == res.compute_dtype == "float64" and res.loss.dtype == np.float64
    _assert_same(res, ref)


def test_inputs_not_modified(client):
    p = make_problem(9, **PROBLEM)
    before = [a.copy() for a in (p.x, p.y, p.head.w_q, p.lora.adapters["q"][1])]
    gd.lora_grad(p.head, p.lora, p.x, p.y, client=client, method="exact", chunks=(None, 20))
    for a, b in zip(before, (p.x, p.y, p.head.w_q, p.lora.adapters["q"][1])):
        np.testing.assert_array_equal(a, b)


BAD = [
    (dict(x_batch=1, mode="batch"), ValueError, "a batch of 1 cannot be split over the batch axis"),
    (dict(chunks=((1, 1), None), x_batch=1), ValueError, "sum to the batch length 1"),
    (dict(chunks=(None, (20, 20))), ValueError, "sum to the tokens length 45"),
    (dict(chunks=(None, 0)), ValueError, "block size must be >= 1"),
    (dict(chunks=(None, 2.5)), TypeError, "chunks: each axis"),
    (dict(chunks=(2, 10), mode="batch"), ValueError, "mode='batch' needs whole sequences"),
    (dict(chunks=(1, None), mode="tokens"), ValueError, "mode='tokens' needs x split over tokens"),
    (dict(chunks=(None, 10), heads_per_task=1), ValueError, "heads_per_task applies to mode='batch'"),
    (dict(chunks=(1, None), heads_per_task=3), ValueError, "heads_per_task must be an int in"),
    (dict(chunks=(1, None), mode="rows"), ValueError, "mode must be one of"),
    (dict(chunks=4), ValueError, "chunks must be a pair"),
    (dict(chunks=(None, 10), unbatched=True), ValueError, "x has no batch axis"),
    (dict(client="tcp://nowhere"), TypeError, "client must be a distributed.Client"),
    (dict(as_list=True), TypeError, "x must be"),
    (dict(dask_chunks=True), ValueError, "chunks applies to NumPy/CuPy input"),
    (dict(chunks=(1, None), both=True), TypeError, "exactly one of y"),
]


@pytest.mark.parametrize("case,exc,match", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_bad_chunking_is_named(case, exc, match):
    case = dict(case)
    p = make_problem(11, L=45, d_model=12, d_head=4, d_v=3, r=2, targets="qv", heads=2,
                     batch=case.pop("x_batch", 3), score_bound=1.0)
    x, y = p.x, p.y
    if case.pop("unbatched", False):
        x, y = x[0], y[0]
    if case.pop("both", False):
        case["grad_output"] = y
    if case.pop("as_list", False):
        x = x.tolist()
    if case.pop("dask_chunks", False):
        x, y = da.from_array(x), da.from_array(y)
        case["chunks"] = (1, None)
    with pytest.raises(exc, match=match):
        gd.lora_grad(p.head, p.lora, x, y, method="exact", **case)


def test_bad_values_rejected_by_the_workers(client):
    p = make_problem(12, **PROBLEM)
    x = p.x.copy()
    x[2, 30, 1] = np.nan
    with pytest.raises(ValueError, match="x must contain only finite values"):
        gd.lora_grad(p.head, p.lora, x, p.y, client=client, method="exact", chunks=(1, None))


def test_partial_sums_are_refused():
    a = Part(frozenset({(0, 0)}), {"loss": np.ones(())})
    b = Part(frozenset({(0, 1)}), {"loss": np.ones(())})
    total = combine(a, b)
    assert float(total.values["loss"]) == 2.0
    assert check_cover(total, {(0, 0), (0, 1)}) is total
    with pytest.raises(RuntimeError, match="summed twice"):
        combine(total, a)
    with pytest.raises(RuntimeError, match=r"missing \[\(0, 2\)\]"):
        check_cover(total, {(0, 0), (0, 1), (0, 2)})


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_worker_killed_mid_run_gives_the_full_answer(client, kind):
    """SIGKILL one of the two worker processes (started by this module) while it runs a task. Dask input
    has lineage: the scheduler recomputes what the dead worker held. Scattered NumPy blocks have none: the
    call scatters them again, once, and says so. Either way the gradient equals the single-process one."""
    p = make_problem(13, L=2000, d_model=8, d_head=8, r=2, targets="qkv", batch=4, score_bound=1.0)
    ref = gpulora.lora_grad(p.head, p.lora, p.x, p.y, method="exact")
    x, y, chunks = p.x, p.y, (1, None)
    if kind == "dask":
        x, y, chunks = da.from_array(p.x, chunks=(1, -1, -1)), da.from_array(p.y, chunks=(1, -1, -1)), None
    out = {}

    def call():
        try:
            out["res"] = gd.lora_grad(p.head, p.lora, x, y, client=client, method="exact", chunks=chunks)
        except Exception as err:  # reported below
            out["err"] = err

    th = threading.Thread(target=call)
    th.start()
    deadline = time.monotonic() + 60
    busy = []
    while not busy and time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if any("batch_part" in str(k) for k in keys)]
        time.sleep(0.005)
    assert busy, "no task started"
    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
    os.kill(pid, signal.SIGKILL)
    assert th.is_alive(), "the run finished before the worker was killed: make the problem larger"
    th.join(120)
    client.wait_for_workers(2, timeout=60)
    assert "err" not in out, out.get("err")
    _assert_same(out["res"], ref)
    assert ("retried once" in out["res"].note) == (kind == "numpy")


@pytest.mark.parametrize("targets", ["qkv", "qv", "kv", "v"])
def test_state_size_formula_is_what_the_passes_build(targets):
    """``traffic.key_state_bytes`` / ``query_state_bytes`` equal the bytes of the states the chain's passes
    return for one (batch member, head): the formula of docs/distributed.md is the real message size."""
    from gpulora.adapters import prepare
    from gpulora.distributed import traffic
    from gpulora.distributed.parts import nbytes
    from gpulora.poly import chain
    from gpulora.poly.coefficients import choose

    p = make_problem(21, L=30, d_model=8, d_head=4, d_v=3, r=2, targets=targets, score_bound=1.0)
    prob = prepare(p.head, p.lora, p.x, p.y)
    choice, dtype = choose(1.0, degree=2)
    keys = chain.key_pass(prob.k, prob.v, choice, need=targets, compute_dtype=dtype)
    _, queries = chain.query_pass(prob.q, keys, prob.beta, choice, y=prob.y, need=targets)
    k = choice.features(4)
    assert nbytes(keys) == traffic.key_state_bytes(k, 4, 3, 8, targets)
    if set(targets) & {"k", "v"}:
        assert nbytes(queries) == traffic.query_state_bytes(k, 4, 3, 8, targets)


def test_study_schedule_adds_up_and_matches_the_docs(tmp_path):
    """The simulated schedules spend exactly the cost model's flops at the given rates, the poly network
    phases move the states, and docs/distributed.md quotes what the study prints."""
    import pathlib

    from gpulora import cost
    from gpulora.distributed import study, traffic

    L, d, P = 10**6, 16, 8
    poly = study.poly_schedule(L, d, d, 2, P, rate=1e9)
    s = study.summary(poly)
    assert s["compute"] == pytest.approx(cost.poly_flops(L / P, d, d, 153) / 1e9, rel=1e-12)
    assert s["bytes"] == 2 * (traffic.key_state_bytes(153, d, d, 4) + traffic.query_state_bytes(153, d, d, 4))
    ring = study.ring_schedule(L, d, d, P, rate=1e9)
    assert study.summary(ring)["compute"] == pytest.approx(cost.exact_flops(L, d, d) / P / 1e9, rel=1e-12)
    assert study.summary(ring)["bytes"] == pytest.approx(traffic.ring_bytes_per_worker(L, d, d, 4, P), rel=1e-12)
    out = tmp_path / "schedule.png"
    text = study.main(["--out", str(out)])
    assert out.stat().st_size > 10_000
    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    poly_s = next(line for line in text.splitlines() if line.startswith("| token-sharded poly")).split("|")[2]
    assert f"{float(poly_s):.3g} s" in docs
