"""Launch controls of the emulator: fiber/block schedules, guarded arrays, sparse arrays."""

from __future__ import annotations

import contextlib
import mmap

import numpy as np

from . import _protocol

# The schedules every emulated kernel test runs under with ``pytest --slow`` (one of the
# non-default ones per test in the quick set): thread order with the last arrival at a barrier
# going on first (the default), reversed, rotated every pass, and two seeded random orders.
SCHEDULES = ("default", "reversed", "rotated", "random:1", "random:2")


def get_schedule() -> str:
    """The schedule launches use now, as a string ("default", "random:3", ...)."""
    kind, seed = _protocol._STATE["schedule"]
    name = {v: k for k, v in _protocol.SCHEDULE_KINDS.items()}[kind]
    return name if kind in (0, 1) and seed == 0 else f"{name}:{seed}"


def set_schedule(spec: str | None) -> None:
    """Set the order in which the emulator runs fibers and blocks (for every later launch).

    ``"default"``: thread order, the last arrival at a barrier or warp collective runs on first;
    ``"reversed"``; ``"rotated[:seed]"`` (a different first fiber every barrier interval);
    ``"random[:seed]"`` (a seeded random order per interval).  Every non-default schedule also
    permutes the block order and runs the blocks on one OS thread, so a result is the same on
    every run.  ``$CUPYNN_EMU_SCHEDULE`` sets the initial value.

    >>> from cupynn.emulator import set_schedule, get_schedule
    >>> set_schedule("random:7"); get_schedule()
    'random:7'
    >>> set_schedule("default")
    """
    _protocol._STATE["schedule"] = _protocol.parse_schedule(spec)


@contextlib.contextmanager
def schedule(spec: str | None):
    """Run the launches inside the ``with`` block under schedule ``spec`` (see set_schedule).

    >>> from cupynn.emulator import schedule, get_schedule
    >>> with schedule("reversed"):
    ...     get_schedule()
    'reversed'
    """
    old = _protocol._STATE["schedule"]
    _protocol._STATE["schedule"] = _protocol.parse_schedule(spec)
    try:
        yield
    finally:
        _protocol._STATE["schedule"] = old


@contextlib.contextmanager
def guarded_arrays(enabled: bool = True):
    """Turn the default mode's guarded copies of array arguments on or off inside the block.

    On (the default; ``CUPYNN_EMU_GUARD=0`` turns it off): each array argument is copied between
    two PROT_NONE pages with 0xff canary bytes around it, so an out-of-bounds read sees NaN
    and an out-of-bounds write fails the launch with the kernel, argument and offset named.

    >>> from cupynn.emulator import guarded_arrays
    >>> with guarded_arrays(False):
    ...     pass
    """
    old = _protocol._STATE["guard"]
    _protocol._STATE["guard"] = bool(enabled)
    try:
        yield
    finally:
        _protocol._STATE["guard"] = old


def sparse_array(shape, dtype) -> np.ndarray:
    """A zero-filled array backed by a lazily mapped anonymous mapping (``MAP_NORESERVE``).

    Only the pages a kernel (or the test) touches take memory, so a launch whose ``M x N``
    passes 2^31 can run its last blocks (``f(..., blocks=(first, count))``) on a laptop.
    Arrays over 256 MiB are not copied into guarded buffers.

    >>> from cupynn.emulator import sparse_array
    >>> a = sparse_array((1 << 28,), "float64")   # 2 GiB of address space, ~nothing resident
    >>> a[-1] = 1.0; float(a[-1] + a[0])
    1.0
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    nbytes = max(int(np.prod(shape, dtype=object)) * dtype.itemsize, 1)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_NORESERVE", 0x4000)
    buf = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape, dtype=object))).reshape(shape)
