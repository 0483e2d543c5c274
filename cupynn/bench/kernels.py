"""Per-kernel breakdown of cupynn's gradient step (``python -m cupynn bench --kernels``).

The CUDA backend records one launch plan per (network, batch, layout, loss); each of its
kernels is launched here on its own, repeatedly, and timed with CUDA events.  Beside the
time: the grid, the registers and static shared memory of the kernel, and an estimate of
how many blocks fit on one SM (registers, shared memory and threads; the tiles are 256
threads) and hence how many waves the grid takes.  The sum of the kernels against the
whole sequence launched back to back shows what launching costs between them.
``report.kernels_table`` prints it.
"""

from __future__ import annotations

import math

import numpy as np

from cupynn.backends.cuda_launch import THREADS

from .timing import measure

__all__ = ["kernel_breakdown", "run_breakdowns", "blocks_per_sm"]


def blocks_per_sm(registers: int | None, smem: int | None, sm: dict | None) -> int | None:
    """Resident 256-thread blocks per SM, from registers (allocated per warp in units of
    256), static shared memory (+1 KiB the driver reserves per block) and thread slots."""
    if not sm or registers is None or smem is None:
        return None
    warps = THREADS // 32
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = sm["registers"] // (regs_per_warp * warps)
    by_smem = sm["shared_memory"] // (smem + 1024)
    by_threads = sm["threads"] // THREADS
    return int(min(by_regs, by_smem, by_threads))


def _sm_limits(xp) -> dict | None:
    """The current device's SM count and per-SM limits (None off the GPU)."""
    if xp is np:
        return None
    attrs = xp.cuda.Device().attributes  # cudaDevAttr* names without the prefix
    keys = {"count": "MultiProcessorCount", "registers": "MaxRegistersPerMultiprocessor",
            "shared_memory": "MaxSharedMemoryPerMultiprocessor",
            "threads": "MaxThreadsPerMultiProcessor"}
    if not all(v in attrs for v in keys.values()):
        return None
    return {k: int(attrs[v]) for k, v in keys.items()}


def kernel_breakdown(backend, net, params, x, loss, *, budget_s: float = 0.5,
                     timer: str | None = None) -> dict:
    """Time every kernel of one ``value_and_grad`` call of ``backend`` (a CudaBackend, on a
    GPU or on the emulator) alone, then the whole sequence; ``budget_s`` is shared."""
    launches, _ = backend.planned_launches(net, params, x, loss)
    xp = backend.xp
    on_gpu = xp is not np
    timer = timer or ("cuda-event" if on_gpu else "cpu")
    sync = (lambda: xp.cuda.Device().synchronize()) if on_gpu else (lambda: None)
    sm = _sm_limits(xp)
    each = budget_s / (len(launches) + 1)

    rows = []
    for pl in launches:
        stats = measure(lambda _i, f=pl.launch: f(), budget_s=each, timer=timer, sync=sync)
        regs = getattr(pl.kernel, "num_regs", None)
        smem = getattr(pl.kernel, "shared_size_bytes", None)
        blocks = int(np.prod(pl.grid))
        per_sm = blocks_per_sm(regs, smem, sm)
        rows.append({
            "range": pl.range, "kernel": pl.name, "grid": list(pl.grid), "blocks": blocks,
            "registers": regs, "static_smem": smem, "blocks_per_sm": per_sm,
            "waves": blocks / (per_sm * sm["count"]) if per_sm and sm else None,
            "median_s": stats.median_s, "spread": stats.spread, "n": stats.n,
        })

    def sequence(_i):
        for pl in launches:
            pl.launch()

    whole = measure(sequence, budget_s=each, timer=timer, sync=sync)
    total = sum(r["median_s"] for r in rows)
    for r in rows:
        r["share"] = r["median_s"] / total if total > 0 else None
    return {"kernels": rows, "sum_s": total, "sequence_s": whole.median_s,
            "sequence_spread": whole.spread, "timer": timer, "sm_count": sm and sm["count"]}


def run_breakdowns(cases, *, seed: int = 0, budget_s: float = 1.0, progress=None) -> list[dict]:
    """``kernel_breakdown`` of cupynn's CUDA backend for every (workload, dtype) case, with
    the ``sum_squares`` loss on the benchmark's parameters and first input."""
    import cupy

    from cupynn.backends import get_backend
    from cupynn.backends.base import LayerSpec, LossSpec, NetSpec

    from .runner import make_problem

    backend = get_backend("cuda")
    out = []
    for w, dtype in cases:
        entry = {"workload": w.name, "shape": w.shape, "batch": w.batch, "dtype": dtype}
        if progress:
            progress(f"kernels of {w.name} {dtype}")
        try:
            problem = make_problem(w, dtype, "cuda", seed, n_inputs=1)
            net = NetSpec(tuple(LayerSpec(i, o, a, True) for i, o, a in w.layers),
                          np.dtype(dtype), "strict")
            params = [(cupy.asarray(W), cupy.asarray(b)) for W, b in problem.params]
            x = cupy.asarray(problem.inputs[0])
            entry["breakdown"] = kernel_breakdown(backend, net, params, x, LossSpec("sum_squares"),
                                                  budget_s=budget_s)
        except Exception as e:  # noqa: BLE001 - report it, keep the other cases
            entry["error"] = f"{type(e).__name__}: {e}"
        out.append(entry)
        cupy.get_default_memory_pool().free_all_blocks()
    return out
