"""Minibatch training with the whole step as one CUDA graph, and a learning-rate schedule.

``step = cupynn.compile(model, loss, optimizer=opt)`` captures forward, loss, backward and
the optimizer's update as one CUDA graph on a GPU; ``step(x, target)`` runs one training
step (the batch is copied into the graph's input buffers) and returns the loss. The step
count and the hyperparameters live on the device, so changing ``opt.lr`` between calls
(here: cosine decay) is seen by the graph. On the CPU the same calls run eagerly.

    python examples/train_compiled.py            # 2000 steps of batch 4096
    python examples/train_compiled.py --quick    # 30 steps of batch 128 (CI)
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

import cupynn


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="30 steps of batch 128 (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    steps, batch = (30, 128) if args.quick else (2000, 4096)

    # y = f(x) for x in [-1, 1]^2: a smooth surface to learn from random minibatches
    def f(x):
        return (np.sin(3 * x[:, :1]) * np.cos(2 * x[:, 1:]) + 0.5 * x[:, :1] * x[:, 1:])

    model = cupynn.MLP([2, 128, 128, 1], "tanh", device=args.device, rng=0)
    xp = np
    if model.device == "cuda":
        import cupy as xp
    rng = np.random.default_rng(1)
    x_test = rng.uniform(-1, 1, (2048, 2))
    x_test_d, y_test_d = xp.asarray(x_test), xp.asarray(f(x_test))

    lr0 = 3e-3
    opt = cupynn.optim.AdamW(model.parameters(), lr=lr0, weight_decay=1e-4)
    step = cupynn.compile(model, "mse", optimizer=opt)   # one CUDA graph per batch shape
    t = time.perf_counter()
    for k in range(steps):
        opt.lr = lr0 * 0.5 * (1 + math.cos(math.pi * k / steps))   # cosine decay
        xb = rng.uniform(-1, 1, (batch, 2))
        loss = step(xp.asarray(xb), xp.asarray(f(xb)))             # one training step
        if k % max(1, steps // 10) == 0:
            print(f"step {k:5d}  lr {opt.lr:.2e}  batch mse {float(loss):.3e}")
    elapsed = time.perf_counter() - t
    test_mse = float(step.forward(x_test_d, y_test_d))  # the loss alone, no update
    print(f"{steps} steps in {elapsed:.2f} s ({1e3 * elapsed / steps:.2f} ms/step, data "
          f"generation included) on '{model.device}'; test mse {test_mse:.3e}; "
          f"optimizer steps {opt.step_count}")
    return test_mse


if __name__ == "__main__":
    main()
