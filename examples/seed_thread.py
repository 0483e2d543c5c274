"""The seed thread's model: one sample at a time against one batched call.

A Julia Discourse thread evaluated a 1→1000→20→1 network (Flux, identity activations)
on 10,000 inputs, one input per call, and found the gradient 10× slower than the value.
This script does the same in cupynn -- the per-sample pattern, then the batched call --
checks that both give the same loss and gradients, and prints the times it measured.

Each of the four measurements (per-sample value, per-sample gradient, batched value,
batched gradient) is first run once untimed on exactly the shapes it times (the first call
of a shape pays one-time costs: a kernel compile on CUDA, the CPU path's setup), then timed
``--repeat`` times; the best run is reported.

    python examples/seed_thread.py            # 10,000 inputs
    python examples/seed_thread.py --quick    # 200 inputs (CI)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import cupynn


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="200 inputs instead of 10,000 (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement; the best "
                    "is reported (default 3)")
    args = ap.parse_args(argv)
    n = 200 if args.quick else 10_000

    rng = np.random.default_rng(0)
    W1, b1 = rng.standard_normal((1000, 1)), rng.standard_normal(1000)
    W2, b2 = rng.standard_normal((20, 1000)), rng.standard_normal(20)
    W3, b3 = rng.standard_normal((1, 20)), rng.standard_normal(1)
    model = cupynn.Chain(cupynn.Dense.from_arrays(W1, b1),       # Chain(Dense(W1, b1), ...)
                         cupynn.Dense.from_arrays(W2, b2),
                         cupynn.Dense.from_arrays(W3, b3)).to(args.device)
    if model.device == "cuda":
        import cupy as xp

        sync = xp.cuda.get_current_stream().synchronize
    else:
        xp, sync = np, (lambda: None)
    x = xp.asarray(np.linspace(-1, 1, n).reshape(-1, 1))   # batch first: (n, 1)
    print(f"model 1→1000→20→1 on '{model.device}', {n:,} inputs, float64")

    # The thread's pattern: one call per input, the loss summed, the gradients accumulated.
    def per_sample():
        total, acc = 0.0, None
        for i in range(n):
            value, grads = cupynn.value_and_grad(model, x[i], "sum_squares")  # x[i]: shape (1,)
            total += float(value)
            if acc is None:
                acc = [{k: v.copy() for k, v in g.items()} for g in grads]
            else:
                for a, g in zip(acc, grads):
                    a["weight"] += g["weight"]
                    a["bias"] += g["bias"]
        return total, acc

    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")

    def timed(fn, warm_up):
        """``warm_up()`` once (the same call on the same shapes), then the best of the timed runs."""
        warm_up()
        best, out = float("inf"), None
        for _ in range(args.repeat):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    def one_sample_value():
        return float((model(x[0]) ** 2).sum())

    def one_sample_grad():
        return cupynn.value_and_grad(model, x[0], "sum_squares")

    def batched_value():
        return float((model(x) ** 2).sum())

    def batched_grad():
        return cupynn.value_and_grad(model, x, "sum_squares")

    t_fwd_1, _ = timed(lambda: [float((model(x[i]) ** 2).sum()) for i in range(n)], one_sample_value)
    t_grad_1, (loss_1, grads_1) = timed(per_sample, one_sample_grad)
    t_fwd_b, loss_b = timed(batched_value, batched_value)
    t_grad_b, (value_b, grads_b) = timed(batched_grad, batched_grad)

    def to_host(a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    err = max(np.linalg.norm(to_host(a[k]) - to_host(b[k])) / np.linalg.norm(to_host(b[k]))
              for a, b in zip(grads_1, grads_b) for k in ("weight", "bias"))
    print(f"loss: per-sample {loss_1:.12e}, batched {float(value_b):.12e} "
          f"(forward alone {loss_b:.12e})")
    print(f"largest relative difference of a gradient array: {err:.1e}")
    print(f"times: the best of {args.repeat} runs each, after an untimed run on the same shapes")
    print(f"{'':12s}{'value':>12s}{'gradient':>12s}{'ratio':>8s}")
    print(f"{'per-sample':12s}{t_fwd_1:11.4f}s{t_grad_1:11.4f}s{t_grad_1 / t_fwd_1:7.1f}x")
    print(f"{'batched':12s}{t_fwd_b:11.4f}s{t_grad_b:11.4f}s{t_grad_b / t_fwd_b:7.1f}x")
    print(f"batching speeds the gradient up {t_grad_1 / t_grad_b:.0f}x")
    assert err < 1e-9, "per-sample and batched gradients disagree"


if __name__ == "__main__":
    main()
