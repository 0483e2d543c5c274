"""Levenberg-Marquardt against Adam on the seed thread's sum of squares.

The seed thread's model (1→1000→20→1, identity activations, standard-normal parameters)
and its loss ``sum(abs2, m(x))`` on 10,000 inputs in [-1, 1]: a sum of squares whose
minimum is 0. ``cupynn.levenberg_marquardt`` (matrix-free: each linear solve is LSMR on the
products ``J v`` and ``J^T u``, one forward or backward pass each, so the 10,000 × 22,041
Jacobian is never stored) against ``cupynn.optim.Adam`` from the same start. Prints the
loss after each LM iteration and Adam's loss after as many steps as it is given.

    python examples/seed_levenberg_marquardt.py           # 10,000 inputs, 2,000 Adam steps
    python examples/seed_levenberg_marquardt.py --quick   # 500 inputs, 300 Adam steps (CI)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import cupynn


def seed_model(device):
    rng = np.random.default_rng(0)  # the parameters of examples/seed_thread.py
    W1, b1 = rng.standard_normal((1000, 1)), rng.standard_normal(1000)
    W2, b2 = rng.standard_normal((20, 1000)), rng.standard_normal(20)
    W3, b3 = rng.standard_normal((1, 20)), rng.standard_normal(1)
    return cupynn.Chain(cupynn.Dense.from_arrays(W1, b1), cupynn.Dense.from_arrays(W2, b2),
                        cupynn.Dense.from_arrays(W3, b3)).to(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="500 inputs, 300 Adam steps (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--adam-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    args = ap.parse_args(argv)
    n = 500 if args.quick else 10_000
    adam_steps = args.adam_steps or (300 if args.quick else 2000)

    model = seed_model(args.device)
    xp = cupynn.backends.get_backend(model.device).xp
    x = xp.asarray(np.linspace(-1, 1, n).reshape(-1, 1))
    start = float((model(x) ** 2).sum())
    print(f"seed model 1→1000→20→1 on '{model.device}', {n:,} inputs, "
          f"{cupynn.num_parameters(model):,} parameters; sum of squares at the start {start:.6e}")

    t0 = time.perf_counter()
    lm = cupynn.levenberg_marquardt(model, x, iterations=30, matrix_free=True, tol=1e-20 * start)
    t_lm = time.perf_counter() - t0
    for i, value in enumerate(lm.loss):
        print(f"  LM iteration {i:2d}: sum of squares {value:.3e}")
    print(f"Levenberg-Marquardt: {lm.iterations} iterations, {t_lm:.1f} s, sum of squares "
          f"{lm.loss[-1]:.3e} ({lm.message})")

    model = seed_model(args.device)
    opt = cupynn.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    checkpoints = {1, 10, 100, 1000, adam_steps}
    first_below = None
    for step in range(1, adam_steps + 1):
        value, grads = cupynn.value_and_grad(model, x, "sum_squares")
        opt.step(grads)
        if first_below is None and float(value) <= lm.loss[-1]:
            first_below = step - 1
        if step in checkpoints:
            print(f"  Adam step {step:5d}: sum of squares {float((model(x) ** 2).sum()):.3e}")
    t_adam = time.perf_counter() - t0
    final = float((model(x) ** 2).sum())
    reached = (f"reached LM's value after {first_below} steps" if first_below is not None
               else f"never reached LM's {lm.loss[-1]:.1e}")
    print(f"Adam (lr {args.lr:g}): {adam_steps} steps, {t_adam:.1f} s, sum of squares {final:.3e}; {reached}")
    print(f"LM reached {lm.loss[-1]:.1e} in {lm.iterations} iterations; Adam is at {final:.1e} after "
          f"{adam_steps} steps")


if __name__ == "__main__":
    main()
