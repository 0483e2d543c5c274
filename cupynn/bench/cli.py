"""``python -m cupynn bench``: the command line.

Examples::

    python -m cupynn bench seed                       # seed workload, best device
    python -m cupynn bench seed narrow --device cpu --dtype float32
    python -m cupynn bench seed seed-1m narrow wide --device cuda --peers all \\
        --json bench.json --plot bench.png --markdown bench.md
    python -m cupynn bench --sizes 8,256,256,1 --activation tanh --batch 65536
    python -m cupynn bench --quick --json out.json --plot out.png   # CI smoke run
    python -m cupynn bench pinn --device cpu          # Poisson residual gradient (cupynn.bench.pinn)
    python -m cupynn bench dask --quick               # cupynn.dask on a local cluster (own options)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import pinn, report
from .impls import IMPLEMENTATIONS, select
from .reference import ACTIVATION_NAMES
from .runner import Settings, run_cases
from .workloads import DEFAULT_DTYPES, WORKLOADS, custom_workload, get_workload

__all__ = ["main", "build_parser", "cprofile_report"]

DTYPES = ("float64", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cupynn bench",
        description="Time cupynn and its peers (forward, gradient, gradient/forward ratio) on "
                    "public workloads, after checking each against a float64 reference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads: " + "; ".join(f"{k} = {w.describe()}" for k, w in WORKLOADS.items())
               + f"; pinn = the gradient of a Poisson residual loss, "
                 f"{'→'.join(map(str, pinn.SIZES))} tanh, batch {pinn.BATCH:,}, float64 "
                 "(only when named; peers: JAX and PyTorch)"
               + ".\nimplementations: " + ", ".join(IMPLEMENTATIONS)
               + " (default: all but torch.compile; 'all' adds it).\n"
               + "`python -m cupynn bench dask --help`: cupynn.dask on a local Dask cluster.",
    )
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help=f"one or more of {', '.join(WORKLOADS)} (default: seed; with --quick "
                        "all; none with --sizes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when a GPU is usable (default)")
    p.add_argument("--dtype", action="append", default=None,
                   help="float64, float32 or both (comma list or repeated); "
                        "default per workload: seed both, narrow/wide float32")
    p.add_argument("--batch", type=int, default=None, help="override every workload's batch")
    p.add_argument("--sizes", default=None,
                   help="your own network, widths input first, e.g. 8,256,256,1")
    p.add_argument("--activation", default="relu", choices=ACTIVATION_NAMES,
                   help="hidden activation for --sizes (default relu)")
    p.add_argument("--peers", default=None,
                   help="comma list of implementations, 'default', 'all' or 'none'")
    p.add_argument("--json", metavar="PATH", help="write results, machine and versions as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--plot", metavar="PATH", help="write PNG charts (needs matplotlib)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds of timing loops, shared among all measurements "
                        "(default 60 on CUDA, 120 on the CPU, 3 with --quick); compile times "
                        "and checks come on top")
    p.add_argument("--max-per-measurement", type=float, default=None,
                   help="cap on one measurement's timing loop in seconds "
                        "(default 0.5 on CUDA, 1.0 on the CPU)")
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes and budgets: a smoke test that runs in seconds")
    p.add_argument("--no-thread", action="store_true",
                   help="skip the seed thread's per-sample pattern (run with 'seed')")
    p.add_argument("--thread-samples", type=int, default=None,
                   help="at most this many single-sample calls (the rest is extrapolated)")
    p.add_argument("--thread-budget-s", type=float, default=None,
                   help="seconds per per-sample loop (default 2; --quick 0.05)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the ceilings")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: one cupyx.profiler.profile() range (cudaProfilerStart/Stop) "
                        "around each implementation's two timed loops, and an NVTX range per "
                        "loop; warm-ups and checks stay outside (for nsys "
                        "--capture-range=cudaProfilerApi / ncu --profile-from-start off); "
                        "CPU: the NVTX ranges only. Says so when the ranges cannot be recorded "
                        "(no NVTX implementation, or an nvtx package that nsys drops)")
    p.add_argument("--cprofile", metavar="PATH",
                   help="run Python's cProfile during every timed loop (not the checks and "
                        "warm-ups), write its statistics to PATH (python -m pstats PATH, or "
                        "snakeviz) and print the functions with the most own time: where the "
                        "CPU time goes, no GPU or nsys needed (the timings then include "
                        "cProfile's overhead per Python call)")
    p.add_argument("--kernels", action="store_true",
                   help="CUDA: also time each kernel of cupynn's gradient step alone (grid, "
                        "registers, blocks per SM, waves, share of the step) per workload and "
                        "dtype; with '--peers none' only that")
    p.add_argument("--host-overhead", action="store_true",
                   help="only the CUDA backend's host cost per call: its real host code against "
                        "a stand-in module whose kernels do nothing (no GPU needed): us per "
                        "call, launches and allocations per call, fused and per-layer paths")
    p.add_argument("--train", action="store_true",
                   help="also time one Adam training step (loss, gradient, update) of cupynn "
                        "(plain and compiled), PyTorch eager + torch.optim.Adam (for-loop, "
                        "foreach, fused) and JAX + optax, each where importable, per workload "
                        "and dtype; '--peers' names (cupynn, cupynn-graph, torch, jax) pick "
                        "among them, '--peers none' gives this table alone")
    p.add_argument("--seed", type=int, default=0, help="random seed for parameters and inputs")
    p.add_argument("-q", "--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def _dtypes(spec: list[str] | None, workload_name: str) -> tuple[str, ...]:
    if not spec:
        return DEFAULT_DTYPES.get(workload_name, ("float64",))
    names = [d.strip() for s in spec for d in s.split(",") if d.strip()]
    out = []
    for d in names:
        for dd in (DTYPES if d == "both" else (d,)):
            if dd not in DTYPES:
                raise SystemExit(f"--dtype: {dd!r} is not one of float64, float32, both")
            if dd not in out:
                out.append(dd)
    return tuple(out)


def _profile_note(device: str) -> None:
    """Say on stderr what --profile records, and loudly when a profiler cannot record it."""
    from cupynn._nvtx import nvtx_backend, nvtx_problem

    problem = nvtx_problem()
    if device != "cuda":
        if problem:
            print(f"WARNING: --profile: the benchmark's NVTX ranges cannot be recorded: {problem}",
                  file=sys.stderr)
        else:
            print(f"note: --profile on the CPU: NVTX ranges (through {nvtx_backend()}) around the "
                  "timed loops only; no cudaProfilerStart/Stop, so no nsys "
                  "--capture-range=cudaProfilerApi; cupynn's own per-layer ranges exist on the "
                  "CUDA backend only. For where the CPU time goes: --cprofile PATH", file=sys.stderr)
    elif problem:
        print(f"WARNING: --profile: cupynn's own ranges (Dense[i].forward, ...) cannot be "
              f"recorded: {problem} (the benchmark's ranges go through CuPy)", file=sys.stderr)


def cprofile_report(profiler, path: str, top: int = 15) -> str:
    """Write ``profiler``'s statistics to ``path`` and return the ``top`` functions by own time."""
    import io
    import pstats

    profiler.dump_stats(path)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    body = out.getvalue().strip("\n")
    from cupynn._threads import lanes_available

    lanes = lanes_available()
    note = ("" if lanes == 1 else
            f"\n(The NumPy backend ran on up to {lanes} threads; cProfile sees the calling thread "
            "only, where the others' work shows as lock waits: CUPYNN_CPU_THREADS=1 runs it all "
            "in that thread.)")
    return (f"cProfile of the timed loops (written to {path}; python -m pstats {path}), the "
            f"{top} functions with the most own time (a NumPy call such as a matrix product or "
            f"np.tanh counts as its caller's own time):\n{body}{note}")


