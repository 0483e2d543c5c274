"""What a ``jax.pure_callback`` into cupynn costs, against the same network compiled by XLA.

For a tiny network (where the time is all overhead) and the seed workload, it times,
per call (median of repeated timed loops, in one process):

- ``cupynn direct``: ``model(x)`` / ``cupynn.value_and_grad`` called from Python;
- ``cupynn.jax``: ``jax.jit`` of ``cupynn.jax.apply(model)`` (one callback) and of
  ``jax.grad`` of a loss using it (two callbacks: forward, then backward);
- ``jax.numpy``: the same network written in ``jax.numpy`` under ``jax.jit``.

``cupynn.jax - cupynn direct`` is what the callback machinery adds. CPU only: on a GPU a
callback is also a device->host->device round trip of its arguments and results (not
measured here).

    python bench/jax_callback_cost.py            # float64 (x64 on)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def per_call(fn, seconds=0.5, repeats=5):
    """Median over ``repeats`` loops of the mean time per call (warmed up first)."""
    fn()
    n, t = 1, 0.0
    while t < seconds / repeats:  # calls per loop so one loop takes ~seconds/repeats
        n *= 2
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=0.5, help="timing per measurement")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import cupynn
    import cupynn.jax

    cases = [("tiny 1→1→1, batch 1", [1, 1, 1], "tanh", 1),
             ("seed 1→1000→20→1, batch 10,000", [1, 1000, 20, 1], "identity", 10_000)]
    print(f"jax {jax.__version__}, cupynn {cupynn.__version__}, float64, CPU; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':34s} {'what':9s} {'cupynn direct':>14s} {'cupynn.jax':>12s} "
          f"{'jax.numpy':>11s} {'callback adds':>14s}")
    for label, sizes, act, batch in cases:
        for what, times in run_case(jax, jnp, cupynn, sizes, act, batch, args.seconds):
            td, tj, tr = times
            print(f"{label:34s} {what:9s} {td * 1e6:11.1f} µs {tj * 1e6:9.1f} µs "
                  f"{tr * 1e6:8.1f} µs {(tj - td) * 1e6:11.1f} µs")


def run_case(jax, jnp, cupynn, sizes, act, batch, seconds):
    """[(phase, (direct, via cupynn.jax, jax.numpy) seconds per call)] for one network."""
    model = cupynn.MLP(sizes, act, device="cpu", rng=0)
    f, params = cupynn.jax.apply(model), cupynn.jax.parameters(model)
    x_np = np.linspace(-1, 1, batch).reshape(batch, 1)
    x = jnp.asarray(x_np)
    acts = [act] * (len(sizes) - 2) + ["identity"]

    def ref(p, x):
        h = x
        for layer, a in zip(p, acts):
            h = h @ layer["weight"].T + layer["bias"]
            h = jnp.tanh(h) if a == "tanh" else h
        return h

    def loss(fn):
        return lambda p, x: jnp.sum(fn(p, x) ** 2)

    fwd_c, fwd_r = jax.jit(f), jax.jit(ref)
    grad_c, grad_r = jax.jit(jax.grad(loss(f))), jax.jit(jax.grad(loss(ref)))
    rows = [
        ("forward", lambda: model(x_np),
         lambda: fwd_c(params, x).block_until_ready(),
         lambda: fwd_r(params, x).block_until_ready()),
        ("gradient", lambda: cupynn.value_and_grad(model, x_np),
         lambda: jax.block_until_ready(grad_c(params, x)),
         lambda: jax.block_until_ready(grad_r(params, x))),
    ]
    return [(what, tuple(per_call(fn, seconds) for fn in fns)) for what, *fns in rows]


if __name__ == "__main__":
    main()
