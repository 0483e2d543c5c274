"""PyTorch eager against cupynn through ``cupynn.torch.Module``, the calls interleaved.

On a shared, noisy machine sequential timing loops (``python -m cupynn bench``) drift with
the load; here every repetition runs each call once in turn, so the per-repetition ratio
``cupynn via torch / PyTorch`` compares the two under the same load. Gradient = the
Parameters' ``.grad`` set to None, ``loss = (net(x) ** 2).sum()``, ``loss.backward()``.

    python bench/torch_module_vs_torch.py seed --dtype float64 --reps 15
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python bench/torch_module_vs_torch.py narrow --batch 262144
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=("seed", "seed-1m", "narrow", "wide"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default: the workload's first dtype")
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)

    import torch

    import cupynn
    import cupynn.torch
    from cupynn.bench.runner import make_problem
    from cupynn.bench.workloads import DEFAULT_DTYPES, get_workload

    w = get_workload(args.workload, batch=args.batch)
    dtype = args.dtype or DEFAULT_DTYPES[w.name][0]
    problem = make_problem(w, dtype, "cpu", 0, n_inputs=1)
    model = cupynn.Chain(*[cupynn.Dense.from_arrays(W, b, a)
                           for (W, b), a in zip(problem.params, problem.activations)])
    net = cupynn.torch.Module(model)
    mods = []
    for (W, b), a in zip(problem.params, problem.activations):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=getattr(torch, dtype))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        mods += [lin] + ([{"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[a]()] if a != "identity" else [])
    plain = torch.nn.Sequential(*mods)
    xn = problem.inputs[0]
    x = torch.from_numpy(xn)

    def forward(n):
        with torch.no_grad():
            return (n(x) ** 2).sum()

    def gradient(n):
        for q in n.parameters():
            q.grad = None
        loss = (n(x) ** 2).sum()
        loss.backward()
        return loss

    calls = {
        "PyTorch forward": lambda: forward(plain),
        "cupynn via torch forward": lambda: forward(net),
        "cupynn forward": lambda: model(xn),
        "PyTorch gradient": lambda: gradient(plain),
        "cupynn via torch gradient": lambda: gradient(net),
        "cupynn value_and_grad": lambda: cupynn.value_and_grad(model, xn),
    }
    ref = gradient(plain).item()
    got = gradient(net).item()
    assert abs(got - ref) <= 1e-4 * abs(ref), (got, ref)
    for fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(args.reps):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    print(f"{w.name} {w.shape}, batch {w.batch:,}, {dtype}, CPU; {args.reps} interleaved repetitions; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"load average {os.getloadavg()[0]:.2f}")
    for k, v in times.items():
        print(f"  {k:26s} median {np.median(v) * 1e3:9.2f} ms   "
              f"(10th-90th percentile {np.percentile(v, 10) * 1e3:.2f} - {np.percentile(v, 90) * 1e3:.2f})")
    for what in ("forward", "gradient"):
        r = np.array(times[f"cupynn via torch {what}"]) / np.array(times[f"PyTorch {what}"])
        print(f"  cupynn via torch / PyTorch, {what:8s}: median {np.median(r):.2f} "
              f"(10th-90th percentile {np.percentile(r, 10):.2f} - {np.percentile(r, 90):.2f})")


if __name__ == "__main__":
    main()
