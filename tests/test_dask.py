"""cupynn.dask on a real cluster: a LocalCluster of 3 worker processes (1 thread each),
started once for this module and always shut down.

Equality with one cupynn.value_and_grad on the whole batch, bit-identical results for any
number of workers, any completion order and after a worker is killed, forward, and the
errors (bad chunking, a failing chunk, an unreachable scheduler, a timeout).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
pytest.importorskip("threadpoolctl")

import cupynn  # noqa: E402
import cupynn.dask as cdask  # noqa: E402

from .conftest import TOL, random_model  # noqa: E402

N_WORKERS = 3
DEADLINE_S = 120  # any single wait on the cluster


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.CRITICAL)
    try:
        c = distributed.Client(cluster, timeout=DEADLINE_S)
        try:
            c.wait_for_workers(N_WORKERS, timeout=DEADLINE_S)
            # import what the tasks need up front, in parallel, so no test times the imports
            c.run(importlib.import_module, __name__)
            yield c
        finally:
            c.close()
    finally:
        cluster.close(timeout=30)


def _workers(client, n=N_WORKERS):
    client.wait_for_workers(n, timeout=DEADLINE_S)
    return sorted(client.scheduler_info()["workers"])


def _wait_until_empty(client, timeout=10.0):
    """Every worker's data store empty (releases travel asynchronously)."""
    t_end = time.monotonic() + timeout
    while True:
        held = client.run(lambda dask_worker: len(dask_worker.data))
        if not any(held.values()) or time.monotonic() > t_end:
            return held
        time.sleep(0.1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _flat(grads):
    items = grads if isinstance(grads, list) else [grads]
    return [a for g in items for a in (g["weight"], g["bias"]) if a is not None]


def _assert_close(got, want, dtype):
    (v, g), (v1, g1) = got, want
    tol = TOL[np.dtype(dtype)]
    assert isinstance(v, np.ndarray) and v.shape == () and v.dtype == dtype
    assert _rel(v, v1) <= tol, (float(v), float(v1))
    assert type(g) is type(g1)
    for a, b in zip(_flat(g), _flat(g1), strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        assert _rel(a, b) <= tol


def _assert_identical(got, want):
    (v, g), (v1, g1) = got, want
    assert v.tobytes() == v1.tobytes()
    for a, b in zip(_flat(g), _flat(g1), strict=True):
        assert a.tobytes() == b.tobytes()


def _seed_model(dtype):
    # the seed thread's 1 -> 1000 -> 20 -> 1 with randn weights
    return cupynn.MLP([1, 1000, 20, 1], "identity", dtype=dtype, device="cpu", init="normal",
                      rng=1)


def _chunked(x, rows):
    return da.from_array(x, chunks=(rows, -1))


# -- equality with one process ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_seed_network_matches_one_process(client, dtype, rng):
    model = _seed_model(dtype)
    x = rng.uniform(-1, 1, (4001, 1)).astype(dtype)  # 6 chunks of 700 and one of 501
    got = cdask.value_and_grad(model, _chunked(x, 700), "sum_squares", timeout=DEADLINE_S)
    _assert_close(got, cupynn.value_and_grad(model, x, "sum_squares"), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", ["chain-tanh-mse-target", "dense-relu-target", "no-bias"])
def test_other_shapes_match_one_process(client, shape, dtype, rng):
    if shape == "chain-tanh-mse-target":
        model, loss, batch, rows = random_model([3, 17, 5], "tanh", dtype, rng), "mse", 997, 101
    elif shape == "dense-relu-target":
        W, b = rng.standard_normal((2, 8)).astype(dtype), rng.standard_normal(2).astype(dtype)
        model, loss, batch, rows = cupynn.Dense.from_arrays(W, b, "relu"), "sum_squares", 513, 64
    else:
        model = random_model([4, 33, 33, 1], ["gelu", "sigmoid", "identity"], dtype, rng,
                             bias=False)
        loss, batch, rows = "mse", 300, 299  # two chunks, the last one row
    n_out = model._dense_layers()[-1].out_features
    x = rng.uniform(-1, 1, (batch, model._dense_layers()[0].in_features)).astype(dtype)
    t = None if shape == "no-bias" else rng.standard_normal((batch, n_out)).astype(dtype)
    got = cdask.value_and_grad(model, _chunked(x, rows), loss,
                               target=None if t is None else _chunked(t, rows), timeout=DEADLINE_S)
    _assert_close(got, cupynn.value_and_grad(model, x, loss, target=t), dtype)
    if shape == "no-bias":
        assert all(g["bias"] is None for g in got[1])


# -- bit-identical: workers, completion order ------------------------------------------

def _shuffle_delay(block, seed, block_info=None):
    """The block itself, after a random delay drawn per (seed, block index)."""
    index = block_info[0]["chunk-location"][0]
    time.sleep(np.random.default_rng([seed, index]).uniform(0.0, 0.15))
    return block


def test_bit_identical_for_1_2_3_workers_and_shuffled_completion(client, rng):
    model = _seed_model("float64")
    x = rng.uniform(-1, 1, (3000, 1))
    X = _chunked(x, 250)  # 12 chunks
    addrs = _workers(client)
    first = cdask.value_and_grad(model, X, "mse", workers=addrs[:1], timeout=DEADLINE_S)
    for n in (2, 3):
        _assert_identical(cdask.value_and_grad(model, X, "mse", workers=addrs[:n],
                                               timeout=DEADLINE_S), first)
    for seed in (1, 2):  # chunks finish in a different order each time
        delayed_X = X.map_blocks(_shuffle_delay, seed, dtype=X.dtype)
        with distributed.get_task_stream(client) as stream:
            got = cdask.value_and_grad(model, delayed_X, "mse", timeout=DEADLINE_S)
        _assert_identical(got, first)
        done = [t for t in stream.data if "cupynn-value-and-grad" in t["key"] and "chunk" in t["key"]]
        assert len(done) == 12 and len({t["worker"] for t in done}) > 1
    _assert_close(first, cupynn.value_and_grad(model, x, "mse"), "float64")


def _count_model_arrivals(on: bool):
    """On a worker: count the shipped models built there (unpickled); on=False: undo, return it."""
    shipped = cdask._Shipped
    if on:
        original = shipped.__init__
        shipped._arrivals = 0

        def counting(self, model):
            type(self)._arrivals += 1
            original(self, model)

        shipped._original_init, shipped.__init__ = original, counting
        return 0
    shipped.__init__ = shipped._original_init
    return shipped._arrivals


def test_model_reaches_each_worker_once_and_nothing_stays(client, rng):
    model = _seed_model("float64")
    X = _chunked(rng.uniform(-1, 1, (2000, 1)), 100)  # 20 chunks on 3 workers
    client.run(_count_model_arrivals, True)
    try:
        cdask.value_and_grad(model, X, timeout=DEADLINE_S)
    finally:
        arrivals = client.run(_count_model_arrivals, False)
    # broadcast to every worker, not sent per chunk (about 7 chunks per worker here); Dask's
    # memory manager may drop a replica no queued chunk needs and a later chunk fetch it again
    assert min(arrivals.values()) >= 1 and max(arrivals.values()) <= 2, arrivals
    assert not any(_wait_until_empty(client).values())
    client.run(_count_model_arrivals, True)
    try:
        cdask.forward(model, X).compute()
    finally:
        arrivals = client.run(_count_model_arrivals, False)
    assert max(arrivals.values()) <= 2, arrivals  # one key of the graph, not one per chunk
    assert not any(_wait_until_empty(client).values())


# -- forward ---------------------------------------------------------------------

def test_forward_is_lazy_and_matches_model_call(client, rng):
    model = random_model([5, 31, 3], "silu", "float64", rng)
    x = rng.uniform(-1, 1, (1001, 5))
    X = _chunked(x, 128)
    Y = cdask.forward(model, X)
    assert isinstance(Y, da.Array) and Y.shape == (1001, 3) and Y.chunks[0] == X.chunks[0]
    assert Y.dtype == np.float64
    y = Y.compute()
    assert isinstance(y, np.ndarray) and _rel(y, model(x)) <= 1e-12
    assert not any(_wait_until_empty(client).values())  # a lazy array holds nothing there
    # any scheduler computes it, e.g. threads in this process
    assert Y.compute(scheduler="threads").tobytes() == y.tobytes()


# -- errors -----------------------------------------------------------------------

def _break_block_2(block, block_info=None):
    if block_info[0]["chunk-location"][0] == 2:
        return np.hstack([block, block])  # a chunk of the wrong width
    return block


def test_a_failing_chunk_names_its_index_and_leaves_no_state(client, rng):
    model = _seed_model("float64")
    X = _chunked(rng.uniform(-1, 1, (1000, 1)), 100).map_blocks(_break_block_2, dtype=np.float64)
    with pytest.raises(cdask.ChunkError, match=r"chunk 2 \(rows 200:300 of X\) failed: ValueError"
                       r".*expects x of shape \(batch, 1\)") as info:
        cdask.value_and_grad(model, X, timeout=DEADLINE_S)
    assert info.value.index == 2 and info.value.rows == (200, 300)
    assert not any(_wait_until_empty(client).values())
    with pytest.raises(cdask.ChunkError, match=r"chunk 2 \(rows 200:300 of X\)"):
        cdask.forward(model, X).compute()


def test_bad_chunking_and_bad_arguments_say_what_to_do(rng):
    model = _seed_model("float64")
    x = rng.uniform(-1, 1, (100, 1))
    wide = cupynn.MLP([4, 3, 2], "tanh", device="cpu", rng=0)
    X4 = da.from_array(rng.uniform(-1, 1, (100, 4)), chunks=(50, 2))
    with pytest.raises(ValueError, match=r"chunked along the batch \(axis 0\) only.*X.rechunk\(\{1: -1\}\)"):
        cdask.value_and_grad(wide, X4)
    with pytest.raises(ValueError, match="chunked along the batch"):
        cdask.forward(wide, X4)
    X = _chunked(x, 30)
    t = da.from_array(rng.standard_normal((100, 1)), chunks=(50, 1))
    with pytest.raises(ValueError, match=r"target must be chunked like X.*target.rechunk"):
        cdask.value_and_grad(model, X, target=t)
    with pytest.raises(TypeError, match=r"must be a dask.array.*from_array"):
        cdask.value_and_grad(model, x)
    with pytest.raises(TypeError, match="dtype float32 but the model is float64"):
        cdask.value_and_grad(model, X.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(batch, 1\)"):
        cdask.value_and_grad(model, da.from_array(rng.uniform(-1, 1, (10, 2)), chunks=(5, 2)))
    with pytest.raises(ValueError, match="2-D"):
        cdask.value_and_grad(model, da.from_array(x[:, 0], chunks=10))
    with pytest.raises(ValueError, match="callable loss"):
        cdask.value_and_grad(model, X, lambda y: ((y**2).sum(), 2 * y))
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        cdask.value_and_grad(model, X, cpu_threads=0)
    with pytest.raises(TypeError, match="Dense or Chain"):
        cdask.forward(object(), X)
    unknown = X[X[:, 0] > 0]
    with pytest.raises(ValueError, match=r"compute_chunk_sizes\(\)"):
        cdask.value_and_grad(model, unknown)


def test_unreachable_scheduler_is_a_clear_error_within_the_timeout(client):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"tcp://127.0.0.1:{port}.*within 2 s"):
        cdask.connect(f"tcp://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - t < 15
    closed = distributed.Client(client.scheduler.address, timeout=DEADLINE_S)
    closed.close()
    model = _seed_model("float64")
    with pytest.raises(ConnectionError, match="'closed'.*cupynn.dask.connect"):
        cdask.value_and_grad(model, _chunked(np.zeros((10, 1)) + 0.5, 5), client=closed)


def _thread_budget(cpu_threads):
    """What a chunk task on this worker sees: its lanes and the process's BLAS threads."""
    import threadpoolctl

    from cupynn import _threads

    with cdask._cpu_threads(cpu_threads):
        blas = {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
        return _threads.lanes_available(), blas


def test_a_chunk_runs_on_cpu_threads_lanes_and_blas_threads(client):
    from cupynn import _threads

    cores = _threads.lanes_available()
    assert client.submit(_thread_budget, 1, pure=False).result(DEADLINE_S) == (1, {1})
    lanes, _ = client.submit(_thread_budget, None, pure=False).result(DEADLINE_S)
    assert lanes == cores  # None: the worker's own lane count (every core it may use)


def _slow(block):
    time.sleep(0.4)
    return block


def test_timeout_cancels_the_computation(client, rng):
    model = _seed_model("float64")
    X = _chunked(rng.uniform(-1, 1, (600, 1)), 50).map_blocks(_slow, dtype=np.float64)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="no result within timeout=0.3 s"):
        cdask.value_and_grad(model, X, timeout=0.3)
    assert time.monotonic() - t < 10
    assert not any(_wait_until_empty(client, timeout=20).values())


# -- docs -------------------------------------------------------------------------

def test_public_names_have_runnable_examples():
    import doctest

    for fn in (cdask.value_and_grad, cdask.forward, cdask.connect, cdask.ChunkError):
        assert fn.__doc__ and ">>>" in fn.__doc__, fn
    failed, attempted = doctest.testmod(cdask, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failed == 0


# -- the benchmark workload ------------------------------------------------------------

def test_bench_dask_checks_then_reports_throughput(client, capsys):
    from cupynn.bench import cli, dask_bench

    doc = dask_bench.run(batch=3000, dtype="float32", workers=[1, 2], single_threads=[1],
                         chunk_rows=500, repeat=1, client=client)
    assert doc["ok"] and [d["workers"] for d in doc["dask"]] == [1, 2]
    for d in doc["dask"]:
        assert d["bit_identical_to_first"] and d["rel_err_vs_single"] <= doc["tolerance"]
        assert d["inputs_per_s"] > 0 and d["speedup_vs_1_worker"] > 0
    assert doc["dask"][0]["overhead_vs_single"] is not None  # 1 worker vs 1 BLAS thread
    assert doc["dask"][1]["overhead_vs_single"] is None  # no 2-thread single run asked for
    assert "inputs/s" in dask_bench.table(doc)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dask", "--help"])
    assert exit_info.value.code == 0 and "python -m cupynn bench dask" in capsys.readouterr().out


# -- GPU workers ------------------------------------------------------------------

@pytest.mark.gpu
def test_cupy_chunks_run_on_the_workers_gpu(client, rng):
    if not cupynn.cuda_available():
        pytest.skip("no usable GPU here")
    import cupy

    model = _seed_model("float64")
    x = rng.uniform(-1, 1, (5000, 1))
    X = _chunked(x, 700).map_blocks(cupy.asarray, dtype=np.float64, meta=cupy.empty((0, 0)))
    got = cdask.value_and_grad(model, X, "mse", timeout=DEADLINE_S)
    _assert_close(got, cupynn.value_and_grad(model, x, "mse"), "float64")
    again = cdask.value_and_grad(model, X, "mse", workers=_workers(client)[:1], timeout=DEADLINE_S)
    _assert_identical(again, got)
    y = cdask.forward(model, X).compute()
    assert isinstance(y, cupy.ndarray) and _rel(y.get(), model(x)) <= 1e-12
    assert model.device == "cpu"  # the caller's model stays where it was


# -- faults (last: it replaces a worker) ---------------------------------------------

def test_killed_worker_gives_the_same_bits(client, rng):
    model = _seed_model("float64")
    x = rng.uniform(-1, 1, (2400, 1))
    X = _chunked(x, 200)  # 12 chunks
    reference = cdask.value_and_grad(model, X, "mse", timeout=DEADLINE_S)
    addrs = _workers(client)
    pids = client.run(os.getpid)
    victim = addrs[0]
    slow_X = X.map_blocks(_slow, dtype=np.float64)  # 12 x 0.4 s over 3 workers: ~1.6 s
    result = {}

    def run():
        try:
            result["value"] = cdask.value_and_grad(model, slow_X, "mse", client=client,
                                                   timeout=DEADLINE_S)
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    t_end = time.monotonic() + DEADLINE_S
    while not client.processing().get(victim) and time.monotonic() < t_end:
        time.sleep(0.02)
    assert client.processing().get(victim), "no chunk ever ran on the worker to kill"
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(DEADLINE_S)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    _assert_identical(result["value"], reference)
    assert pids[victim] not in client.run(os.getpid).values()  # it was killed (its nanny restarts it)
