"""CPU threads of the NumPy backend: BLAS's own pool, and the lanes cupynn runs itself.

A threaded BLAS (OpenBLAS, MKL) splits every product over all cores and makes its
threads wait for each other by spinning.  On the NumPy backend's cache-sized chunks that
pays little on a quiet machine and collapses when another process holds a core (the
spinning threads wait for one that is not scheduled: 3-15x slower).  So the hot loop
runs BLAS with one thread and parallelises over *lanes* itself: the batch is cut into
as many contiguous ranges of chunks as there are usable cores, each range runs on its
own Python thread (NumPy releases the GIL inside BLAS and ufuncs), and the lanes'
partial gradients are added in lane order at the end.  Nothing spins: a busy core
slows one lane, not every product.

BLAS threads are set through ``threadpoolctl`` (a dependency of cupynn).  Without it
the backend runs one lane and leaves BLAS alone (the behaviour of plain NumPy).

``CUPYNN_CPU_THREADS=N`` sets the number of lanes (BLAS stays at one thread inside the
hot loop either way); the default is the number of cores this process may run on
(``os.sched_getaffinity``), at most 16.  The lane count fixes the order in which the
partial gradients are added, so results are bit-identical run to run on one machine
and setting, busy or not.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import threading

__all__ = ["lanes_available", "blas_single_thread", "run_lanes", "thread_control", "usable_cores"]

_MAX_LANES = 16
_LOCK = threading.Lock()
_POOL: cf.ThreadPoolExecutor | None = None
_CONTROLLER: object | None = None
_CONTROLLER_REASON: str | None = None


def usable_cores() -> int:
    """How many cores this process may run on (its CPU affinity), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries, or None (and why)."""
    global _CONTROLLER, _CONTROLLER_REASON
    if _CONTROLLER is None and _CONTROLLER_REASON is None:
        with _LOCK:
            if _CONTROLLER is None and _CONTROLLER_REASON is None:
                try:
                    import threadpoolctl  # noqa: PLC0415 - imported on first use

                    ctl = threadpoolctl.ThreadpoolController().select(user_api="blas")
                    if not ctl.lib_controllers:
                        _CONTROLLER_REASON = "threadpoolctl finds no BLAS library in NumPy"
                    else:
                        _CONTROLLER = ctl
                except ImportError:
                    _CONTROLLER_REASON = "threadpoolctl is not installed (pip install threadpoolctl)"
                except Exception as exc:  # noqa: BLE001 - a broken BLAS introspection
                    _CONTROLLER_REASON = f"threadpoolctl failed: {exc}"
    return _CONTROLLER


def thread_control() -> str:
    """One line for ``cupynn info``: how the NumPy backend runs its threads."""
    ctl = _blas_controller()
    if ctl is None:
        return f"one lane, BLAS threads untouched ({_CONTROLLER_REASON})"
    libs = ", ".join(f"{c.internal_api} {c.version}" for c in ctl.lib_controllers)
    return f"up to {lanes_available()} lanes, BLAS ({libs}) at 1 thread in the hot loop"


def lanes_available() -> int:
    """How many lanes a large batch is split into (1 without BLAS thread control)."""
    env = os.environ.get("CUPYNN_CPU_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"CUPYNN_CPU_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"CUPYNN_CPU_THREADS must be a positive integer, got {env!r}")
    else:
        n = min(_MAX_LANES, usable_cores())
    if n > 1 and _blas_controller() is None:
        return 1
    return n


def blas_single_thread():
    """A context manager running BLAS with one thread (a no-op without threadpoolctl)."""
    ctl = _blas_controller()
    if ctl is None:
        return contextlib.nullcontext()
    return ctl.limit(limits=1)


def _pool(workers: int) -> cf.ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            old, _POOL = _POOL, cf.ThreadPoolExecutor(max_workers=workers,
                                                      thread_name_prefix="cupynn-lane")
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def run_lanes(fn, n_lanes: int) -> list:
    """``[fn(0), ..., fn(n_lanes - 1)]``; lane 0 runs on the calling thread, the others on
    a shared pool.  An exception in any lane is raised here (after every lane ended)."""
    if n_lanes <= 1:
        return [fn(0)]
    futures = [_pool(n_lanes - 1).submit(fn, i) for i in range(1, n_lanes)]
    first_error = None
    try:
        results = [fn(0)]
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finish
        results, first_error = [None], exc
    for fut in futures:
        try:
            results.append(fut.result())
        except BaseException as exc:  # noqa: BLE001
            results.append(None)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results
