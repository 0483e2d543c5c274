"""One planted GPU bug per capability of the emulator, each of which it must catch.

The kernels are in cupynn/emulator/testdata/emulator_bugs.cu; each takes a flag that selects
the correct version (which must pass) or the bug.  The capabilities: adversarial fiber and
block schedules, poisoned static shared memory, guarded array arguments (an overrun fails the
launch with the kernel and offset named instead of killing the process), cp.async modelled as
the hardware behaves (poisoned at issue, landing at the matching wait), the wrappers' PTX text
executed by the emulator (a swapped operand fails on the CPU), bit-exact fixed-order
reductions, and the sparse-memory mode for launches whose M x N passes 2^31.
"""

from __future__ import annotations

import numpy as np
import pytest

emu = pytest.importorskip("cupynn.emulator")
from cupynn.emulator.testing import TESTDATA, emulated_module, kernels_dir  # noqa: E402

pytestmark = pytest.mark.emulator
BUGS = TESTDATA / "emulator_bugs.cu"
NAMES = ("left_neighbour", "chain_blocks", "stale_shared", "overrun", "cp_async_groups",
         "mma_wrapper<0>", "mma_wrapper<1>", "mma_wrapper<2>", "mma_wrapper<3>", "exchange_across_mma")
ADVERSARIAL = ("reversed", "rotated", "random:1", "random:2")


@pytest.fixture(scope="module")
def mod():
    return emulated_module(BUGS, NAMES)


# -- schedules ------------------------------------------------------------------------

def run_left_neighbour(mod, bug, rng):
    x = rng.standard_normal(512).astype(np.float32)
    y = np.full(512, np.nan, np.float32)
    mod.get_function("left_neighbour")((2,), (256,), (x, y, np.int32(bug)))
    xr = x.reshape(2, 256)
    want = xr + np.concatenate([np.zeros((2, 1), np.float32), xr[:, :-1]], axis=1)
    return np.array_equal(y, want.ravel())


@pytest.mark.parametrize("sched", ADVERSARIAL)
def test_missing_barrier_caught_by_adversarial_schedules(mod, rng, sched):
    with emu.schedule("default"):
        assert run_left_neighbour(mod, 0, rng)
        # the blind spot the schedules close: thread order runs the writer first
        assert run_left_neighbour(mod, 1, rng)
    with emu.schedule(sched):
        assert run_left_neighbour(mod, 0, rng)
        assert not run_left_neighbour(mod, 1, rng), f"{sched} did not expose the missing barrier"


def run_chain_blocks(mod, bug, rng):
    x = rng.standard_normal(64)
    y = np.full(64, np.nan)
    mod.get_function("chain_blocks")((64,), (1,), (x, y, np.int32(bug)))
    return np.array_equal(y, x)


@pytest.mark.parametrize("sched", ADVERSARIAL)
def test_race_between_blocks_caught_deterministically(mod, rng, sched):
    with emu.schedule(sched):
        assert run_chain_blocks(mod, 0, rng)
        results = {run_chain_blocks(mod, 1, rng) for _ in range(3)}
    assert results == {False}, "the block-order race must fail on every run"


def test_schedule_names_are_checked():
    with pytest.raises(ValueError, match="schedule must be one of"):
        emu.set_schedule("sideways")
    with pytest.raises(ValueError, match="seed"):
        emu.set_schedule("random:x")


# -- poisoned static shared memory -----------------------------------------------------

def test_static_shared_is_poisoned_per_block(mod, rng):
    x = rng.standard_normal(64)
    y = np.full(4 * 64, 0.5)
    f = mod.get_function("stale_shared")
    f((4,), (64,), (x, y, np.int32(0)))
    np.testing.assert_array_equal(y, np.tile(x[::-1], 4))
    y[:] = 0.5
    f((4,), (64,), (x, y, np.int32(1)))
    np.testing.assert_array_equal(y[:64], x[::-1])
    assert np.isnan(y[64:]).all(), "blocks 1-3 must read poison, not block 0's tile"


