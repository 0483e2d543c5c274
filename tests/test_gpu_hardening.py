"""The CUDA path's host code and kernels, hardened without a GPU: stream hand-over to
CuPy, concurrent calls, float32 flush-to-zero semantics, CuPy's real NVRTC options,
persistent fused blocks and the shared-memory bank model of the per-layer GEMM."""

from __future__ import annotations

import types

import pytest


# -- torch streams handed to CuPy ------------------------------------------------------------
class _FakeCupy:
    """Stand-in for the ``cupy`` module: records which stream constructor was used."""

    def __init__(self, has_from_external: bool):
        calls = self.calls = []

        class Stream:
            pass

        if has_from_external:
            def from_external(obj):
                if not hasattr(obj, "__cuda_stream__"):  # what CuPy 14 does
                    raise TypeError("the object does not implement __cuda_stream__")
                calls.append(("from_external", obj))
                return "from_external"
            Stream.from_external = staticmethod(from_external)

        def external(ptr, device_id):
            calls.append(("ExternalStream", ptr, device_id))
            return "external"

        self.cuda = types.SimpleNamespace(Stream=Stream, ExternalStream=external)


class _OldTorchStream:  # torch 2.1-2.9: no __cuda_stream__
    cuda_stream = 0x1234
    device_index = 1


class _NewTorchStream(_OldTorchStream):  # torch >= 2.10
    def __cuda_stream__(self):
        return (0, self.cuda_stream)


@pytest.mark.parametrize("has_from_external", [True, False])
def test_torch_stream_without_the_protocol_uses_external_stream(has_from_external):
    pytest.importorskip("torch")
    import cupynn.torch as ct

    cp = _FakeCupy(has_from_external)
    assert ct._cupy_stream(_OldTorchStream(), cp) == "external"
    assert cp.calls == [("ExternalStream", 0x1234, 1)]


def test_torch_stream_with_the_protocol_uses_from_external():
    pytest.importorskip("torch")
    import cupynn.torch as ct

    cp = _FakeCupy(True)
    s = _NewTorchStream()
    assert ct._cupy_stream(s, cp) == "from_external"
    assert cp.calls == [("from_external", s)]
    cp = _FakeCupy(False)  # CuPy < 14: ExternalStream even for a new torch
    assert ct._cupy_stream(s, cp) == "external"


# -- CuPy's kernel cache ----------------------------------------------------------------------
def test_info_says_when_the_kernel_cache_is_not_used(monkeypatch, tmp_path, capsys):
    from cupynn import _config

    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    versions = {"cupy-cuda12x": "14.1.1"}
    monkeypatch.setattr(_config, "_dist_version", lambda name: versions.get(name))
    monkeypatch.setattr(_config, "_cupy_installed", lambda: True)
    cache = _config.collect()["kernel_cache"]
    assert cache["used"] is False and "14.1.1" in cache["not_used"] and ">=14.2" in cache["not_used"]
    _config.show_config()
    assert "NOT USED" in capsys.readouterr().out
    versions["cupy-cuda12x"] = "14.2.0"
    assert _config.collect()["kernel_cache"]["used"] is True
    versions["cupy-cuda12x"] = "15.0.0rc1"
    assert _config.collect()["kernel_cache"]["used"] is True
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    cache = _config.collect()["kernel_cache"]
    assert cache["used"] is False and "CUPY_CACHE_IN_MEMORY" in cache["not_used"]


def test_cuda_extras_require_the_cupy_whose_cache_works():
    import re
    from pathlib import Path

    from cupynn import _config

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    pins = re.findall(r'"cupy-cuda1\dx>=([\d.]+)"', text)
    assert pins and all(_config._version_tuple(v) >= _config.CUPY_CACHE_MIN for v in pins)


