"""The device's ceilings, measured once per run, and each workload's floor.

- copy bandwidth: a large array copied into another, counting the bytes read
  plus the bytes written (NumPy on the CPU, CuPy on the GPU);
- matrix rate per dtype: a large square product (NumPy's BLAS; cuBLAS through
  CuPy, strict FP32 for float32, DMMA tensor cores for float64 on Hopper).

A workload's floor is ``max(FLOPs / matrix rate, minimum bytes / bandwidth)``
(see :mod:`cupynn.bench.workloads` for the counts); a time's "% of floor" is
``floor / time``: 100% would be the hardware's limit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .workloads import Workload

__all__ = ["Ceilings", "measure_ceilings", "floor_seconds"]


@dataclass
class Ceilings:
    device: str
    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float] = field(default_factory=dict)
    method: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _best_of(fn, sync, repeats: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _copy_seconds(xp, nbytes: int, sync, repeats: int) -> float:
    src = xp.ones(nbytes // 8, dtype=np.float64)
    dst = xp.empty_like(src)
    return _best_of(lambda: xp.copyto(dst, src), sync, repeats)


def measure_ceilings(device: str, dtypes, *, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and matrix rates (best of a few runs each)."""
    if device == "cuda":
        import cupy as xp

        def sync():
            xp.cuda.Device().synchronize()

        copy_bytes = (1 << 28) if quick else (1 << 30)
        n = 2048 if quick else 8192
        repeats = 5
    else:
        xp = np

        def sync():
            return None

        copy_bytes = (1 << 25) if quick else (1 << 28)
        n = 1024 if quick else 2048
        repeats = 3
    t = _copy_seconds(xp, copy_bytes, sync, repeats)
    ceilings = Ceilings(device, 2 * copy_bytes / t)
    ceilings.method["copy"] = f"{'cupy' if device == 'cuda' else 'numpy'}.copyto of " \
                              f"{copy_bytes / 2**20:.0f} MiB, bytes read + written, best of {repeats}"
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
        b = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
        c = xp.empty_like(a)
        t = _best_of(lambda a=a, b=b, c=c: xp.matmul(a, b, out=c), sync, repeats)
        ceilings.matmul_flops_per_s[dtype] = 2.0 * n ** 3 / t
        del a, b, c
    ceilings.method["matmul"] = f"{'cuBLAS via cupy' if device == 'cuda' else 'numpy BLAS'} " \
                                f"matmul {n}³, best of {repeats}"
    if device == "cuda":
        xp.get_default_memory_pool().free_all_blocks()
    return ceilings


def floor_seconds(workload: Workload, dtype: str, phase: str, ceilings: Ceilings):
    """``(floor_s, bound)`` with bound ``"compute"`` or ``"memory"``."""
    itemsize = np.dtype(dtype).itemsize
    rate = ceilings.matmul_flops_per_s.get(dtype)
    t_compute = workload.flops(phase) / rate if rate else 0.0
    t_memory = workload.min_bytes(phase, itemsize) / ceilings.copy_bytes_per_s
    return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")
