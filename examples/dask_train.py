"""Train a small network on a Dask cluster: the gradient data-parallel, the update on the driver.

    python examples/dask_train.py                 # 2 local worker processes, 10^6 samples
    python examples/dask_train.py --quick         # reduced size, seconds (what CI runs)
    python examples/dask_train.py --scheduler tcp://10.0.0.5:8786   # a running cluster

It fits ``y = sin(3x)`` on ``x`` in [-1, 1] with an MLP 1 -> 64 -> 64 -> 1 (tanh), loss "mse".
The samples are generated on the workers and stay there (``persist``). Every step:
``cupynn.dask.value_and_grad`` scatters the current model to the workers, each chunk's
gradient is computed where the chunk lives and the chunks are summed in a fixed tree;
the driver then takes a plain SGD step in place (``W -= lr * dW`` on the arrays that
``model.parameters()`` returns), and the next step scatters the updated model.
"""

from __future__ import annotations

import argparse
import time

import dask
import dask.array as da
import numpy as np

import cupynn
import cupynn.dask


def make_data(n_samples: int, chunk_rows: int, dtype: str, seed: int = 0):
    """``(X, Y)``: ``n_samples`` points, chunked along the batch, computed lazily on the workers."""
    X = da.random.default_rng(seed).uniform(-1.0, 1.0, (n_samples, 1), chunks=(chunk_rows, 1))
    X = X.astype(dtype)
    return X, da.sin(3 * X)


def train(client, *, n_samples: int, chunk_rows: int, steps: int, lr: float = 0.1,
          dtype: str = "float64", seed: int = 0, log=print) -> list[float]:
    """Run ``steps`` SGD steps on the cluster behind ``client``; return the loss before each."""
    X, Y = make_data(n_samples, chunk_rows, dtype, seed)
    X, Y = dask.persist(X, Y)  # generate the data once, on the workers, and keep it there
    model = cupynn.MLP([1, 64, 64, 1], "tanh", dtype=dtype, device="cpu", rng=seed)
    losses = []
    for step in range(steps):
        t = time.perf_counter()
        value, grads = cupynn.dask.value_and_grad(model, X, "mse", target=Y, client=client)
        for p, g in zip(model.parameters(), grads):  # plain SGD, in place
            p["weight"] -= lr * g["weight"]
            p["bias"] -= lr * g["bias"]
        losses.append(float(value))
        log(f"step {step:3d}  mse {float(value):.6f}  ({time.perf_counter() - t:.2f} s)")
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20,000 samples, 30 steps")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a "
                                       "local cluster of --workers processes)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args(argv)
    n = args.samples or (20_000 if args.quick else 1_000_000)
    steps = args.steps or (30 if args.quick else 200)

    from distributed import Client, LocalCluster

    if args.scheduler:
        client, cluster = cupynn.dask.connect(args.scheduler), None
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
    try:
        n_workers = len(client.scheduler_info()["workers"])
        print(f"{n:,} samples in chunks of {max(1, n // 8):,} rows on {n_workers} workers")
        losses = train(client, n_samples=n, chunk_rows=max(1, n // 8), steps=steps, lr=args.lr)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(f"mse {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0 if np.isfinite(losses[-1]) and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
