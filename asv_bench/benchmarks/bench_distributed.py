"""``gpulora.distributed.lora_grad`` on a local Dask cluster (CPU): 1 vs 2 worker processes, and bytes moved.

- :class:`TokensPoly`: token-sharded polynomial method at L = 2^20 (and 2^14, the smoke-test size), two
  token shards on 1 or 2 workers (the same graph: the ratio of the two times is the parallel speed-up).
- :class:`BatchExact`: batch-parallel exact gradient, a batch of 2 sequences on 1 or 2 workers.
- :class:`Traffic`: bytes the workers received from each other (distributed's transfer logs, whose sizes
  come from ``dask.sizeof``, registered for the chain's states) per worker, beside what the state-size
  formula predicts (:mod:`gpulora.distributed.traffic`): the poly states independent of L, and for
  token-sharded exact the ring-attention volume, linear in L.

Each class starts its cluster (1 thread per worker) in ``setup`` and closes it in ``teardown``. On the
shared 2-core CI machine two workers compete for the same cores: read the 2-worker speed-up as a lower
bound.
"""

from __future__ import annotations

from gpulora import backend
from gpulora.distributed import traffic

from .common import Benchmark, problem, setup  # noqa: F401  (setup: the module-level asv hook, seeding)

D_HEAD = 4
DEGREE = 2
K_FEATURES = 15  # C(D_HEAD + DEGREE, DEGREE)


def _cluster(workers: int):
    try:
        import distributed
    except ImportError as err:
        raise NotImplementedError(f"the dask extra is not installed ({err})") from None

    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    return cluster, distributed.Client(cluster, set_as_default=False)


def _received_bytes(client) -> int:
    """Bytes all workers fetched from other workers since their logs were last cleared."""
    logs = client.run(lambda dask_worker: sum(e["total"] for e in dask_worker.transfer_incoming_log))
    return int(sum(logs.values()))


def _clear_logs(client):
    client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())


class _ClusterBenchmark(Benchmark):
    workers = 1

    def start(self, workers):
        self.cluster, self.client = _cluster(workers)

    def teardown(self, *params):
        self.client.close()
        self.cluster.close()


class TokensPoly(_ClusterBenchmark):
    """Token-sharded poly (``d_head = d_v = 4``, degree 2, ``k = 15``, qkv, float64), two token shards."""

    params = [["numpy"], [1, 2], [2**14, 2**20]]
    param_names = ["backend", "workers", "L"]

    def setup(self, backend_name, workers, L):
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, D_HEAD, "qkv", "float64")
        self.L = L
        self.start(workers)
        self._run()  # warm-up: imports and the features' caches on every worker

    def time_lora_grad(self, *params):
        self._run()
        backend.synchronize()

    def _run(self):
        from gpulora.distributed import lora_grad

        p = self.prob
        return lora_grad(p.head, p.lora, p.x, p.y, client=self.client, method="poly", degree=DEGREE,
                         chunks=(self.L // 2,))


class BatchExact(_ClusterBenchmark):
    """Batch-parallel exact gradient (``d_head = 8``, qkv, float64): a batch of 2, one sequence per task."""

    params = [["numpy"], [1, 2], [1024, 4096]]
    param_names = ["backend", "workers", "L"]

    def setup(self, backend_name, workers, L):
        xp = self.setup_backend(backend_name)
        p = problem(xp, L, 8, "qkv", "float64")
        self.prob = p
        self.x, self.y = xp.stack([p.x, p.x[::-1]]), xp.stack([p.y, p.y[::-1]])
        self.start(workers)
        self._run()

    def time_lora_grad(self, *params):
        self._run()
        backend.synchronize()

    def _run(self):
        from gpulora.distributed import lora_grad

        p = self.prob
        return lora_grad(p.head, p.lora, self.x, self.y, client=self.client, method="exact", chunks=(1, None))


class Traffic(_ClusterBenchmark):
    """Bytes received per worker, 2 workers, 2 token shards: measured vs the formula (``unit = "bytes"``)."""

    params = [["numpy"], ["poly", "exact"], [4096, 2**20]]
    param_names = ["backend", "method", "L"]

    def setup(self, backend_name, method, L):
        if method == "exact" and L > 4096:
            raise NotImplementedError("token-sharded exact is O(L^2): measured at L = 4096 only")
        xp = self.setup_backend(backend_name)
        self.prob = problem(xp, L, D_HEAD, "qkv", "float64")
        self.method, self.L = method, L
        self.start(2)
        self._run()
        _clear_logs(self.client)
        self._run()
        self.measured = _received_bytes(self.client) / 2

    def _run(self):
        from gpulora.distributed import lora_grad

        p = self.prob
        kw = {"degree": DEGREE} if self.method == "poly" else {}
        return lora_grad(p.head, p.lora, p.x, p.y, client=self.client, method=self.method, chunks=(self.L // 2,),
                         **kw)

    def track_bytes_per_worker(self, *params):
        return float(self.measured)

    track_bytes_per_worker.unit = "bytes"

    def track_predicted_bytes_per_worker(self, *params):
        """Poly: the states, ``2 (P - 1) (S_K + S_Q) / P``; exact: ring attention's ``L (3 d_head + 3 d_v)``
        numbers times ``(P - 1) / P``."""
        if self.method == "poly":
            return traffic.tokens_poly_bytes(K_FEATURES, D_HEAD, D_HEAD, 8, 2) / 2
        return float(traffic.ring_bytes_per_worker(self.L, D_HEAD, D_HEAD, 8, 2))

    track_predicted_bytes_per_worker.unit = "bytes"