# -- guarded arrays --------------------------------------------------------------------

def test_overrun_read_sees_poison_and_write_fails_the_launch(mod, rng):
    f = mod.get_function("overrun")
    x = rng.standard_normal(100)
    y = np.full(100, np.nan)
    f((1,), (128,), (x, y, np.int32(100), np.int32(0), np.int64(0)))
    np.testing.assert_array_equal(y, x)
    f((1,), (128,), (x, y, np.int32(100), np.int32(1), np.int64(0)))  # reads x[100]
    np.testing.assert_array_equal(y[:99], x[1:])
    assert np.isnan(y[99]), "a read past the end must see the 0xff canary (NaN)"
    with pytest.raises(emu.EmulatorError, match=r"overrun: wrote outside an array: .*argument 1.*element 100 of 100"):
        f((1,), (128,), (x, y, np.int32(100), np.int32(0), np.int64(100)))


def test_far_overrun_fails_the_launch_not_the_process(mod, rng):
    f = mod.get_function("overrun")
    x = rng.standard_normal(100)
    y = np.full(100, np.nan)
    with pytest.raises(emu.EmulatorError, match=r"kernel overrun: invalid write at .* of argument \d"):
        f((1,), (128,), (x, y, np.int32(100), np.int32(0), np.int64(-(1 << 32))))
    # the module (and this process) still work
    f((1,), (128,), (x, y, np.int32(100), np.int32(0), np.int64(0)))
    np.testing.assert_array_equal(y, x)


# -- cp.async --------------------------------------------------------------------------

@pytest.mark.parametrize("mode, ok", [(0, True), (1, False), (2, True), (3, False), (4, False)])
def test_cp_async_lands_at_the_matching_wait(mod, rng, mode, ok):
    x = rng.standard_normal(256).astype(np.float32)
    y = np.full(128, 0.25, np.float32)
    mod.get_function("cp_async_groups")((1,), (128,), (x, y, np.int32(mode)))
    a = np.roll(x[:128], -1)
    want = a if mode == 2 else a + np.roll(x[128:], -1)
    assert np.array_equal(y, want) == ok
    if not ok:
        assert np.isnan(y).all(), "a copy that was not waited for must read as poison"


# -- the PTX text ----------------------------------------------------------------------

def run_mma(mod, variant, rng):
    A, B, C = rng.standard_normal((8, 4)), rng.standard_normal((4, 8)), rng.standard_normal((8, 8))
    D = np.full((8, 8), np.nan)
    mod.get_function(f"mma_wrapper<{variant}>")((1,), (32,), (A, B, C, D))
    return D, A @ B + C


def test_ptx_wrapper_runs_from_its_text(mod, rng):
    D, want = run_mma(mod, 0, rng)
    np.testing.assert_allclose(D, want, rtol=1e-14, atol=1e-14)


def test_swapped_ptx_operand_fails_on_the_cpu(mod, rng):
    D, want = run_mma(mod, 1, rng)
    assert np.linalg.norm(D - want) > 1e-3 * np.linalg.norm(want)


def test_ptx_operand_type_and_count_are_checked(mod, rng):
    with pytest.raises(emu.EmulatorError, match=r'%5 has constraint "l" but operand 4 \(C\) takes "d"'):
        run_mma(mod, 2, rng)
    with pytest.raises(emu.EmulatorError, match=r"asm operand %4 is used 2 times|%5 is used 0 times"):
        run_mma(mod, 3, rng)


def test_swapped_operand_still_compiles_under_nvrtc():
    """The blind spot the interpreter closes: NVRTC accepts the swapped list."""
    res = nvrtc_ptx(BUGS, ("mma_wrapper<1>",), "sm_80", ())
    assert res["ok"], res["log"]


