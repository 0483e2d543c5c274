"""The CUDA backend on a real GPU: the emulated test matrix at GPU sizes.

Skipped with a reason where CuPy or a GPU is not usable. Every output and
workspace is poisoned with NaN before the kernels run (``backend.kernels.poison``).
Set ``CUPYNN_TEST_NO_POOL=1`` to run without CuPy's memory pool (what
compute-sanitizer needs to see small overruns; .ci/gpu does this).
"""

from __future__ import annotations

import numpy as np
import pytest

from cupynn.activations import ACTIVATIONS
from cupynn.backends import cuda_backend as cb
from cupynn.backends import cuda_select as cs
from cupynn.backends.base import LossSpec

from .test_kernels_emulated import (
    REF,
    _kernels_of_selected_tests,
    case_guard_bands,
    case_layer,
    case_network,
    case_sanitizer_subset,
    case_special_values,
    check_close,
    host,
    make_net,
    to_dev,
    tol,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be(cp, request):
    backend = cb.CudaBackend(xp=cp, module_cls=cp.RawModule)
    # NVRTC in parallel threads, one module per kernel (the modules lazy loading makes, so
    # CuPy's on-disk cache serves both) for the kernels the selected tests launch, instead
    # of one compile at a time as each test first needs one.
    backend.warm_up(_kernels_of_selected_tests(request, xp_fixtures=("cp",)))
    backend.kernels.poison = True
    backend.fused.enabled = False  # the per-layer kernels (tests/test_fused.py: the fused path)
    return backend


ACTS = list(ACTIVATIONS)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS)
def test_gpu_layer_every_activation(be, cp, rng, act, dtype):
    case_layer(be, cp, rng, act, dtype, 1000, 33, 65, nan_row=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS)
def test_gpu_activation_special_values(be, cp, act, dtype):
    case_special_values(be, cp, act, dtype)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 1, 1000), (1025, 33, 1), (1000, 1025, 33),
                                   (33, 7, 1025), (1025, 1000, 7)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_layer_odd_sizes(be, cp, rng, M, K, N, dtype):
    case_layer(be, cp, rng, "tanh", dtype, M, K, N, bias=(N != 33))


@pytest.mark.parametrize("dtype,precision", [("float64", "strict"), ("float32", "strict"),
                                             ("float32", "tf32"), ("float32", "3xtf32")])
def test_gpu_big_tile(be, cp, rng, monkeypatch, dtype, precision):
    monkeypatch.setattr(cs, "BIG_TILE_MIN_BLOCKS", 1)
    case_layer(be, cp, rng, "relu", dtype, 1025, 257, 1000, precision=precision)


@pytest.mark.parametrize("precision", ["tf32", "3xtf32"])
def test_gpu_precision_modes(be, cp, rng, precision):
    case_layer(be, cp, rng, "gelu", "float32", 1000, 1025, 33, precision=precision)
    case_network(be, cp, rng, [3, 200, 33, 2], ["tanh", "relu", "identity"], "float32", 1025,
                 precision=precision)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_seed_batch_10k(be, cp, rng, dtype):
    """The seed example: 1 -> 1000 -> 20 -> 1 identity, batch 10,000, sum_squares."""
    net, params = make_net(rng, SEED_FULL, "identity", dtype)
    x = np.linspace(-1, 1, 10_000, dtype=dtype).reshape(-1, 1)
    pd = to_dev(cp, params)
    v, grads, _ = be.network_value_and_grad(net, pd, cp.asarray(x), LossSpec("sum_squares"))
    v_r, grads_r, _ = REF.network_value_and_grad(net, params, x, LossSpec("sum_squares"))
    rt = tol(dtype)
    check_close(v, v_r, rt, "seed value")
    for l, ((dW, db), (dW_r, db_r)) in enumerate(zip(grads, grads_r)):
        check_close(dW, dW_r, rt, f"seed dW[{l}]")
        check_close(db, db_r, rt, f"seed db[{l}]")
    check_close(be.network_forward(net, pd, cp.asarray(x)), REF.network_forward(net, params, x),
                rt, "seed forward")


SEED_FULL = [1, 1000, 20, 1]


@pytest.mark.parametrize("sizes,acts", [
    ([1, 1000, 20, 1], ["tanh", "gelu", "softplus"]),
    ([4, 257, 33, 7], ["silu", "relu", "elu"]),
    ([33, 1025, 1], ["sigmoid", "identity"]),
])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_networks(be, cp, rng, sizes, acts, dtype):
    case_network(be, cp, rng, sizes, acts, dtype, 1025, target=True, loss="mse")


