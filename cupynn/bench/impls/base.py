"""What an implementation adapter provides to the runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..workloads import Workload

__all__ = ["Skip", "Problem", "Runner", "Implementation"]


class Skip(Exception):
    """Raised by ``prepare`` when an implementation cannot run this case; the message says why."""


@dataclass
class Problem:
    """One workload at one dtype on one device, as host arrays of that dtype."""

    workload: Workload
    dtype: str  # "float64" | "float32"
    device: str  # "cpu" | "cuda"
    params: list[tuple[np.ndarray, np.ndarray]]
    inputs: list[np.ndarray]  # rotating buffers; inputs[0] is the checked one

    @property
    def activations(self) -> list[str]:
        return [a for _, _, a in self.workload.layers]


@dataclass
class Runner:
    """Prepared calls for one problem.

    ``forward(i)`` returns the loss for input buffer ``i`` (a device scalar);
    ``gradient(i)`` returns ``(loss, grads)``; ``fetch_*`` copy results to the
    host as ``float`` and ``[(dW, db), ...]``. ``forward`` may be None where an
    implementation only offers the gradient step.
    """

    forward: Callable[[int], Any] | None
    gradient: Callable[[int], Any]
    fetch_forward: Callable[[Any], float]
    fetch_gradient: Callable[[Any], tuple[float, list[tuple[np.ndarray, np.ndarray]]]]
    timer: str = "cpu"  # see cupynn.bench.timing
    sync: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    # The seed thread's pattern: one call per input row, results accumulated.
    # ``thread_forward(n)`` -> summed loss over rows 0..n-1 of input 0;
    # ``thread_gradient(n)`` -> (summed loss, summed grads); both synchronous.
    thread_forward: Callable[[int], Any] | None = None
    thread_gradient: Callable[[int], Any] | None = None


class Implementation:
    """Base class: a name, where it runs, and how to prepare a :class:`Runner`."""

    name: str = ""  # the --peers name
    label: str = ""  # the table label
    devices: tuple[str, ...] = ("cpu", "cuda")
    is_cupynn: bool = False  # cupynn's own entries are not "peers" for best-peer ratios
    on_request_only: bool = False  # run only when named (or --peers all)
    memory_factor: float = 3.0  # peak bytes ≈ factor × the batch's activations (memory guard)

    def unavailable(self, device: str) -> str | None:
        """None if this can run on ``device``, else the reason it cannot."""
        if device not in self.devices:
            return f"runs on {' / '.join(self.devices)} only"
        return None

    def prepare(self, problem: Problem) -> Runner:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {}


def import_reason(module: str) -> str | None:
    """None if ``module`` imports, else a one-line reason."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken CUDA install raising anything
        return f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None
