"""The fused path (kernels/fused.cu; cupynn/backends/cuda_fused*.py).

On the CPU emulator (marked ``emulator``), through the real CudaBackend host code, against
the NumPy backend: every activation, both dtypes, every float32 precision mode, the narrow
and the wide-first-layer classes, tile and super-tile boundaries +-1, odd batches, batch 1,
wrt_input, no bias, targets and mse, strided inputs, NaN propagation, determinism; the
launches and allocations of a call; out=; results that the next call must not overwrite;
the address and thread sanitizer modes.  Outputs and workspaces are poisoned with NaN.
Unmarked tests check the path choice and layouts without running anything.

The wide class normally starts at 257 hidden units; tests lower ``WIDE_MIN`` so that it runs
at emulator sizes, and lower ``FUSED_BLOCKS`` so that a block walks several tiles.  The
``case_*`` functions are reused by tests/test_fused_gpu.py on a GPU.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from cupynn.activations import ACTIVATIONS
from cupynn.backends import cuda_backend as cb
from cupynn.backends import cuda_fused_layout as fl
from cupynn.backends.base import LayerSpec, LossSpec, NetSpec

from .test_kernels_emulated import (
    REF,
    case_network,
    check_close,
    dry_call,
    host,
    kernels_used,
    make_net,
    to_dev,
    tol,
)

ACTS = list(ACTIVATIONS)
ARCH = "sm_90"  # test_sm90_direct and the sanitizer runs: mma.m16n8k16's own emulation
H200_SMEM = 232448


def spec(sizes, acts, dtype="float64", precision="strict", bias=True):
    if isinstance(acts, str):
        acts = [acts] * (len(sizes) - 1)
    if isinstance(bias, bool):
        bias = [bias] * (len(sizes) - 1)
    return NetSpec(tuple(LayerSpec(i, o, a, b) for i, o, a, b in zip(sizes, sizes[1:], acts, bias)),
                   np.dtype(dtype), precision)


# -- shared with the GPU tests -------------------------------------------------------------------

def case_fused(be, xp, rng, sizes, acts, dtype, M, *, wide=None, **kw):
    """case_network on a backend whose fused path must take the call (and be wide or not)."""
    net, _ = make_net(rng, sizes, acts, dtype, kw.get("precision", "strict"), kw.get("bias", True))
    loss = LossSpec(kw.get("loss", "sum_squares"), np.zeros(1) if kw.get("target") else None)
    lay = be.fused.layout(net, M, fl.MODE_GRAD, need_dx=kw.get("need_dx", False), loss=loss)
    assert isinstance(lay, fl.FusedLayout), lay
    if wide is not None:
        assert lay.wide == wide, lay
    return case_network(be, xp, rng, sizes, acts, dtype, M, **kw)


def case_fused_launches(be, xp, rng, sizes, dtype="float64"):
    """A call launches fused_mlp + fused_reduce (forward: fused_mlp alone) and allocates one
    output block; with out= nothing; the first call's results survive the second call."""
    net, params = make_net(rng, sizes, "tanh", dtype)
    params = to_dev(xp, params)
    x1 = xp.asarray(rng.standard_normal((70, sizes[0])).astype(dtype))
    x2 = xp.asarray(rng.standard_normal((70, sizes[0])).astype(dtype))
    loss = LossSpec("sum_squares")
    allocs = []
    real_empty = be.kernels.empty

    def counting_empty(shape, dtype):
        allocs.append(shape)
        return real_empty(shape, dtype)

    be.kernels.empty = counting_empty
    be.kernels.launch_log = []
    try:
        v1, g1, _ = be.network_value_and_grad(net, params, x1, loss)  # builds the plan
        first = (len(allocs), list(be.kernels.launch_log))
        allocs.clear()
        be.kernels.launch_log.clear()
        keep = (host(v1).copy(), [host(w).copy() for w, _ in g1])
        v2, g2, _ = be.network_value_and_grad(net, params, x2, loss)
        plain = (len(allocs), list(be.kernels.launch_log))
        allocs.clear()
        be.kernels.launch_log.clear()
        v3, g3, _ = be.network_value_and_grad(net, params, x2, loss, out=(v2, g2, None))
        with_out = (len(allocs), list(be.kernels.launch_log))
        allocs.clear()
        be.kernels.launch_log.clear()
        be.network_forward(net, params, x1)
        fwd = list(be.kernels.launch_log)
        be.kernels.launch_log.clear()
        be.network_value(net, params, x1, loss)
        val = list(be.kernels.launch_log)
    finally:
        be.kernels.empty = real_empty
        be.kernels.launch_log = None
    assert [r for r, _ in plain[1]] == ["fused.step", "fused.reduce"], plain[1]
    assert plain[0] == 1, "a plain call after the first allocates its output block only"
    assert first[0] >= 3, "the first call allocates the workspaces (cfg table, partials) too"
    assert with_out[0] == 0 and len(with_out[1]) == 2
    assert v3 is v2 and g3[0][0] is g2[0][0]
    assert [r for r, _ in fwd] == ["fused.forward"]
    assert [r for r, _ in val] == ["fused.value", "fused.reduce"]
    # the first results were not overwritten by the calls after them
    assert host(v1).tobytes() == keep[0].tobytes()
    for (w, _), k in zip(g1, keep[1]):
        assert host(w).tobytes() == k.tobytes()
    v_r, g_r, _ = REF.network_value_and_grad(net, [(host(W), host(b)) for W, b in params],
                                              host(x2), loss)
    check_close(v3, v_r, tol(dtype), "value (out=)")
    for (dW, db), (dW_r, db_r) in zip(g3, g_r):
        check_close(dW, dW_r, tol(dtype), "dW (out=)")
        check_close(db, db_r, tol(dtype), "db (out=)")


