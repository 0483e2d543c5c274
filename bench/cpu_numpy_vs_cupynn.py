#!/usr/bin/env python3
"""Plain NumPy against cupynn's NumPy backend on the seed workload, CPU, float64.

The seed workload: a 1→1000→20→1 network, identity activations, 10,000
inputs, loss sum(y**2). The plain NumPy version below is written the way a
user writes it: a matrix product, a broadcast bias, every activation kept for
the backward pass. Both are checked against each other (and the float64
reference of cupynn.bench) before timing; the four timed calls are
interleaved, so a noisy machine slows all of them alike.

Targets (issue 2): cupynn gradient ≤ 0.5 × plain NumPy gradient, and
cupynn value_and_grad ≤ 2 × cupynn forward.

    python bench/cpu_numpy_vs_cupynn.py [--batch 10000] [--repeats 30] [--json out.json] [--check]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

import cupynn
from cupynn.bench.reference import relative_error
from cupynn.bench.runner import compute_reference, make_problem
from cupynn.bench.workloads import get_workload


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
def cupynn_model(params):
    return cupynn.Chain(*[cupynn.Dense.from_arrays(W, b, "identity") for W, b in params])


def cupynn_forward(model, x):
    y = model(x)
    return (y ** 2).sum()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=30, help="timed calls of each (interleaved)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)

    problem = make_problem(get_workload("seed", batch=args.batch), "float64", "cpu", 0,
                           n_inputs=1)
    params, x = problem.params, problem.inputs[0]
    model = cupynn_model(params)

    ref = compute_reference(problem)
    v, grads = cupynn.value_and_grad(model, x, "sum_squares")
    errors = {
        "plain gradient": relative_error(plain_value_and_grad(params, x), ref),
        "cupynn gradient": relative_error(
            (float(v), [(g["weight"], g["bias"]) for g in grads]), ref),
        "plain forward": abs(float(plain_forward(params, x)) - ref[0]) / abs(ref[0]),
        "cupynn forward": abs(float(cupynn_forward(model, x)) - ref[0]) / abs(ref[0]),
    }
    for name, err in errors.items():
        if not err <= 1e-10:
            print(f"{name} does not match the float64 reference: rel. error {err:.2e}")
            return 1

    calls = {
        "plain NumPy forward": lambda: plain_forward(params, x),
        "plain NumPy gradient": lambda: plain_value_and_grad(params, x),
        "cupynn forward": lambda: cupynn_forward(model, x),
        "cupynn value_and_grad": lambda: cupynn.value_and_grad(model, x, "sum_squares"),
    }
    samples = {k: [] for k in calls}
    for fn in calls.values():  # warm-up
        fn()
    names = list(calls)
    for r in range(args.repeats):
        for k in names[r % 4:] + names[:r % 4]:  # rotate the order each round
            t = time.perf_counter()
            calls[k]()
            samples[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    p10 = {k: float(np.percentile(v, 10)) for k, v in samples.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in samples.items()}

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"seed workload 1→1000→20→1 identity, batch {args.batch:,}, float64, loss sum(y**2) "
          f"= {float(v):.10g}; {cpu}, numpy {np.__version__}, cupynn {cupynn.__version__}; "
          f"median of {args.repeats} interleaved calls (10th–90th percentile)")
    for k in names:
        print(f"  {k:<24} {med[k] * 1e3:9.2f} ms   ({p10[k] * 1e3:.2f} – {p90[k] * 1e3:.2f})")
    plain_ratio = med["plain NumPy gradient"] / med["plain NumPy forward"]
    speedup = med["cupynn value_and_grad"] / med["plain NumPy gradient"]
    own_ratio = med["cupynn value_and_grad"] / med["cupynn forward"]
    fwd_speed = med["cupynn forward"] / med["plain NumPy forward"]
    ok1, ok2 = speedup <= 0.5, own_ratio <= 2.0
    print(f"  plain NumPy gradient / forward:          {plain_ratio:.2f}")
    print(f"  cupynn forward / plain NumPy forward:    {fwd_speed:.2f}")
    print(f"  cupynn gradient / plain NumPy gradient:  {speedup:.2f}   target ≤ 0.5  "
          f"{'MET' if ok1 else 'MISSED'}")
    print(f"  cupynn gradient / cupynn forward:        {own_ratio:.2f}   target ≤ 2.0  "
          f"{'MET' if ok2 else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "repeats": args.repeats, "cpu": cpu,
                       "cpu_count": __import__("os").cpu_count(),
                       "numpy": np.__version__, "cupynn": cupynn.__version__,
                       "median_s": med, "p10_s": p10, "p90_s": p90, "loss": float(v),
                       "rel_errors": errors,
                       "targets": {"gradient_vs_plain": [speedup, 0.5, ok1],
                                   "gradient_vs_forward": [own_ratio, 2.0, ok2]}}, f, indent=1)
    return 0 if (ok1 and ok2) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
