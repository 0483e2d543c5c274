"""CPU threads of the NumPy backend: BLAS's own pool, and the lanes cupynn runs itself.

A threaded BLAS (OpenBLAS, MKL) splits every product over all cores and makes its
threads wait for each other by spinning.  On the NumPy backend's cache-sized chunks that
pays little on a quiet machine and collapses when another process holds a core (the
spinning threads wait for one that is not scheduled: 3-15x slower).  So the hot loop
runs BLAS with one thread and parallelises itself over *lanes*, one Python thread per
usable core (NumPy releases the GIL inside BLAS and ufuncs): the batch is cut into groups
of contiguous chunks, each lane takes the next group when it finishes one, and the groups'
partial gradients are added in group order at the end.  Nothing spins, and a lane on a
busy core simply takes fewer groups.

BLAS threads are set through ``threadpoolctl`` (a dependency of cupynn).  Without it
the backend runs one lane and leaves BLAS alone (the behaviour of plain NumPy).  The limit
is process-wide while a call runs: another thread of the program using NumPy's BLAS at the
same moment also gets one thread (correct results, possibly slower products).  It has one
owner, :func:`blas_single_thread`, which *counts* the calls inside it: the first to enter
sets BLAS to one thread, the last to leave restores what was there before the first
entered.  So calls from many threads at once neither leave BLAS at one thread for the
rest of the process nor change the thread count under another call's loop.

``CUPYNN_CPU_THREADS=N`` sets the number of lanes (BLAS stays at one thread inside the
hot loop either way); the default is the number of cores this process may run on
(``os.sched_getaffinity``), at most 16.  ``lane_limit(n)`` caps it for the calls one
thread makes inside a block (``cupynn.dask`` runs every chunk of a CPU worker on one
lane, so that worker processes sharing a host do not oversubscribe its cores).  The
group count (from the batch and the lane count, never from timing) fixes the order in
which partial gradients are added, so results are bit-identical run to run on one
machine and setting, busy or not, whatever other threads of the process do.  Across
settings they are not: a different ``CUPYNN_CPU_THREADS`` (or CPU affinity, which sets the
default) may change the group count and with it the last bits of a gradient (within the
float tolerance; the value of a chunked call likewise).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import os
import threading

__all__ = ["lanes_available", "lane_limit", "blas_limiter", "blas_single_thread", "blas_holders",
           "run_groups", "thread_control", "usable_cores"]

_MAX_LANES = 16
_LOCK = threading.Lock()
_POOL: cf.ThreadPoolExecutor | None = None
_CONTROLLER: object | None = None
_CONTROLLER_REASON: str | None = None
_LOCAL = threading.local()  # .lanes: the cap lane_limit() set for this thread, or absent


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
    cap = getattr(_LOCAL, "lanes", None)
    if cap is not None:
        n = min(n, cap)
    if n > 1 and _blas_controller() is None:
        return 1
    return n


@contextlib.contextmanager
def lane_limit(n: int):
    """Within the block, NumPy-backend calls made by *this* thread run on at most ``n``
    lanes (other threads are not affected; blocks nest, the innermost cap applies)."""
    if isinstance(n, bool) or not (isinstance(n, int) and n >= 1):
        raise ValueError(f"a lane limit must be a positive integer, got {n!r}")
    prev = getattr(_LOCAL, "lanes", None)
    _LOCAL.lanes = n
    try:
        yield
    finally:
        _LOCAL.lanes = prev


def blas_limiter(n: int):
    """Set the loaded BLAS libraries to ``n`` threads now; return threadpoolctl's limiter
    (``restore_original_limits()`` undoes it; also a context manager), or None without
    threadpoolctl.  Uncounted: cupynn's own calls use :func:`blas_single_thread`, the one
    owner of the limit while they run; this is for a whole process's setting (a benchmark's
    worker)."""
    ctl = _blas_controller()
    if ctl is None:
        return None
    _release_blas_ownership()
    limiter = ctl.limit(limits=n)
    _release_blas_ownership()
    return limiter


def _release_blas_ownership() -> None:
    """Let the next thread set OpenBLAS's limit. threadpoolctl (3.5+) lets only the first
    thread that set a limit on a pthreads OpenBLAS set it again -- other threads' calls
    silently do nothing -- until that ownership is cleared, which its ``with`` blocks do and
    a limiter kept across threads (ours) must do itself: else a call from a second thread
    runs BLAS at full width under another call's loop, or cannot restore the limit."""
    import threadpoolctl  # noqa: PLC0415 - present: the controller exists

    clear = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread",
                    None)
    if clear is not None:
        try:
            clear(force=True)
        except TypeError:  # an older threadpoolctl without force=
            clear()


_HOLD_LOCK = threading.Lock()
_HOLDERS = 0
_HELD = None  # threadpoolctl's limiter while _HOLDERS > 0


@contextlib.contextmanager
def blas_single_thread():
    """A context manager running BLAS with one thread (a no-op without threadpoolctl).

    Counted, so safe from many threads at once: the first entry sets the limit, the last
    exit restores the limits that were there before the first entry, and no exit changes
    them while another thread is still inside."""
    global _HOLDERS, _HELD
    if _blas_controller() is None:
        yield
        return
    with _HOLD_LOCK:
        if _HOLDERS == 0:
            _HELD = blas_limiter(1)
        _HOLDERS += 1
    try:
        yield
    finally:
        with _HOLD_LOCK:
            _HOLDERS -= 1
            if _HOLDERS == 0 and _HELD is not None:
                held, _HELD = _HELD, None
                _release_blas_ownership()  # the last to leave may be another thread
                held.restore_original_limits()
                _release_blas_ownership()


def blas_holders() -> int:
    """How many calls are inside :func:`blas_single_thread` now (for tests and ``info``)."""
    return _HOLDERS


def _pool(workers: int) -> cf.ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            old, _POOL = _POOL, cf.ThreadPoolExecutor(max_workers=workers,
                                                      thread_name_prefix="cupynn-lane")
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def run_groups(fn, n_groups: int, n_threads: int) -> list:
    """``[fn(0), ..., fn(n_groups - 1)]`` computed on ``n_threads`` threads (the caller's and
    a shared pool's): each thread takes the next group when it finishes one, so a thread on
    a busy core does fewer.  Results are in group order, whichever thread ran a group.  An
    exception in a group stops the others taking new groups and is raised here after every
    thread ended."""
    if n_threads <= 1 or n_groups <= 1:
        return [fn(g) for g in range(n_groups)]
    results: list = [None] * n_groups
    counter = itertools.count()
    errors: list = []

    def worker():
        while not errors:
            g = next(counter)  # atomic under the GIL
            if g >= n_groups:
                return
            try:
                results[g] = fn(g)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                errors.append(exc)

    futures = [_pool(n_threads - 1).submit(worker) for _ in range(min(n_threads, n_groups) - 1)]
    worker()
    for fut in futures:
        fut.result()
    if errors:
        raise errors[0]
    return results
