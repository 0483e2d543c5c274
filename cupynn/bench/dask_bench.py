"""``python -m cupynn bench dask``: ``cupynn.dask.value_and_grad`` on a local cluster.

The seed network (1→1000→20→1, identity, randn weights, inputs ``linspace(-1, 1)``)
on ``--batch`` inputs (default 10⁷, float32), chunked along the batch, on a
``distributed.LocalCluster`` of worker processes with one thread each, which runs
every chunk on one CPU thread (``cpu_threads=1``: one lane of the NumPy backend, one
BLAS thread). For each worker count ``k`` of ``--workers`` (default 1,2) the
chunks are generated on ``k`` workers and kept there (``persist``), and
``cupynn.dask.value_and_grad(model, X)`` is restricted to them. The single-process
baseline is one ``cupynn.value_and_grad(model, x)`` in this process, on the same
data, on ``t`` CPU threads (``t`` lanes of the NumPy backend, ``t`` BLAS threads) for
each ``t`` of ``--single-threads`` (default: the worker counts). After one warm-up call
of each, the calls are timed in rounds, each round timing every configuration once
(a change of the machine's load then hits all of them alike); the median over
``--repeat`` rounds gives the throughput in inputs/s. The *overhead* of ``k`` workers
is their time over the single process's on ``k`` CPU threads, minus one.

Checked before anything is reported: every worker count gives bit-identical
results, and they match the single process within the float tolerance of
``python -m cupynn bench`` (``runner.tolerance``). The exit status is 1 otherwise.

Examples::

    python -m cupynn bench dask                           # 10^7 inputs, 1 vs 2 workers
    python -m cupynn bench dask --quick                   # 10^5 inputs: seconds
    python -m cupynn bench dask --batch 1000000 --workers 1,2,4 --json dask.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time

import numpy as np

from . import reference, report
from .runner import tolerance
from .workloads import get_workload

__all__ = ["main", "run"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cupynn bench dask",
        description="cupynn.dask.value_and_grad on a local Dask cluster of 1, 2, ... worker "
                    "processes against one cupynn.value_and_grad in this process: throughput "
                    "in inputs/s, speed-up and overhead (seed network).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=None, help="inputs (default 10^7; --quick 10^5)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--workers", type=_ints, default=[1, 2],
                   help="worker counts to time, comma list (default 1,2)")
    p.add_argument("--single-threads", type=_ints, default=None,
                   help="CPU thread counts (NumPy-backend lanes and BLAS threads) of the "
                        "single-process baseline (default: --workers; --quick: 1)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk (default: batch / (8 x the largest worker count))")
    p.add_argument("--repeat", type=int, default=None, help="timed calls each (default 3; --quick 2)")
    p.add_argument("--quick", action="store_true", help="10^5 inputs, 2 calls each: a smoke run")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--json", metavar="PATH", help="write the results, machine and load as JSON")
    p.add_argument("-q", "--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def _pairs(grads):
    return [(g["weight"], g["bias"]) for g in grads]


def run(*, batch: int, dtype: str, workers: list[int], single_threads: list[int],
        chunk_rows: int, repeat: int, seed: int = 0, progress=None, client=None) -> dict:
    """Time everything and return the result document (see the module docstring).

    Starts a LocalCluster of ``max(workers)`` processes, or uses ``client``'s workers.
    """
    import dask.array as da
    import distributed

    import cupynn
    import cupynn.dask as cdask
    from cupynn._threads import blas_limiter, lane_limit

    say = progress or (lambda text: None)
    w = get_workload("seed", batch=batch)
    rng = np.random.default_rng(seed)
    params = [(W.astype(dtype), b.astype(dtype)) for W, b in w.make_params(rng)]
    model = cupynn.Chain(*[cupynn.Dense.from_arrays(W, b, act)
                           for (W, b), (_, _, act) in zip(params, w.layers)])
    # the seed thread's inputs, generated chunk by chunk where they are used
    lazy_X = da.linspace(-1.0, 1.0, batch, chunks=chunk_rows).astype(dtype)[:, None]
    x = lazy_X.compute(scheduler="sync")
    doc = {"schema": "cupynn-bench-dask/2", "workload": w.describe(), "shape": w.shape,
           "batch": batch, "dtype": dtype, "chunk_rows": chunk_rows,
           "chunks": math.ceil(batch / chunk_rows), "repeat": repeat, "interleaved": True,
           "load_before": list(os.getloadavg()), "single": [], "dask": []}

    def single_call(threads):
        limiter = blas_limiter(threads)
        try:
            with lane_limit(threads):
                return cupynn.value_and_grad(model, x)
        finally:
            if limiter is not None:
                limiter.restore_original_limits()

    cluster = None
    if client is None:
        cluster = distributed.LocalCluster(n_workers=max(workers), threads_per_worker=1,
                                           processes=True, dashboard_address=":0",
                                           silence_logs=logging.ERROR)
    runs = []  # (kind, setting, call): every call is timed once per round, in turn
    try:
        with contextlib.nullcontext(client) if cluster is None else distributed.Client(cluster) \
                as client:
            client.wait_for_workers(max(workers), timeout=120)
            client.run(__import__, "cupynn.dask")  # imports out of the timings
            addrs = sorted(client.scheduler_info()["workers"])
            for threads in single_threads:
                runs.append(("single", threads, lambda t=threads: single_call(t)))
            for k in workers:
                X = lazy_X.persist(workers=addrs[:k])  # the chunks live on those k workers
                distributed.wait(X)
                runs.append(("dask", k, lambda X=X, use=addrs[:k]:
                             cdask.value_and_grad(model, X, workers=use)))
            say("warm-up: one call of each on the first chunks")
            cupynn.value_and_grad(model, x[:chunk_rows])
            for kind, k, _ in runs:
                if kind == "dask":
                    cdask.value_and_grad(model, lazy_X[:chunk_rows * k], workers=addrs[:k])
            def cpu_seconds():  # this process (driver, scheduler) and every worker process
                return time.process_time() + sum(client.run(time.process_time).values())

            times = {(kind, k): [] for kind, k, _ in runs}
            cpu = {(kind, k): [] for kind, k, _ in runs}
            results = {}
            for r in range(repeat):  # rounds: a load change on the machine hits every run alike
                for kind, k, call in runs:
                    say(f"round {r + 1}/{repeat}: {kind} {k} ({batch:,} inputs)")
                    c = cpu_seconds()
                    t = time.perf_counter()
                    results[(kind, k)] = call()
                    times[(kind, k)].append(time.perf_counter() - t)
                    cpu[(kind, k)].append(cpu_seconds() - c)
            del runs, X
    finally:
        if cluster is not None:
            cluster.close()

    def flat(result):
        value, grads = result
        return [np.asarray(value)] + [a for g in grads for a in (g["weight"], g["bias"])]

    ref_result = results.get(("single", 1)) or next(v for (kind, _), v in results.items()
                                                  if kind == "single")
    ref = (float(ref_result[0]), _pairs(ref_result[1]))
    tol = tolerance(dtype, 0.0, batch)
    first = None
    for (kind, k), ts in times.items():
        med = statistics.median(ts)
        entry = {"times_s": ts, "median_s": med, "inputs_per_s": batch / med,
                 "cpu_s": cpu[(kind, k)], "cpu_median_s": statistics.median(cpu[(kind, k)])}
        if kind == "single":
            doc["single"].append({"cpu_threads": k, **entry})
            continue
        value, grads = results[(kind, k)]
        first = first or flat(results[(kind, k)])
        doc["dask"].append({
            "workers": k, **entry,
            "rel_err_vs_single": reference.relative_error((float(value), _pairs(grads)), ref),
            "bit_identical_to_first": all(a.tobytes() == b.tobytes()
                                          for a, b in zip(flat(results[(kind, k)]), first)),
        })
    one = next((d["median_s"] for d in doc["dask"] if d["workers"] == 1), None)
    single = {s["cpu_threads"]: s["median_s"] for s in doc["single"]}
    for d in doc["dask"]:
        d["speedup_vs_1_worker"] = one / d["median_s"] if one is not None else None
        d["overhead_vs_single"] = (d["median_s"] / single[d["workers"]] - 1.0
                                   if d["workers"] in single else None)
    doc["tolerance"] = tol
    doc["ok"] = all(d["rel_err_vs_single"] <= tol and d["bit_identical_to_first"]
                    for d in doc["dask"])
    doc["load_after"] = list(os.getloadavg())
    return doc


def table(doc: dict) -> str:
    lines = [f"cupynn.dask value_and_grad: {doc['workload']} ({doc['dtype']}), "
             f"{doc['chunks']} chunks of {doc['chunk_rows']:,} rows; median of {doc['repeat']}",
             "", f"{'run':<32} {'time':>10} {'inputs/s':>12} {'vs 1 worker':>12} {'overhead':>9} "
                 f"{'CPU s':>9}"]
    for s in doc["single"]:
        lines.append(f"{'single process, ' + str(s['cpu_threads']) + ' CPU thr.':<32} "
                     f"{s['median_s']:>9.3f}s {s['inputs_per_s']:>12.3g} {'':>12} {'':>9} "
                     f"{s['cpu_median_s']:>9.2f}")
    for d in doc["dask"]:
        sp = f"{d['speedup_vs_1_worker']:.2f}x" if d["speedup_vs_1_worker"] else ""
        ov = f"{100 * d['overhead_vs_single']:+.0f}%" if d["overhead_vs_single"] is not None else ""
        lines.append(f"{'dask, ' + str(d['workers']) + ' worker(s)':<32} {d['median_s']:>9.3f}s "
                     f"{d['inputs_per_s']:>12.3g} {sp:>12} {ov:>9} {d['cpu_median_s']:>9.2f}")
    errs = ", ".join(f"{d['rel_err_vs_single']:.1e}" for d in doc["dask"])
    same = all(d["bit_identical_to_first"] for d in doc["dask"])
    lines += ["", f"rel. error vs single process: {errs} (tolerance {doc['tolerance']:.0e}); "
                  f"bit-identical across worker counts: {'yes' if same else 'NO'}",
              f"load average before {doc['load_before'][0]:.2f}, after {doc['load_after'][0]:.2f}"
              f" ({os.cpu_count()} CPUs); CPU s: CPU time of this process and all workers"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import cupynn.dask  # noqa: F401
    except ImportError as e:
        raise SystemExit(str(e)) from None
    batch = args.batch or (100_000 if args.quick else 10_000_000)
    repeat = args.repeat or (2 if args.quick else 3)
    chunk_rows = args.chunk_rows or max(1, math.ceil(batch / (8 * max(args.workers))))
    progress = None if args.no_progress else (
        lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True))
    doc = run(batch=batch, dtype=args.dtype, workers=args.workers,
              single_threads=args.single_threads or ([1] if args.quick else args.workers),
              chunk_rows=chunk_rows,
              repeat=repeat, seed=args.seed, progress=progress)
    doc["command"] = "python -m cupynn bench dask " + " ".join(
        argv if argv is not None else sys.argv[1:])
    doc["machine"] = report.machine_info("cpu")
    for m in ("dask", "distributed"):
        doc["machine"]["versions"][m] = report._version(m)
    print(table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    if not doc["ok"]:
        print("cupynn.dask FAILED its check (see the table)", file=sys.stderr)
    return 0 if doc["ok"] else 1
