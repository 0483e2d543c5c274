"""The fused step's GPU targets, measured: fused path against the per-layer path, one run.

    python bench/fused_targets.py [--json fused.json] [--reps 7] [--quick]

For each workload of the fused-step targets (the seed 1->1000->20->1 at 10k and 1M rows,
identity and tanh; the narrow 32->64x4->1 relu at 2^20 rows, float32 strict and tf32) and
each path (``fused``: the default; ``per-layer``: ``backend.fused.enabled = False``), the
median over ``--reps`` timed loops (CUDA events) of: the forward ``model(x)``, the plain
``value_and_grad`` call, and the call replayed as a CUDA graph (``cupynn.compile``); the
kernel launches per call (the backend's launch log); the relative error of the gradient
against a float64 NumPy reference.  Each row prints its target and the prediction that
bench/RESULTS.md made from static counts before any of this ran.  Needs CuPy and a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np

# (name, sizes, hidden activation, batch, dtype, precision, targets {kind: seconds},
#  predictions {kind: seconds}) -- targets from the fused-step work, predictions from
#  bench/RESULTS.md ("Fused step: predicted H200 times")
CASES = [
    ("seed", (1, 1000, 20, 1), "identity", 10_000, "float64", "strict",
     {"graph": 50e-6, "grad": 80e-6, "forward": 20e-6}, {"graph": 40e-6, "grad": 55e-6, "forward": 15e-6}),
    ("seed tanh", (1, 1000, 20, 1), "tanh", 10_000, "float64", "strict",
     {"graph": 70e-6}, {"graph": 80e-6, "grad": 90e-6, "forward": 30e-6}),
    ("seed", (1, 1000, 20, 1), "identity", 1_000_000, "float64", "strict",
     {"grad": 3.5e-3}, {"grad": 2.8e-3, "forward": 0.95e-3}),
    ("seed", (1, 1000, 20, 1), "identity", 1_000_000, "float32", "strict",
     {"grad": 3.5e-3}, {"grad": 5.3e-3, "forward": 1.9e-3}),
    ("narrow", (32, 64, 64, 64, 64, 1), "relu", 1 << 20, "float32", "strict",
     {"grad": 2.2e-3}, {"grad": 3.1e-3, "forward": 1.0e-3}),
    ("narrow", (32, 64, 64, 64, 64, 1), "relu", 1 << 20, "float32", "tf32",
     {"grad": 0.8e-3}, {"grad": 1.2e-3, "forward": 0.4e-3}),
]


def _reference(xp, params, acts, x):
    """Value and weight gradients of sum(y**2) in float64 (plain backprop, cuBLAS on the GPU:
    the 1M-row seed's hidden layer is 8 GB)."""
    params = [(xp.asarray(W), xp.asarray(b)) for W, b in params]
    h = xp.asarray(x)
    hs = [h]
    for (W, b), a in zip(params, acts):
        z = h @ W.T + b
        h = xp.tanh(z) if a == "tanh" else xp.maximum(z, 0) if a == "relu" else z
        hs.append(h)
    g = 2 * h
    grads = []
    for l in range(len(params) - 1, -1, -1):
        a = acts[l]
        if a == "tanh":
            g = g * (1 - hs[l + 1] ** 2)
        elif a == "relu":
            g = g * (hs[l + 1] > 0)
        grads.append((g.T @ hs[l]).get() if hasattr(g, "get") else g.T @ hs[l])
        g = g @ params[l][0]
    return float((h * h).sum()), grads[::-1]


def _time(cp, fn, reps: int, budget: float) -> float:
    fn()
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    fn()
    cp.cuda.Device().synchronize()
    one = max(time.perf_counter() - t, 1e-6)
    n = max(3, min(2000, int(budget / reps / one)))
    s, e = cp.cuda.Event(), cp.cuda.Event()
    ms = []
    for _ in range(reps):
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        ms.append(cp.cuda.get_elapsed_time(s, e) / n)
    return float(np.median(ms)) * 1e-3


def run(reps: int = 7, budget: float = 0.3, quick: bool = False) -> list[dict]:
    import cupy as cp

    import cupynn
    from cupynn.backends import get_backend

    be = get_backend("cuda")
    rows = []
    rng = np.random.default_rng(0)
    for name, sizes, act, batch, dtype, precision, targets, predicted in CASES:
        if quick:
            batch = min(batch, 65_536)
        acts = [act] * (len(sizes) - 2) + ["identity"]
        host = [((rng.standard_normal((o, i)) / np.sqrt(i)), rng.standard_normal(o))
                for i, o in zip(sizes, sizes[1:])]
        xh = np.linspace(-1, 1, batch).reshape(-1, 1) if sizes[0] == 1 else \
            rng.standard_normal((batch, sizes[0]))
        model = cupynn.Chain(*[cupynn.Dense.from_arrays(cp.asarray(W.astype(dtype)),
                                                        cp.asarray(b.astype(dtype)), a)
                               for (W, b), a in zip(host, acts)], precision=precision)
        x = cp.asarray(xh.astype(dtype))
        v_ref, g_ref = _reference(cp, host, acts, xh)
        cp.get_default_memory_pool().free_all_blocks()
        for path in ("fused", "per-layer"):
            be.fused.enabled = path == "fused"
            row = {"workload": name, "sizes": list(sizes), "activation": act, "batch": batch,
                   "dtype": dtype, "precision": precision, "path": path,
                   "execution_path": cupynn.execution_path(model, batch)}
            try:
                v, g = cupynn.value_and_grad(model, x)
                num = sum(float(np.linalg.norm(gg["weight"].get() - r) ** 2)
                          for gg, r in zip(g, g_ref))
                den = sum(float(np.linalg.norm(r) ** 2) for r in g_ref)
                row["grad_rel_err"] = (num / den) ** 0.5
                row["value_rel_err"] = abs(float(v) - v_ref) / abs(v_ref)
                be.kernels.launch_log = []
                cupynn.value_and_grad(model, x)
                row["launches"] = len(be.kernels.launch_log)
                be.kernels.launch_log = None
                step = cupynn.compile(model, "sum_squares")
                row["forward_s"] = _time(cp, functools.partial(model, x), reps, budget)
                row["grad_s"] = _time(cp, functools.partial(cupynn.value_and_grad, model, x),
                                      reps, budget)
                row["graph_s"] = _time(cp, functools.partial(step, x), reps, budget)
                row["grad_over_forward"] = row["grad_s"] / row["forward_s"]
            except Exception as exc:  # keep going: one failure must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["targets_s"] = targets
            row["predicted_s"] = predicted
            rows.append(row)
            print(json.dumps(row), flush=True)
        be.fused.enabled = True
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def table(rows: list[dict]) -> str:
    def us(v):
        return "-" if v is None else f"{v * 1e6:.1f} µs" if v < 1e-3 else f"{v * 1e3:.3g} ms"

    out = ["| workload | dtype | path | forward | gradient | graph | grad/fwd | launches | "
           "target | predicted | grad err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} {r['batch']:,} | {r['dtype']} {r['precision']} | "
                       f"{r['path']} | ERROR: {r['error']} |")
            continue
        tgt = ", ".join(f"{k} ≤ {us(v)}" for k, v in r["targets_s"].items())
        pred = ", ".join(f"{k} {us(v)}" for k, v in r["predicted_s"].items())
        out.append(f"| {r['workload']} {r['batch']:,} | {r['dtype']} {r['precision']} | "
                   f"{r['path']} | {us(r['forward_s'])} | {us(r['grad_s'])} | "
                   f"{us(r['graph_s'])} | {r['grad_over_forward']:.2f} | {r['launches']} | "
                   f"{tgt if r['path'] == 'fused' else ''} | "
                   f"{pred if r['path'] == 'fused' else ''} | {r['grad_rel_err']:.1e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--quick", action="store_true", help="batches capped at 65,536")
    args = ap.parse_args(argv)
    rows = run(reps=args.reps, budget=args.budget_s, quick=args.quick)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if "error" in r or r.get("grad_rel_err", 0) > (
        1e-10 if r["dtype"] == "float64" else 5e-3 if r["precision"] == "tf32" else 1e-4)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
