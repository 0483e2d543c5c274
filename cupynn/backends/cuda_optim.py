"""The optimizers' update on the CUDA backend: one ``kernels/optim.cu`` launch per step.

``multi_tensor_step<T>`` updates up to :data:`SLOTS` parameter arrays in one launch; its
arguments are fixed slots (``p<s>, g<s>``, see the kernel's header comment), so nothing
depends on where the gradient arrays of a call live.  What does depend on the parameters'
shapes only is built once, when the state is made: the layout table (element offsets in
the flat state, first block of each parameter), the flat state buffers, and the per-block
step counters.  A model with more than :data:`SLOTS` parameter arrays is split into
groups of :data:`SLOTS`, one launch each.

The hyperparameters are read by the kernel from a small float64 device array that is
rewritten only when they change (:func:`sync`), so a captured CUDA graph follows a
learning-rate schedule; the step count is counted on the device (``steps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import OPTIMIZER_KINDS, OptimizerState
from .cuda_launch import CudaLaunchError, Launcher, expect

__all__ = ["SOURCE", "SLOTS", "CHUNK", "KINDS", "step_name", "kernel_names_all", "make_state",
           "step", "sync", "get_step", "set_step"]

SOURCE = "optim.cu"
SLOTS = 16   # kernels/optim.cu OPT_SLOTS
CHUNK = 512  # kernels/optim.cu OPT_CHUNK: elements per block
KINDS = {"sgd": 0, "adam": 1, "adamw": 2}  # kernels/optim.cu OPT_SGD, OPT_ADAM, OPT_ADAMW
HYPER_LEN = 8
_CTYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}

assert set(KINDS) == set(OPTIMIZER_KINDS)


def step_name(ctype: str) -> str:
    return f"cupynn::multi_tensor_step<{ctype}>"


def kernel_names_all() -> list[tuple[str, tuple[str, ...]]]:
    """Every instantiation of ``kernels/optim.cu`` (one per dtype; the kind is a runtime switch)."""
    return [(SOURCE, tuple(step_name(c) for c in _CTYPE.values()))]


@dataclass
class _Group:
    """Up to SLOTS parameters updated by one launch."""

    index: tuple[int, ...]   # which parameters (positions in the optimizer's list)
    layout: object           # i64 (2 n + 2,) device array: offsets, then first blocks
    blocks: int              # grid size
    steps: object            # i64 (blocks,) device array: per-block step counts
    flat: tuple              # (s0, s1) flat state arrays, or the launcher's dummy


@dataclass
class _Impl:
    groups: list[_Group]
    hyper: object            # float64 (HYPER_LEN,) device array
    hyper_host: tuple | None  # what ``hyper`` holds (None: not written yet)


def _host_layout(shapes) -> tuple[np.ndarray, int]:
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    off = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    blk = np.concatenate([[0], np.cumsum([-(-n // CHUNK) for n in sizes], dtype=np.int64)])
    return np.concatenate([off, blk]).astype(np.int64), int(blk[-1])


def make_state(launcher: Launcher, xp, kind: str, shapes, dtype, buffers) -> OptimizerState:
    """Zeroed state (step 0) for parameters of these shapes; ``buffers`` names the per-parameter
    state arrays (at most two: the kernel's s0 and s1)."""
    dtype = np.dtype(dtype)
    if len(buffers) > 2:
        raise ValueError(f"the update kernel keeps at most two state arrays, got {buffers}")
    groups = []
    views: dict[str, list] = {name: [] for name in buffers}
    for start in range(0, len(shapes), SLOTS):
        index = tuple(range(start, min(start + SLOTS, len(shapes))))
        gshapes = [tuple(shapes[i]) for i in index]
        layout, blocks = _host_layout(gshapes)
        total = int(layout[len(gshapes)])
        flat = []
        for name in buffers:
            buf = xp.zeros(total, dtype=dtype)
            flat.append(buf)
            for j, shp in enumerate(gshapes):
                views[name].append(buf[int(layout[j]):int(layout[j + 1])].reshape(shp))
        groups.append(_Group(index, xp.asarray(layout), blocks,
                             xp.zeros(max(blocks, 1), dtype=np.int64), tuple(flat)))
    impl = _Impl(groups, xp.zeros(HYPER_LEN, dtype=np.float64), None)
    return OptimizerState(kind, dtype, tuple(tuple(s) for s in shapes), views, impl)


def _write(xp, dev, host: np.ndarray) -> None:
    if xp is np:
        dev[...] = host
    else:
        dev.set(host)  # an ordered copy on the current stream


def sync(xp, state: OptimizerState, hyper: tuple) -> None:
    """Write the hyperparameters to the device array the kernel reads, if they changed.

    (Never during a CUDA graph capture: a compiled step syncs before each launch, so the
    step inside the capture finds them current.)"""
    impl: _Impl = state.impl
    hyper = tuple(float(h) for h in hyper)
    if impl.hyper_host != hyper:
        vec = np.zeros(HYPER_LEN, dtype=np.float64)
        vec[:len(hyper)] = hyper
        _write(xp, impl.hyper, vec)
        impl.hyper_host = hyper


def step(launcher: Launcher, xp, state: OptimizerState, hyper: tuple, params, grads) -> None:
    """One update of every parameter, in place: one launch per group of SLOTS arrays."""
    impl: _Impl = state.impl
    dtype = state.dtype
    ctype = _CTYPE[dtype]
    sync(xp, state, hyper)
    none = launcher.none(dtype)
    i32 = np.int32
    for grp in impl.groups:
        n = len(grp.index)
        if n > SLOTS:
            raise CudaLaunchError(f"a group holds {n} parameters; the kernel has {SLOTS} slots")
        expect(grp.layout, "optimizer layout", (2 * n + 2,), np.dtype(np.int64))
        expect(grp.steps, "optimizer steps", (max(grp.blocks, 1),), np.dtype(np.int64))
        slots = []
        for i in grp.index:
            shape = state.shapes[i]
            expect(params[i], f"parameter {i}", shape, dtype)
            expect(grads[i], f"gradient {i}", shape, dtype)
            slots += [params[i], grads[i]]
        slots += [none, none] * (SLOTS - n)
        s0 = grp.flat[0] if len(grp.flat) > 0 else none
        s1 = grp.flat[1] if len(grp.flat) > 1 else none
        args = (i32(KINDS[state.kind]), i32(n), grp.layout, impl.hyper, grp.steps, s0, s1,
                *slots)
        launcher.launch(f"optim.{state.kind}", SOURCE, step_name(ctype), (grp.blocks, 1, 1), args)


def get_step(backend_to_host, state: OptimizerState) -> int:
    """The step count (block 0's copy of the first group's counter: one tiny copy)."""
    grp = state.impl.groups[0]
    return int(backend_to_host(grp.steps[:1])[0])


def set_step(state: OptimizerState, n: int) -> None:
    """Set every copy of the step count to ``n`` (in place: a captured graph keeps reading it)."""
    for grp in state.impl.groups:
        grp.steps[...] = n
