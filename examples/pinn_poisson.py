"""A physics-informed network for the Poisson equation on the unit square, in float64.

Solve Δu = f in (0, 1)² with u = g on the boundary, for the exact solution
u*(x, y) = sin(πx) sin(πy) + (x² - y²)/2 (so f = -2π² sin(πx) sin(πy), g = u* on the
edges), with a 2→64→64→64→1 tanh network and the loss

    mean over interior points (Δu - f)²  +  λ · mean over boundary points (u - g)²,

whose gradient comes from ``cupynn.residual_value_and_grad`` (the Laplacian by the
forward Laplacian, no nested autodiff) and ``cupynn.value_and_grad``. Adam
(``cupynn.optim``) first, then L-BFGS-B through SciPy on the flat parameter vector
(``cupynn.get_flat`` / ``set_flat``); prints the loss and the relative L2 error against
u*, and saves a plot of u, u* and the error when matplotlib is installed.

    python examples/pinn_poisson.py                  # 2048 + 512 points, 1000 Adam + L-BFGS
    python examples/pinn_poisson.py --quick          # a reduced size (CI)
    python examples/pinn_poisson.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import cupynn

LAMBDA = 10.0  # weight of the boundary term


def exact(x):
    return np.sin(np.pi * x[:, 0]) * np.sin(np.pi * x[:, 1]) + 0.5 * (x[:, 0] ** 2 - x[:, 1] ** 2)


def rhs(x):
    return -2 * np.pi ** 2 * np.sin(np.pi * x[:, 0]) * np.sin(np.pi * x[:, 1])


def boundary_points(n, rng):
    """n points spread over the four edges of the unit square."""
    t = rng.uniform(0, 1, n)
    side = np.arange(n) % 4
    x = np.where(side == 0, t, np.where(side == 1, 1.0, np.where(side == 2, t, 0.0)))
    y = np.where(side == 0, 0.0, np.where(side == 1, t, np.where(side == 2, 1.0, t)))
    return np.stack([x, y], axis=1)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="256 + 64 points, 60 Adam steps, 40 L-BFGS iterations (also: "
                         "CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--adam-steps", type=int, default=None)
    ap.add_argument("--lbfgs-iters", type=int, default=None)
    ap.add_argument("--plot", default="pinn_poisson.png",
                    help="where to save the plot (needs matplotlib; '' for none)")
    args = ap.parse_args(argv)
    from scipy.optimize import minimize

    n_in, n_b = (256, 64) if args.quick else (2048, 512)
    adam_steps = args.adam_steps if args.adam_steps is not None else (60 if args.quick else 1000)
    lbfgs_iters = args.lbfgs_iters if args.lbfgs_iters is not None else (40 if args.quick else 1000)
    rng = np.random.default_rng(0)
    model = cupynn.MLP([2, 64, 64, 64, 1], "tanh", dtype="float64", device=args.device,
                       init="glorot", rng=0)
    xp = np
    if model.device == "cuda":
        import cupy as xp
    x_in, x_b = rng.uniform(0, 1, (n_in, 2)), boundary_points(n_b, rng)
    f, g = xp.asarray(rhs(x_in)), xp.asarray(exact(x_b)[:, None])
    x_in_d, x_b_d = xp.asarray(x_in), xp.asarray(x_b)

    def loss_and_grads():
        """(total loss, grads) of the residual term plus LAMBDA times the boundary term."""
        v_r, g_r = cupynn.residual_value_and_grad(model, x_in_d, "poisson", rhs=f)
        v_b, g_b = cupynn.value_and_grad(model, x_b_d, "mse", target=g)
        grads = [{k: gr[k] + LAMBDA * gb[k] for k in ("weight", "bias")}
                 for gr, gb in zip(g_r, g_b)]
        return float(v_r) + LAMBDA * float(v_b), grads

    print(f"{cupynn.num_parameters(model)} parameters on '{model.device}', {n_in} interior and "
          f"{n_b} boundary points")
    t0 = time.perf_counter()
    opt = cupynn.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1, adam_steps + 1):
        value, grads = loss_and_grads()
        opt.step(grads)
        if step == 1 or step % max(1, adam_steps // 10) == 0:
            print(f"adam  {step:5d}  loss {value:.4e}")

    def objective(theta):  # SciPy's (value, gradient) on the flat float64 vector
        cupynn.set_flat(model, theta)
        value, grads = loss_and_grads()
        host = cupynn.backends.get_backend(model.device).to_host
        flat = np.concatenate([host(a).ravel() for gr in grads for a in (gr["weight"], gr["bias"])])
        return value, flat

    history = []

    def report(intermediate_result):
        history.append(intermediate_result.fun)
        if len(history) % max(1, lbfgs_iters // 10) == 0:
            print(f"lbfgs {len(history):5d}  loss {intermediate_result.fun:.4e}")

    res = minimize(objective, cupynn.get_flat(model), jac=True, method="L-BFGS-B",
                   callback=report, options={"maxiter": lbfgs_iters})
    cupynn.set_flat(model, res.x)
    print(f"L-BFGS-B: {res.nit} iterations, {res.nfev} evaluations, loss {res.fun:.4e} "
          f"({res.message}); {time.perf_counter() - t0:.1f} s in all")

    grid = np.linspace(0, 1, 101)
    X, Y = np.meshgrid(grid, grid)
    pts = np.stack([X.ravel(), Y.ravel()], axis=1)
    u = cupynn.backends.get_backend(model.device).to_host(model(xp.asarray(pts)))[:, 0]
    u_star = exact(pts)
    err = float(np.linalg.norm(u - u_star) / np.linalg.norm(u_star))
    print(f"relative L2 error against the exact solution on a 101 x 101 grid: {err:.3e} "
          f"(max abs error {np.abs(u - u_star).max():.3e})")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
        else:
            fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
            for ax, data, title in zip(axes, (u, u_star, u - u_star),
                                       ("network u", "exact u*", "u - u*")):
                im = ax.pcolormesh(X, Y, data.reshape(X.shape), shading="auto", cmap="viridis")
                ax.set_title(title)
                ax.set_aspect("equal")
                fig.colorbar(im, ax=ax)
            fig.suptitle(f"Δu = f on the unit square: relative L2 error {err:.2e}")
            fig.tight_layout()
            fig.savefig(args.plot, dpi=100)
            print(f"plot saved to {args.plot}")
    return err


if __name__ == "__main__":
    main()
