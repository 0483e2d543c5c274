"""L-BFGS-B through SciPy on a cupynn network, in float64, with the loss per iteration.

``cupynn.flat_value_and_grad`` turns (model, x, loss) into ``theta -> (value, grad)`` on
float64 NumPy vectors, which is what ``scipy.optimize.minimize(..., jac=True)`` calls;
``cupynn.get_flat`` / ``set_flat`` move between the model and the vector. Second-order-ish
methods like L-BFGS need the float64 gradient: in float32 they stall early.

    python examples/lbfgs_scipy.py            # 1→32→32→1 tanh fitting a damped oscillation
    python examples/lbfgs_scipy.py --quick    # fewer points and iterations (CI)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import cupynn


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="256 points, 60 iterations (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--maxiter", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    from scipy.optimize import minimize

    n = 256 if args.quick else 4096
    maxiter = args.maxiter or (60 if args.quick else 1000)
    model = cupynn.MLP([1, 32, 32, 1], "tanh", dtype="float64", device=args.device, rng=0)
    xp = np
    if model.device == "cuda":
        import cupy as xp
    x = xp.linspace(-2, 2, n).reshape(-1, 1)
    target = xp.exp(-0.5 * x**2) * xp.cos(4 * x)

    f = cupynn.flat_value_and_grad(model, x, "mse", target=target)
    theta0 = cupynn.get_flat(model)
    print(f"{theta0.size} parameters on '{model.device}', {n} points; initial mse {f(theta0)[0]:.3e}")
    history = []

    def report(intermediate_result):
        history.append(intermediate_result.fun)
        k = len(history)
        if k <= 5 or k % 10 == 0:
            print(f"iteration {k:4d}  mse {intermediate_result.fun:.6e}")

    t = time.perf_counter()
    res = minimize(f, theta0, jac=True, method="L-BFGS-B", callback=report,
                   options={"maxiter": maxiter})
    cupynn.set_flat(model, res.x)  # the model now holds the optimum
    print(f"{res.nit} iterations, {res.nfev} evaluations in {time.perf_counter() - t:.2f} s: "
          f"mse {res.fun:.3e} ({res.message})")
    return float(res.fun)


if __name__ == "__main__":
    main()
