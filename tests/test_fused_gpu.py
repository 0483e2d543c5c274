"""The fused path on a real GPU: the emulated matrix of tests/test_fused.py at GPU sizes.

Skipped with a reason where CuPy or a GPU is not usable.  Outputs and workspaces are poisoned
with NaN (``backend.kernels.poison``).  ``CUPYNN_TEST_NO_POOL=1`` runs without CuPy's memory
pool, which is what compute-sanitizer needs to see small overruns (.ci/gpu runs
``-k sanitizer_subset`` under memcheck and racecheck).
"""

from __future__ import annotations

import numpy as np
import pytest

from cupynn.activations import ACTIVATIONS
from cupynn.backends import cuda_backend as cb
from cupynn.backends.base import LossSpec

from .test_fused import case_fused, case_fused_launches, case_fused_sanitizer_subset
from .test_kernels_emulated import host, make_net, to_dev

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be(cp):
    backend = cb.CudaBackend(xp=cp, module_cls=cp.RawModule)
    backend.kernels.poison = True
    return backend


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gpu_fused_every_activation(be, cp, rng, act, dtype):
    case_fused(be, cp, rng, [3, 64, 24, 2], act, dtype, 4099, need_dx=True, wide=False)
    case_fused(be, cp, rng, [1, 1000, 20, 1], [act, act, "identity"], dtype, 10_000,
               target=True, wide=True)


@pytest.mark.parametrize("dtype,precision", [("float64", "strict"), ("float32", "strict"),
                                             ("float32", "tf32"), ("float32", "3xtf32")])
def test_gpu_fused_public_workloads(be, cp, rng, dtype, precision):
    if dtype == "float64":
        case_fused(be, cp, rng, [1, 1000, 20, 1], "identity", dtype, 1_000_000, wide=True)
    case_fused(be, cp, rng, [32, 64, 64, 64, 64, 1], ["relu"] * 4 + ["identity"], dtype,
               1 << 16, precision=precision, wide=False)


@pytest.mark.parametrize("M", [1, 15, 16, 17, 127, 129, 8447, 8449, 10_000, 65_537])
def test_gpu_fused_batch_boundaries(be, cp, rng, M):
    case_fused(be, cp, rng, [1, 1000, 20, 1], "tanh", "float64", M, wide=True, need_dx=(M % 2 == 0))
    case_fused(be, cp, rng, [5, 100, 30, 3], ["gelu", "elu", "identity"], "float64", M,
               wide=False, bias=(M % 2 == 1))


def test_gpu_fused_deterministic(be, cp, rng):
    net, params = make_net(rng, [1, 1000, 20, 1], "tanh", "float64")
    params = to_dev(cp, params)
    x = cp.asarray(rng.standard_normal((100_000, 1)))
    runs = [be.network_value_and_grad(net, params, x, LossSpec("sum_squares")) for _ in range(3)]
    for r in runs[1:]:
        assert host(r[0]).tobytes() == host(runs[0][0]).tobytes()
        for (a, b), (c, d) in zip(r[1], runs[0][1]):
            assert host(a).tobytes() == host(c).tobytes() and host(b).tobytes() == host(d).tobytes()


def test_gpu_fused_launches_and_allocations(be, cp, rng):
    case_fused_launches(be, cp, rng, [3, 40, 6, 2])


def test_gpu_fused_sanitizer_subset(be, cp, rng, monkeypatch):
    case_fused_sanitizer_subset(be, cp, rng, monkeypatch)


def test_gpu_fused_graph_capture(be, cp, rng):
    """cupynn.compile captures the fused step (two kernels, no allocation inside) and replays it."""
    import cupynn

    rs = np.random.default_rng(3)
    layers = [cupynn.Dense.from_arrays(cp.asarray(rs.standard_normal((o, i))),
                                       cp.asarray(rs.standard_normal(o)), a)
              for i, o, a in ((1, 1000, "tanh"), (1000, 20, "tanh"), (20, 1, "identity"))]
    model = cupynn.Chain(*layers)
    x = cp.asarray(np.linspace(-1, 1, 10_000).reshape(-1, 1))
    step = cupynn.compile(model, "sum_squares")
    v_graph, g_graph = step(x)
    v_plain, g_plain = cupynn.value_and_grad(model, x, "sum_squares")
    assert float(v_graph) == pytest.approx(float(v_plain), rel=1e-13)
    for a, b in zip(g_graph, g_plain):
        np.testing.assert_allclose(host(a["weight"]), host(b["weight"]), rtol=1e-12, atol=1e-12)
    assert cupynn.execution_path(model, 10_000) == "fused"
    be2 = cupynn.backends.get_backend("cuda")
    be2.kernels.launch_log = []
    cupynn.value_and_grad(model, x, "sum_squares")
    assert [r for r, _ in be2.kernels.launch_log] == ["fused.step", "fused.reduce"]
    be2.kernels.launch_log = None
