"""Our CUDA kernels, through the real CudaBackend host code, on the CPU emulator.

``CudaBackend(xp=numpy, module_cls=EmulatedModule)`` runs the same tiling
choices, workspace sizes, launch parameters and checks as on a GPU; each case
compares with the NumPy backend (the oracle) at small sizes: every activation,
both dtypes, every precision mode and tile, tile boundaries +-1, split-batch
reductions, the recomputed first layer, the fused losses, batch 0 and 1,
strided inputs, NaN propagation, determinism.  Outputs and workspaces are
poisoned with NaN before the kernels run, so an unwritten element fails.

The ``case_*`` functions take a backend and an array module and are reused by
tests/test_cuda_backend.py on a real GPU.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from cupynn.activations import ACTIVATIONS
from cupynn.backends import cuda_backend as cb
from cupynn.backends import cuda_catalog
from cupynn.backends import cuda_select as cs
from cupynn.backends.base import LayerSpec, LossSpec, NetSpec
from cupynn.backends.numpy_backend import NumpyBackend

from .conftest import emulated_cuda_backend

pytestmark = pytest.mark.emulator

ACTS = list(ACTIVATIONS)
TOL = {("float64", "strict"): 1e-12, ("float32", "strict"): 1e-5,
       ("float32", "3xtf32"): 1e-5, ("float32", "tf32"): 5e-3}
REF = NumpyBackend()


def tol(dtype, precision="strict"):
    dt = np.dtype(dtype).name
    return TOL[(dt, precision if dt == "float32" else "strict")]


# -- helpers shared with the GPU tests ----------------------------------------------

def host(a):
    if a is None:
        return None
    return a.get() if hasattr(a, "get") else np.asarray(a)


_DRY_RUN = False  # set while the fixture collects the kernels the selected tests need


def check_close(got, want, rtol, what):
    """Relative error against the reference norm; NaNs must sit where the reference has them."""
    if _DRY_RUN:
        return
    got = np.asarray(host(got), dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    nan_w = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan_w, err_msg=f"{what}: NaN positions differ")
    g, w = got[~nan_w], want[~nan_w]
    scale = max(np.linalg.norm(w), np.finfo(np.float64).tiny)
    err = np.linalg.norm(g - w) / scale if g.size else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def rand(rng, shape, dtype, xp=np):
    a = rng.standard_normal(shape).astype(dtype)
    return xp.asarray(a)


def make_net(rng, sizes, acts, dtype, precision="strict", bias=True):
    if isinstance(acts, str):
        acts = [acts] * (len(sizes) - 1)
    if isinstance(bias, bool):
        bias = [bias] * (len(sizes) - 1)
    layers = tuple(LayerSpec(i, o, a, bb) for (i, o), a, bb in zip(zip(sizes, sizes[1:]), acts, bias))
    params = [((rng.standard_normal((o, i)) / np.sqrt(max(i, 1))).astype(dtype),
               rng.standard_normal(o).astype(dtype) if bb else None)
              for (i, o), bb in zip(zip(sizes, sizes[1:]), bias)]
    return NetSpec(layers, np.dtype(dtype), precision), params


def to_dev(xp, params):
    return [(xp.asarray(W), None if b is None else xp.asarray(b)) for W, b in params]


def case_layer(be, xp, rng, act, dtype, M, K, N, *, precision="strict", bias=True,
               nan_row=False, x_layout="c"):
    """dense_forward / dense_forward_train / dense_backward of one layer vs NumPy."""
    x = rng.standard_normal((M, K)).astype(dtype)
    if nan_row and M > 1:
        x[M // 2, 0] = np.nan
    W = (rng.standard_normal((N, K)) / np.sqrt(max(K, 1))).astype(dtype)
    b = rng.standard_normal(N).astype(dtype) if bias else None
    g = rng.standard_normal((M, N)).astype(dtype)
    xd = xp.asarray(x)
    if x_layout == "t":  # a transposed view: column-major memory
        xd = xp.asarray(np.ascontiguousarray(x.T)).T
    rt = tol(dtype, precision)
    y = be.dense_forward(xd, xp.asarray(W), None if b is None else xp.asarray(b), act,
                         precision=precision)
    y_ref = REF.dense_forward(x, W, b, act)
    check_close(y, y_ref, rt, f"{act} forward")
    y2, saved = be.dense_forward_train(xd, xp.asarray(W), None if b is None else xp.asarray(b),
                                       act, precision=precision)
    y2_ref, saved_ref = REF.dense_forward_train(x, W, b, act)
    check_close(y2, y2_ref, rt, f"{act} forward_train")
    dx, dW, db = be.dense_backward(xp.asarray(g), xd, saved, xp.asarray(W), act,
                                   has_bias=bias, need_dx=True, precision=precision)
    dx_r, dW_r, db_r = REF.dense_backward(g, x, saved_ref, W, act, has_bias=bias, need_dx=True)
    check_close(dW, dW_r, rt, f"{act} dW")
    check_close(dx, dx_r, rt, f"{act} dx")
    if bias:
        check_close(db, db_r, rt, f"{act} db")
    else:
        assert db is None


def case_network(be, xp, rng, sizes, acts, dtype, M, *, precision="strict", loss="sum_squares",
                 target=False, need_dx=False, x_layout="c", bias=True, nan_row=False):
    """network_value_and_grad and network_forward vs NumPy; returns the device results."""
    net, params = make_net(rng, sizes, acts, dtype, precision, bias)
    x = rng.standard_normal((M, sizes[0])).astype(dtype)
    if nan_row and M > 1:
        x[M // 2, 0] = np.nan
    if x_layout == "t":
        xd = xp.asarray(np.ascontiguousarray(x.T)).T
    elif x_layout == "slice":  # every other row of a wider array
        big = rng.standard_normal((2 * M, sizes[0] + 3)).astype(dtype)
        big[::2, 1:sizes[0] + 1] = x
        xd = xp.asarray(big)[::2, 1:sizes[0] + 1]
    else:
        xd = xp.asarray(x)
    t = rng.standard_normal((M, sizes[-1])).astype(dtype) if target else None
    if loss == "callable":
        def fn(y):
            return (y * y).sum() * 0.5, y.copy()
        spec_d = spec_h = LossSpec("callable", None, fn)
    else:
        spec_h = LossSpec(loss, t)
        spec_d = LossSpec(loss, None if t is None else xp.asarray(t))
    pd = to_dev(xp, params)
    rt = tol(dtype, precision)
    v, grads, dx = be.network_value_and_grad(net, pd, xd, spec_d, need_dx=need_dx)
    v_r, grads_r, dx_r = REF.network_value_and_grad(net, params, x, spec_h, need_dx=need_dx)
    assert host(v).shape == ()
    assert host(v).dtype == np.dtype(dtype)
    check_close(v, v_r, rt, "value")
    for l, ((dW, db), (dW_r, db_r)) in enumerate(zip(grads, grads_r)):
        assert dW.dtype == np.dtype(dtype)
        check_close(dW, dW_r, rt, f"dW[{l}]")
        if db_r is None:
            assert db is None
        else:
            check_close(db, db_r, rt, f"db[{l}]")
    if need_dx:
        check_close(dx, dx_r, rt, "dx")
    else:
        assert dx is None
    y = be.network_forward(net, pd, xd)
    check_close(y, REF.network_forward(net, params, x), rt, "network_forward")
    check_close(be.network_value(net, pd, xd, spec_d), v_r, rt, "network_value")
    return v, grads, dx


# -- the emulated suite --------------------------------------------------------------------

class _Collector(cuda_catalog.NameCollector):
    seen: set = set()

    def get_function(self, name):  # (modules are cached by the loader; lookups are not)
        _Collector.seen.add(name)
        return super().get_function(name)


def kernels_used(run, *, fused: bool = False, arch: str | None = None) -> list[str]:
    """The kernels ``run(backend)`` asks for, on a backend that launches nothing (so they
    can be compiled into a few modules up front instead of one module each); ``fused``: with
    the fused path on (its kernels are in kernels/fused.cu)."""
    global _DRY_RUN
    _Collector.seen = set()
    _DRY_RUN = True
    try:
        dry = cb.CudaBackend(xp=np, module_cls=_Collector, arch=arch)
        dry.fused.enabled = fused
        run(dry)
    finally:
        _DRY_RUN = False
    return sorted(_Collector.seen)


def dry_call(fn, **kwargs):
    """Call a test body on the dry backend: garbage outputs may fail it, but the kernel
    names are recorded by then.  A ``monkeypatch`` argument is undone afterwards."""
    try:
        with np.errstate(all="ignore"):
            fn(**kwargs)
    except Exception:  # noqa: BLE001
        pass
    finally:
        if "monkeypatch" in kwargs:
            kwargs["monkeypatch"].undo()


def _kernels_of_selected_tests(request, xp_fixtures=()) -> list[str]:
    """Which kernels this module's selected tests need (``xp_fixtures``: fixtures that are
    an array module, replaced by NumPy in the dry run)."""
    def run(dry):
        for item in request.session.items:
            if getattr(item, "module", None) is not request.module:
                continue
            fn = getattr(item, "obj", None)
            params = dict(getattr(getattr(item, "callspec", None), "params", {}) or {})
            kwargs = {}
            for arg in inspect.signature(fn).parameters:
                kwargs[arg] = {"be": dry, "rng": np.random.default_rng(0)}.get(arg, params.get(arg))
                if arg in xp_fixtures:
                    kwargs[arg] = np
                if arg == "monkeypatch":
                    kwargs[arg] = pytest.MonkeyPatch()
            if "be" in kwargs:
                dry_call(fn, **kwargs)

    return kernels_used(run)


@pytest.fixture(scope="module")
def be(request):
    pytest.importorskip("cupynn.emulator", reason="the CPU emulator is not there")
    try:
        backend = emulated_cuda_backend(request)
    except Exception as exc:  # pragma: no cover - no compiler
        pytest.skip(f"emulator unusable: {exc}")
    backend.kernels.poison = True
    backend.fused.enabled = False  # this suite is about the per-layer kernels (tests/test_fused.py)
    return backend


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS)
def test_layer_every_activation(be, rng, act, dtype):
    case_layer(be, np, rng, act, dtype, 37, 19, 11, nan_row=True)


@pytest.mark.parametrize("M,K,N", [
    (1, 1, 1), (7, 3, 1), (257, 5, 1),      # GEMV tile (BM 256) +-1
    (129, 8, 2), (5, 17, 8), (33, 9, 9),    # N <= 8 tile and its edge
    (127, 16, 32), (128, 31, 33),           # N <= 32 tile (BM 128) and its edge
    (65, 17, 65), (64, 64, 64), (3, 1, 100),  # general tile edges, fan-in 1
])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_tile_boundaries(be, rng, M, K, N, dtype):
    case_layer(be, np, rng, "tanh", dtype, M, K, N, bias=(M % 2 == 1))


@pytest.mark.parametrize("precision", ["strict", "tf32", "3xtf32"])
def test_layer_float32_precision_modes(be, rng, precision):
    case_layer(be, np, rng, "gelu", "float32", 67, 40, 45, precision=precision)


@pytest.mark.parametrize("dtype,precision", [("float64", "strict"), ("float32", "strict"),
                                             ("float32", "3xtf32"), ("float32", "tf32")])
def test_big_tile(be, rng, monkeypatch, dtype, precision):
    monkeypatch.setattr(cs, "BIG_TILE_MIN_BLOCKS", 1)
    assert cs.pick_tile(129, 129) == 4
    case_layer(be, np, rng, "relu", dtype, 129, 11, 130, precision=precision)


def test_layer_strided_input(be, rng):
    case_layer(be, np, rng, "silu", "float64", 40, 7, 12, x_layout="t")


def test_split_batch_reductions(be, rng, monkeypatch):
    monkeypatch.setattr(cs, "MIN_ROWS_PER_SPLIT", 16)
    assert cs.splits(300, 1)[0] > 1
    case_network(be, np, rng, [1, 70, 20, 1], "tanh", "float64", 300, target=True)
    case_network(be, np, rng, [5, 9, 3], ["elu", "sigmoid"], "float32", 100, need_dx=True)


SEED = [1, 40, 20, 1]


@pytest.mark.parametrize("M", [1, 7, 130])
def test_seed_shape(be, rng, M):
    case_network(be, np, rng, SEED, "identity", "float64", M)


@pytest.mark.parametrize("loss,target", [("sum_squares", True), ("mse", False), ("mse", True),
                                         ("callable", False)])
def test_losses(be, rng, loss, target):
    case_network(be, np, rng, [3, 17, 2], ["softplus", "leaky_relu"], "float64", 41, loss=loss,
                 target=target)


@pytest.mark.parametrize("sizes,acts", [
    ([1, 33, 5], ["gelu_erf", "elu"]),           # recomputed first layer, from-z activations
    ([2, 9, 1], ["sigmoid", "tanh"]),            # fan-in 2, GEMV last layer
    ([4, 12, 7, 3], ["silu", "relu", "gelu"]),  # fan-in 4 (largest recomputed)
    ([5, 12, 3], ["relu", "identity"]),          # fan-in 5: stored, not recomputed
])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_networks(be, rng, sizes, acts, dtype):
    case_network(be, np, rng, sizes, acts, dtype, 45, target=True)


@pytest.mark.parametrize("x_layout", ["t", "slice"])
def test_network_strided_input(be, rng, x_layout):
    case_network(be, np, rng, SEED, "tanh", "float64", 23, x_layout=x_layout)
    case_network(be, np, rng, [6, 10, 2], "relu", "float64", 23, x_layout=x_layout, need_dx=True)


def test_network_input_gradient(be, rng):
    case_network(be, np, rng, SEED, ["tanh", "identity", "sigmoid"], "float64", 19, need_dx=True)


def test_network_without_bias(be, rng):
    case_network(be, np, rng, [1, 20, 4, 1], "tanh", "float64", 19, bias=[False, True, False])
    case_network(be, np, rng, [3, 8, 2], "relu", "float32", 19, bias=False, need_dx=True)


@pytest.mark.parametrize("precision", ["tf32", "3xtf32"])
def test_network_precision_modes(be, rng, precision):
    case_network(be, np, rng, [3, 20, 9, 2], ["tanh", "relu", "identity"], "float32", 70,
                 precision=precision)


def test_batch_zero(be, rng):
    v, grads, dx = case_network(be, np, rng, SEED, "identity", "float64", 0, need_dx=True)
    assert float(v) == 0.0


def test_nan_propagates(be, rng):
    case_network(be, np, rng, SEED, "relu", "float64", 9, nan_row=True)
    case_network(be, np, rng, [3, 5, 2], "tanh", "float32", 9, nan_row=True, need_dx=True)


def test_deterministic(be, rng, monkeypatch):
    monkeypatch.setattr(cs, "MIN_ROWS_PER_SPLIT", 8)
    net, params = make_net(rng, SEED, "tanh", "float64")
    x = rng.standard_normal((100, 1))
    runs = [be.network_value_and_grad(net, params, x, LossSpec("sum_squares")) for _ in range(2)]
    assert host(runs[0][0]).tobytes() == host(runs[1][0]).tobytes()
    for (a, b), (c, d) in zip(runs[0][1], runs[1][1]):
        assert a.tobytes() == c.tobytes() and b.tobytes() == d.tobytes()


def test_seed_launch_count(be, rng):
    net, params = make_net(rng, SEED, "identity", "float64")
    x = rng.standard_normal((50, 1))
    be.kernels.launch_log = []
    try:
        be.network_value_and_grad(net, params, x, LossSpec("sum_squares"))
        log = be.kernels.launch_log
    finally:
        be.kernels.launch_log = None
    ranges = [r for r, _ in log]
    assert len(log) <= 8, log  # 2 forward + loss value + 4 backward + 1 reduction
    assert "Dense[0].forward" not in ranges  # the fan-in-1 layer is recomputed, never stored
    assert ranges[0] == "Dense[1].forward" and "Dense[0].backward" in ranges


def case_guard_bands(be, xp, rng, dtype, M, K, N):
    """Kernels write exactly their outputs: sentinels around them stay untouched."""
    guard = 7
    sentinel = 1234.5

    def framed(shape):
        n = int(np.prod(shape))
        buf = xp.full(n + 2 * guard, sentinel, dtype=dtype)
        return buf, buf[guard:guard + n].reshape(shape)

    x = xp.asarray(rng.standard_normal((M, K)).astype(dtype))
    W = xp.asarray((rng.standard_normal((N, K)) / np.sqrt(K)).astype(dtype))
    b = xp.asarray(rng.standard_normal(N).astype(dtype))
    g = xp.asarray(rng.standard_normal((M, N)).astype(dtype))
    ybuf, y = framed((M, N))
    be._forward("t", be._x_input(x), W, b, 3, M, y=y)
    dWbuf, dW = framed((N, K))
    dbbuf, db = framed((N,))
    dxbuf, dx = framed((M, K))
    dz = be._dz_args(g, y, None, 3, None, M, N, np.dtype(dtype))
    be._backward_dw("t", dz, be._x_input(x), M, N, K, True, dW, db, "strict")
    be._backward_dx("t", dz, W, M, dx, "strict")
    for buf in (ybuf, dWbuf, dbbuf, dxbuf):
        h = host(buf)
        assert (h[:guard] == sentinel).all() and (h[-guard:] == sentinel).all()
    check_close(y, np.tanh(host(x) @ host(W).T + host(b)), tol(dtype), "guarded y")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_guard_bands(be, rng, dtype):
    case_guard_bands(be, np, rng, dtype, 131, 9, 33)


def case_sanitizer_subset(be, xp, rng, monkeypatch):
    """Small cases that reach every kernel kind (forward + loss, dx, [dW | db] on every tile,
    the chain, the reductions) and every math path (DMMA, 3xTF32, FMA with and without
    vector fragment reads, float32 and float64): what compute-sanitizer checks on the GPU
    and the emulator's address / thread modes check on the CPU.  The first case is the chain
    kernel walking three 64-row chunks in one block, the last with 57 rows (> 48)."""
    monkeypatch.setattr(cs, "MIN_ROWS_PER_SPLIT", 4096)
    case_network(be, xp, rng, [1, 70, 20, 1], "tanh", "float64", 185, target=True)
    monkeypatch.setattr(cs, "MIN_ROWS_PER_SPLIT", 16)
    case_network(be, xp, rng, [1, 70, 20, 1], "tanh", "float64", 300, target=True)
    case_network(be, xp, rng, [5, 33, 3], ["elu", "sigmoid"], "float32", 130, need_dx=True,
                 precision="3xtf32")
    case_layer(be, xp, rng, "relu", "float32", 129, 17, 9)
    case_layer(be, xp, rng, "relu", "float32", 65, 17, 65)
    case_guard_bands(be, xp, rng, "float64", 131, 9, 33)
    monkeypatch.setattr(cs, "BIG_TILE_MIN_BLOCKS", 1)
    case_layer(be, xp, rng, "tanh", "float32", 129, 9, 130)
    monkeypatch.setattr(cs, "_F64_MMA_ENV", "0")
    case_layer(be, xp, rng, "elu", "float64", 129, 9, 130)


def test_checks_say_what_to_change(be, rng):
    x = rng.standard_normal((4, 3))
    W = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(cb.CudaLaunchError, match="astype"):
        be._forward("t", be._x_input(x), W, None, 0, 4, y=np.empty((4, 2), np.float32))
    with pytest.raises(cb.CudaLaunchError, match="ascontiguousarray"):
        be._forward("t", be._x_input(x), np.asfortranarray(rng.standard_normal((2, 3))), None, 0,
                    4, y=np.empty((4, 2)))


def test_instantiation_table_is_sane():
    (src, names), = cs.kernel_names_all()
    assert src == "dense.cu" and len(names) == len(set(names)) and len(names) < 160
    forward_acts = {int(n.split("<")[1].split(",")[1]) for n in names if "dense_forward<" in n}
    assert forward_acts == {*cs.FORWARD_ACTIVATIONS, cs.ACT_RUNTIME}
    assert all(cs.forward_act(a.id) == (a.id if a.id in cs.FORWARD_ACTIVATIONS else -2)
               for a in ACTIVATIONS.values())


def test_hot_kernels_have_their_activation_compiled_in():
    """The public workloads' forward kernels never switch on the activation at run time."""
    for _sizes, act, *_ in cuda_catalog.PUBLIC_WORKLOADS:
        assert ACTIVATIONS[act].id in cs.FORWARD_ACTIVATIONS and 0 in cs.FORWARD_ACTIVATIONS
    hot = cuda_catalog.hot_kernels()
    assert not [n for n in hot if "dense_forward<" in n and f", {cs.ACT_RUNTIME}," in n]


