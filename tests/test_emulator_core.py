"""The CPU emulator itself: dialect built-ins, launch checks, error reports, caching."""

from __future__ import annotations

import time

import numpy as np
import pytest

emu = pytest.importorskip("cupynn.emulator")
from cupynn.emulator.testing import TESTDATA, emulated_module  # noqa: E402

pytestmark = pytest.mark.emulator

BASICS = ("axpy<double>", "axpy<float>", "row_sum<double, 128>", "row_sum<float, 64>",
          "reverse_chunks", "warp_ops", "bad_shuffle", "deadlock")


@pytest.fixture(scope="module")
def basics():
    try:
        return emulated_module(TESTDATA / "basics.cu", BASICS)
    except emu.EmulatorBuildError as exc:  # pragma: no cover - no g++
        pytest.skip(f"no C++ compiler for the emulator: {exc}")


@pytest.mark.parametrize("dtype,name", [(np.float64, "axpy<double>"), (np.float32, "axpy<float>")])
@pytest.mark.parametrize("n", [1, 127, 1025])
def test_axpy(basics, dtype, name, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    want = dtype(1.5) * x + y
    basics.get_function(name)(((n + 127) // 128,), (128,), (dtype(1.5), x, y, np.int64(n)))
    np.testing.assert_allclose(y, want, rtol=1e-6)


@pytest.mark.parametrize("dtype,name,block", [(np.float64, "row_sum<double, 128>", 128),
                                              (np.float32, "row_sum<float, 64>", 64)])
def test_block_reduction(basics, dtype, name, block):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((33, 1023)).astype(dtype)
    out = np.full(33, np.nan, dtype)
    basics.get_function(name)((33,), (block,), (x, out, np.int32(1023)))
    np.testing.assert_allclose(out, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


def test_dynamic_shared_memory(basics):
    x = np.arange(300, dtype=np.float32)
    y = np.full(300, np.nan, np.float32)
    basics.get_function("reverse_chunks")((3,), (100,), (x, y, np.int32(300)), shared_mem=400)
    np.testing.assert_array_equal(y, x.reshape(3, 100)[:, ::-1].ravel())


def test_warp_ops(basics):
    rng = np.random.default_rng(2)
    block = (16, 2, 2)
    n = 64
    x = rng.integers(-50, 50, n).astype(np.int32)
    x[40] = 101  # warp 1: any(v > 100) true
    ballot = np.zeros(2, np.uint32)
    any_all = np.zeros(4, np.int32)
    up = np.zeros(n, np.int32)
    idx8 = np.zeros(n, np.int32)
    ll = np.zeros(n, np.int64)
    casts = np.zeros(n, np.float32)
    basics.get_function("warp_ops")((1,), block, (x, ballot, any_all, up, idx8, ll, casts))
    t = np.arange(n)
    lane = t % 32
    for w in range(2):
        bits = (x[w * 32:(w + 1) * 32] > 0).astype(np.uint64)
        assert ballot[w] == int((bits << np.arange(32, dtype=np.uint64)).sum())
    assert list(any_all) == [0, 1, 1, 1]
    np.testing.assert_array_equal(up, np.where(lane % 16 >= 3, x[np.maximum(t - 3, 0)], x))
    np.testing.assert_array_equal(idx8, x[(t // 32) * 32 + (lane & ~7) + 5])
    np.testing.assert_array_equal(ll, x[t ^ 1].astype(np.int64) << 33)
    np.testing.assert_array_equal(casts, x.astype(np.float32) + 0.5 + lane)


def test_shuffle_naming_exited_lanes_is_an_error(basics):
    with pytest.raises(emu.EmulatorError, match="already returned|returned while"):
        basics.get_function("bad_shuffle")((1,), (32,), (np.zeros(32, np.int32),))


def test_deadlock_is_reported(basics):
    with pytest.raises(emu.EmulatorError, match="deadlock"):
        basics.get_function("deadlock")((1,), (64,), (np.zeros(1, np.int32),))


def test_module_still_usable_after_an_error(basics):
    with pytest.raises(emu.EmulatorError):
        basics.get_function("deadlock")((2,), (64,), (np.zeros(1, np.int32),))
    test_block_reduction(basics, np.float64, "row_sum<double, 128>", 128)


def test_argument_checks(basics):
    f = basics.get_function("axpy<double>")
    x = np.ones(4)
    y = np.ones(4)
    with pytest.raises(TypeError, match="long long"):
        f((1,), (4,), (np.float64(1), x, y, np.int32(4)))  # int where long long expected
    with pytest.raises(TypeError, match="numpy scalar"):
        f((1,), (4,), (np.float64(1), x, y, 4))  # Python int: CuPy would not check its size
    with pytest.raises(TypeError, match="double\\* pointer but the array has dtype float32"):
        f((1,), (4,), (np.float64(1), x.astype(np.float32), y, np.int64(4)))
    with pytest.raises(TypeError, match="double"):
        f((1,), (4,), (np.float32(1), x, y, np.int64(4)))
    with pytest.raises(TypeError, match="C-contiguous"):
        f((1,), (4,), (np.float64(1), np.ones(8)[::2], y, np.int64(4)))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        f((1,), (4,), (np.float64(1), x, y))
    with pytest.raises(TypeError, match="read-only"):
        ro = np.ones(4)
        ro.flags.writeable = False
        f((1,), (4,), (np.float64(1), x, ro, np.int64(4)))
    with pytest.raises(ValueError, match="1024"):
        f((1,), (2048,), (np.float64(1), x, y, np.int64(4)))
    with pytest.raises(ValueError, match="grid"):
        f((0,), (4,), (np.float64(1), x, y, np.int64(4)))
    with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes"):
        f((1,), (4,), (np.float64(1), x, y, np.int64(4)), shared_mem=64 * 1024)
    with pytest.raises(KeyError, match="name_expressions"):
        basics.get_function("axpy<int>")


def test_blocks_in_parallel_are_deterministic(basics, monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 300))
    outs = []
    for threads in ("1", "4"):
        monkeypatch.setenv("CUPYNN_EMU_THREADS", threads)
        out = np.full(200, np.nan)
        basics.get_function("row_sum<double, 128>")((200,), (128,), (x, out, np.int32(300)))
        outs.append(out)
    assert outs[0].tobytes() == outs[1].tobytes()


def test_extern_c_kernels_found_without_name_expressions():
    mod = emu.EmulatedModule(path=str(TESTDATA / "planted_bugs.cu"))
    x = np.arange(32, dtype=np.float32)
    y = np.zeros(32, np.float32)
    mod.get_function("warp_exchange")((1,), (32,), (x, y, np.int32(1)))
    np.testing.assert_array_equal(y, x[::-1])


def test_cache_makes_the_second_build_fast():
    code = (TESTDATA / "basics.cu").read_text()
    opts = ("-I" + str(TESTDATA.parents[2] / "kernels"),)
    emu.EmulatedModule(code, options=opts, name_expressions=("reverse_chunks",))
    t0 = time.perf_counter()
    emu.EmulatedModule(code, options=opts, name_expressions=("reverse_chunks",))
    assert time.perf_counter() - t0 < 1.0


def test_compile_errors_are_reported():
    with pytest.raises(emu.EmulatorBuildError, match="undeclared|not declared|error"):
        emu.EmulatedModule('extern "C" __global__ void k(int* p) { p[0] = no_such_name; }')