def case_fused_sanitizer_subset(be, xp, rng, monkeypatch):
    """Small cases reaching every phase of the fused kernel (narrow and wide, super-tiles,
    wrt_input, targets, both dtypes, DMMA / FMA / 3xTF32): what compute-sanitizer checks on a
    GPU and the emulator's address / thread modes check on the CPU."""
    monkeypatch.setattr(fl, "WIDE_MIN", 24)
    monkeypatch.setattr(fl, "FUSED_BLOCKS", 3)
    # emulator: 2 persistent blocks for the 3 slices, so one block walks two of them
    monkeypatch.setattr(be.fused, "simulated_sms", 2)
    case_fused(be, xp, rng, [3, 21, 6, 2], ["tanh", "elu", "identity"], "float64", 53,
               need_dx=True, target=True, wide=False)
    case_fused(be, xp, rng, [2, 40, 9, 1], ["softplus", "relu", "identity"], "float64", 150,
               target=True, wide=True)
    case_fused(be, xp, rng, [1, 33, 5], ["silu", "identity"], "float64", 37, need_dx=True, wide=True)
    case_fused(be, xp, rng, [4, 18, 3], ["gelu", "sigmoid"], "float32", 41, precision="3xtf32")
    case_fused(be, xp, rng, [2, 30, 7, 1], ["tanh", "identity", "identity"], "float32", 90, wide=True)


# -- the emulated suite ----------------------------------------------------------------------------

emu = pytest.importorskip("cupynn.emulator", reason="the CPU emulator is not there")


def _fused_names(names):
    return sorted(n for n in names if "fused_" in n), sorted(n for n in names if "fused_" not in n)


def make_backend(module_cls, arch, names):
    be = cb.CudaBackend(xp=np, module_cls=module_cls, arch=arch)
    fused, dense = _fused_names(names)
    if fused:
        be.kernels.warm_up(fl.SOURCE, fused, workers=2, modules=2)
    if dense:
        be.warm_up(dense, workers=2, modules=1)
    be.kernels.poison = True
    return be


