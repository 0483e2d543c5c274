"""Fit sin(x) on [-pi, pi] with a small tanh MLP and Adam; plot the fit.

The shortest cupynn training loop: ``value_and_grad`` for the loss and its gradient,
``opt.step`` to update the parameters in place.

    python examples/fit_sine.py                      # 3000 steps, progress every 250
    python examples/fit_sine.py --quick              # 100 steps on 256 points (CI)
    python examples/fit_sine.py --plot fit.png       # where the PNG goes (needs matplotlib)
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
                    help="100 steps on 256 points (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--every", type=int, default=None, help="a progress line every N steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--plot", default="fit_sine.png", help="PNG path ('' for none)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 3000)
    every = args.every or max(1, steps // 12)

    model = cupynn.MLP([1, 64, 64, 1], "tanh", device=args.device, rng=0)
    xp = np
    if model.device == "cuda":
        import cupy as xp
    x = xp.linspace(-np.pi, np.pi, 256 if args.quick else 1024).reshape(-1, 1)
    y = xp.sin(x)

    opt = cupynn.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss, grads = cupynn.value_and_grad(model, x, "mse", target=y)
        opt.step(grads)
        if step % every == 0 or step == 1:
            print(f"step {step:5d}  mse {float(loss):.3e}  ({time.perf_counter() - t0:.2f} s)")
    final = float(cupynn.value_and_grad(model, x, "mse", target=y)[0])
    print(f"final mse {final:.3e} after {steps} Adam steps on '{model.device}'")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return final
        host = (lambda a: a.get()) if xp is not np else np.asarray
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(host(x)[:, 0], host(y)[:, 0], label="sin(x)", lw=3, alpha=0.4)
        ax.plot(host(x)[:, 0], host(model(x))[:, 0], label=f"MLP after {steps} steps", lw=1.5)
        ax.set_xlabel("x")
        ax.legend()
        ax.set_title(f"1→64→64→1 tanh, Adam lr={args.lr}, mse {final:.1e}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")
    return final


if __name__ == "__main__":
    main()
