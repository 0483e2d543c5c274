"""Per-sample parameter Jacobians: cupynn against JAX and torch.func, checked, then timed.

Two workloads, each a full Jacobian ``(rows, P)`` with the columns in ``cupynn.get_flat``
order:

* ``seed``: the seed network 1→1000→20→1 (identity) at batch 1,000: ``cupynn.jacobian``
  (1,000 × 22,041);
* ``pinn``: a 2→32→32→32→1 tanh network at 4,096 points, the Jacobian of the Poisson
  residual ``Δu - f`` (``cupynn.pde_jacobian``, 4,096 × 2,241).

Peers (when installed): JAX ``jit(vmap(jacrev))`` and ``jit(vmap(jacfwd))`` of a per-sample
function of the flat parameters (the Laplacian of the PINN by ``jax.hessian``), and
``torch.func.vmap(torch.func.jacrev)`` (the Laplacian by ``torch.func.hessian``). JAX's
``jacfwd`` of the PINN residual (forward mode over all ``P`` parameter directions through a
Hessian) takes minutes per call at 4,096 points, and for the seed network it holds
``P × 1000`` activations per sample (176 GB at batch 1,000): it runs on the first
``--fwd-points`` (256) points of the PINN and ``--fwd-points-seed`` (8) samples of the seed
only, is labelled so, and is left out of the best-peer ratio. Every
implementation's Jacobian is compared with cupynn's (relative Frobenius norm) before any
timing (that call is also the warm-up: JIT compilation); then each runs ``--repeats`` times
(once when its first call took over 20 s), and the median and the minimum are reported, with
the ratio of cupynn's median to the best peer's. Run it on a quiet machine: the load average
at the start and the end is printed.

    python bench/jacobian_vs_peers.py --json bench/results/jacobian-cpu.json
    python bench/jacobian_vs_peers.py --quick          # small sizes, 2 repeats (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

import cupynn


def seed_model(hidden=1000):
    rng = np.random.default_rng(0)
    return cupynn.Chain(cupynn.Dense.from_arrays(rng.standard_normal((hidden, 1)), rng.standard_normal(hidden)),
                        cupynn.Dense.from_arrays(rng.standard_normal((20, hidden)), rng.standard_normal(20)),
                        cupynn.Dense.from_arrays(rng.standard_normal((1, 20)), rng.standard_normal(1)))


def layout(model):
    """[(n, k, activation)] per layer, for the peers' unflattening of theta."""
    return [(layer.out_features, layer.in_features, layer.activation.name) for layer in model.layers]


# -- peers ------------------------------------------------------------------------------------

def jax_peers(model, x, f, pinn, fwd_points):
    try:
        import jax
    except ImportError:
        return {}
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    shapes = layout(model)
    acts = {"tanh": jnp.tanh, "identity": lambda z: z}

    def u(theta, xs):
        h, off = xs, 0
        for n, k, act in shapes:
            W = theta[off:off + n * k].reshape(n, k)
            off += n * k
            h = acts[act](W @ h + theta[off:off + n])
            off += n
        return h

    if pinn:
        def row(theta, xs, fs):
            return jnp.trace(jax.hessian(lambda z: u(theta, z)[0])(xs)) - fs
        args = (jnp.asarray(x), jnp.asarray(f))
        axes = (None, 0, 0)
    else:
        def row(theta, xs):
            return u(theta, xs)
        args = (jnp.asarray(x),)
        axes = (None, 0)
    theta = jnp.asarray(cupynn.get_flat(model))
    rev = jax.jit(jax.vmap(jax.jacrev(row), in_axes=axes))
    fwd = jax.jit(jax.vmap(jax.jacfwd(row), in_axes=axes))

    def call(fn, a):
        def run():
            out = fn(theta, *a)
            out.block_until_ready()
            return np.asarray(out).reshape(-1, theta.shape[0])
        return run

    peers = {"JAX jit(vmap(jacrev))": (call(rev, args), None)}
    if x.shape[0] > fwd_points:
        # forward mode over all P parameter directions at once: for the PINN minutes per call
        # at 4,096 points, for the seed network P x 1000 activations per sample (176 GB at
        # batch 1,000), so it is measured on the first fwd_points points only
        peers[f"JAX jit(vmap(jacfwd)) [first {fwd_points} points]"] = (
            call(fwd, tuple(a[:fwd_points] for a in args)), fwd_points)
    else:
        peers["JAX jit(vmap(jacfwd))"] = (call(fwd, args), None)
    return peers


