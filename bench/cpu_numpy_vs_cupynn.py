#!/usr/bin/env python3
"""cupynn's NumPy backend on the CPU: against plain NumPy (seed workload) and JAX (narrow nets).

1. The seed workload: a 1→1000→20→1 network, identity activations, float64,
   10,000 inputs, loss sum(y**2). The plain NumPy version below is written the
   way a user writes it: a matrix product, a broadcast bias, every activation
   kept for the backward pass. Targets: cupynn gradient ≤ 0.5 × plain NumPy
   gradient, and cupynn value_and_grad ≤ 2 × cupynn forward.
2. Narrow networks, float32, tanh hidden layers, against JAX's CPU
   ``jit(value_and_grad)`` of the same loss: 4→32→16→4 at batch 10,000 and
   24→8→2 at batch 200. Target: cupynn's gradient ≤ 1.2 × JAX's (skipped,
   and said so, when JAX is not installed).

Every implementation is checked against the float64 reference of cupynn.bench
before it is timed; the timed calls of a group are interleaved (the order
rotates each round), so a noisy machine slows all of them alike.

``--load 0,1`` runs everything twice in one process: on the machine as it is,
then with one extra process spinning on a core (started and stopped by this
script) -- the case where a threaded BLAS collapses.

    python bench/cpu_numpy_vs_cupynn.py [--load 0,1] [--repeats 30] [--json out.json] [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

import cupynn
from cupynn.bench.reference import relative_error
from cupynn.bench.runner import compute_reference, make_problem
from cupynn.bench.workloads import custom_workload, get_workload

SPREAD_LIMIT = 0.20  # (p90 - p10) / (2 median) above this (as python -m cupynn bench): NOISY
SAMPLE_S = 2e-3      # a sample of a fast call times a loop of calls lasting about this long

NARROW = (((4, 32, 16, 4), 10_000), ((24, 8, 2), 200))

COLUMNS = """\
Columns: median = the median over the samples of one call's time (a sample of a call
faster than 2 ms times a loop of k calls and divides by k); p10-p90 = the 10th and 90th
percentiles of those samples; ±N% = the spread, (p90 - p10) / 2 / median, as in
python -m cupynn bench; "NOISY" marks a spread above ±20%: that row's median is not to be
trusted (rerun on a quieter machine); cpu = the median CPU time of this process per call,
all its threads together (BLAS's, JAX's, cupynn's lanes): on a busy machine it shows the
work done where the wall clock also shows the waiting. Ratios are of wall-clock medians
measured in the same interleaved rounds. load = extra processes spinning on a core, started
by this script; loadavg = /proc/loadavg (1, 5, 15 min) before and after."""


# -- the plain NumPy network, as a user writes it ---------------------------------
def plain_forward(params, x):
    h = x
    for W, b in params:
        h = h @ W.T + b
    return (h ** 2).sum()


def plain_value_and_grad(params, x):
    hs = [x]
    for W, b in params:
        hs.append(hs[-1] @ W.T + b)
    y = hs[-1]
    g = 2 * y
    grads = []
    for i in reversed(range(len(params))):
        W, _ = params[i]
        grads.append((g.T @ hs[i], g.sum(axis=0)))
        g = g @ W
    grads.reverse()
    return (y ** 2).sum(), grads


# -- the same function through cupynn -----------------------------------------------
def cupynn_model(params, activations):
    return cupynn.Chain(*[cupynn.Dense.from_arrays(W, b, a) for (W, b), a in zip(params, activations)])


def cupynn_forward(model, x):
    y = model(x)
    return (y ** 2).sum()


def as_pair(v, grads):
    return float(v), [(g["weight"], g["bias"]) for g in grads]


# -- timing ------------------------------------------------------------------------
def loop_count(fn) -> int:
    """Calls per sample so that one sample lasts about SAMPLE_S."""
    t = time.perf_counter()
    fn()
    one = time.perf_counter() - t
    return max(1, min(10_000, math.ceil(SAMPLE_S / max(one, 1e-7))))


def time_interleaved(calls: dict, repeats: int) -> dict:
    """name -> {median, p10, p90, spread, cpu, loops} in seconds per call (cpu: the median
    of this process's CPU time per call, all its threads)."""
    for fn in calls.values():  # warm-up (workspaces, JIT)
        fn()
        fn()
    loops = {k: loop_count(fn) for k, fn in calls.items()}
    samples = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            fn, n = calls[k], loops[k]
            c = time.process_time()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[k].append((time.perf_counter() - t) / n)
            cpu[k].append((time.process_time() - c) / n)
    out = {}
    for k, v in samples.items():
        med = float(np.median(v))
        p10, p90 = float(np.percentile(v, 10)), float(np.percentile(v, 90))
        out[k] = {"median": med, "p10": p10, "p90": p90, "spread": (p90 - p10) / 2 / med,
                  "cpu": float(np.median(cpu[k])), "loops": loops[k]}
    return out


def fmt_time(s: float) -> str:
    return f"{s * 1e3:9.3f} ms" if s >= 1e-3 else f"{s * 1e6:9.1f} µs"


def print_rows(stats: dict) -> bool:
    """Print one group's rows; True when every row's spread is within SPREAD_LIMIT."""
    ok = True
    for k, s in stats.items():
        noisy = s["spread"] > SPREAD_LIMIT
        ok &= not noisy
        print(f"  {k:<28} {fmt_time(s['median'])}   ({fmt_time(s['p10']).strip()} – "
              f"{fmt_time(s['p90']).strip()})  ±{s['spread'] * 100:.0f}%  cpu "
              f"{fmt_time(s['cpu']).strip()}{'  NOISY' if noisy else ''}")
    return ok


# -- background load -----------------------------------------------------------------
def start_load(n: int) -> list[subprocess.Popen]:
    """``n`` processes, each spinning on a core until stopped."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


# -- the two parts -------------------------------------------------------------------
def seed_part(args) -> dict:
    problem = make_problem(get_workload("seed", batch=args.batch), "float64", "cpu", 0, n_inputs=1)
    params, x = problem.params, problem.inputs[0]
    model = cupynn_model(params, problem.activations)
    ref = compute_reference(problem)
    v, grads = cupynn.value_and_grad(model, x, "sum_squares")
    errors = {
        "plain NumPy gradient": relative_error(plain_value_and_grad(params, x), ref),
        "cupynn gradient": relative_error(as_pair(v, grads), ref),
        "plain NumPy forward": abs(float(plain_forward(params, x)) - ref[0]) / abs(ref[0]),
        "cupynn forward": abs(float(cupynn_forward(model, x)) - ref[0]) / abs(ref[0]),
    }
    for name, err in errors.items():
        if not err <= 1e-10:
            raise SystemExit(f"{name} does not match the float64 reference: rel. error {err:.2e}")
    calls = {
        "plain NumPy forward": lambda: plain_forward(params, x),
        "plain NumPy gradient": lambda: plain_value_and_grad(params, x),
        "cupynn forward": lambda: cupynn_forward(model, x),
        "cupynn value_and_grad": lambda: cupynn.value_and_grad(model, x, "sum_squares"),
    }
    stats = time_interleaved(calls, args.repeats)
    med = {k: s["median"] for k, s in stats.items()}
    print(f"seed workload 1→1000→20→1 identity, batch {args.batch:,}, float64, loss sum(y**2) "
          f"= {float(v):.10g}")
    trusted = print_rows(stats)
    note = "" if trusted else "   (from NOISY rows)"
    speedup = med["cupynn value_and_grad"] / med["plain NumPy gradient"]
    own_ratio = med["cupynn value_and_grad"] / med["cupynn forward"]
    print(f"  plain NumPy gradient / forward:          "
          f"{med['plain NumPy gradient'] / med['plain NumPy forward']:.2f}")
    print(f"  cupynn forward / plain NumPy forward:    "
          f"{med['cupynn forward'] / med['plain NumPy forward']:.2f}")
    targets = {"gradient_vs_plain": [speedup, 0.5, speedup <= 0.5],
               "gradient_vs_forward": [own_ratio, 2.0, own_ratio <= 2.0]}
    print(f"  cupynn gradient / plain NumPy gradient:  {speedup:.2f}   target ≤ 0.5  "
          f"{'MET' if speedup <= 0.5 else 'MISSED'}{note}")
    print(f"  cupynn gradient / cupynn forward:        {own_ratio:.2f}   target ≤ 2.0  "
          f"{'MET' if own_ratio <= 2.0 else 'MISSED'}{note}")
    return {"stats": stats, "rel_errors": errors, "targets": targets, "trusted": trusted,
            "loss": float(v)}


def narrow_part(args) -> dict:
    from cupynn.bench.impls import CUPYNN, JAX

    reason = JAX.unavailable("cpu")
    if reason:
        print(f"narrow networks against JAX: skipped ({reason})")
        return {"skipped": reason}
    out = {}
    for sizes, batch in NARROW:
        problem = make_problem(custom_workload(sizes, "tanh", batch), "float32", "cpu", 0,
                               n_inputs=1)
        ref = compute_reference(problem)
        runners = {"cupynn value_and_grad": CUPYNN.prepare(problem),
                   "JAX jit(value_and_grad)": JAX.prepare(problem)}
        errors = {k: relative_error(r.fetch_gradient(r.gradient(0)), ref) for k, r in runners.items()}
        for k, err in errors.items():
            if not err <= 1e-4:
                raise SystemExit(f"{k} on {sizes} does not match the float64 reference: "
                                 f"rel. error {err:.2e}")
        stats = time_interleaved({k: (lambda r=r: r.gradient(0)) for k, r in runners.items()},
                                 args.repeats)
        for r in runners.values():
            r.close()
        shape = "→".join(map(str, sizes))
        print(f"{shape} tanh, batch {batch:,}, float32, loss sum(y**2) "
              f"(rel. errors {', '.join(f'{e:.1e}' for e in errors.values())})")
        trusted = print_rows(stats)
        ratio = stats["cupynn value_and_grad"]["median"] / stats["JAX jit(value_and_grad)"]["median"]
        print(f"  cupynn gradient / JAX gradient:          {ratio:.2f}   target ≤ 1.2  "
              f"{'MET' if ratio <= 1.2 else 'MISSED'}{'' if trusted else '   (from NOISY rows)'}")
        out[shape] = {"batch": batch, "stats": stats, "rel_errors": errors, "trusted": trusted,
                      "targets": {"gradient_vs_jax": [ratio, 1.2, ratio <= 1.2]}}
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from cupynn import _threads

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "numpy": np.__version__,
            "cupynn": cupynn.__version__, "threads": _threads.thread_control()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=10_000, help="seed workload batch")
    p.add_argument("--repeats", type=int, default=30, help="samples of each call (interleaved)")
    p.add_argument("--load", default="0", help="comma-separated numbers of busy processes to "
                   "run everything under, one after the other (default 0; '0,1': quiet, then "
                   "one core kept busy)")
    p.add_argument("--no-narrow", action="store_true", help="skip the narrow networks vs JAX")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    try:
        loads = [int(v) for v in args.load.split(",")]
        if min(loads) < 0:
            raise ValueError
    except ValueError:
        p.error(f"--load takes comma-separated non-negative integers, got {args.load!r}")

    info = machine()
    print(f"{info['cpu']}, {info['cpu_count']} cores, numpy {info['numpy']}, cupynn "
          f"{info['cupynn']}; NumPy backend threads: {info['threads']}")
    results, all_met = [], True
    for n in loads:
        procs = start_load(n)
        try:
            before = loadavg()
            print(f"\n=== load: {n} extra busy process{'es' if n != 1 else ''}; loadavg {before}")
            run = {"load": n, "loadavg_before": before, "seed": seed_part(args)}
            if not args.no_narrow:
                print()
                run["narrow"] = narrow_part(args)
            run["loadavg_after"] = loadavg()
        finally:
            stop_load(procs)
        print(f"  (loadavg after: {run['loadavg_after']})")
        targets = [t for t in run["seed"]["targets"].values()]
        for part in run.get("narrow", {}).values():
            if isinstance(part, dict):
                targets += list(part["targets"].values())
        all_met &= all(t[2] for t in targets)
        results.append(run)
    print("\n" + COLUMNS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeats": args.repeats, "seed_batch": args.batch,
                       "runs": results}, f, indent=1)
    return 0 if all_met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
