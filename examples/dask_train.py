"""Train a network on a Dask cluster: the gradient data-parallel, the Adam step on the driver.

    python examples/dask_train.py                 # 2 local worker processes, 10^6 samples
    python examples/dask_train.py --quick         # 20,000 samples, 20 steps (CI)
    python examples/dask_train.py --scheduler tcp://10.0.0.5:8786   # a running cluster
    python examples/dask_train.py --device cuda   # chunks as CuPy arrays: the workers' GPUs

It fits ``y = sin(3x)`` on ``x`` in [-1, 1] with an MLP 1 -> 64 -> 64 -> 1 (tanh), loss "mse".
The samples are generated on the workers and stay there (``persist``). Every step,
``cupynn.dask.value_and_grad`` scatters the current model to the workers, each chunk's
gradient is computed where the chunk lives and the chunks are summed in a fixed tree;
the driver's ``cupynn.optim.Adam`` then updates the model in place, and the next step
scatters the updated model. The loss sequence is the same for any number of workers.
Needs the ``dask`` extra (``pip install "cupynn[dask]"``).
"""

from __future__ import annotations

import argparse
import os
import time

import dask
import dask.array as da
import numpy as np

import cupynn
import cupynn.dask


def make_data(n_samples: int, chunk_rows: int, dtype: str = "float64", seed: int = 0,
              device: str = "cpu"):
    """``(X, Y)``: ``n_samples`` points chunked along the batch, computed lazily on the workers."""
    X = da.random.default_rng(seed).uniform(-1.0, 1.0, (n_samples, 1), chunks=(chunk_rows, 1))
    X = X.astype(dtype)
    Y = da.sin(3 * X)
    if device == "cuda":  # CuPy chunks: each worker runs cupynn's CUDA kernels on its GPU
        import cupy

        X, Y = (a.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), dtype)) for a in (X, Y))
    return X, Y


def train(client, *, n_samples: int, chunk_rows: int, steps: int, lr: float = 1e-2,
          dtype: str = "float64", seed: int = 0, device: str = "cpu", log=print) -> list[float]:
    """``steps`` Adam steps on the cluster behind ``client``; returns the loss before each."""
    X, Y = dask.persist(*make_data(n_samples, chunk_rows, dtype, seed, device))
    model = cupynn.MLP([1, 64, 64, 1], "tanh", dtype=dtype, device="cpu", rng=seed)
    opt = cupynn.optim.Adam(model.parameters(), lr=lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        value, grads = cupynn.dask.value_and_grad(model, X, "mse", target=Y, client=client)
        opt.step(grads)  # in place, on the driver's model; the next call scatters it again
        losses.append(float(value))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"step {step:4d}  mse {float(value):.3e}  ({time.perf_counter() - t0:.1f} s)")
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                   help="20,000 samples, 20 steps (also: CUPYNN_EXAMPLES_QUICK=1)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a "
                                       "local cluster of --workers processes)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help="where the workers compute: NumPy chunks on their CPUs, or CuPy chunks "
                        "on their GPUs (auto: cuda when this machine has a usable GPU)")
    args = p.parse_args(argv)
    n = args.samples or (20_000 if args.quick else 1_000_000)
    steps = args.steps or (20 if args.quick else 300)
    device = ("cuda" if cupynn.cuda_available() else "cpu") if args.device == "auto" else args.device

    from distributed import Client, LocalCluster

    if args.scheduler:
        client, cluster = cupynn.dask.connect(args.scheduler), None
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
    try:
        n_workers = len(client.scheduler_info()["workers"])
        chunk_rows = max(1, n // 8)
        print(f"{n:,} samples in chunks of {chunk_rows:,} rows on {n_workers} dask workers ({device})")
        losses = train(client, n_samples=n, chunk_rows=chunk_rows, steps=steps, lr=args.lr,
                       device=device)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(f"mse {losses[0]:.3e} -> {losses[-1]:.3e} after {steps} Adam steps on {n_workers} dask workers")
    return 0 if np.isfinite(losses[-1]) and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