def _resolve_device(device: str) -> str:
    from cupynn._devices import cuda_unavailable_reason, resolve_device

    resolved = resolve_device(device)
    if device == "cuda" and resolved == "cuda" and cuda_unavailable_reason():
        raise SystemExit(f"--device cuda: {cuda_unavailable_reason()}")
    return resolved


def _host_overhead(args) -> int:
    from .host_overhead import WORKLOADS as HO_WORKLOADS
    from .host_overhead import format_table, host_overhead

    quick = args.quick
    rows = host_overhead(workloads=HO_WORKLOADS[:1] if quick else HO_WORKLOADS,
                         reps=3 if quick else 7, loops=30 if quick else 400)
    print(format_table(rows))
    if args.json:
        doc = {"schema": "cupynn-host-overhead/1",
               "command": "python -m cupynn bench --host-overhead",
               "machine": report.machine_info("cpu"), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["dask"]:
        from .dask_bench import main as dask_main

        return dask_main(sys.argv[2:] if argv is None else list(argv)[1:])
    args = build_parser().parse_args(argv)
    if args.host_overhead:
        return _host_overhead(args)
    t_start = time.perf_counter()
    device = _resolve_device(args.device)
    try:
        impls = select(args.peers)
    except ValueError as e:
        raise SystemExit(f"--peers: {e}") from None

    default = list(WORKLOADS) if args.quick else ["seed"]
    names = list(args.workloads) or ([] if args.sizes else default)
    run_pinn = "pinn" in names  # its own runner: cupynn.bench.pinn
    names = [n for n in names if n != "pinn"]
    try:
        workloads = [get_workload(n, quick=args.quick, batch=args.batch) for n in names]
        if args.sizes:
            sizes = tuple(int(s) for s in args.sizes.replace("→", ",").split(","))
            batch = args.batch or (512 if args.quick else 10_000)
            workloads.append(custom_workload(sizes, args.activation, batch))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    cases = [(w, dt) for w in workloads for dt in _dtypes(args.dtype, w.name)]
    dtypes_used = sorted({dt for _, dt in cases})

    settings = Settings(
        device=device, cases=cases, impls=impls,
        budget_s=args.budget_s if args.budget_s is not None else (
            3.0 if args.quick else 60.0 if device == "cuda" else 120.0),
        cap_s=args.max_per_measurement or (
            0.05 if args.quick else 0.5 if device == "cuda" else 1.0),
        floor_s=0.005 if args.quick else 0.05,
        profile=args.profile, seed=args.seed, progress=not args.no_progress,
    )
    if args.profile:
        _profile_note(device)
    if args.cprofile:
        import cProfile

        settings.cpu_profiler = cProfile.Profile()

    ceilings = None
    if not args.no_roofline and cases:
        from .roofline import measure_ceilings

        if settings.progress:
            print("measuring the device's copy bandwidth and matrix rates ...", file=sys.stderr)
        ceilings = measure_ceilings(device, dtypes_used, quick=args.quick)

    results = run_cases(settings)
    report.finalize(results, ceilings)
    derivatives = []
    if run_pinn:
        libraries = {"jax" if i.name == "jax" else "torch" for i in impls
                     if i.name == "jax" or i.name.startswith("torch")}
        derivatives = pinn.run(device, quick=args.quick, batch=args.batch,
                               budget_s=2.0 if args.quick else 30.0,
                               cap_s=settings.cap_s if args.quick else 3.0, seed=args.seed,
                               libraries=libraries, progress=settings.progress)

    kernels = []
    if args.kernels and device != "cuda":
        print("note: --kernels times the CUDA backend's kernels; on the CPU it does nothing",
              file=sys.stderr)
    elif args.kernels:
        from .kernels import run_breakdowns

        kernels = run_breakdowns(cases, seed=args.seed, budget_s=0.1 if args.quick else 1.0,
                                 progress=(lambda t: print(t, "...", file=sys.stderr))
                                 if settings.progress else None)

    train = []
    if args.train:
        from .train import run_train, select_train

        train = run_train(cases, device, budget_s=max(settings.floor_s, settings.budget_s / 4),
                          cap_s=settings.cap_s, floor_s=settings.floor_s, seed=args.seed,
                          progress=settings.progress, impls=select_train(args.peers))

    thread = []
    seed = next((w for w in workloads if w.name == "seed"), None)
    if seed is not None and not args.no_thread and impls:
        from .thread import run_thread

        batched = {r["impl"]: (r["forward"]["median_s"], r["gradient"]["median_s"])
                   for r in results
                   if r["workload"] == "seed" and r["dtype"] == "float64" and r["status"] == "ok"
                   and r.get("forward") and r.get("gradient")}
        per_sample_impls = [i for i in impls if not i.on_request_only and i.name != "cupynn-graph"]
        thread = run_thread(
            seed, device, per_sample_impls,
            budget_s=args.thread_budget_s or (0.05 if args.quick else 2.0),
            batched_budget_s=settings.cap_s,
            samples=args.thread_samples or (200 if args.quick else None),
            seed=args.seed, progress=settings.progress, batched=batched)

    # Versions are read after the implementations have imported their libraries.
    doc = {
        "schema": "cupynn-bench/1",
        "command": "python -m cupynn bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": report.machine_info(device),
        "settings": {"device": device, "quick": args.quick, "budget_s": settings.budget_s,
                     "cap_s": settings.cap_s, "peers": [i.name for i in impls],
                     "seed": args.seed, "profile": args.profile, "cprofile": args.cprofile},
        "ceilings": ceilings.to_dict() if ceilings else None,
        "results": results,
        "thread": thread,
        "kernels": kernels,
        "derivatives": derivatives,
        "train": train,
        "wall_s": None,
    }
    if results:
        print(report.terminal_table(results))
        print("\n" + report.COLUMNS)
    if thread:
        print("\nseed thread (float64): one call per input, gradients accumulated, "
              "vs one batched call")
        print(report.thread_table(thread))
    for k in kernels:
        print("\n" + report.kernels_table(k))
    if derivatives:
        print("\n" + pinn.table(derivatives))
    if train:
        print("\ntraining step: loss, gradient and an Adam update of every parameter")
        print(report.train_table(train))
    if ceilings:
        rates = ", ".join(f"{k} {v / 1e9:.3g} GFLOP/s"
                          for k, v in ceilings.matmul_flops_per_s.items())
        print(f"\nceilings ({device}): copy {ceilings.copy_bytes_per_s / 1e9:.3g} GB/s, "
              f"matmul {rates}")
    if settings.cpu_profiler is not None:
        print("\n" + cprofile_report(settings.cpu_profiler, args.cprofile))
    doc["wall_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(doc))
    if args.plot:
        try:
            from .plot import write_png

            write_png(doc, args.plot)
        except ImportError as e:
            print(f"--plot: matplotlib is not importable ({e}); no chart written",
                  file=sys.stderr)
    n_cases = len(results) + len(derivatives)
    print(f"\n{n_cases} cases in {doc['wall_s']:.1f} s", file=sys.stderr)
    bad = [r for r in results + thread + train + derivatives
           if r.get("impl", "").startswith("cupynn")
           and r["status"] in ("wrong", "error")]
    for r in bad:
        print(f"cupynn FAILED: {r['impl']} {r.get('workload')} {r.get('dtype')}: {r['reason']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