# -- float32 flush-to-zero: the options CuPy really passes ------------------------------------
def _cupy_nvrtc_options(arch: str) -> tuple:
    """The options CuPy hands NVRTC for one of our modules, recorded by wrapping its NVRTC
    program compile (stopped there: no driver is needed)."""
    cc = pytest.importorskip("cupy.cuda.compiler")
    from cupynn import _loader, compile_check

    try:
        compile_check.load_nvrtc()
    except compile_check.NvrtcUnavailable as exc:
        pytest.skip(str(exc))
    seen = []

    class Stop(Exception):
        pass

    orig = cc._NVRTCProgram.compile

    def compile(self, options=(), log_stream=None):
        if self.name_expressions:  # the module's own compilation (not CuPy's preprocess)
            seen.append(tuple(options))
            raise Stop
        return orig(self, options, log_stream)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(cc._NVRTCProgram, "compile", compile)
        # CuPy asks the current device for this; pick the architecture ourselves
        mp.setattr(cc, "_get_arch_for_options_for_nvrtc", lambda a=None: (f"-arch=sm_{a}", "cubin"))
        mp.setenv("CUPY_CACHE_IN_MEMORY", "1")
        with pytest.raises(Stop):
            cc._compile_module_with_cache("template <class T> __global__ void k(T* p) {}",
                                          _loader.compile_options(), arch=arch[3:],
                                          name_expressions=["k<float>"])
    finally:
        mp.undo()
    return seen[0]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_options_are_what_cupy_passes(arch):
    from cupynn import _loader

    real = _cupy_nvrtc_options(arch)
    assert "-ftz=true" in real
    assert real == _loader.nvrtc_options(arch)


def test_compile_check_sass_stats_and_emulator_use_cupys_options(monkeypatch):
    import numpy as np

    from cupynn import _loader, compile_check, sass_stats
    from cupynn.emulator import _build

    seen = {}

    def fake_chunk(source_name, code, names, arch, options, sass=True):
        seen[source_name] = tuple(options)
        return {"ok": False, "log": "stop", "lowered": {}, "cubin_size": 0}

    monkeypatch.setattr(compile_check, "compile_chunk", fake_chunk)
    with pytest.raises(RuntimeError):
        sass_stats.kernel_sass("cupynn::dense_forward<double, 0, 2, 1>", arch="sm_90")
    assert seen["dense.cu"][:len(_loader.nvrtc_options("sm_90"))] == _loader.nvrtc_options("sm_90")

    class Recorder:
        def __init__(self, code=None, options=(), name_expressions=()):
            self.options = options

    mod = _loader.load_module("optim.cu", ["x<float>"], module_cls=Recorder, arch="sm_90")
    assert "-ftz=true" in mod.options and _build.parse_options(mod.options).ftz
    assert not _build.parse_options(mod.options + ("-ftz=false",)).ftz
    assert np.dtype("float32")  # (keep numpy imported lazily with the other optional pieces)


@pytest.mark.emulator
def test_emulator_flushes_float32_subnormals_like_the_gpu():
    """sigmoid(-88) = 6.05e-39 is a float32 subnormal: 0 under CuPy's -ftz=true, on the GPU
    and now on the emulator; float64 keeps it (-ftz only concerns float32)."""
    import numpy as np

    from cupynn.backends.cuda_backend import CudaBackend
    from cupynn.emulator import EmulatedModule

    be = CudaBackend(xp=np, module_cls=EmulatedModule)
    x = np.array([[-88.0], [-1.0]])
    W = np.ones((1, 1))
    for dtype, tiny_kept in (("float32", False), ("float64", True)):
        y = be.dense_forward(x.astype(dtype), W.astype(dtype), None, "sigmoid")
        want = 1.0 / (1.0 + np.exp(88.0))
        assert (y[0, 0] == want) if tiny_kept else (y[0, 0] == 0.0), (dtype, y[0, 0])
        np.testing.assert_allclose(y[1, 0], 1.0 / (1.0 + np.exp(1.0)), rtol=1e-6)


# -- concurrent calls on one backend ----------------------------------------------------------
def _two_threads(be, net, params_pair, xs, delay_hook, need_dx=False):
    """Run one value_and_grad per thread (own x and params, same network spec) while the
    launches are slowed by ``delay_hook``; returns each thread's (value, grads, dx)."""
    import threading

    from cupynn.backends.base import LossSpec

    out = [None, None]
    errors = []

    def work(i):
        try:
            out[i] = be.network_value_and_grad(net, params_pair[i], xs[i], LossSpec("sum_squares"),
                                               need_dx=need_dx)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    ts[0].start()
    delay_hook.first_started.wait(10)
    ts[1].start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    return out


