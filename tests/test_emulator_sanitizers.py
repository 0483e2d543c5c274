"""AddressSanitizer and ThreadSanitizer modes of the emulator catch planted bugs.

The counterparts of compute-sanitizer memcheck (a one-element overrun of a global array or of
dynamic shared memory, a misaligned vector read) and racecheck (a missing __syncthreads /
__syncwarp between a shared memory write and another thread's read).  The bug-free variants must pass clean.
"""

from __future__ import annotations

import numpy as np
import pytest

emu = pytest.importorskip("cupynn.emulator")
from cupynn.emulator.testing import TESTDATA, emulated_module, sanitizer_available  # noqa: E402

pytestmark = [pytest.mark.emulator, pytest.mark.slow]  # builds the sanitizer runtimes
BUGS = TESTDATA / "planted_bugs.cu"


def module(sanitizer, source=BUGS, names=()):
    ok, why = sanitizer_available(sanitizer)
    if not ok:
        pytest.skip(f"sanitizer {sanitizer!r} unavailable: {why}")
    return emulated_module(source, names, sanitizer=sanitizer)


def test_asan_catches_one_element_overrun():
    f = module("address").get_function("scale_overrun")
    x = np.random.default_rng(0).standard_normal(100)
    y = np.full(100, np.nan)
    f((1,), (128,), (x, y, np.int32(100), np.int32(0)))  # correct version: clean
    np.testing.assert_array_equal(y, 2 * x)
    with pytest.raises(emu.SanitizerError, match="heap-buffer-overflow") as info:
        f((1,), (128,), (x, y, np.int32(100), np.int32(1)))
    assert "scale_overrun" in info.value.report


def test_asan_catches_dynamic_shared_overrun():
    f = module("address").get_function("smem_overrun")
    y = np.zeros(64, np.float32)
    f((1,), (64,), (y, np.int32(0)), shared_mem=64 * 4)
    np.testing.assert_array_equal(y, np.arange(64, dtype=np.float32))
    with pytest.raises(emu.SanitizerError, match="heap-buffer-overflow"):
        f((1,), (64,), (y, np.int32(1)), shared_mem=64 * 4)


def test_address_mode_catches_misaligned_vector_read():
    """A 16-byte vector read 4 bytes off its alignment: works on x86, faults on the GPU."""
    f = module("address").get_function("vector_read")
    x = np.random.default_rng(3).standard_normal(4 * 64 + 4).astype(np.float32)
    y = np.full(64, np.nan, np.float32)
    f((1,), (64,), (x, y, np.int32(0)))  # aligned: clean
    np.testing.assert_allclose(y, x[:256].reshape(64, 4).sum(1), rtol=1e-6)
    with pytest.raises(emu.SanitizerError, match="misaligned address") as info:
        f((1,), (64,), (x, y, np.int32(1)))
    assert "16 byte alignment" in info.value.report


@pytest.mark.parametrize("kernel,block", [("neighbour_sum", 256), ("warp_exchange", 32)])
def test_tsan_catches_missing_barrier(kernel, block):
    f = module("thread").get_function(kernel)
    x = np.random.default_rng(1).standard_normal(2 * block).astype(np.float32)
    y = np.zeros(2 * block, np.float32)
    grid = (2,) if kernel == "neighbour_sum" else (1,)
    f(grid, (block,), (x, y, np.int32(1)))  # with the barrier: clean
    if kernel == "neighbour_sum":
        xb = x.reshape(2, block)
        np.testing.assert_array_equal(y.reshape(2, block), xb + np.roll(xb, -1, axis=1))
    with pytest.raises(emu.SanitizerError, match="data race") as info:
        f(grid, (block,), (x, y, np.int32(0)))
    assert kernel in info.value.report


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_clean_kernels_pass_both_sanitizers(sanitizer):
    """Barriers, shuffles, votes, dynamic shared memory, several blocks on several threads."""
    mod = module(sanitizer, TESTDATA / "basics.cu",
                 ("row_sum<double, 128>", "reverse_chunks", "warp_ops"))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 300))
    out = np.full(9, np.nan)
    mod.get_function("row_sum<double, 128>")((9,), (128,), (x, out, np.int32(300)))
    np.testing.assert_allclose(out, x.sum(1), rtol=1e-12)
    xs = np.arange(300, dtype=np.float32)
    ys = np.zeros(300, np.float32)
    mod.get_function("reverse_chunks")((3,), (100,), (xs, ys, np.int32(300)), shared_mem=400)
    np.testing.assert_array_equal(ys, xs.reshape(3, 100)[:, ::-1].ravel())
    mma = module(sanitizer, TESTDATA / "mma_test.cu", ("mma_f64_tile",))
    A, B, C = rng.standard_normal((8, 4)), rng.standard_normal((4, 8)), rng.standard_normal((8, 8))
    D = np.zeros((8, 8))
    mma.get_function("mma_f64_tile")((1,), (32,), (A, B, C, D))
    np.testing.assert_allclose(D, A @ B + C, rtol=1e-13)


def test_emulator_errors_cross_the_process_boundary():
    mod = module("address", TESTDATA / "basics.cu", ("deadlock",))
    with pytest.raises(emu.EmulatorError, match="deadlock"):
        mod.get_function("deadlock")((1,), (64,), (np.zeros(1, np.int32),))