@pytest.fixture(scope="module")
def be(request):
    """The shared emulated backend (every catalog kernel built once, for sm_80: the m16n8k16
    steps run as m8n8k4 sequences; test_sm90_direct runs the sm_90 emulation itself)."""
    from .conftest import emulated_cuda_backend

    try:
        backend = emulated_cuda_backend(request)
    except Exception as exc:  # pragma: no cover - no compiler
        pytest.skip(f"emulator unusable: {exc}")
    backend.kernels.poison = True
    return backend


@pytest.fixture
def small_wide(monkeypatch):
    """Fan-in <= 4 first layers from 24 units on take the wide class."""
    monkeypatch.setattr(fl, "WIDE_MIN", 24)


@pytest.fixture
def few_blocks(monkeypatch):
    """Two blocks per batch: each walks several tiles (and, wide, super-tiles)."""
    monkeypatch.setattr(fl, "FUSED_BLOCKS", 2)


@pytest.mark.emulator
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS)
def test_every_activation(be, rng, small_wide, act, dtype):
    case_fused(be, np, rng, [3, 19, 6, 2], act, dtype, 37, need_dx=True, wide=False)
    case_fused(be, np, rng, [1, 40, 7, 1], [act, act, "identity"], dtype, 45, target=True,
               wide=True)


@pytest.mark.emulator
@pytest.mark.parametrize("precision", ["tf32", "3xtf32"])
def test_float32_precision_modes(be, rng, small_wide, precision):
    case_fused(be, np, rng, [5, 33, 17, 3], ["gelu", "relu", "tanh"], "float32", 70,
               precision=precision, need_dx=True, wide=False)
    case_fused(be, np, rng, [2, 50, 20, 1], ["tanh", "elu", "identity"], "float32", 70,
               precision=precision, wide=True)


# M around the tile sizes for two blocks: rows per block 16 (M <= 32), 32, 64, 128 and more
# (BT 128, several tiles, a short last one); the wide class also around its super-tiles
@pytest.mark.emulator
@pytest.mark.parametrize("M", [1, 2, 31, 33, 63, 65, 127, 129, 255, 257, 301])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tile_boundaries(be, rng, small_wide, few_blocks, M, dtype):
    case_fused(be, np, rng, [4, 23, 9, 2], ["tanh", "silu", "identity"], dtype, M, wide=False,
               bias=(M % 2 == 1))
    case_fused(be, np, rng, [1, 37, 20, 1], ["tanh", "identity", "identity"], dtype, M,
               wide=True, target=(M % 2 == 0))


@pytest.mark.emulator
def test_many_blocks(be, rng, small_wide):
    # 132 blocks of 16 rows, the last one short
    case_fused(be, np, rng, [1, 30, 9, 1], "tanh", "float64", 16 * 131 + 5, wide=True)


@pytest.mark.emulator
@pytest.mark.parametrize("loss,target", [("sum_squares", True), ("mse", False), ("mse", True)])
def test_losses(be, rng, small_wide, loss, target):
    case_fused(be, np, rng, [3, 17, 2], ["softplus", "leaky_relu"], "float64", 41, loss=loss,
               target=target, wide=False)
    case_fused(be, np, rng, [2, 30, 1], ["sigmoid", "identity"], "float64", 41, loss=loss,
               target=target, wide=True)


@pytest.mark.emulator
def test_callable_loss_takes_the_per_layer_path(be, rng):
    net, params = make_net(rng, [3, 17, 2], "tanh", "float64")
    loss = LossSpec("callable", None, lambda y: ((y * y).sum(), 2 * y))
    assert be.execution_path(net, 10, loss=loss).startswith("per-layer: a callable loss")
    case_network(be, np, rng, [3, 17, 2], "tanh", "float64", 23, loss="callable")