class _Delay:
    """Wraps a launch function: after the first launch of the first thread, sleep, so that a
    second thread can launch in between (what an unlucky scheduler does)."""

    def __init__(self, launch, seconds=0.3):
        import threading

        self.launch = launch
        self.seconds = seconds
        self.first_started = threading.Event()
        self.count = 0

    def __call__(self, *a, **k):
        import time

        r = self.launch(*a, **k)
        self.count += 1
        if self.count == 1:
            self.first_started.set()
            time.sleep(self.seconds)
        return r


@pytest.fixture(scope="module")
def emu_be():
    pytest.importorskip("cupynn.emulator")
    import numpy as np

    from cupynn.backends.cuda_backend import CudaBackend
    from cupynn.emulator import EmulatedModule

    be = CudaBackend(xp=np, module_cls=EmulatedModule)
    be.kernels.poison = True
    return be


def _reference(net, params, x, need_dx=False):
    from cupynn.backends import get_backend
    from cupynn.backends.base import LossSpec

    return get_backend("cpu").network_value_and_grad(net, params, x, LossSpec("sum_squares"),
                                                       need_dx=need_dx)


def _assert_same(got, want, what):
    import numpy as np

    v, grads, dx = got
    v_r, grads_r, dx_r = want
    np.testing.assert_allclose(v, v_r, rtol=1e-10, err_msg=f"{what}: value")
    for (dW, db), (dW_r, db_r) in zip(grads, grads_r):
        np.testing.assert_allclose(dW, dW_r, rtol=1e-9, atol=1e-12, err_msg=f"{what}: dW")
        np.testing.assert_allclose(db, db_r, rtol=1e-9, atol=1e-12, err_msg=f"{what}: db")
    if dx_r is not None:
        np.testing.assert_allclose(dx, dx_r, rtol=1e-9, atol=1e-12, err_msg=f"{what}: dx")


@pytest.mark.emulator
@pytest.mark.parametrize("fused", [True, False])
def test_concurrent_calls_return_their_own_gradients(emu_be, monkeypatch, fused):
    """Two host threads, one backend, the same network spec: a delay between the first
    thread's launches lets the second launch in between; each must get its own results."""
    import numpy as np

    from cupynn.backends import cuda_fused_layout as fl
    from cupynn.backends.base import LayerSpec, NetSpec

    rng = np.random.default_rng(22)
    net = NetSpec((LayerSpec(3, 9, "tanh", True), LayerSpec(9, 2, "identity", True)),
                  np.dtype("float64"), "strict")
    params_pair = [[(rng.standard_normal((9, 3)), rng.standard_normal(9)),
                    (rng.standard_normal((2, 9)), rng.standard_normal(2))] for _ in range(2)]
    xs = [rng.standard_normal((40, 3)) for _ in range(2)]
    be = emu_be
    monkeypatch.setattr(be.fused, "enabled", fused)
    assert (be.execution_path(net, 40) == "fused") == fused
    if fused:
        monkeypatch.setattr(fl, "FUSED_BLOCKS", 2)
        hook = _Delay(be.fused._launch)
        monkeypatch.setattr(be.fused, "_launch", hook)
    else:
        hook = _Delay(be.kernels.launch)
        monkeypatch.setattr(be.kernels, "launch", hook)
    be.network_value_and_grad(net, params_pair[0], xs[0], __import__(
        "cupynn.backends.base", fromlist=["LossSpec"]).LossSpec("sum_squares"))  # plans, compiled
    hook.count = 0
    got = _two_threads(be, net, params_pair, xs, hook, need_dx=not fused)
    for i in (0, 1):
        _assert_same(got[i], _reference(net, params_pair[i], xs[i], need_dx=not fused), f"thread {i}")