def test_launch_plan_replays_with_new_arrays(be, rng):
    """The second call of a shape replays the recorded plan: fresh arrays, fresh results."""
    for _ in range(2):
        case_network(be, np, rng, [2, 30, 3], ["tanh", "identity"], "float64", 33, target=True)
    net, params = make_net(rng, [2, 30, 3], ["tanh", "identity"], "float64")
    x = rng.standard_normal((33, 2))
    v1, g1, _ = be.network_value_and_grad(net, params, x, LossSpec("sum_squares"))
    v2, g2, _ = be.network_value_and_grad(net, params, x, LossSpec("sum_squares"))
    assert g1[0][0] is not g2[0][0]  # new output arrays on every call
    assert host(v1).tobytes() == host(v2).tobytes()


@pytest.mark.parametrize("M,K,N", [(70, 17, 65), (129, 9, 130)])
def test_float64_fma_fallback(be, rng, monkeypatch, M, K, N):
    """CUPYNN_F64_MMA=0 (debug switch): float64 on the FMA path, vector reads of 2 doubles."""
    monkeypatch.setattr(cs, "_F64_MMA_ENV", "0")
    monkeypatch.setattr(cs, "BIG_TILE_MIN_BLOCKS", 1 if N > 128 else 10**9)
    case_layer(be, np, rng, "elu", "float64", M, K, N)


SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 20.0, -20.0,
            40.0, -40.0, 88.0, -88.0, 700.0, -700.0, 1e30, -1e30]


def case_special_values(be, xp, act, dtype):
    """y = act(x) and dx = act'(.) through a 1 -> 1 identity-weight layer, at NaN, +-inf,
    +-0, tiny and huge arguments: the device formulas behave like cupynn/activations.py.

    Elementwise tolerance: float32 gelu/gelu_erf lose digits to the cancellation in
    1 + tanh(.) / 1 + erf(.) for negative arguments (a 1-ulp difference in tanhf becomes
    ~2e-5 relative), hence 1e-4 there; float64 stays at 1e-12."""
    with np.errstate(all="ignore"):
        x = np.array(SPECIALS, dtype=dtype).reshape(-1, 1)
        W = np.ones((1, 1), dtype=dtype)
        g = np.ones((x.shape[0], 1), dtype=dtype)
        y, saved = be.dense_forward_train(xp.asarray(x), xp.asarray(W), None, act)
        y_r, saved_r = REF.dense_forward_train(x, W, None, act)
        dx, _, _ = be.dense_backward(xp.asarray(g), xp.asarray(x), saved, xp.asarray(W), act,
                                     has_bias=False, need_dx=True)
        dx_r, _, _ = REF.dense_backward(g, x, saved_r, W, act, has_bias=False, need_dx=True)
    rt = 1e-12 if dtype == "float64" else 1e-4
    at = ftz_atol(x, dtype)
    check_ftz_close(host(y), y_r, rt, at, "forward")
    check_ftz_close(host(dx), dx_r, rt, at, "dx")