def nvrtc_ptx(path, names, arch, extra):
    """NVRTC's PTX of `path`, compiled in a child process (loading NVRTC into this one would
    change what later tests see), or a skip where NVRTC is unavailable."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from cupynn.compile_check import compile_chunk\n"
        "path, names, arch, opts = json.loads(sys.argv[1])\n"
        "try:\n"
        "    r = compile_chunk('x.cu', open(path).read(), tuple(names), arch, tuple(opts), sass=False)\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'skip': str(exc)})); raise SystemExit\n"
        "print(json.dumps({'ok': r['ok'], 'log': r['log'], 'ptx': r.get('ptx', b'').decode()}))\n")
    opts = ["-std=c++17", "-default-device", f"-I{kernels_dir()}", f"-arch={arch}", *extra]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([str(path), list(names), arch, opts])],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"NVRTC unavailable: {proc.stderr[-500:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"NVRTC unavailable: {res['skip']}")
    return res


# -- bit-exact fixed-order reductions --------------------------------------------------

def tree_sum_256(v, mirrored=False):
    """dense.cu block_sum: red[t] += red[t + s] for s = 128, 64, ..., 1 (mirrored: red[2s-1-t])."""
    red = np.array(v, dtype=np.float64)
    s = 128
    while s:
        red[:s] = red[:s] + (red[2 * s - 1:s - 1:-1] if mirrored else red[s:2 * s])
        s //= 2
    return red[0]


def test_loss_reduce_is_bit_exact_in_its_order():
    P = 3 * 256 + 5
    p = np.zeros(P)
    p[7], p[7 + 256], p[7 + 512] = 1.0, 1e16, -1e16  # one thread's strided partials: 0 in order
    p[3], p[3 + 128], p[252] = 1e16, 1.0, -1e16     # the tree: 1 + 1e16 first (0), not 1e16 - 1e16 (1)
    mod = emulated_module(kernels_dir() / "dense.cu", ("cupynn::loss_reduce<double>",))
    value = np.full(1, np.nan)
    mod.get_function("cupynn::loss_reduce<double>")((1,), (256,), (p, np.int64(P), np.float64(1.0), value))
    acc = np.zeros(256)
    for start in range(0, P, 256):
        chunk = p[start:start + 256]
        acc[:chunk.size] = acc[:chunk.size] + chunk
    want = tree_sum_256(acc)
    assert value[0] == want, (value[0], want)
    backwards = 0.0
    for v in p[7::256][::-1]:
        backwards += v
    assert want == 0.0 and backwards == 1.0 and tree_sum_256(acc, mirrored=True) == 1.0, \
        "the test must distinguish the orders"


def test_split_reduction_is_bit_exact_in_split_order():
    S, N, K = 3, 5, 7
    p = np.zeros((S, N, K + 1))
    p[0], p[1], p[2] = 1.0, 1e16, -1e16  # split order: (1 + 1e16) - 1e16 = 0; reversed: 1
    p[:, 2, 3] = (-1e16, 1e16, 1.0)      # split order: 1
    mod = emulated_module(kernels_dir() / "dense.cu", ("cupynn::reduce_partials<double>",))
    dw, db = np.full((N, K), np.nan), np.full(N, np.nan)
    mod.get_function("cupynn::reduce_partials<double>")(
        (1,), (256,), (p, np.int64(S), np.int64(N), np.int64(K), np.int32(1), dw, db))
    want = (p[0] + p[1]) + p[2]
    np.testing.assert_array_equal(dw, want[:, :K])
    np.testing.assert_array_equal(db, want[:, K])
    assert dw[2, 3] == 1.0 and dw[0, 0] == 0.0


# -- sparse memory: launches past 2^31 elements ---------------------------------------

def test_sparse_mode_runs_the_last_blocks_past_2_31():
    """reduce_partials over N x (K + 1) > 2^31 elements: only its last 2 blocks run, on lazily
    mapped arrays; a 32-bit element index would write below the array (and fail)."""
    S, N, K = 1, 1 << 16, (1 << 15) + 7  # N * (K + 1) = 2^31 + 2^19
    total = N * (K + 1)
    assert total > 2**31
    p = emu.sparse_array((S, N, K + 1), np.float64)
    dw = emu.sparse_array((N, K), np.float64)
    db = emu.sparse_array((N,), np.float64)
    rng = np.random.default_rng(5)
    tail = rng.standard_normal(2 * 256)
    p.reshape(-1)[total - tail.size:] = tail
    nblocks = (total + 255) // 256
    f = emu_dense_function("cupynn::reduce_partials<double>")
    f((nblocks,), (256,), (p, np.int64(S), np.int64(N), np.int64(K), np.int32(1), dw, db),
      blocks=(nblocks - 2, 2))
    np.testing.assert_array_equal(dw[-1, K + 1 - tail.size:], tail[:-1])
    assert db[-1] == tail[-1]
    assert dw[-2, -1] == 0.0 and db[-2] == 0.0  # blocks before the range did not run


def emu_dense_function(name):
    return emulated_module(kernels_dir() / "dense.cu", (name,)).get_function(name)


# -- -Wconversion: a narrowed 64-bit index does not build --------------------------------

def test_narrowed_64_bit_offset_is_a_build_error():
    code = """
    extern "C" __global__ void copy_rows(const double* x, double* y, long long ld) {
        const long long row = blockIdx.x;
        const int off = row * ld;   // the bug: a 32-bit offset
        y[off + threadIdx.x] = x[off + threadIdx.x];
    }"""
    with pytest.raises(emu.EmulatorBuildError, match=r"conversion from .long long int. to .int."):
        emulated_module(code)
    emulated_module(code.replace("const int off", "const long long off"))


# -- no ordering from collectives (ThreadSanitizer) --------------------------------------

@pytest.mark.slow
def test_tsan_takes_no_ordering_from_mma():
    from cupynn.emulator.testing import sanitizer_available

    ok, why = sanitizer_available("thread")
    if not ok:
        pytest.skip(f"ThreadSanitizer unavailable: {why}")
    f = emulated_module(BUGS, NAMES, sanitizer="thread").get_function("exchange_across_mma")
    x = np.random.default_rng(3).standard_normal(32)
    y = np.full(32, np.nan)
    f((1,), (32,), (x, y, np.int32(1)))
    np.testing.assert_array_equal(y, x[::-1])
    with pytest.raises(emu.SanitizerError, match="data race"):
        f((1,), (32,), (x, y, np.int32(0)))


def test_fused_reduce_is_bit_exact_in_block_order():
    """fused_reduce sums the per-block partials in block order (b = 0, 1, ...)."""
    n, k, G = 3, 4, 3
    P = n * k + n + 1  # dW0, db0, the loss value
    cfg = np.zeros(24 + 16 * 8, np.int64)
    cfg[0], cfg[5], cfg[21] = 1, P, P - 1                  # H_L, H_P, H_VSLOT
    layer = cfg[24:40]
    layer[0], layer[1], layer[9], layer[10] = k, n, 0, n * k  # F_K, F_N, F_DW, F_DB
    parts = np.zeros((G, P))
    parts[:, :] = np.array([1.0, 1e16, -1e16])[:, None]     # block order: 0; reversed: 1
    parts[:, 5] = (-1e16, 1e16, 1.0)                        # block order: 1; reversed: 0
    value, dw, db = np.full(1, np.nan), np.full((n, k), np.nan), np.full(n, np.nan)
    name = "cupynn::fused_reduce<double>"
    f = emulated_module(kernels_dir() / "fused.cu", (name,)).get_function(name)
    f((1,), (256,), (cfg, parts, np.int64(G), np.int64(0), np.int64(P), np.float64(2.0), value,
                     dw, *([None] * 7), db, *([None] * 7)))
    want = (parts[0] + parts[1]) + parts[2]
    np.testing.assert_array_equal(dw.ravel(), want[:n * k])
    np.testing.assert_array_equal(db, want[n * k:n * k + n])
    assert value[0] == 2.0 * want[-1]
    assert dw.ravel()[5] == 1.0 and dw.ravel()[0] == 0.0


def test_sparse_mode_forward_layer_past_2_31():
    """dense_forward with M x N = 2^31 + 1600 outputs: the last two 128-row blocks run on lazily
    mapped x and y and must write their rows (a 32-bit output offset wraps below y)."""
    M, N, K = (1 << 28) + 200, 8, 1
    assert M * N > 2**31
    rng = np.random.default_rng(9)
    x = emu.sparse_array((M, K), np.float64)
    y = emu.sparse_array((M, N), np.float64)
    x[-256:] = rng.standard_normal((256, K))
    y[-256:] = np.nan
    w, b = rng.standard_normal((N, K)), rng.standard_normal(N)
    name = "cupynn::dense_forward<double, 0, 1, 0>"  # identity, the N <= 8 tile (BM 128), FMA
    f = emu_dense_function(name)
    nb = -(-M // 128)
    i32, i64 = np.int32, np.int64
    f((nb, 1), (256,), (x, i64(K), i64(1), None, None, i32(0), i32(0), i32(0), w, b, i32(1),
                        i64(M), i64(N), i64(K), y, i32(1), None, i32(0), None, i32(0), i32(0), None,
                        i32(0)), blocks=(nb - 2, 2))
    rows = M - (nb - 2) * 128  # the rows of the last two blocks
    np.testing.assert_allclose(y[-rows:], x[-rows:] @ w.T + b, rtol=1e-15, atol=0)
    assert np.isnan(y[-rows - 1]).all()  # the block before the range did not run


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_gpu_build_emits_the_interpreted_instruction_texts(arch):
    """NVRTC turns the same CUPYNN_PTX texts into the PTX the GPU runs (sm_90: the m16n8k*
    f64 instructions too), and the shuffle-only reference uses none of them."""
    import re

    names = ("mma_f64_tile", "mma_tf32_tile", "to_tf32", "mma_f64_m16n8k16_tile")
    res = nvrtc_ptx(TESTDATA / "mma_test.cu", names, arch, ())
    ref = nvrtc_ptx(TESTDATA / "mma_test.cu", names, arch, ("-DCUPYNN_MMA_REFERENCE",))
    assert res["ok"] and ref["ok"], res["log"] + ref["log"]
    ptx = res["ptx"]
    want = {"mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64", "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
            "cvt.rna.tf32.f32"}
    if arch == "sm_90":
        want.add("mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64")
    assert want <= set(re.findall(r"(?:mma\.sync\.aligned|cvt\.rna\.tf32)\.\S+?(?=\s)", ptx)), ptx[-2000:]
    assert "mma.sync" not in ref["ptx"]


@pytest.mark.slow
def test_loss_reduce_race_free_under_tsan():
    """The block tree's barriers checked by ThreadSanitizer, whatever the schedule: a missing
    barrier that a fiber order happens to hide (reads after the writes) is still a race."""
    from cupynn.emulator.testing import sanitizer_available

    ok, why = sanitizer_available("thread")
    if not ok:
        pytest.skip(f"ThreadSanitizer unavailable: {why}")
    name = "cupynn::loss_reduce<double>"
    f = emulated_module(kernels_dir() / "dense.cu", (name,), sanitizer="thread").get_function(name)
    p = np.random.default_rng(4).standard_normal(300)
    value = np.full(1, np.nan)
    f((1,), (256,), (p, np.int64(p.size), np.float64(1.0), value))
    acc = np.zeros(256)
    acc[:] = p[:256]
    acc[:44] = acc[:44] + p[256:]
    assert value[0] == tree_sum_256(acc)