@pytest.mark.emulator
def test_a_capture_records_only_its_own_threads_launches(emu_be):
    import threading

    import numpy as np

    from cupynn.backends.base import LayerSpec, NetSpec

    rng = np.random.default_rng(5)
    net = NetSpec((LayerSpec(3, 5, "tanh", True),), np.dtype("float64"), "strict")
    params = [(rng.standard_normal((5, 3)), rng.standard_normal(5))]
    x = rng.standard_normal((7, 3))
    be = emu_be
    be.kernels.capture = []  # this thread captures
    try:
        box = []
        t = threading.Thread(target=lambda: box.append(be.network_forward(net, params, x)))
        t.start()
        t.join(60)
        assert be.kernels.capture == []  # the other thread's launches ran, unrecorded
    finally:
        be.kernels.capture = None
    y = box[0]
    W, b = params[0]
    np.testing.assert_allclose(y, np.tanh(x @ W.T + b), rtol=1e-12)


# -- persistent fused blocks: the bits do not depend on the SM count -------------------------
@pytest.mark.emulator
@pytest.mark.parametrize("dtype,sizes,wide", [("float64", (3, 17, 5, 2), False),
                                              ("float32", (1, 40, 6, 1), True)])
def test_fused_bits_are_independent_of_the_sm_count(emu_be, monkeypatch, dtype, sizes, wide):
    """A fixed number of slices (here 9, so the emulator runs quickly) walked by
    min(slices, SMs) persistent blocks: 1, 2, 4, 8, 9 and 132 simulated SMs give the same bits
    and launch that many blocks (before: always one block per slice)."""
    import numpy as np

    from cupynn.backends import cuda_fused_layout as fl
    from cupynn.backends.base import LayerSpec, LossSpec, NetSpec

    monkeypatch.setattr(fl, "FUSED_BLOCKS", 9)
    monkeypatch.setattr(fl, "WIDE_MIN", 24)
    rng = np.random.default_rng(4)
    acts = ["tanh"] * (len(sizes) - 2) + ["identity"]
    net = NetSpec(tuple(LayerSpec(i, o, a, True) for i, o, a in zip(sizes, sizes[1:], acts)),
                  np.dtype(dtype), "strict")
    params = [(rng.standard_normal((o, i)).astype(dtype), rng.standard_normal(o).astype(dtype))
              for i, o in zip(sizes, sizes[1:])]
    M = 280  # 9 slices of 32 rows, the last one 24
    x = rng.standard_normal((M, sizes[0])).astype(dtype)
    t = rng.standard_normal((M, sizes[-1])).astype(dtype)
    be = emu_be
    lay = be.fused.layout(net, M, fl.MODE_GRAD, loss=LossSpec("mse", t))
    assert isinstance(lay, fl.FusedLayout) and lay.wide == wide and lay.grid == 9
    grids = []
    real = be.fused._launch

    def spy(rng_, name, fn, grid3, args, smem=0):
        grids.append((name, grid3))
        return real(rng_, name, fn, grid3, args, smem)

    monkeypatch.setattr(be.fused, "_launch", spy)
    results = {}
    for sms in (132, 9, 8, 4, 2, 1):
        monkeypatch.setattr(be.fused, "simulated_sms", sms)
        grids.clear()
        v, g, dx = be.network_value_and_grad(net, params, x, LossSpec("mse", t), need_dx=not wide)
        assert grids[0] == (lay.kernel, (min(9, sms), 1, 1)), grids
        results[sms] = [np.asarray(v).copy()] + [a.copy() for pair in g for a in pair] + (
            [] if dx is None else [dx.copy()])
    ref = results[132]
    for sms, got in results.items():
        for a, b in zip(got, ref):
            assert a.tobytes() == b.tobytes(), f"{sms} SMs: bits differ"
    want = _reference_mse(net, params, x, t, need_dx=not wide)
    np.testing.assert_allclose(ref[0], want[0], rtol=1e-4 if dtype == "float32" else 1e-10)


def _reference_mse(net, params, x, t, need_dx):
    from cupynn.backends import get_backend
    from cupynn.backends.base import LossSpec

    return get_backend("cpu").network_value_and_grad(net, params, x, LossSpec("mse", t),
                                                     need_dx=need_dx)