def ftz_atol(x, dtype):
    """The elementwise absolute tolerance of float32 flush-to-zero: CuPy compiles every kernel
    with -ftz=true, so a float32 intermediate below the smallest normal (1.18e-38; e.g.
    sigmoid(-88) = 6.05e-39) becomes 0, and a result it is multiplied into (silu = x sigmoid(x))
    is off by at most that times the factor: smallest normal * (1 + |x|).  float64: 0."""
    if np.dtype(dtype) != np.float32:
        return np.zeros_like(np.asarray(x, dtype=np.float64))
    with np.errstate(all="ignore"):
        return np.float64(np.finfo(np.float32).tiny) * (1.0 + np.abs(np.asarray(x, dtype=np.float64)))


def check_ftz_close(got, want, rtol, atol, what):
    """|got - want| <= rtol |want| + atol elementwise (atol an array), NaN where NaN, infinities equal."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN pattern {got} vs {want}"
    inf = np.isinf(want) | np.isinf(got)
    assert np.array_equal(got[inf], want[inf]), f"{what}: infinities {got[inf]} vs {want[inf]}"
    ok = ~np.isnan(want) & ~inf
    with np.errstate(all="ignore"):
        err = np.abs(got - want)[ok]
        bound = (rtol * np.abs(want) + np.broadcast_to(atol, want.shape))[ok]
    bad = np.nonzero(err > bound)[0]
    assert bad.size == 0, f"{what}: {got[ok][bad]} vs {want[ok][bad]} (bound {bound[bad]})"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS)
def test_activation_special_values(be, act, dtype):
    case_special_values(be, np, act, dtype)