@pytest.mark.emulator
def test_input_gradient_and_no_bias(be, rng, small_wide, few_blocks):
    case_fused(be, np, rng, [6, 20, 4, 3], ["tanh", "identity", "sigmoid"], "float64", 75,
               need_dx=True, bias=[True, False, True], wide=False)
    case_fused(be, np, rng, [3, 36, 8, 2], ["gelu_erf", "relu", "identity"], "float64", 75,
               need_dx=True, bias=[False, True, False], wide=True)
    case_fused(be, np, rng, [4, 30, 5], ["elu", "identity"], "float32", 75, need_dx=True,
               bias=False, wide=True)
    case_fused(be, np, rng, [7, 5], "softplus", "float64", 75, need_dx=True, wide=False)  # one layer


@pytest.mark.emulator
@pytest.mark.parametrize("x_layout", ["t", "slice"])
def test_strided_input(be, rng, small_wide, x_layout):
    case_fused(be, np, rng, [1, 40, 20, 1], "tanh", "float64", 23, x_layout=x_layout, wide=True)
    case_fused(be, np, rng, [6, 10, 2], "relu", "float64", 23, x_layout=x_layout, need_dx=True,
               wide=False)


@pytest.mark.emulator
def test_nan_propagates(be, rng, small_wide):
    case_fused(be, np, rng, [1, 40, 20, 1], "relu", "float64", 9, nan_row=True, wide=True)
    case_fused(be, np, rng, [3, 5, 2], "tanh", "float32", 9, nan_row=True, need_dx=True, wide=False)


@pytest.mark.emulator
def test_deep_and_widest(be, rng):
    case_fused(be, np, rng, [5] + [9] * 7 + [2], ["tanh", "relu", "elu", "silu", "identity",
                                                  "gelu", "sigmoid", "identity"], "float64", 33)
    case_fused(be, np, rng, [2, 256, 3], ["relu", "identity"], "float32", 20, need_dx=True)


@pytest.mark.emulator
def test_batch_zero_and_one(be, rng):
    net, _ = make_net(rng, [1, 40, 20, 1], "tanh", "float64")
    assert be.execution_path(net, 0).startswith("per-layer")
    v, grads, dx = case_network(be, np, rng, [1, 40, 20, 1], "tanh", "float64", 0, need_dx=True)
    assert float(v) == 0.0
    case_fused(be, np, rng, [1, 40, 20, 1], "tanh", "float64", 1, need_dx=True)


@pytest.mark.emulator
def test_deterministic(be, rng, small_wide, few_blocks):
    for sizes in ([1, 40, 9, 1], [3, 21, 6, 2]):
        net, params = make_net(rng, sizes, "tanh", "float64")
        x = rng.standard_normal((301, sizes[0]))
        runs = [be.network_value_and_grad(net, params, x, LossSpec("sum_squares")) for _ in range(2)]
        assert host(runs[0][0]).tobytes() == host(runs[1][0]).tobytes()
        for (a, b), (c, d) in zip(runs[0][1], runs[1][1]):
            assert a.tobytes() == c.tobytes() and b.tobytes() == d.tobytes()


@pytest.mark.emulator
def test_launches_allocations_and_aliasing(be, rng):
    from .conftest import emulated_cuda_backend

    fresh = emulated_cuda_backend()  # no plan cached by an earlier run of this test (schedules)
    fresh.kernels.poison = True
    case_fused_launches(fresh, np, rng, [3, 21, 6, 2])


@pytest.mark.emulator
def test_planned_launches_reproduce_the_call(be, rng, small_wide):
    net, params = make_net(rng, [1, 40, 9, 1], "tanh", "float64")
    x = rng.standard_normal((150, 1))
    loss = LossSpec("sum_squares")
    launches, (value, grads, _) = be.planned_launches(net, params, x, loss)
    assert [p.range for p in launches] == ["fused.step", "fused.reduce"]
    assert np.isnan(value)  # poisoned, not run yet
    for p in launches:
        p.launch()
        p.launch()  # twice: the first tile writes each block's partials, the reduction overwrites
    v_r, g_r, _ = REF.network_value_and_grad(net, params, x, loss)
    check_close(value, v_r, 1e-12, "value")
    for (dW, db), (dW_r, db_r) in zip(grads, g_r):
        check_close(dW, dW_r, 1e-12, "dW")
        check_close(db, db_r, 1e-12, "db")