# -- shared-memory bank model of kernels/gemm.cuh's tiles --------------------------------------
_FMA, _DMMA, _TF32 = "fma", "dmma", "tf32"


def _gemm_source() -> str:
    from cupynn import _loader

    return (_loader.KERNEL_DIR / "gemm.cuh").read_text()


def _tile_shapes() -> dict:
    import re

    shapes = {}
    for m in re.finditer(r"template <> struct TileShape<(\d)> \{[^\n]*\n\s*static constexpr int ([^;]+);",
                         _gemm_source()):
        shapes[int(m.group(1))] = {k.strip(): int(v) for k, v in
                                   (kv.split("=") for kv in m.group(2).split(","))}
    assert sorted(shapes) == [0, 1, 2, 3, 4, 5], shapes
    return shapes


def _shape(tile, E, math):
    s = dict(_tile_shapes()[tile])
    if tile == 4 and E == 4 and math == _FMA:  # Gemm::BK: 16-deep K steps for FMA float there
        s["BK"] = 16
    s["PAD"] = 4 if E == 8 else 8
    vec = 16 // E
    s["VM"] = vec if s["TM"] % vec == 0 else 1
    s["VN"] = vec if s["TN"] % vec == 0 else 1
    s["TX"], s["TY"] = s["BN"] // s["TN"], s["BM"] // s["TM"]
    return s


