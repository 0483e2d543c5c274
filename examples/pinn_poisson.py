"""A physics-informed network for the 2-D Poisson equation, with public cupynn API only.

Solve -Δu = f on the unit square with u = 0 on the boundary (by a penalty), for the exact
solution u*(x, y) = sin(πx) sin(πy), f = 2π² sin(πx) sin(πy). The residual is written in
jax.numpy (``cupynn.jax.residual``: JAX differentiates it, cupynn computes Δu by the
forward Laplacian and its parameter gradient); interior residual plus weighted boundary
term are ONE composite loss; Adam (``cupynn.optim``) first, then SciPy's L-BFGS-B on the
flat parameter vector (``cupynn.flat_value_and_grad``). Prints the relative L2 error.

    python examples/pinn_poisson.py              # 2048 + 512 points, 1000 Adam + 1000 L-BFGS
    python examples/pinn_poisson.py --quick      # a reduced size (CI)
    python examples/pinn_poisson.py --device cuda
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

import cupynn
import cupynn.jax

ap = argparse.ArgumentParser(description="2-D Poisson PINN")
ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("CUPYNN_EXAMPLES_QUICK")))
ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
args = ap.parse_args()
n_in, n_b, adam_steps, lbfgs_iters = (256, 64, 60, 40) if args.quick else (2048, 512, 1000, 1000)

jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
model = cupynn.MLP([2, 64, 64, 64, 1], "tanh", dtype="float64", device=args.device, init="glorot", rng=0)
xp = __import__("cupy") if model.device == "cuda" else np
x_in = xp.asarray(rng.uniform(0, 1, (n_in, 2)))
t, side = rng.uniform(0, 1, n_b), np.arange(n_b) % 4               # points on the four edges
x_b = xp.asarray(np.stack([np.where(side % 2, side == 1, t), np.where(side % 2, t, side == 2)], 1) * 1.0)


def residual(u, du, lap, x):                                        # -Δu = f, in jax.numpy
    f = 2 * jnp.pi**2 * jnp.sin(jnp.pi * x[:, 0]) * jnp.sin(jnp.pi * x[:, 1])
    return jnp.mean((lap + f) ** 2)


loss = (cupynn.ResidualTerm(x_in, cupynn.jax.residual(residual))
        + 10.0 * cupynn.LossTerm(x_b, "mse", target=xp.zeros((n_b, 1))))

t0 = time.perf_counter()
opt = cupynn.optim.Adam(model.parameters(), lr=1e-3)
for step in range(1, adam_steps + 1):
    value, grads = loss.value_and_grad(model)
    opt.step(grads)
    if step % max(1, adam_steps // 5) == 0:
        print(f"adam  {step:5d}  loss {float(value):.4e}")
res = minimize(cupynn.flat_value_and_grad(model, loss), cupynn.get_flat(model), jac=True,
               method="L-BFGS-B", options={"maxiter": lbfgs_iters})
cupynn.set_flat(model, res.x)
print(f"L-BFGS-B: {res.nit} iterations, loss {res.fun:.4e}; {time.perf_counter() - t0:.1f} s in all")

g = np.linspace(0, 1, 101)
pts = np.stack([a.ravel() for a in np.meshgrid(g, g)], 1)
u = model(xp.asarray(pts))[:, 0]
u = u.get() if hasattr(u, "get") else u
u_star = np.sin(np.pi * pts[:, 0]) * np.sin(np.pi * pts[:, 1])
print(f"relative L2 error against the exact solution on a 101 x 101 grid: "
      f"{np.linalg.norm(u - u_star) / np.linalg.norm(u_star):.3e}")