def torch_peers(model, x, f, pinn):
    try:
        import torch
        from torch.func import hessian, jacrev, vmap
    except ImportError:
        return {}
    shapes = layout(model)
    acts = {"tanh": torch.tanh, "identity": lambda z: z}

    def u(theta, xs):
        h, off = xs, 0
        for n, k, act in shapes:
            W = theta[off:off + n * k].reshape(n, k)
            off += n * k
            h = acts[act](W @ h + theta[off:off + n])
            off += n
        return h

    theta = torch.tensor(cupynn.get_flat(model), dtype=torch.float64)
    xt = torch.tensor(np.ascontiguousarray(x), dtype=torch.float64)
    if pinn:
        ft = torch.tensor(f, dtype=torch.float64)

        def row(th, xs, fs):
            return torch.trace(hessian(lambda z: u(th, z)[0])(xs)) - fs
        fn = vmap(jacrev(row), in_dims=(None, 0, 0))

        def run():
            with torch.no_grad():
                return fn(theta, xt, ft).reshape(-1, theta.shape[0]).numpy()
    else:
        fn = vmap(jacrev(u), in_dims=(None, 0))

        def run():
            with torch.no_grad():
                return fn(theta, xt).reshape(-1, theta.shape[0]).numpy()
    return {"torch.func vmap(jacrev)": (run, None)}


# -- the measurement ------------------------------------------------------------------------

def measure(fn, repeats, first_s):
    """Median and minimum of ``repeats`` calls (after the warm-up call, which took
    ``first_s``); one call only when the warm-up took more than 20 s (JAX's jacfwd of the
    PINN residual: minutes per call)."""
    if first_s > 20:
        repeats = 1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def workload(name, quick):
    rng = np.random.default_rng(1)
    if name == "seed":
        model = seed_model(100 if quick else 1000)
        x = np.linspace(-1, 1, 100 if quick else 1000).reshape(-1, 1)
        return model, x, None, (lambda: cupynn.jacobian(model, x))
    model = cupynn.MLP([2, 32, 32, 32, 1], "tanh", device="cpu", rng=0)
    x = rng.uniform(size=(256 if quick else 4096, 2))
    f = -2 * np.pi ** 2 * np.sin(np.pi * x[:, 0]) * np.sin(np.pi * x[:, 1])
    return model, x, f, (lambda: cupynn.pde_jacobian(model, x, "poisson", rhs=f)[1] * np.sqrt(x.shape[0]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workloads", default="seed,pinn")
    ap.add_argument("--json", default="")
    ap.add_argument("--fwd-points", type=int, default=256,
                    help="JAX jacfwd of the PINN residual on at most this many points (minutes per call "
                         "at 4,096)")
    ap.add_argument("--fwd-points-seed", type=int, default=8,
                    help="JAX jacfwd of the seed network on at most this many samples (176 MB each)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "load_start": os.getloadavg(), "versions": {"cupynn": cupynn.__version__, "numpy": np.__version__},
              "workloads": {}}
    for lib in ("jax", "torch"):
        try:
            report["versions"][lib] = __import__(lib).__version__
        except ImportError:
            pass
    for name in args.workloads.split(","):
        model, x, f, ours = workload(name, args.quick)
        pinn = name == "pinn"
        impls = {"cupynn": (ours, None)}
        fwd_points = args.fwd_points if pinn else args.fwd_points_seed
        impls.update(jax_peers(model, x, f, pinn, fwd_points))
        impls.update(torch_peers(model, x, f, pinn))
        ref = ours()
        rows = {}
        for label, (fn, subset) in impls.items():  # the check, and the warm-up call (JIT compilation)
            t = time.perf_counter()
            got = fn()
            first = time.perf_counter() - t
            want = ref if subset is None else ref[:subset]
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            del got
            if err > 1e-10:
                raise SystemExit(f"{name}: {label} disagrees with cupynn (relative error {err:.2e})")
            rows[label] = {"check_rel_err": err, "first_call_s": first, "rows": int(want.shape[0])}
        for label, (fn, _) in impls.items():
            med, best = measure(fn, repeats, rows[label]["first_call_s"])
            rows[label].update(median_s=med, min_s=best)
        # the best peer among those that computed the whole Jacobian
        peers = [r["median_s"] for k, r in rows.items() if k != "cupynn" and r["rows"] == ref.shape[0]]
        ratio = rows["cupynn"]["median_s"] / min(peers) if peers else None
        report["workloads"][name] = {"shape": list(ref.shape), "rows": rows, "cupynn_vs_best_peer": ratio}
        print(f"{name}: Jacobian {ref.shape[0]:,} x {ref.shape[1]:,} float64 ({repeats} repeats)")
        for label, r in rows.items():
            print(f"  {label:26s} median {r['median_s'] * 1e3:9.1f} ms  min {r['min_s'] * 1e3:9.1f} ms  "
                  f"check {r['check_rel_err']:.1e}")
        if ratio is not None:
            print(f"  cupynn / best peer (median): {ratio:.2f}x")
    report["load_end"] = os.getloadavg()
    print(f"load average at start {report['load_start'][0]:.2f}, at end {report['load_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
