"""kernels/mma.cuh: fragment layouts and tf32 rounding, on the emulator and (gpu) on a GPU.

The test kernels (cupynn/emulator/testdata/mma_test.cu) load each lane's fragment through the
mma_*_row/col helpers, call the wrapper, and store D the same way; NumPy is the reference.
On a GPU the same file runs through cupy.RawModule, both with the real mma.sync and with the
emulator's shuffle-based reference (-DCUPYNN_MMA_REFERENCE), so the CPU model of the
tensor cores is itself checked against the hardware.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupynn.emulator.testing import TESTDATA, emulated_module, kernels_dir

KERNELS = ("mma_f64_tile", "mma_tf32_tile", "mma_3xtf32_tile", "to_tf32", "mma_f64_m16n8k16_tile",
           "mma_f64_m16n8k8_tile", "mma_f64_m16n8k4_tile", "mma_tf32_m16n8k16_tile")
KERNEL_DIR = kernels_dir()  # the loader's (a mutation run points it at a scratch copy)


def tf32_rna(x: np.ndarray) -> np.ndarray:
    """Round float32 to 10 mantissa bits, ties away from zero (independent of the bit trick)."""
    x = np.asarray(x, np.float32).astype(np.float64)
    m, e = np.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    r = np.sign(m) * np.floor(np.abs(m) * 2.0**11 + 0.5) / 2.0**11
    with np.errstate(over="ignore"):
        return np.ldexp(r, e).astype(np.float32)


def tf32_trunc(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def run_all(launch, rng, xp=np):
    """Check every test kernel through `launch(name, grid, block, args)`; xp for device arrays."""
    def dev(a):
        return xp.asarray(a)

    def host(a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    # f64 8x8x4
    A, B, C = rng.standard_normal((8, 4)), rng.standard_normal((4, 8)), rng.standard_normal((8, 8))
    D = dev(np.full((8, 8), np.nan))
    launch("mma_f64_tile", (1,), (32,), (dev(A), dev(B), dev(C), D))
    np.testing.assert_allclose(host(D), A @ B + C, rtol=1e-14, atol=1e-14)

    # f64 16x8xK in the m16n8 layout (sm_90: one mma.m16n8kK; sm_80: K/4 x 2 m8n8k4)
    for K in (16, 8, 4):
        A, B = rng.standard_normal((16, K)), rng.standard_normal((K, 8))
        C = rng.standard_normal((16, 8))
        D = dev(np.full((16, 8), np.nan))
        launch(f"mma_f64_m16n8k{K}_tile", (1,), (32,), (dev(A), dev(B), dev(C), D))
        np.testing.assert_allclose(host(D), A @ B + C, rtol=1e-14, atol=1e-14, err_msg=f"k{K}")

    # tf32 16x8x16 as two m16n8k8 on the halves of the m16n8 registers
    A = rng.standard_normal((16, 16)).astype(np.float32)
    B = rng.standard_normal((16, 8)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    D = dev(np.full((16, 8), np.nan, np.float32))
    launch("mma_tf32_m16n8k16_tile", (1,), (32,), (dev(A), dev(B), dev(C), D))
    want = tf32_rna(A).astype(np.float64) @ tf32_rna(B).astype(np.float64) + C
    np.testing.assert_allclose(host(D), want, rtol=2e-6, atol=2e-6)

    # tf32 16x8x8, with and without rounding the inputs first
    A = rng.standard_normal((16, 8)).astype(np.float32)
    B = rng.standard_normal((8, 8)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    for rnd, conv in ((1, tf32_rna), (0, tf32_trunc)):
        D = dev(np.full((16, 8), np.nan, np.float32))
        launch("mma_tf32_tile", (1,), (32,), (dev(A), dev(B), dev(C), D, np.int32(rnd)))
        want = conv(A).astype(np.float64) @ conv(B).astype(np.float64) + C
        np.testing.assert_allclose(host(D), want, rtol=2e-6, atol=2e-6)
        full = A.astype(np.float64) @ B + C
        err = np.linalg.norm(host(D) - full) / np.linalg.norm(full)
        assert 1e-6 < err < 5e-3  # tf32 is visibly less accurate than float32

    D = dev(np.full((16, 8), np.nan, np.float32))
    launch("mma_3xtf32_tile", (1,), (32,), (dev(A), dev(B), dev(C), D))
    full = A.astype(np.float64) @ B + C
    assert np.linalg.norm(host(D) - full) / np.linalg.norm(full) < 1e-6

    # cvt.rna.tf32.f32 on normal numbers, exact ties, overflow, inf and NaN
    x = np.concatenate([
        rng.standard_normal(1000).astype(np.float32) * np.float32(1e3),
        (np.float32(1) + np.float32(2.0**-11)) * np.float32([1, -1, 3, -7]),  # exact ties
        np.float32([1 + 3 * 2.0**-11, 1.0, -0.0, 0.0, 3.4028235e38, -3.4028235e38]),
    ]).astype(np.float32)
    out = dev(np.zeros(x.size, np.uint32))
    launch("to_tf32", ((x.size + 127) // 128,), (128,), (dev(x), out, np.int32(x.size)))
    got = host(out).view(np.float32)
    np.testing.assert_array_equal(got, tf32_rna(x))
    special = dev(np.float32([np.inf, -np.inf, np.nan]))
    out = dev(np.zeros(3, np.uint32))
    launch("to_tf32", (1,), (32,), (special, out, np.int32(3)))
    got = host(out).view(np.float32)
    assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])


def test_layout_helpers_cover_each_tile_once():
    # The formulas of mma.cuh, restated: every element of every fragment is owned exactly once.
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3
    for rows, cols, shape in [((g,), (t,), (8, 4)), ((t,), (g,), (4, 8)),
                              ((g, g), (2 * t, 2 * t + 1), (8, 8)),
                              ((g, g + 8, g, g + 8), (t, t, t + 4, t + 4), (16, 8)),
                              ((t, t + 4), (g, g), (8, 8)),
                              ((g, g, g + 8, g + 8), (2 * t, 2 * t + 1, 2 * t, 2 * t + 1), (16, 8)),
                              # m16n8k16 f64: A (16 x 16), B (16 x 8)
                              (tuple(g + 8 * (v & 1) for v in range(8)),
                               tuple(t + 4 * (v >> 1) for v in range(8)), (16, 16)),
                              (tuple(t + 4 * v for v in range(4)), (g,) * 4, (16, 8))]:
        seen = np.zeros(shape, int)
        for r, c in zip(rows, cols):
            np.add.at(seen, (r, c), 1)
        assert (seen == 1).all()


@pytest.mark.emulator
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mma_on_emulator(arch):
    # sm_80: the m16n8 f64 tiles run as m8n8k4 sequences; sm_90: the m16n8kK emulation itself
    mod = emulated_module(TESTDATA / "mma_test.cu", KERNELS,
                          options=("-I" + str(KERNEL_DIR), "-std=c++17", f"-arch={arch}"))
    run_all(lambda n, g, b, a: mod.get_function(n)(g, b, a), np.random.default_rng(0))


def _gpu():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # no driver
        pytest.skip(f"no usable GPU: {exc}")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("reference", [False, True], ids=["mma.sync", "emulator-reference"])
def test_mma_on_gpu(reference):
    # On sm_90 "mma.sync" runs mma.m16n8k16/k8/k4.f64 (DMMA.16x8x16 ...) against NumPy, and the
    # reference run checks the emulator's m16n8 layout against the same expectations; on sm_80
    # both run the m8n8k4 composition.
    cp = _gpu()
    opts = ("-std=c++17", f"-I{KERNEL_DIR}") + (("-DCUPYNN_MMA_REFERENCE",) if reference else ())
    mod = cp.RawModule(code=(TESTDATA / "mma_test.cu").read_text(), options=opts,
                       name_expressions=KERNELS)
    run_all(lambda n, g, b, a: mod.get_function(n)(g, b, a), np.random.default_rng(0), xp=cp)
