"""Timing: warm up, pick a repetition count from a time budget, take the median.

Three clocks, chosen per implementation:

- ``"cpu"``: ``time.perf_counter`` around the call (CPU implementations).
- ``"cuda-event"``: CUDA events recorded on CuPy's legacy null stream before
  and after the call, then synchronized. Each run starts with an idle GPU,
  so the interval holds the Python call as a user sees it when the call is
  launch-bound, and the GPU's work when it is not. It sees work on the
  legacy default stream and on every blocking stream (CuPy, cupynn, PyTorch).
- ``"wall-sync"``: ``perf_counter`` around the call plus a synchronization
  of the implementation's own streams (JAX, whose streams are non-blocking:
  events on the null stream would not wait for them).

Inputs rotate over several buffers (``fn(i)`` gets the buffer index) so a
small input is not served from cache run after run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Stats", "measure", "warm_up", "TimeBudget"]


@dataclass(frozen=True)
class Stats:
    """Seconds per call over ``n`` timed runs."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    n: int
    timer: str

    @property
    def spread(self) -> float:
        """Half the 10–90 percentile range over the median (0.05 means ±5%)."""
        return (self.p90_s - self.p10_s) / 2 / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spread"] = self.spread
        return d


def _from_samples(samples: list[float], timer: str) -> Stats:
    a = np.asarray(samples, dtype=np.float64)
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return Stats(float(med), float(p10), float(p90), float(a.min()), len(a), timer)


class TimeBudget:
    """Shares a total number of seconds among the measurements still to come.

    ``per_measurement()`` gives ``remaining / measurements_left`` clamped to
    ``[floor_s, cap_s]``; compile times and checks eat into the remainder,
    so later measurements shrink rather than the run overrunning.
    """

    def __init__(self, total_s: float, n_measurements: int, *, floor_s: float, cap_s: float):
        self.deadline = time.perf_counter() + total_s
        self.left = max(1, n_measurements)
        self.floor_s, self.cap_s = floor_s, cap_s

    def per_measurement(self) -> float:
        remaining = self.deadline - time.perf_counter()
        share = remaining / max(1, self.left)
        return float(min(self.cap_s, max(self.floor_s, share)))

    def done(self, n: int = 1) -> None:
        self.left = max(1, self.left - n)


def _cuda_events():
    import cupy

    return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time


def warm_up(fn: Callable[[int], object], *, n_inputs: int = 1, budget_s: float = 0.5,
            sync: Callable[[], None] = lambda: None) -> float:
    """Call ``fn`` at least twice and for up to a tenth of ``budget_s``; return the
    last call's seconds (the estimate the repetition count is based on)."""
    t0 = time.perf_counter()
    k = 0
    last = 0.0
    while k < 2 or (time.perf_counter() - t0 < 0.1 * budget_s and k < 50):
        t = time.perf_counter()
        fn(k % n_inputs)
        sync()
        last = time.perf_counter() - t
        k += 1
    return max(last, 1e-7)


def measure(fn: Callable[[int], object], *, n_inputs: int = 1, budget_s: float = 0.5,
            timer: str = "cpu", sync: Callable[[], None] = lambda: None,
            min_runs: int = 5, max_runs: int = 5000,
            region: Callable[[], contextlib.AbstractContextManager] | None = None,
            per_call: float | None = None) -> Stats:
    """Warm ``fn`` up, then time it ``n`` times, ``n`` chosen to fill ``budget_s``.

    At least ``min_runs`` runs (3 when one call alone exceeds the budget);
    ``region`` (a context-manager factory, e.g. an NVTX range) wraps only the
    timed loop. Pass ``per_call`` (from :func:`warm_up`) when warmed up already.
    """
    if per_call is None:
        per_call = warm_up(fn, n_inputs=n_inputs, budget_s=budget_s, sync=sync)
    if per_call * min_runs > 2 * budget_s:
        min_runs = 3
    n = int(min(max_runs, max(min_runs, budget_s / per_call)))

    samples: list[float] = []
    ctx = region() if region is not None else contextlib.nullcontext()
    with ctx:
        if timer == "cuda-event":
            start, end, elapsed_ms = _cuda_events()
            for r in range(n):
                start.record()
                fn(r % n_inputs)
                end.record()
                end.synchronize()
                samples.append(elapsed_ms(start, end) * 1e-3)
            sync()
        else:
            for r in range(n):
                t = time.perf_counter()
                fn(r % n_inputs)
                sync()
                samples.append(time.perf_counter() - t)
    return _from_samples(samples, timer)
