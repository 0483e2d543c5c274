"""Launch plans: record the kernels a call launches once, replay them on later calls.

A plan records, for one (network, batch, layout, loss kind), the kernels, grids and
scalar arguments a call launches and the buffers it allocates; later calls only allocate
fresh buffers and launch (the host cost of a seed step drops from ~100 us of Python to
~30).  Arrays are referred to by slot: the caller's arrays (``externals``: the input the
first layer reads, every W and b, the target) first, then the call's own allocations in
order.  A call that hands a kernel an array from anywhere else cannot be planned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from .._nvtx import nvtx_range
from .cuda_launch import THREADS, Launcher

__all__ = ["Plan", "UNPLANNABLE", "PlannedLaunch", "record", "replay", "bind"]


class PlannedLaunch(NamedTuple):
    """One kernel launch of a recorded call (``CudaBackend.planned_launches``)."""

    range: str                    # the NVTX range, e.g. "Dense[1].forward"
    name: str                     # the kernel's name expression
    grid: tuple[int, int, int]    # blocks of THREADS threads
    launch: Callable[[], None]    # launches it again, on the same buffers
    kernel: object                # the module's function (CuPy: .num_regs, .shared_size_bytes)


class _Slot(int):
    """A buffer index in a launch plan's result structure."""


class Plan:
    __slots__ = ("allocs", "steps", "result")

    def __init__(self, allocs, steps, result):
        self.allocs = allocs      # [(shape, dtype)] of the call's own buffers, in order
        self.steps = steps        # [(range, name, fn, grid, constant args, ((i, slot), ...))]
        self.result = result      # the call's return value, arrays replaced by _Slot


UNPLANNABLE = object()


def record(launcher: Launcher, externals: list, run: Callable[[], object]):
    """Run ``run()`` with the launcher recording; return its :class:`Plan` or UNPLANNABLE."""
    launches: list = []
    allocs: list = []
    launcher.recording = (launches, allocs)
    try:
        result = run()
    finally:
        launcher.recording = None
    slot_of = {id(a): i for i, a in enumerate(externals)}
    n_ext = len(externals)
    for j, a in enumerate(allocs):
        slot_of[id(a)] = n_ext + j
    dummies = {id(d) for d in launcher.dummies()}
    array_type = launcher.xp.ndarray
    steps = []
    for rng, name, fn, grid, args in launches:
        const = list(args)
        slots = []
        for i, a in enumerate(args):
            if isinstance(a, array_type) and id(a) not in dummies:
                k = slot_of.get(id(a))
                if k is None:
                    return UNPLANNABLE  # an array made outside Launcher.empty (a copy, a view)
                slots.append((i, k))
                const[i] = None
        grid3 = (int(grid[0]), int(grid[1]), int(grid[2]))
        steps.append((rng, name, fn, grid3, const, tuple(slots)))

    def encode(obj):
        if obj is None:
            return None
        if isinstance(obj, (list, tuple)):
            return type(obj)(encode(o) for o in obj)
        k = slot_of.get(id(obj))
        if k is None:
            raise LookupError
        return _Slot(k)

    try:
        out = encode(result)
    except LookupError:
        return UNPLANNABLE
    return Plan([(a.shape, a.dtype) for a in allocs], steps, out)


def _buffers(launcher: Launcher, plan: Plan, externals: list) -> list:
    bufs = list(externals)
    for shape, dtype in plan.allocs:
        bufs.append(launcher.empty(shape, dtype))
    return bufs


def _decode(obj, bufs):
    if obj is None:
        return None
    if isinstance(obj, _Slot):
        return bufs[obj]
    return type(obj)(_decode(o, bufs) for o in obj)


def replay(launcher: Launcher, plan: Plan, externals: list):
    """Launch a plan's kernels on fresh buffers; return the call's result on them.
    (Under an emulated graph capture, ``launcher.capture``, the launches are recorded.)"""
    bufs = _buffers(launcher, plan, externals)
    log = launcher.launch_log
    gpu = not launcher.emulated
    block = (THREADS,)
    capture = launcher.capture
    for rng, name, fn, grid, const, slots in plan.steps:
        args = list(const)
        for i, k in slots:
            args[i] = bufs[k]
        if capture is not None:
            capture.append((rng, name, fn, grid, tuple(args)))
            continue
        if log is not None:
            log.append((rng, name))
        with nvtx_range(rng, gpu):
            fn(grid, block, tuple(args))
    return _decode(plan.result, bufs)


def bind(launcher: Launcher, plan: Plan, externals: list) -> tuple[list[PlannedLaunch], object]:
    """Each launch of a plan bound to buffers of its own and callable alone, and the
    result those buffers hold once all have run."""
    bufs = _buffers(launcher, plan, externals)
    out = []
    for rng, name, fn, grid, const, slots in plan.steps:
        args = list(const)
        for i, k in slots:
            args[i] = bufs[k]
        out.append(PlannedLaunch(rng, name, grid,
                                 functools.partial(fn, grid, (THREADS,), tuple(args)), fn))
    return out, _decode(plan.result, bufs)
