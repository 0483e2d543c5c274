"""The per-kernel breakdown (``python -m cupynn bench --kernels``) on the CPU emulator:
the launch plan's kernels run alone on buffers of their own and reproduce the call, and
the breakdown lists them in order.  No time is asserted."""

from __future__ import annotations

import numpy as np
import pytest

from cupynn.backends.base import LossSpec
from cupynn.bench import report
from cupynn.bench.kernels import blocks_per_sm, kernel_breakdown

from .conftest import emulated_cuda_backend
from .test_kernels_emulated import REF, check_close, make_net

emu = pytest.importorskip("cupynn.emulator", reason="the CPU emulator is not there")

H200 = {"count": 132, "registers": 65536, "shared_memory": 233472, "threads": 2048}


@pytest.fixture(scope="module")
def be(request):
    backend = emulated_cuda_backend(request)  # the same modules as test_kernels_emulated's
    backend.kernels.poison = True
    backend.fused.enabled = False  # the per-layer breakdown; tests/test_fused.py has the fused one
    return backend


@pytest.mark.emulator
def test_planned_launches_reproduce_the_call(be):
    rng = np.random.default_rng(5)
    net, params = make_net(rng, [1, 40, 9, 1], "tanh", "float64")
    x = rng.standard_normal((150, 1))
    loss = LossSpec("sum_squares")
    be.kernels.launch_log = []
    try:
        be.network_value_and_grad(net, params, x, loss)
        log = be.kernels.launch_log
    finally:
        be.kernels.launch_log = None
    launches, (value, grads, dx) = be.planned_launches(net, params, x, loss)
    assert [(p.range, p.name) for p in launches] == log
    assert np.isnan(value) and all(np.isnan(dW).all() for dW, _ in grads)  # poisoned, not run
    for p in launches:
        p.launch()
        p.launch()  # twice: kernels overwrite their outputs, never read or accumulate them
    v_r, g_r, _ = REF.network_value_and_grad(net, params, x, loss)
    check_close(value, v_r, 1e-12, "value")
    for (dW, db), (dW_r, db_r) in zip(grads, g_r):
        check_close(dW, dW_r, 1e-12, "dW")
        check_close(db, db_r, 1e-12, "db")
    assert dx is None


@pytest.mark.emulator
def test_kernel_breakdown_lists_every_kernel(be):
    rng = np.random.default_rng(6)
    net, params = make_net(rng, [1, 40, 9, 1], "tanh", "float64")
    x = rng.standard_normal((150, 1))
    b = kernel_breakdown(be, net, params, x, LossSpec("sum_squares"), budget_s=0.05)
    launches, _ = be.planned_launches(net, params, x, LossSpec("sum_squares"))
    assert [r["kernel"] for r in b["kernels"]] == [p.name for p in launches]
    assert all(r["median_s"] > 0 and r["blocks"] == np.prod(r["grid"]) for r in b["kernels"])
    assert b["sum_s"] == pytest.approx(sum(r["median_s"] for r in b["kernels"]))
    assert sum(r["share"] for r in b["kernels"]) == pytest.approx(1.0)
    assert b["timer"] == "cpu" and b["sm_count"] is None
    text = report.kernels_table({"workload": "custom", "shape": "1→40→9→1", "batch": 150,
                                 "dtype": "float64", "breakdown": b})
    assert "dense_backward_chain<double" in text and "sum of the kernels" in text


def test_planned_launches_refuse_unplannable_calls(be):
    rng = np.random.default_rng(7)
    net, params = make_net(rng, [2, 3], "tanh", "float64")
    with pytest.raises(ValueError, match="no launch plan"):
        be.planned_launches(net, params, np.empty((0, 2)), LossSpec("sum_squares"))


@pytest.mark.parametrize("regs,smem,want", [
    (212, 35840, 1),   # the 128x128 FMA tile: registers allow one block
    (128, 19456, 2),   # 64x64 tile: two
    (32, 0, 8),        # a reduction: thread slots
    (64, 110000, 2),   # shared memory decides
])
def test_blocks_per_sm(regs, smem, want):
    assert blocks_per_sm(regs, smem, H200) == want
    assert blocks_per_sm(regs, smem, None) is None


@pytest.mark.emulator
def test_run_breakdowns_wiring(be, monkeypatch):
    """The --kernels driver (workload -> network, parameters, input) on the emulated backend,
    with a stand-in for CuPy's module: what .ci/gpu runs, minus the GPU."""
    import sys
    import types

    import cupynn.backends
    from cupynn.bench.kernels import run_breakdowns
    from cupynn.bench.workloads import custom_workload

    fake = types.SimpleNamespace(asarray=np.ascontiguousarray, get_default_memory_pool=lambda:
                                 types.SimpleNamespace(free_all_blocks=lambda: None))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupynn.backends, "get_backend", lambda device: be)
    w = custom_workload((1, 40, 9, 1), "tanh", 150)
    out = run_breakdowns([(w, "float64"), (w, "float32")], budget_s=0.02)
    assert [k["dtype"] for k in out] == ["float64", "float32"]
    for k in out:
        assert "error" not in k, k.get("error")
        assert k["breakdown"]["kernels"][0]["range"] == "Dense[1].forward"
        ctype = "<double" if k["dtype"] == "float64" else "<float"
        assert all(ctype in r["kernel"] for r in k["breakdown"]["kernels"])