@pytest.mark.parametrize("M", [0, 1, 7])
def test_gpu_small_batches(be, cp, rng, M):
    case_network(be, cp, rng, SEED_FULL, "tanh", "float64", M, need_dx=True)
    case_network(be, cp, rng, SEED_FULL, "identity", "float64", M)


@pytest.mark.parametrize("x_layout", ["t", "slice"])
def test_gpu_strided_input(be, cp, rng, x_layout):
    case_network(be, cp, rng, SEED_FULL, "tanh", "float64", 1000, x_layout=x_layout)
    case_network(be, cp, rng, [33, 65, 7], "relu", "float32", 1000, x_layout=x_layout,
                 need_dx=True)


def test_gpu_losses(be, cp, rng):
    case_network(be, cp, rng, [7, 65, 3], "softplus", "float64", 1000, loss="callable")
    case_network(be, cp, rng, [7, 65, 3], "leaky_relu", "float32", 1000, need_dx=True,
                 target=True)


def test_gpu_nan_propagates(be, cp, rng):
    case_network(be, cp, rng, SEED_FULL, "relu", "float64", 1000, nan_row=True)
    case_network(be, cp, rng, [7, 33, 2], "tanh", "float32", 1000, nan_row=True, need_dx=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_guard_bands(be, cp, rng, dtype):
    case_guard_bands(be, cp, rng, dtype, 1025, 33, 65)


def test_gpu_deterministic(be, cp, rng):
    net, params = make_net(rng, SEED_FULL, "tanh", "float64")
    pd = to_dev(cp, params)
    x = cp.asarray(rng.standard_normal((20_000, 1)))
    runs = [be.network_value_and_grad(net, pd, x, LossSpec("sum_squares")) for _ in range(3)]
    for r in runs[1:]:
        assert host(r[0]).tobytes() == host(runs[0][0]).tobytes()
        for (a, b), (c, d) in zip(r[1], runs[0][1]):
            assert host(a).tobytes() == host(c).tobytes()
            assert host(b).tobytes() == host(d).tobytes()


def test_gpu_64bit_offsets(be, cp, rng):
    """An output of more than 2^31 elements (batch x width): rows past 2^31 / N are right."""
    M, N = (1 << 22) + 3, 513  # M * N = 2,151,680,499 > 2^31
    try:
        x = cp.asarray(rng.standard_normal((M, 1)).astype(np.float32))
        W = cp.asarray(rng.standard_normal((N, 1)).astype(np.float32))
        b = cp.asarray(rng.standard_normal(N).astype(np.float32))
        y = be.dense_forward(x, W, b, "identity")
    except cp.cuda.memory.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element output")
    rows = np.array([0, M // 2, M - 2, M - 1])
    want = host(x)[rows] @ host(W).T + host(b)
    check_close(host(y[cp.asarray(rows)]), want, 1e-6, "rows past 2^31")
    del y


def test_gpu_compile_graph(be, cp, rng):
    import cupynn
    from cupynn.graph import compile as compile_step

    model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cuda", rng=0)
    step = compile_step(model, "sum_squares")
    for _ in range(2):
        x = cp.asarray(rng.standard_normal((3000, 1)))
        v, g = step(x)
        v_r, g_r = cupynn.value_and_grad(model, x, "sum_squares")
        check_close(v, host(v_r), 1e-12, "graph value")
        for a, b in zip(g, g_r):
            check_close(a["weight"], host(b["weight"]), 1e-12, "graph dW")
            check_close(a["bias"], host(b["bias"]), 1e-12, "graph db")
    check_close(step.forward(x), host(v_r), 1e-12, "graph forward value")


def test_gpu_launches_inside_nvtx_ranges(be, cp, rng):
    net, params = make_net(rng, SEED_FULL, "identity", "float64")
    be.kernels.launch_log = []
    try:
        be.network_value_and_grad(net, to_dev(cp, params), cp.asarray(rng.standard_normal((500, 1))),
                                  LossSpec("sum_squares"))
        log = be.kernels.launch_log
    finally:
        be.kernels.launch_log = None
    assert len(log) <= 8 and all(r.startswith(("Dense[", "Dense.backward", "loss")) for r, _ in log)


def test_gpu_sanitizer_subset(be, cp, rng, monkeypatch):
    """Small cases over every kernel kind, for compute-sanitizer memcheck / racecheck."""
    case_sanitizer_subset(be, cp, rng, monkeypatch)
