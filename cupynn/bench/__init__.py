"""``python -m cupynn bench``: cupynn and its peers, side by side, on public workloads.

One module owns one thing:

- :mod:`.workloads` — the networks, batch sizes, FLOP and byte counts;
- :mod:`.reference` — the plain array-code network (forward and backward,
  every activation kept) used as the float64 oracle and as the naive
  NumPy/CuPy peers;
- :mod:`.impls` — one adapter per implementation (cupynn, NumPy, CuPy,
  PyTorch, torch.compile, JAX), each importable only where its library is;
- :mod:`.timing` — CPU clocks and CUDA events, adaptive repetition counts;
- :mod:`.roofline` — the device's measured copy bandwidth and matrix rates;
- :mod:`.thread` — the seed thread's per-sample pattern against one batched call;
- :mod:`.runner` — check, then time, every implementation on every workload;
- :mod:`.report` and :mod:`.plot` — terminal/markdown tables, JSON, PNG charts;
- :mod:`.cli` — the command line.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    """Entry point of ``python -m cupynn bench`` (see :mod:`cupynn.bench.cli`)."""
    from .cli import main as _main

    return _main(argv)
