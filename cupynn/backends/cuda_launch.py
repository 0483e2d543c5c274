"""Launching our CUDA kernels: compile on demand, check arguments, allocate, launch.

:class:`Launcher` owns the kernel functions of one array module / module class pair
(``cupy`` + ``cupy.RawModule`` on a GPU, ``numpy`` + the emulator's ``EmulatedModule`` on
the CPU), the buffers the backend allocates (:meth:`Launcher.empty`, so tests can poison
them and a graph capture can keep them), and the launch itself (with its NVTX range, and
optionally recorded instead of run, for launch plans).  :func:`expect` is the one
pre-launch check of an array argument.  Any ``kernels/*.cu`` file can be launched from:
functions are cached per (device, source file, name expression).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading

import numpy as np

from .. import _loader
from .._nvtx import nvtx_range

__all__ = ["THREADS", "CudaLaunchError", "Launcher", "expect", "elem_strides", "graph_stream",
           "synchronize_current", "EmulatedStream", "EmulatedGraph"]

THREADS = 256  # threads per block of every kernel (kernels/common.cuh)


class CudaLaunchError(ValueError):
    """An argument a kernel cannot take (shape, dtype, layout); the message says what to change."""


def expect(arr, what: str, shape: tuple, dtype: np.dtype, *, contiguous: bool = True) -> None:
    """The one pre-launch check: shape, dtype and (unless strided) C-contiguity."""
    if tuple(arr.shape) != tuple(shape):
        raise CudaLaunchError(f"{what}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")
    if arr.dtype != dtype:
        raise CudaLaunchError(
            f"{what}: expected dtype {dtype}, got {arr.dtype}; convert with .astype({dtype.name!r})"
        )
    if contiguous and not arr.flags.c_contiguous:
        raise CudaLaunchError(
            f"{what}: the kernel needs a C-contiguous array; pass xp.ascontiguousarray({what})"
        )


def elem_strides(x) -> tuple[int, int]:
    """Element strides of a 2-D array (the first layer's loads take them: no copy)."""
    item = x.dtype.itemsize
    sm, sk = x.strides
    if sm % item or sk % item:
        raise CudaLaunchError("x: strides must be multiples of the item size; "
                              "pass xp.ascontiguousarray(x)")
    return sm // item, sk // item


class _PerThread(threading.local):
    """A launcher's per-thread state (class attributes: the defaults every thread starts with)."""

    recording = None
    capture = None
    keep_alive = None


class Launcher:
    """Kernel functions, buffers and launches for one array module and module class.

    Attributes a caller may set: ``poison`` (fill every buffer from :meth:`empty` with NaN:
    tests), ``keep_alive`` (a list that receives every buffer from :meth:`empty`: a CUDA
    graph capture keeps what it reads), ``launch_log`` (a list that receives
    ``(nvtx range, kernel name)`` per launch), ``recording`` (a pair of lists
    ``(launches, allocations)``: launches are recorded instead of run), ``capture`` (set by
    an :class:`EmulatedStream` between ``begin_capture`` and ``end_capture``: on the
    emulator, launches -- a launch plan's included -- are recorded into a graph, not run).
    ``recording``, ``capture`` and ``keep_alive`` are per thread: they belong to the thread
    that set them.
    """

    def __init__(self, xp, module_cls, *, arch: str | None = None):
        self.xp = xp
        self.module_cls = module_cls
        self.arch = arch
        self.emulated = xp is np
        self._funcs: dict[tuple, object] = {}
        self._dummy: dict[tuple, object] = {}
        self.poison = False
        self._local = _PerThread()  # recording, capture, keep_alive: per thread
        self.launch_log: list[tuple[str, str]] | None = None

    # -- buffers ------------------------------------------------------------------------
    def empty(self, shape, dtype):
        """Every output and workspace of the backend comes from here."""
        a = self.xp.empty(shape, dtype=dtype)
        if self.poison:
            a.fill(np.nan if a.dtype.kind == "f" else -1)
        local = self._local
        if local.keep_alive is not None:
            local.keep_alive.append(a)
        if local.recording is not None:
            local.recording[1].append(a)
        return a

    def none(self, dtype):
        """A 1-element array passed where a kernel's optional pointer is unused (flag 0)."""
        key = (self.device(), np.dtype(dtype))
        d = self._dummy.get(key)
        if d is None:
            d = self._dummy[key] = self.xp.zeros(1, dtype=dtype)
        return d

    def dummies(self) -> list:
        """The arrays :meth:`none` hands out (launch plans pass them as constants)."""
        return list(self._dummy.values())

    # -- per-thread state: a recording, a capture or a graph's keep-alive list belongs to the
    # thread that set it (another thread's calls meanwhile are neither recorded nor kept) --
    @property
    def recording(self):
        return self._local.recording

    @recording.setter
    def recording(self, value):
        self._local.recording = value

    @property
    def capture(self):
        return self._local.capture

    @capture.setter
    def capture(self, value):
        self._local.capture = value

    @property
    def keep_alive(self):
        return self._local.keep_alive

    @keep_alive.setter
    def keep_alive(self, value):
        self._local.keep_alive = value

    def stream_key(self) -> int:
        """The current stream (workspaces that kernels write are per stream); 0 on the
        emulator, which runs every launch at once."""
        if self.emulated:
            return 0
        return self.xp.cuda.get_current_stream().ptr

    # -- kernel functions ---------------------------------------------------------------
    def device(self) -> int:
        """The current device (functions, dummies and plans are per device)."""
        if self.emulated:
            return -1
        return self.xp.cuda.runtime.getDevice()

    def prepare(self, source: str, names) -> None:
        """Compile (one module) every name of ``kernels/<source>`` not loaded yet here."""
        dev = self.device()
        missing = [n for n in names if (dev, source, n) not in self._funcs]
        if not missing:
            return
        mod = _loader.load_module(source, missing, module_cls=self.module_cls, arch=self.arch)
        for n in missing:
            self._funcs[(dev, source, n)] = mod.get_function(n)

    def warm_up(self, source: str, names, *, workers: int | None = None,
                modules: int | None = None) -> int:
        """Compile kernels of ``kernels/<source>`` ahead of use, in parallel threads;
        returns how many were compiled.

        ``modules``: how many modules to spread them over (default: one per kernel, the
        same modules lazy loading makes, so CuPy's on-disk cache serves both).  NVRTC runs
        outside the GIL; the emulator builds with g++ in subprocesses.
        """
        dev = self.device()
        todo = sorted(n for n in set(names) if (dev, source, n) not in self._funcs)
        if not todo:
            return 0
        n_mod = len(todo) if modules is None else max(1, min(modules, len(todo)))
        groups = [todo[i::n_mod] for i in range(n_mod)]

        def build(group):
            if not self.emulated:
                self.xp.cuda.Device(dev).use()
            mod = _loader.load_module(source, group, module_cls=self.module_cls, arch=self.arch)
            return [(name, mod.get_function(name)) for name in group]

        workers = workers or max(1, min(16, os.cpu_count() or 1))
        with cf.ThreadPoolExecutor(max_workers=workers) as ex:
            for pairs in ex.map(build, groups):
                for name, fn in pairs:
                    self._funcs[(dev, source, name)] = fn
        return len(todo)

    def function(self, source: str, name: str):
        key = (self.device(), source, name)
        f = self._funcs.get(key)
        if f is None:
            self.prepare(source, [name])
            f = self._funcs[key]
        return f

    # -- launching ----------------------------------------------------------------------
    def launch(self, rng: str, source: str, name: str, grid, args) -> None:
        """Launch ``name`` of ``kernels/<source>`` on ``grid`` blocks of THREADS threads
        inside the NVTX range ``rng`` (or record it); a grid with a zero extent is a no-op."""
        if min(grid) <= 0:
            return
        fn = self.function(source, name)
        local = self._local
        if local.recording is not None:
            local.recording[0].append((rng, name, fn, grid, args))
            return
        if local.capture is not None:
            local.capture.append((rng, name, fn, (int(grid[0]), int(grid[1]), int(grid[2])),
                                 tuple(args)))
            return
        if self.launch_log is not None:
            self.launch_log.append((rng, name))
        with nvtx_range(rng, not self.emulated):
            fn((int(grid[0]), int(grid[1]), int(grid[2])), (THREADS,), args)


# -- CUDA graphs: the stream that captures one, and its emulator stand-in --------------------

def graph_stream(launcher: Launcher):
    """A stream to capture a CUDA graph on: ``cupy.cuda.Stream(non_blocking=True)`` on a GPU,
    an :class:`EmulatedStream` on the emulator (same methods: ``with``, ``synchronize``,
    ``begin_capture``, ``end_capture``)."""
    if launcher.emulated:
        return EmulatedStream(launcher)
    return launcher.xp.cuda.Stream(non_blocking=True)


def synchronize_current(launcher: Launcher) -> None:
    """Wait for the current stream (a no-op on the emulator, which runs launches at once)."""
    if not launcher.emulated:
        launcher.xp.cuda.get_current_stream().synchronize()


class EmulatedGraph:
    """What a captured CUDA graph is on the emulator: the launches of the captured call, in
    order, bound to the arrays they were given; :meth:`launch` runs them again."""

    def __init__(self, launcher: Launcher, launches: list):
        self._launcher = launcher
        self.launches = launches

    def launch(self, stream=None) -> None:
        log = self._launcher.launch_log
        block = (THREADS,)
        for rng, name, fn, grid, args in self.launches:
            if log is not None:
                log.append((rng, name))
            fn(grid, block, args)


class EmulatedStream:
    """``cupy.cuda.Stream``'s capture interface on the emulator: between
    :meth:`begin_capture` and :meth:`end_capture` the launcher records launches (its own and
    a launch plan's) instead of running them, as a stream capture does on a GPU. Host-side
    array operations are not recorded: a captured call must launch kernels only."""

    def __init__(self, launcher: Launcher):
        self._launcher = launcher

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self) -> None:
        pass

    def begin_capture(self) -> None:
        if self._launcher.capture is not None:
            raise RuntimeError("a capture is already in progress on this backend")
        self._launcher.capture = []

    def end_capture(self) -> EmulatedGraph:
        launches, self._launcher.capture = self._launcher.capture, None
        return EmulatedGraph(self._launcher, launches or [])