@pytest.mark.emulator
@pytest.mark.slow
def test_sm90_direct(rng, small_wide, few_blocks):
    """arch sm_90: the m16n8k16 / m16n8k8 emulation itself (what an H100/H200 runs), where
    the rest of this file runs sm_80's m8n8k4 sequences."""
    be90 = make_backend(emu.EmulatedModule, ARCH, [fl.kernel_name("double", 1),
                                                  fl.reduce_name("double"),
                                                  fl.kernel_name("float", 2),
                                                  fl.reduce_name("float")])
    case_fused(be90, np, rng, [3, 21, 6, 2], ["tanh", "elu", "identity"], "float64", 53,
               need_dx=True, wide=False)
    case_fused(be90, np, rng, [2, 40, 9, 1], ["gelu", "relu", "identity"], "float64", 150,
               target=True, wide=True)
    case_fused(be90, np, rng, [1, 30, 20, 1], "tanh", "float32", 77, precision="tf32", wide=True)


@pytest.mark.emulator
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_clean_under_sanitizer(sanitizer, monkeypatch):
    from cupynn.emulator.testing import sanitizer_available

    ok, why = sanitizer_available(sanitizer)
    if not ok:
        pytest.skip(f"sanitizer {sanitizer!r} unavailable: {why}")
    names = kernels_used(lambda dry: dry_call(case_fused_sanitizer_subset, be=dry, xp=np,
                                              rng=np.random.default_rng(0),
                                              monkeypatch=pytest.MonkeyPatch()),
                         fused=True, arch=ARCH)
    assert len(_fused_names(names)[0]) >= 4, names
    mod = functools.partial(emu.EmulatedModule, sanitizer=sanitizer)
    be = make_backend(mod, ARCH, names)
    case_fused_sanitizer_subset(be, np, np.random.default_rng(11), monkeypatch)


# -- path choice and layouts (nothing runs) -----------------------------------------------------------

def test_configuration_table_matches_the_kernel():
    src = (fl._loader.KERNEL_DIR / fl.SOURCE).read_text()

    def enum(first):
        body = re.search(r"enum : int \{\s*" + first + r"([^}]*)\}", src).group(0)
        names = re.findall(r"\b([HF]_[A-Z0-9_]+|HEADER|LAYER_WORDS|MODE_[A-Z]+)\b(\s*=\s*(\d+))?", body)
        out, i = {}, 0
        for name, _, val in names:
            i = int(val) if val else i
            out[name] = i
            i += 1
        return out

    h = enum("H_L")
    f = enum("F_K")
    m = enum("MODE_FORWARD")
    assert h.pop("HEADER") == fl.HEADER and f.pop("LAYER_WORDS") == fl.LAYER_WORDS
    for name, v in {**h, **f, **m}.items():
        assert getattr(fl, name) == v, name
    for const in ("MAX_LAYERS", "MAX_K0", "FMW", "FNW"):
        assert int(re.search(rf"constexpr int {const} = (\d+);", src).group(1)) == getattr(fl, const)


@pytest.mark.parametrize("M,limit", [(10_000, H200_SMEM), (1_000_000, H200_SMEM),
                                     (1_000_000, 166912), (1, H200_SMEM)])
def test_seed_layout(M, limit):
    lay = fl.fused_layout(spec([1, 1000, 20, 1], "identity"), M, mode=fl.MODE_GRAD,
                          smem_limit=limit)
    assert isinstance(lay, fl.FusedLayout) and lay.wide
    assert lay.smem_bytes + fl.STATIC_SMEM <= limit
    assert lay.grid <= fl.FUSED_BLOCKS and lay.grid * lay.rows_per_block >= M
    assert lay.super_rows % lay.tile_rows == 0 and lay.tile_rows in fl.TILE_ROWS
    assert lay.partial_stride == 1000 + 1000 + 20 * 1000 + 20 + 20 + 1 + 1
    assert lay.kernel == "cupynn::fused_mlp<double, 1>"
    if M == 10_000:
        assert (lay.rows_per_block, lay.grid) == (80, 125)


