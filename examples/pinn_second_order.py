"""Second-order training of a Poisson PINN against Adam + L-BFGS, for the same wall time.

Solve -Δu = f on the unit square with u = 0 on the boundary, for the exact solution
u*(x, y) = sin(πx) sin(πy) (f = 2π² sin(πx) sin(πy)), in float64, with a 2→32→32→1 tanh
network (1,185 parameters) and the penalty loss

    L = mean over interior points (Δu + f)²  +  mean over boundary points u²,

which is ``||r||²`` of ``cupynn.PDEResiduals(interior, "poisson", rhs=-f, boundary=...,
boundary_values=0)``. Each method gets the same wall-time budget from the same start:

* ``eng``: ``cupynn.energy_natural_gradient`` (Müller & Zeinhofer 2023: Gramian of the
  residual Jacobian, damped Cholesky solve, line search);
* ``lm``: ``cupynn.levenberg_marquardt`` on the same residuals;
* ``adam-lbfgs``: ``cupynn.optim.Adam`` (lr 1e-3) for a fifth of the budget, then SciPy's
  L-BFGS-B on ``cupynn.get_flat`` / ``set_flat`` (gradients from
  ``cupynn.residual_value_and_grad`` and ``cupynn.value_and_grad``).

The relative L2 error against u* on a 101×101 grid is recorded against the wall time
(its evaluation counted in the time) and printed; ``--plot`` saves the curves (needs
matplotlib), ``--json`` the numbers.

    python examples/pinn_second_order.py                     # 600 s per method (30 min)
    python examples/pinn_second_order.py --seconds 60        # a shorter budget
    python examples/pinn_second_order.py --quick             # a few seconds per method (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import cupynn

METHODS = ("eng", "lm", "adam-lbfgs")


def exact(x):
    return np.sin(np.pi * x[:, 0]) * np.sin(np.pi * x[:, 1])


def problem(n):
    """Interior points: the n×n cell centres; boundary: 4n + 1 points on each edge."""
    g = (np.arange(n) + 0.5) / n
    X, Y = np.meshgrid(g, g)
    interior = np.stack([X.ravel(), Y.ravel()], axis=1)
    t = np.linspace(0, 1, 4 * n + 1)
    z, o = np.zeros_like(t), np.ones_like(t)
    boundary = np.concatenate([np.stack([t, z], 1), np.stack([t, o], 1),
                               np.stack([z, t], 1), np.stack([o, t], 1)])
    f = 2 * np.pi ** 2 * exact(interior)
    return interior, boundary, f


class Recorder:
    """(seconds, relative L2 error) of the model on the 101×101 grid, against a clock."""

    def __init__(self, model, xp):
        g = np.linspace(0, 1, 101)
        X, Y = np.meshgrid(g, g)
        grid = np.stack([X.ravel(), Y.ravel()], axis=1)
        self.model, self.xp = model, xp
        self.grid = xp.asarray(grid)
        self.exact = exact(grid)
        self.norm = np.linalg.norm(self.exact)
        self.t0 = time.perf_counter()
        self.curve: list[tuple[float, float]] = []

    def error(self) -> float:
        u = self.model(self.grid).reshape(-1)
        u = u.get() if hasattr(u, "get") else np.asarray(u)
        return float(np.linalg.norm(u - self.exact) / self.norm)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self) -> float:
        e = self.error()
        self.curve.append((self.elapsed(), e))
        return e


def run_second_order(method, model, pde, seconds, xp):
    rec = Recorder(model, xp)
    rec.record()

    def callback(i, loss):
        rec.record()
        return rec.elapsed() > seconds

    if method == "eng":
        res = cupynn.energy_natural_gradient(model, pde, iterations=10 ** 9, time_limit=seconds,
                                             callback=callback)
    else:
        res = cupynn.levenberg_marquardt(model, pde, iterations=10 ** 9, time_limit=seconds,
                                         callback=callback)
    return rec, res.iterations, res.loss[-1]


def run_adam_lbfgs(model, interior, boundary, f, seconds, xp):
    import scipy.optimize

    rec = Recorder(model, xp)
    rec.record()
    rhs = xp.asarray(-f)
    zeros = xp.zeros((boundary.shape[0], 1))
    xi, xb = xp.asarray(interior), xp.asarray(boundary)

    def loss_and_grads():
        v1, g1 = cupynn.residual_value_and_grad(model, xi, "poisson", rhs=rhs)
        v2, g2 = cupynn.value_and_grad(model, xb, "mse", target=zeros)
        return float(v1) + float(v2), [{k: a[k] + b[k] for k in a} for a, b in zip(g1, g2)]

    opt = cupynn.optim.Adam(model.parameters(), lr=1e-3)
    steps = 0
    while rec.elapsed() < seconds / 5:
        _, grads = loss_and_grads()
        opt.step(grads)
        steps += 1
        if steps % 50 == 0:
            rec.record()
    rec.record()

    def fun(theta):
        cupynn.set_flat(model, theta)
        value, grads = loss_and_grads()
        flat = np.concatenate([np.asarray(a[k].get() if hasattr(a[k], "get") else a[k]).ravel()
                               for a in grads for k in ("weight", "bias")])
        return value, flat

    iters = [0]

    def callback(intermediate_result):
        iters[0] += 1
        if iters[0] % 10 == 0:
            rec.record()
        if rec.elapsed() > seconds:
            raise StopIteration

    sol = scipy.optimize.minimize(fun, cupynn.get_flat(model), jac=True, method="L-BFGS-B",
                                  callback=callback,
                                  options={"maxiter": 10 ** 9, "maxfun": 10 ** 9, "ftol": 0.0,
                                           "gtol": 0.0, "maxcor": 20})
    cupynn.set_flat(model, sol.x)
    rec.record()
    return rec, (steps, iters[0]), float(sol.fun)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")),
                    help="a 2→16→1 network, 10×10 points, 3 s per method (also: CUPYNN_EXAMPLES_QUICK=1)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--seconds", type=float, default=None, help="wall-time budget per method (600)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    ap.add_argument("--points", type=int, default=None, help="interior points per side (30)")
    ap.add_argument("--hidden", default=None, help="hidden widths, comma-separated (32,32)")
    ap.add_argument("--plot", default="", help="save the error-vs-time curves here (PNG, matplotlib)")
    ap.add_argument("--json", default="", help="save the curves and results here")
    ap.add_argument("--merge", default="", help="a --json file of an earlier run (same problem): its "
                    "methods not run now are added to the summary, the JSON and the plot")
    args = ap.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 600.0)
    n = args.points or (10 if args.quick else 30)
    hidden = args.hidden or ("16" if args.quick else "32,32")
    sizes = [2, *(int(w) for w in hidden.split(",")), 1]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")

    interior, boundary, f = problem(n)
    results = {}
    for method in methods:
        model = cupynn.MLP(sizes, "tanh", device=args.device, rng=1)
        xp = cupynn.backends.get_backend(model.device).xp
        if method == "adam-lbfgs":
            rec, iters, loss = run_adam_lbfgs(model, interior, boundary, f, seconds, xp)
        else:
            pde = cupynn.PDEResiduals(xp.asarray(interior), "poisson", rhs=xp.asarray(-f),
                                      boundary=xp.asarray(boundary), boundary_values=0.0)
            rec, iters, loss = run_second_order(method, model, pde, seconds, xp)
        errs = [e for _, e in rec.curve]
        t_hit = next((t for t, e in rec.curve if e <= 1e-6), None)
        results[method] = {"curve": rec.curve, "iterations": iters, "final_loss": loss,
                           "final_error": errs[-1], "best_error": min(errs), "seconds_to_1e-6": t_hit}
        hit = f"{t_hit:.0f} s" if t_hit is not None else "not reached"
        print(f"{method:>10s}: relative L2 error {errs[-1]:.3e} (best {min(errs):.3e}) after "
              f"{rec.curve[-1][0]:.0f} s; loss {loss:.3e}; iterations {iters}; 1e-6 reached: {hit}",
              flush=True)
    if args.merge:
        with open(args.merge) as fh:
            earlier = json.load(fh)
        if earlier["sizes"] != sizes or earlier["points"] != n or earlier["seconds"] != seconds:
            raise SystemExit(f"--merge: {args.merge} is another problem or budget")
        for method, r in earlier["results"].items():
            if method not in results:
                results[method] = r
                print(f"{method:>10s}: (from {args.merge}) relative L2 error {r['final_error']:.3e}, "
                      f"1e-6 reached: {r['seconds_to_1e-6']}")
    print(f"relative L2 error on the 101×101 grid, {n}×{n} interior points, network {sizes}, "
          f"{cupynn.num_parameters(cupynn.MLP(sizes, 'tanh', device='cpu', rng=1)):,} parameters, "
          f"{seconds:.0f} s per method")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sizes": sizes, "points": n, "seconds": seconds, "results": results}, fh, indent=1)
    if args.plot:
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return results
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = {"eng": "energy natural gradient", "lm": "Levenberg-Marquardt",
                  "adam-lbfgs": "Adam, then L-BFGS"}
        for method, r in results.items():
            t, e = zip(*r["curve"])
            ax.semilogy(t, e, label=labels[method])
        ax.axhline(1e-6, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("relative L2 error (101×101 grid)")
        ax.set_title(f"-Δu = f on the unit square, 2→{'→'.join(map(str, sizes[1:]))} tanh, float64")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot saved to {args.plot}")
    return results


if __name__ == "__main__":
    main()
