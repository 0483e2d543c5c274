"""The seed thread's pattern: one call per input, gradients accumulated, against one batched call.

The Julia Discourse thread that started cupynn (see README.md) evaluated a 1→1000→20→1
network sample by sample (``map(t -> nn([t]), x)``): the gradient cost 10×
the forward. Batching the 10,000 inputs into one call made both faster and
left the gradient at 2.2× the forward. Here each implementation that offers
the per-sample pattern runs it on the seed workload in float64: a probe of a
few samples (checked against the float64 reference on those rows), then as
many samples as the time budget allows; a count short of the full batch is
extrapolated linearly and labelled so.
"""

from __future__ import annotations

import time

from . import reference, timing
from .impls import Implementation, Skip
from .runner import Progress, close_quietly, compute_reference, make_problem, record_error, tolerance
from .workloads import Workload

__all__ = ["run_thread"]


def _timed(fn, n):
    t = time.perf_counter()
    out = fn(n)
    return time.perf_counter() - t, out


def run_thread(workload: Workload, device: str, impls: list[Implementation], *,
               budget_s: float, batched_budget_s: float, samples: int | None = None,
               seed: int = 0, progress: bool = True, batched: dict | None = None) -> list[dict]:
    """Per-sample vs batched, per implementation; ``batched`` maps impl name ->
    (forward_s, gradient_s) already measured on this workload (else measured here)."""
    dtype = "float64"
    n_total = min(samples or workload.batch, workload.batch)
    problem = make_problem(workload, dtype, device, seed, n_inputs=1)
    results = []
    prog = Progress(len(impls), progress)
    probe = min(20, n_total)
    ref_probe = compute_reference(problem, rows=probe)
    for impl in impls:
        res = {"impl": impl.name, "label": impl.label, "device": device, "dtype": dtype,
               "workload": workload.name, "batch": workload.batch, "samples_total": workload.batch,
               "status": "skipped", "reason": ""}
        results.append(res)
        reason = impl.unavailable(device)
        if reason:
            res["reason"] = reason
            continue
        runner = None
        try:
            prog(f"seed thread {impl.label}: per-sample calls")
            runner = impl.prepare(problem)
            if runner.thread_forward is None:
                res["reason"] = "no per-sample adapter"
                continue
            runner.thread_forward(2)  # warm-up
            runner.thread_gradient(2)
            t_probe, out = _timed(runner.thread_gradient, probe)
            err = reference.relative_error(runner.fetch_gradient(out), ref_probe)
            res["check"] = {"gradient_rel_err": err, "tolerance": tolerance(dtype)}
            if not err <= tolerance(dtype):
                res["status"] = "wrong"
                res["reason"] = f"per-sample gradient rel. error {err:.2e}"
                continue
            for phase, fn in (("forward", runner.thread_forward),
                              ("gradient", runner.thread_gradient)):
                per = t_probe / probe if phase == "gradient" else _timed(fn, probe)[0] / probe
                n = int(min(n_total, max(probe, budget_s / max(per, 1e-9))))
                t, _ = _timed(fn, n)
                res[f"per_sample_{phase}"] = {
                    "samples_run": n, "seconds_run": t, "seconds_total": t * workload.batch / n,
                    "extrapolated": n < workload.batch,
                }
            if batched and impl.name in batched:
                res["batched_forward_s"], res["batched_gradient_s"] = batched[impl.name]
            else:
                prog(f"seed thread {impl.label}: batched call")
                for phase in ("forward", "gradient"):
                    fn = getattr(runner, phase)
                    s = timing.measure(fn, budget_s=batched_budget_s, timer=runner.timer,
                                       sync=runner.sync)
                    res[f"batched_{phase}_s"] = s.median_s
            res["status"] = "ok"
        except Skip as e:
            res["reason"] = str(e)
        except Exception as e:  # one failing peer must not end the sweep
            record_error(res, e)
        finally:
            prog.done += 1
            close_quietly(runner)
    return results