def _skew(E, BK, G):
    """Gemm::skew<G> (kernels/gemm.cuh), in Python."""
    wave = 128 // E
    if G == 1:
        return lambda k: (k >> 2) * (wave // BK)
    return lambda k: ((k >> 2) & 1) * G


def _wavefronts(words, nbytes):
    """Shared-memory wavefronts of one warp access (each lane reads/writes nbytes at word
    address words[lane], None: inactive) and the conflict-free minimum: the warp is served in
    phases of 128 bytes; within a phase, distinct words in one bank serialize."""
    from collections import defaultdict

    per_phase = 32 if nbytes <= 4 else 128 // nbytes
    total = 0
    for p in range(0, 32, per_phase):
        banks = defaultdict(set)
        for a in words[p:p + per_phase]:
            if a is not None:
                for w in range(nbytes // 4):
                    banks[(a + w) % 32].add(a + w)
        total += max((len(v) for v in banks.values()), default=0)
    return total, -(-32 * nbytes // 128)


def _bank_report(tile, E, math, swizzled=True):
    """Wavefronts per access over the ideal, per kind of access: the stash stores of both
    operands for both loader orientations (C_FAST), and the fragment reads of the mode."""
    from collections import defaultdict

    s = _shape(tile, E, math)
    BM, BN, BK, PAD = s["BM"], s["BN"], s["BK"], s["PAD"]
    mma = math != _FMA and s["WM"] > 0
    ga, gb = (1, 1) if mma else (s["VM"], s["VN"])
    sa = _skew(E, BK, ga) if swizzled else (lambda k: 0)
    sb = _skew(E, BK, gb) if swizzled and tile != 2 else (lambda k: 0)  # Gemm::SKEW_B
    assert all(max(f(k) for k in range(BK)) <= PAD for f in (sa, sb))  # inside the row padding

    def word(k, i, ld, sk):
        return (k * ld + i + sk(k)) * E // 4

    acc = defaultdict(lambda: [0, 0])

    def add(what, words, nbytes):
        w, ideal = _wavefronts(words, nbytes)
        acc[what][0] += w
        acc[what][1] += ideal

    for operand, n0, n1 in (("a", BM, BK), ("b", BK, BN)):
        for cfast in (True, False):
            for q in range(-(-n0 * n1 // 256)):
                for warp in range(8):
                    words = []
                    for lane in range(32):
                        e = warp * 32 + lane + q * 256
                        if e >= n0 * n1:
                            words.append(None)
                            continue
                        i0, i1 = (e // n1, e % n1) if cfast else (e % n0, e // n0)
                        words.append(word(i1, i0, BM + PAD, sa) if operand == "a"
                                     else word(i0, i1, BN + PAD, sb))
                    add(f"store {operand} fast={'k' if (cfast == (operand == 'a')) else 'i'}", words, E)
    if not mma:
        TX, TY, TM, TN, VM, VN = (s[k] for k in ("TX", "TY", "TM", "TN", "VM", "VN"))
        for kk in range(BK):
            for warp in range(8):
                tids = [warp * 32 + lane for lane in range(32)]
                for i in range(0, TM, VM):
                    add("read a", [word(kk, (i // VM) * TY * VM + (t // TX) * VM, BM + PAD, sa)
                                   for t in tids], E * VM)
                for j in range(0, TN, VN):
                    add("read b", [word(kk, (j // VN) * TX * VN + (t % TX) * VN, BN + PAD, sb)
                                   for t in tids], E * VN)
    else:
        WM, WN = s["WM"], s["WN"]
        WTM, WTN = BM // WM, BN // WN
        rows = 8 if math == _DMMA else 16
        ks = [(0, 0)] if math == _DMMA else [(0, 0), (0, 8), (4, 0), (4, 8)]
        for kk in range(0, BK, 4 if math == _DMMA else 8):
            for warp in range(8):
                wr, wc = (warp % WM) * WTM, (warp // WM) * WTN
                for i in range(WTM // rows):
                    for dk, dr in ks:
                        add("read a", [word(kk + (ln & 3) + dk, wr + i * rows + (ln >> 2) + dr,
                                            BM + PAD, sa) for ln in range(32)], E)
                for j in range(WTN // 8):
                    for dk in sorted({d for d, _ in ks}):
                        add("read b", [word(kk + (ln & 3) + dk, wc + j * 8 + (ln >> 2), BN + PAD, sb)
                                       for ln in range(32)], E)
    return {k: v[0] / v[1] for k, v in acc.items()}


def test_the_bank_model_mirrors_gemm_cuh():
    """The model's skew is the kernel's (a change to one must be made to the other)."""
    src = _gemm_source()
    assert "if constexpr (G == 1) return (k >> 2) * (WAVE / BK);" in src
    assert "else return ((k >> 2) & 1) * G;" in src
    assert "static constexpr int WAVE = 128 / (int)sizeof(T);" in src
    assert "sm.a[stage][kk][rr + skew_a(kk)]" in src and "sm.b[stage][kk][cc + skew_b(kk)]" in src
    assert "sm.a[stage][kk] + skew_a(kk)" in src and "g + skew_a(kk)" in src
    assert "static constexpr bool SKEW_B = TILE != 2;" in src
    assert "static constexpr bool SKEW_A = TILE != 0;" in src  # the GEMV tile is not modelled


@pytest.mark.parametrize("E,math", [(8, _DMMA), (4, _TF32), (8, _FMA), (4, _FMA)])
@pytest.mark.parametrize("tile", [2, 3, 4, 5])
def test_shared_tiles_bank_conflicts(E, math, tile):
    """Per warp access: the k-fast stash stores were 4-way (BK 16) / 2-way (BK 8) conflicted;
    swizzled, the mma modes are conflict-free in every store and fragment read, and the FMA
    path (16-byte vector reads) has conflict-free reads, 2-way BK-16 stores, conflict-free
    BK-8 stores."""
    before = _bank_report(tile, E, math, swizzled=False)
    after = _bank_report(tile, E, math)
    BK = _shape(tile, E, math)["BK"]
    assert before["store a fast=k"] == (4.0 if BK == 16 else 2.0)
    for what, ratio in after.items():
        if tile == 2 and what == "store b fast=k":  # not skewed: the 128-register forward
            assert ratio == before[what]
        elif what.startswith("read") or what.endswith("fast=i") or math != _FMA or BK == 8:
            assert ratio <= 1.0, (what, ratio, after)
        else:
            assert ratio <= 2.0, (what, ratio, after)
        assert ratio <= before[what], (what, ratio, before[what])


def test_wide_first_layer_cliff_takes_the_per_layer_path():
    """N1 > 24 after a wide first layer (the fused kernel's cliff) is excluded, and the CUDA
    backend's execution_path says why; N1 <= 24 (the seed's 20) stays fused."""
    import numpy as np

    from cupynn.backends.base import LayerSpec, NetSpec
    from cupynn.backends.cuda_backend import CudaBackend
    from cupynn.bench.host_overhead import NullModule

    be = CudaBackend(xp=np, module_cls=NullModule)

    def net(n1):
        return NetSpec((LayerSpec(1, 1000, "tanh", True), LayerSpec(1000, n1, "tanh", True),
                        LayerSpec(n1, 1, "identity", True)), np.dtype("float64"), "strict")

    assert be.execution_path(net(20), 10_000) == "fused"
    assert be.execution_path(net(24), 10_000) == "fused"
    for n1 in (25, 64, 256):
        why = be.execution_path(net(n1), 10_000)
        assert why.startswith("per-layer: ") and "re-reads W1 from L2" in why, why


@pytest.mark.emulator
def test_finer_slices_keep_the_bits_across_sm_counts(emu_be, monkeypatch):
    """SLICE_SPLIT: FUSED_BLOCKS * split slices for a large batch (here 3 * 4 = 12 slices of
    a 1,600-row batch), walked by 3, 2 or 1 persistent blocks: same bits, right values."""
    import numpy as np

    from cupynn.backends import cuda_fused_layout as fl
    from cupynn.backends.base import LayerSpec, LossSpec, NetSpec

    monkeypatch.setattr(fl, "FUSED_BLOCKS", 3)
    monkeypatch.setattr(fl, "SLICE_SPLIT", 4)
    rng = np.random.default_rng(9)
    net = NetSpec((LayerSpec(2, 6, "tanh", True), LayerSpec(6, 1, "identity", True)),
                  np.dtype("float64"), "strict")
    params = [(rng.standard_normal((6, 2)), rng.standard_normal(6)),
              (rng.standard_normal((1, 6)), rng.standard_normal(1))]
    M = 1600
    x = rng.standard_normal((M, 2))
    be = emu_be
    lay = be.fused.layout(net, M, fl.MODE_GRAD, loss=LossSpec("sum_squares"))
    assert isinstance(lay, fl.FusedLayout) and lay.grid == 12, lay
    half = be.fused.layout(net, 1000, fl.MODE_GRAD, loss=LossSpec("sum_squares"))
    assert half.grid == 6  # 2 x 3 slices: 4 x 3 would be under 128 rows each
    small = be.fused.layout(net, 700, fl.MODE_GRAD, loss=LossSpec("sum_squares"))
    assert small.grid <= 3  # below 128 rows per slice: no finer slices
    out = {}
    for sms in (3, 2, 1):
        monkeypatch.setattr(be.fused, "simulated_sms", sms)
        v, g, _ = be.network_value_and_grad(net, params, x, LossSpec("sum_squares"))
        out[sms] = b"".join(a.tobytes() for a in [np.asarray(v)] + [t for pair in g for t in pair])
    assert out[1] == out[2] == out[3]
    _assert_same((v, g, None), _reference(net, params, x), "12 slices")


# -- the claims and the staging loops, in the sources ------------------------------------------
def test_the_bit_guarantee_is_stated_exactly():
    """Bits: same card type (architecture) and any SM count -- not "any card": sm_80 and sm_90
    tensor cores accumulate differently."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    def words(path):
        return " ".join(path.read_text().replace("#", " ").split())

    readme = words(root / "README.md")
    kreadme = words(root / "kernels" / "README.md")
    layout = words(root / "cupynn" / "backends" / "cuda_fused_layout.py")
    assert "same card type (architecture), same inputs: same bits, for any SM count" in kreadme
    assert "Not across architectures" in kreadme and "DMMA.16x8x16" in kreadme
    assert "same card type" in readme and "not across" in readme
    assert "same card type (architecture), same inputs: same bits, for any SM count" in layout
    for text in (readme, kreadme, layout):
        assert "the bits do not depend on the card" not in text
        assert "the same on every card." not in text


def test_staging_loops_keep_several_loads_in_flight():
    """fused.cu's staging loops (W, x, the epilogue's bias and targets) issue STAGE_U >= 2
    global loads before using them, not one load per `#pragma unroll 1` iteration."""
    import re

    from cupynn import _loader

    src = (_loader.KERNEL_DIR / "fused.cu").read_text()
    u = int(re.search(r"constexpr int STAGE_U = (\d+);", src).group(1))
    assert u >= 2
    assert src.count("copy_in_flight<T>(") >= 3  # W, narrow x, wide x
    assert "dst[(e / K) * ld + e % K] = w[e]" not in src  # the old one-load-at-a-time W loop
    epilogue = src[src.index("void layer_epilogue"):src.index("narrow_forward")]
    assert "tv[STAGE_U]" in epilogue and "bv[STAGE_U]" in epilogue


# -- on a GPU (skipped here): what only the card can confirm -----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_fused_bits_do_not_depend_on_the_block_count(cp, monkeypatch, dtype):
    """The card's own SM count against 114 and 37 persistent blocks (a smaller card's grid):
    the same bits, on the hardware."""
    import numpy as np

    from cupynn.backends import cuda_backend as cb
    from cupynn.backends.base import LayerSpec, LossSpec, NetSpec

    be = cb.CudaBackend(xp=cp, module_cls=cp.RawModule)
    be.kernels.poison = True
    rng = np.random.default_rng(1)
    net = NetSpec((LayerSpec(1, 1000, "tanh", True), LayerSpec(1000, 20, "tanh", True),
                   LayerSpec(20, 1, "identity", True)), np.dtype(dtype), "strict")
    params = [(cp.asarray(rng.standard_normal((o, i)).astype(dtype) / np.sqrt(i)),
               cp.asarray(rng.standard_normal(o).astype(dtype))) for i, o in ((1, 1000), (1000, 20), (20, 1))]
    x = cp.asarray(rng.standard_normal((100_003, 1)).astype(dtype))
    real = be.fused.sm_count()
    out = []
    for sms in (real, 114, 37):
        be = cb.CudaBackend(xp=cp, module_cls=cp.RawModule)  # fresh plans: the grid is in them
        be.kernels.poison = True
        monkeypatch.setattr(be.fused, "sm_count", lambda s=sms: s)
        assert be.fused.blocks(be.fused.layout(net, x.shape[0], 2)) == min(132, sms)
        v, g, _ = be.network_value_and_grad(net, params, x, LossSpec("sum_squares"))
        out.append(b"".join(cp.asnumpy(a).tobytes() for a in [v] + [t for pair in g for t in pair]))
    assert out[0] == out[1] == out[2]


@pytest.mark.gpu
def test_gpu_concurrent_calls_on_two_streams(cp):
    """Two threads, each on its own non-blocking stream, one backend: their own gradients."""
    import threading

    import numpy as np

    from cupynn.backends import cuda_backend as cb
    from cupynn.backends.base import LayerSpec, LossSpec, NetSpec

    be = cb.CudaBackend(xp=cp, module_cls=cp.RawModule)
    rng = np.random.default_rng(2)
    net = NetSpec((LayerSpec(3, 64, "tanh", True), LayerSpec(64, 2, "identity", True)),
                  np.dtype("float64"), "strict")
    host_params = [[(rng.standard_normal((64, 3)), rng.standard_normal(64)),
                    (rng.standard_normal((2, 64)), rng.standard_normal(2))] for _ in range(2)]
    xs = [rng.standard_normal((50_000, 3)) for _ in range(2)]
    got = [None, None]

    def work(i):
        with cp.cuda.Stream(non_blocking=True) as s:
            p = [(cp.asarray(W), cp.asarray(b)) for W, b in host_params[i]]
            x = cp.asarray(xs[i])
            for _ in range(20):
                v, g, _ = be.network_value_and_grad(net, p, x, LossSpec("sum_squares"))
            s.synchronize()
            got[i] = (cp.asnumpy(v), [(cp.asnumpy(a), cp.asnumpy(b)) for a, b in g], None)

    ts = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    for i in (0, 1):
        _assert_same(got[i], _reference(net, host_params[i], xs[i]), f"stream {i}")
