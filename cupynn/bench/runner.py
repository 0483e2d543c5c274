"""Check, then time, every implementation on every (workload, dtype).

For each case the float64 reference (the plain network in float64 on the
parameters as rounded to the case's dtype) is computed once; each
implementation's loss (forward) and loss and gradients (gradient step) must
match it before anything is timed. A mismatch is reported as ``wrong``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import reference, timing
from .impls import Implementation, Problem, Skip
from .workloads import Workload

__all__ = ["Settings", "tolerance", "run_cases", "make_problem", "available_bytes"]


@dataclass
class Settings:
    device: str
    cases: list[tuple[Workload, str]]  # (workload, dtype)
    impls: list[Implementation]
    budget_s: float = 120.0  # total seconds of timing loops, shared out
    cap_s: float = 1.0  # at most this per measurement
    floor_s: float = 0.05  # at least this per measurement (and 3 runs)
    profile: bool = False
    # a cProfile.Profile enabled around every timed loop (--cprofile), else None
    cpu_profiler: Any = None
    seed: int = 0
    progress: bool = True
    log: list[str] = field(default_factory=list)


def tolerance(dtype: str, plain_err: float = 0.0, batch: int = 0) -> float:
    """Largest accepted ``‖a − ref‖ / ‖ref‖`` (worst over the loss and each gradient array).

    float64: 1e-9. float32: the largest of 2e-5, ten times the error of the plain
    float32 network on the same device and data (summed in chunks of rows), and
    ``5e-3·√(batch / 10⁶)``. The last term is there because a correct float32 GEMM
    that reduces the batch in one long run (``dW = dz.T @ x``) loses accuracy with
    the batch: plain NumPy's float32 gradient lands at 1e-3 on seed-1m (batch 10⁶),
    PyTorch and JAX at 2e-4, while a chunked sum stays near 1e-5. TF32 products or an
    indexing bug land far above either term at these sizes.
    """
    if dtype == "float64":
        return 1e-9
    return max(2e-5, 10.0 * plain_err, 5e-3 * math.sqrt(batch / 1e6))


def available_bytes(device: str) -> float:
    """Free memory on the device (the host's MemAvailable for the CPU)."""
    if device == "cuda":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        return float(free + cupy.get_default_memory_pool().free_bytes())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def cache_bytes(device: str) -> int:
    """The last-level cache an input could sit in (GPU L2; CPU L2/L3 from sysfs)."""
    if device == "cuda":
        import cupy

        return int(cupy.cuda.Device().attributes.get("L2CacheSize", 50 << 20))
    best = 0
    import glob

    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
        except (OSError, ValueError):
            continue
    return best or (32 << 20)


def make_problem(workload: Workload, dtype: str, device: str, seed: int,
                 n_inputs: int | None = None) -> Problem:
    rng = np.random.default_rng(seed)
    params = [(W.astype(dtype), b.astype(dtype)) for W, b in workload.make_params(rng)]
    itemsize = np.dtype(dtype).itemsize
    input_bytes = workload.batch * workload.sizes[0] * itemsize
    if n_inputs is None:
        # Enough buffers to cover twice the cache, at most 64 and 512 MiB.
        n_inputs = math.ceil(2 * cache_bytes(device) / max(1, input_bytes))
        n_inputs = int(max(1, min(64, n_inputs, (512 << 20) // max(1, input_bytes))))
    inputs = [workload.make_input(rng, i).astype(dtype) for i in range(n_inputs)]
    return Problem(workload, dtype, device, params, inputs)


def compute_reference(problem: Problem, input_index: int = 0, rows: int | None = None,
                      dtype=np.float64):
    """Loss and gradients of the plain network in ``dtype`` (float64: the reference)
    on the device's array module, returned on the host."""
    xp = np
    if problem.device == "cuda":
        import cupy as xp
    params = [(xp.asarray(W, dtype=dtype), xp.asarray(b, dtype=dtype))
              for W, b in problem.params]
    x_host = problem.inputs[input_index]
    if rows is not None:
        x_host = x_host[:rows]
    # The loss and its gradients are sums over the batch: take them in chunks of
    # rows so the reference's memory stays bounded (seed-1m keeps 8 GB otherwise).
    chunk_bytes = (4 << 30) if xp is not np else (256 << 20)
    per_row = 8 * sum(problem.workload.sizes)
    step = max(1, chunk_bytes // per_row)
    to_host = (lambda a: a.get()) if xp is not np else np.asarray
    total, acc = 0.0, None
    for start in range(0, max(1, len(x_host)), step):
        x = xp.asarray(x_host[start:start + step], dtype=dtype)
        loss, grads = reference.value_and_grad(xp, params, problem.activations, x)
        total += float(loss)
        host = [(to_host(dW).astype(np.float64), to_host(db).astype(np.float64))
                for dW, db in grads]
        acc = host if acc is None else [(a + dW, b + db) for (a, b), (dW, db) in zip(acc, host)]
        del x, grads
    if dtype != np.float64:  # the plain run in its own dtype: results in that dtype
        acc = [(a.astype(dtype), b.astype(dtype)) for a, b in acc]
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
    return total, acc


def plain_float32_error(problem: Problem, ref) -> float:
    """Relative error of the plain float32 network against the float64 reference."""
    return reference.relative_error(compute_reference(problem, dtype=np.float32), ref)


def _profiler(device: str):
    """cudaProfilerStart/Stop (``cupyx.profiler.profile``) on CUDA, else nothing."""
    if device != "cuda":
        return contextlib.nullcontext()
    import cupyx.profiler

    return cupyx.profiler.profile()


def _nvtx_range(device: str, label: str):
    """A factory of NVTX ranges named ``label``: CuPy's NVTX on CUDA (no ``nvtx`` package
    needed), cupynn's (``cupynn._nvtx``: the ``nvtx`` package, else CuPy's binding) on the
    CPU, so that ``nsys profile --trace=nvtx`` shows the timed loops there too; None when
    neither is importable."""
    if device != "cuda":
        from cupynn._nvtx import nvtx_backend, nvtx_range

        if nvtx_backend() is None:
            return None
        return lambda: nvtx_range(label)
    import cupyx.profiler

    return lambda: cupyx.profiler.time_range(label)


def _profiled(profiler):
    """``profiler`` (a ``cProfile.Profile``) enabled while the context lasts."""
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()


def _regions(device: str, label: str, settings: Settings):
    """The context-manager factory that wraps one timed loop: its NVTX range (--profile) and
    the cProfile profiler (--cprofile), each when asked for; None when neither is."""
    factories = []
    if settings.profile:
        nvtx = _nvtx_range(device, label)
        if nvtx is not None:
            factories.append(nvtx)
    if settings.cpu_profiler is not None:
        factories.append(lambda: contextlib.contextmanager(_profiled)(settings.cpu_profiler))
    if not factories:
        return None

    def region():
        stack = contextlib.ExitStack()
        for factory in factories:
            stack.enter_context(factory())
        return stack

    return region


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.done}/{self.total} {elapsed:5.0f}s] {text}", file=sys.stderr, flush=True)


def _result_base(workload: Workload, dtype: str, device: str, impl: Implementation) -> dict:
    return {
        "workload": workload.name, "shape": workload.shape, "activation": workload.activation,
        "batch": workload.batch, "dtype": dtype, "device": device,
        "impl": impl.name, "label": impl.label, "is_cupynn": impl.is_cupynn,
        "status": "skipped", "reason": "", "forward": None, "gradient": None,
    }


def run_one(impl: Implementation, problem: Problem, ref, settings: Settings,
            budget: timing.TimeBudget, progress: Progress, tol: float | None = None) -> dict:
    w, dtype, device = problem.workload, problem.dtype, problem.device
    res = _result_base(w, dtype, device, impl)
    need = impl.memory_factor * w.activation_bytes(np.dtype(dtype).itemsize)
    have = available_bytes(device)
    if need > 0.7 * have:
        res["reason"] = (f"needs ~{need / 1e9:.1f} GB for activations, "
                         f"{have / 1e9:.1f} GB available")
        return res
    if tol is None:
        tol = tolerance(dtype)
    runner = None
    try:
        progress(f"{w.name} {dtype} {impl.label}: prepare + check")
        runner = impl.prepare(problem)
        t = time.perf_counter()
        g = runner.gradient(0)
        runner.sync()
        first_grad = time.perf_counter() - t
        loss, grads = runner.fetch_gradient(g)
        del g
        err_g = reference.relative_error((loss, grads), ref)
        res["loss"] = loss
        res["check"] = {"tolerance": tol, "gradient_rel_err": err_g}
        res["first_call_s"] = {"gradient": first_grad}
        if runner.forward is not None:
            t = time.perf_counter()
            v = runner.forward(0)
            runner.sync()
            res["first_call_s"]["forward"] = time.perf_counter() - t
            err_f = abs(runner.fetch_forward(v) - ref[0]) / abs(ref[0])
            del v
            res["check"]["forward_rel_err"] = err_f
        else:
            err_f = 0.0
            res["forward_note"] = "no forward-only call"
        if not (err_g <= tol and err_f <= tol):
            res["status"] = "wrong"
            res["reason"] = (f"does not match the float64 reference: rel. error forward "
                             f"{err_f:.2e}, gradient {err_g:.2e} > tolerance {tol:.0e}")
            return res
        # Warm both phases up first, so that under --profile one profiler range holds
        # exactly the two timed loops (nsys --capture-range=cudaProfilerApi captures it).
        phases = [(ph, getattr(runner, ph)) for ph in ("forward", "gradient")
                  if getattr(runner, ph) is not None]
        share = budget.per_measurement()
        warm = {ph: timing.warm_up(fn, n_inputs=len(problem.inputs), budget_s=share,
                                   sync=runner.sync) for ph, fn in phases}
        with _profiler(device) if settings.profile else contextlib.nullcontext():
            for phase, fn in phases:
                progress(f"{w.name} {dtype} {impl.label}: {phase}")
                label = f"bench {w.name} {dtype} {impl.name} {phase}"
                stats = timing.measure(
                    fn, n_inputs=len(problem.inputs), budget_s=budget.per_measurement(),
                    timer=runner.timer, sync=runner.sync, per_call=warm[phase],
                    region=_regions(device, label, settings))
                budget.done()
                progress.done += 1
                res[phase] = stats.to_dict()
        res["status"] = "ok"
        res["timer"] = runner.timer
        res["notes"] = runner.notes
    except Skip as e:
        res["reason"] = str(e)
    except Exception as e:  # one failing peer must not end the sweep
        record_error(res, e)
    finally:
        close_quietly(runner)
    return res


def record_error(res: dict, e: Exception) -> None:
    """Mark a result as failed: the exception's type and first line, and a short traceback
    (every sweep catches a peer's error so that it does not end the sweep)."""
    res["status"] = "error"
    res["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    res["traceback"] = traceback.format_exc(limit=8)


def close_quietly(runner) -> None:
    """Release a runner's memory; a failure to do so does not hide the result."""
    if runner is not None:
        try:
            runner.close()
        except Exception:
            pass


def run_cases(settings: Settings) -> list[dict]:
    """Every implementation on every case; returns one result dict each."""
    plan = []
    for w, dtype in settings.cases:
        for impl in settings.impls:
            plan.append((w, dtype, impl, impl.unavailable(settings.device)))
    n_measure = 2 * sum(1 for *_, reason in plan if reason is None)
    progress = Progress(n_measure, settings.progress)
    budget = timing.TimeBudget(settings.budget_s, n_measure,
                               floor_s=settings.floor_s, cap_s=settings.cap_s)
    results = []
    for w, dtype in settings.cases:
        runnable = [(impl, reason) for ww, dt, impl, reason in plan if ww is w and dt == dtype]
        problem, ref, tol, plain_err = None, None, None, 0.0
        for impl, reason in runnable:
            if reason is not None:
                res = _result_base(w, dtype, settings.device, impl)
                res["reason"] = reason
                results.append(res)
                continue
            if problem is None:
                progress(f"{w.name} {dtype}: float64 reference")
                problem = make_problem(w, dtype, settings.device, settings.seed)
                ref = compute_reference(problem)
                plain_err = plain_float32_error(problem, ref) if dtype == "float32" else 0.0
                tol = tolerance(dtype, plain_err, w.batch)
            results.append(run_one(impl, problem, ref, settings, budget, progress, tol))
            r = results[-1]
            if dtype == "float32" and "check" in r:
                r["check"]["plain_float32_rel_err"] = plain_err
            if r["status"] != "ok":
                budget.done(2)
                progress.done += 2
            progress(f"{w.name} {dtype} {impl.label}: {r['status']} {r['reason'][:80]}")
    return results