def test_narrow_workload_layout():
    net = spec([32, 64, 64, 64, 64, 1], ["relu"] * 4 + ["identity"], "float32")
    lay = fl.fused_layout(net, 1 << 20, mode=fl.MODE_GRAD, smem_limit=H200_SMEM)
    assert isinstance(lay, fl.FusedLayout) and not lay.wide and lay.tile_rows == 64
    assert lay.kernel == "cupynn::fused_mlp<float, 0>"
    tf = fl.fused_layout(spec([32, 64, 64, 64, 64, 1], ["relu"] * 4 + ["identity"], "float32",
                              "tf32"), 1 << 20, mode=fl.MODE_GRAD, smem_limit=H200_SMEM)
    assert tf.kernel == "cupynn::fused_mlp<float, 2>"


@pytest.mark.parametrize("sizes,why", [
    ([5, 257, 3], "257 wide"),                 # hidden > 256 after a fan-in 5: stored, too wide
    ([1, 5000, 3], "5000 wide"),               # wider than WIDE_MAX
    ([3, 20, 300], "300 wide (output)"),
    ([3] + [4] * 9, "9 layers"),
])
def test_what_is_not_fused(sizes, why):
    r = fl.fused_layout(spec(sizes, "tanh"), 100, mode=fl.MODE_GRAD, smem_limit=H200_SMEM)
    assert isinstance(r, str) and why in r, r


def test_wide_class_bounds():
    for sizes in ([2, 257, 3], [4, 4096, 24, 1], [3, 1000, 24, 1]):
        r = fl.fused_layout(spec(sizes, "tanh"), 100, mode=fl.MODE_GRAD, smem_limit=H200_SMEM)
        assert isinstance(r, fl.FusedLayout) and r.wide, r
    # past one 24-column pass of layer 1 (W1 re-read from L2, h0 recomputed per pass): the
    # per-layer path, for every call kind, and execution_path says why
    for sizes in ([4, 4096, 32, 1], [3, 1000, 256, 1], [1, 1000, 25, 1]):
        for mode in (fl.MODE_GRAD, fl.MODE_FORWARD):
            r = fl.fused_layout(spec(sizes, "tanh"), 100, mode=mode, smem_limit=H200_SMEM)
            assert isinstance(r, str) and "24-column pass" in r and "per-layer" in r, r


def test_fan_in_limited_by_shared_memory():
    r = fl.fused_layout(spec([2000, 64, 1], "relu", "float64"), 4096, mode=fl.MODE_GRAD,
                        smem_limit=166912)
    assert isinstance(r, str) and "shared memory" in r, r
    ok = fl.fused_layout(spec([300, 64, 1], "relu", "float32"), 4096, mode=fl.MODE_GRAD,
                         smem_limit=166912)
    assert isinstance(ok, fl.FusedLayout)


def test_float64_without_dmma_is_not_fused():
    r = fl.fused_layout(spec([3, 20, 1], "tanh"), 100, mode=fl.MODE_GRAD, smem_limit=H200_SMEM,
                        f64_mma=False)
    assert isinstance(r, str) and "DMMA" in r


def test_switch_off(monkeypatch):
    monkeypatch.setattr(fl, "_ENABLED_ENV", "0")
    fl._fused_layout.cache_clear()
    r = fl.fused_layout(spec([3, 20, 1], "tanh"), 100, mode=fl.MODE_GRAD, smem_limit=H200_SMEM)
    assert isinstance(r, str) and "CUPYNN_FUSED=0" in r
    fl._fused_layout.cache_clear()
