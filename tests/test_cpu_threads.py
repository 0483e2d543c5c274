"""The NumPy backend's lanes and BLAS threads (cupynn/_threads.py): correct results with
any lane count, bit-identical run to run, BLAS limits restored, safe from several threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import cupynn
from cupynn import _threads
from cupynn.backends import numpy_backend as nb

from . import reference as ref
from .conftest import TOL, activations_of, host_params, random_model


def _check(model, x, target=None, wrt_input=False):
    params, acts = host_params(model), activations_of(model)
    out = cupynn.value_and_grad(model, x, "sum_squares", target=target, wrt_input=wrt_input)
    rv, rgrads, rdx = ref.value_and_grad(params, acts, x, "sum_squares", target)
    tol = TOL[model.dtype]
    assert ref.rel_err(out[0], rv) <= tol
    for g, (rdW, rdb) in zip(out[1], rgrads):
        got = np.concatenate([g["weight"].ravel(), [] if rdb is None else g["bias"].ravel()])
        want = np.concatenate([rdW.ravel(), [] if rdb is None else rdb.ravel()])
        assert ref.rel_err(got, want) <= tol
        assert g["weight"].flags.c_contiguous
    if wrt_input:
        assert ref.rel_err(out[2], rdx) <= tol
    assert ref.rel_err(model(x), ref.net_forward(params, acts, x)[0]) <= tol
    return out


@pytest.mark.parametrize("lanes", ["1", "2", "3", "5"])
@pytest.mark.parametrize("sizes,act", [([1, 300, 20, 1], "identity"),   # reassociated dW0
                                       ([20, 64, 16, 3], "tanh"),       # x read in place
                                       ([4, 32, 16, 4], "sigmoid")])    # [x; 1] copied
def test_any_lane_count_matches_the_reference(monkeypatch, rng, lanes, sizes, act):
    monkeypatch.setenv("CUPYNN_CPU_THREADS", lanes)
    monkeypatch.setattr(nb, "_SMALL_WORK", 1)  # lanes (and the BLAS limit) for every batch
    calls = []
    run_groups = _threads.run_groups
    monkeypatch.setattr(_threads, "run_groups",
                        lambda fn, groups, threads: calls.append(threads) or run_groups(fn, groups, threads))
    model = random_model(sizes, act, np.float64, rng)
    rows = nb._chunk_rows(model_spec(model))
    batch = 4 * rows + 3  # five chunks, the last one partial
    x = rng.standard_normal((batch, sizes[0]))
    _check(model, x, target=rng.standard_normal((batch, sizes[-1])), wrt_input=True)
    _check(model, x)
    assert calls and set(calls) == {min(int(lanes), 5)}


def model_spec(model):
    from cupynn.functional import _model_parts

    return _model_parts(model)[1]


def test_results_are_bit_identical_run_to_run(monkeypatch, rng):
    monkeypatch.setenv("CUPYNN_CPU_THREADS", "3")
    monkeypatch.setattr(nb, "_SMALL_WORK", 1)
    model = random_model([3, 200, 10, 2], "leaky_relu", np.float32, rng)
    x = rng.standard_normal((5000, 3)).astype(np.float32)
    runs = [cupynn.value_and_grad(model, x) for _ in range(3)]
    for v, grads in runs[1:]:
        assert v.tobytes() == runs[0][0].tobytes()
        for g, g0 in zip(grads, runs[0][1]):
            assert g["weight"].tobytes() == g0["weight"].tobytes()
            assert g["bias"].tobytes() == g0["bias"].tobytes()


def test_blas_thread_limit_is_restored(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    model = random_model([1, 500, 20, 1], "tanh", np.float64, rng)
    cupynn.value_and_grad(model, rng.standard_normal((3000, 1)))
    after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert after == before


def test_without_threadpoolctl_one_lane_and_the_same_results(monkeypatch, rng):
    monkeypatch.setattr(_threads, "_CONTROLLER", None)
    monkeypatch.setattr(_threads, "_CONTROLLER_REASON", "threadpoolctl is not installed (test)")
    monkeypatch.setenv("CUPYNN_CPU_THREADS", "4")
    assert _threads.lanes_available() == 1
    assert "not installed" in _threads.thread_control()
    model = random_model([2, 100, 7, 1], "relu", np.float64, rng)
    _check(model, rng.standard_normal((3000, 2)), wrt_input=True)


def test_bad_thread_setting_says_what_to_set(monkeypatch):
    monkeypatch.setenv("CUPYNN_CPU_THREADS", "many")
    with pytest.raises(ValueError, match="CUPYNN_CPU_THREADS must be a positive integer"):
        _threads.lanes_available()


def test_groups_go_to_whichever_thread_is_free_and_come_back_in_order():
    ran_on = {}

    def fn(g):
        ran_on[g] = threading.get_ident()
        if g == 0:
            time.sleep(0.3)  # a thread on a busy core
        return g * g

    assert _threads.run_groups(fn, 8, 2) == [g * g for g in range(8)]
    slow = ran_on[0]  # while it slept, the other thread took every other group
    assert all(ran_on[g] != slow for g in range(1, 8))


def test_an_error_in_a_group_is_raised_after_every_thread_ended():
    started = []

    def fn(g):
        started.append(g)
        if g == 1:
            raise RuntimeError("group 1 failed")
        time.sleep(0.01)
        return g

    with pytest.raises(RuntimeError, match="group 1 failed"):
        _threads.run_groups(fn, 50, 3)
    assert len(started) < 50  # the others stopped taking groups
    assert _threads.run_groups(lambda g: g, 3, 1) == [0, 1, 2]


def test_calls_from_several_threads_at_once(monkeypatch, rng):
    """Workspaces are checked out per call: concurrent calls on one model do not mix."""
    monkeypatch.setenv("CUPYNN_CPU_THREADS", "2")
    monkeypatch.setattr(nb, "_SMALL_WORK", 1)
    model = random_model([3, 64, 8, 2], "tanh", np.float64, rng)
    xs = [rng.standard_normal((b, 3)) for b in (700, 2000, 2000, 33)]
    want = [cupynn.value_and_grad(model, x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                v, g = cupynn.value_and_grad(model, xs[i])
                assert v.tobytes() == want[i][0].tobytes()
                assert g[1]["weight"].tobytes() == want[i][1][1]["weight"].tobytes()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_lane_limit_caps_this_thread_only_and_nests(monkeypatch, rng):
    monkeypatch.setenv("CUPYNN_CPU_THREADS", "4")
    monkeypatch.setattr(nb, "_SMALL_WORK", 1)
    calls = []
    run_groups = _threads.run_groups
    monkeypatch.setattr(_threads, "run_groups",
                        lambda fn, groups, threads: calls.append(threads) or run_groups(fn, groups, threads))
    model = random_model([3, 64, 8, 2], "tanh", np.float64, rng)
    x = rng.standard_normal((4 * nb._chunk_rows(model_spec(model)) + 1, 3))
    seen = {}
    with _threads.lane_limit(2):
        outer = _threads.lanes_available()
        with _threads.lane_limit(1):
            inner = _threads.lanes_available()
            _check(model, x)
        other = threading.Thread(target=lambda: seen.update(lanes=_threads.lanes_available()))
        other.start()
        other.join()
        again = _threads.lanes_available()
    assert (outer, inner, again, seen["lanes"], _threads.lanes_available()) == (2, 1, 2, 4, 4)
    assert calls and set(calls) == {1}  # the call inside lane_limit(1) ran on one lane
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="lane limit must be a positive integer"):
            with _threads.lane_limit(bad):
                pass
