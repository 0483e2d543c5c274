"""cupynn.dask under bad input (the Dask reproducers of the reliability report): chunks with
fewer rows than declared, unknown workers, bad timeouts, a failing task of the input's own
graph. An in-process cluster (2 workers, threads), started once for this module."""

from __future__ import annotations

import logging

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

import cupynn  # noqa: E402
import cupynn.dask as cdask  # noqa: E402

from .conftest import random_model  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=":0", silence_logs=logging.CRITICAL)
    try:
        c = distributed.Client(cluster, timeout=60)
        try:
            yield c
        finally:
            c.close()
    finally:
        cluster.close(timeout=30)


def _short(block):
    """A chunk function that loses a row of every full chunk (a bug in user code)."""
    return block[:-1] if block.shape[0] == 100 else block


def test_chunks_with_fewer_rows_than_declared_are_a_chunk_error(client, rng):
    model = random_model([3, 8, 1], "tanh", np.float64, rng)
    X = da.from_array(rng.standard_normal((250, 3)), chunks=(100, 3))
    bad = X.map_blocks(_short, dtype=X.dtype, chunks=X.chunks)
    with pytest.raises(cdask.ChunkError, match=r"chunk [01] \(rows (0:100|100:200) of X\) failed: "
                                               r"ValueError: this chunk of X has 99 rows but X.chunks "
                                               r"declares 100"):
        cdask.value_and_grad(model, bad, "mse", timeout=60)
    with pytest.raises(cdask.ChunkError, match="has 99 rows but X.chunks declares 100"):
        cdask.forward(model, bad).compute(scheduler="threads")
    T = da.from_array(rng.standard_normal((250, 1)), chunks=(100, 1))
    with pytest.raises(cdask.ChunkError, match="this chunk of target has 99 rows"):
        cdask.value_and_grad(model, X, "mse", target=T.map_blocks(_short, dtype=T.dtype,
                                                                   chunks=T.chunks), timeout=60)
    value, _ = cdask.value_and_grad(model, X, "mse", timeout=60)  # the honest array: the mean
    want, _ = cupynn.value_and_grad(model, X.compute(), "mse")
    assert abs(float(value) - float(want)) <= 1e-12 * abs(float(want))


@pytest.mark.parametrize("kw, exc, msg", [
    ({"workers": ["tcp://10.255.255.1:1"]}, ValueError, "are not workers of this cluster"),
    ({"workers": 5}, TypeError, "workers must be a worker address"),
    ({"timeout": -1}, ValueError, "timeout must be a finite number of seconds > 0"),
    ({"timeout": float("nan")}, ValueError, "timeout must be a finite number"),
    ({"timeout": "abc"}, TypeError, "timeout must be a number of seconds"),
    ({"timeout": True}, TypeError, "timeout must be a number of seconds"),
])
def test_bad_arguments_are_clear_errors(client, rng, kw, exc, msg):
    model = random_model([3, 8, 1], "tanh", np.float64, rng)
    X = da.from_array(rng.standard_normal((50, 3)), chunks=(25, 3))
    with pytest.raises(exc, match=msg):
        cdask.value_and_grad(model, X, **kw)


def test_connect_checks_its_timeout():
    for bad, exc in [(-1, ValueError), ("3", TypeError), (None, TypeError), (0, ValueError)]:
        with pytest.raises(exc, match="timeout"):
            cdask.connect("tcp://127.0.0.1:9", timeout=bad)


def _fail_on_block_two(block, block_info=None):
    if block_info[0]["chunk-location"][0] == 2:
        raise OSError("the storage behind block 2 is gone")
    return block


def test_a_failing_task_of_the_input_graph_is_a_chunk_error(client, rng):
    model = random_model([3, 8, 1], "tanh", np.float64, rng)
    X = da.from_array(rng.standard_normal((400, 3)), chunks=(100, 3))
    bad = X.map_blocks(_fail_on_block_two, dtype=X.dtype)
    with pytest.raises(cdask.ChunkError, match=r"chunk 2 \(rows 200:300 of X\) failed: OSError: "
                                               r"computing the input chunk itself failed: the "
                                               r"storage behind block 2 is gone") as info:
        cdask.value_and_grad(model, bad, timeout=60)
    assert info.value.index == 2 and info.value.error == "OSError"
