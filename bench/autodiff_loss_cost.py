"""What a loss differentiated by JAX or PyTorch costs against the same loss with a
hand-written ``dL/dy``, and what ``cupynn.torch.Module``'s training step costs against
cupynn's own: all measured in the same run, the calls interleaved.

The seed network (1 -> 1000 -> 20 -> 1, identity, float64) at batch 10,000 by default.
Every repetition runs each variant once in turn, so the per-repetition ratios compare them
under the same load (the machine may be shared); the medians of those ratios are printed.
Losses (each written three ways: NumPy with its hand-derived gradient, ``jax.numpy`` through
``cupynn.jax.loss``, torch through ``cupynn.torch.loss``):

* ``sum_squares``: ``sum(y**2)``;
* ``logsumexp``: ``log sum exp(y)`` over the whole batch (it couples the samples).

Module step: ``loss = (net(x)**2).sum(); loss.backward()`` through ``cupynn.torch.Module``
against ``cupynn.value_and_grad(model, x, "sum_squares")`` (the same value and gradients).

    python bench/autodiff_loss_cost.py                       # batch 10,000, 15 repetitions
    python bench/autodiff_loss_cost.py --batch 200 --reps 3  # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _hand_losses():
    def sum_squares(y):
        return (y * y).sum(), 2 * y

    def logsumexp(y):
        m = y.max()
        e = np.exp(y - m)
        s = e.sum()
        return m + np.log(s), e / s

    return {"sum_squares": sum_squares, "logsumexp": logsumexp}


def variants():
    """{loss name: {library: loss callable}} for the libraries importable here."""
    import cupynn  # noqa: F401

    out = {name: {"hand": fn} for name, fn in _hand_losses().items()}
    try:
        import jax
        import jax.numpy as jnp

        import cupynn.jax

        jax.config.update("jax_enable_x64", True)
        out["sum_squares"]["jax"] = cupynn.jax.loss(lambda y: jnp.sum(y * y))
        out["logsumexp"]["jax"] = cupynn.jax.loss(lambda y: jax.nn.logsumexp(y))
    except ImportError as e:
        print(f"JAX not measured: {e}")
    try:
        import torch

        import cupynn.torch

        out["sum_squares"]["torch"] = cupynn.torch.loss(lambda y: (y * y).sum())
        out["logsumexp"]["torch"] = cupynn.torch.loss(lambda y: torch.logsumexp(y.reshape(-1), 0))
    except ImportError as e:
        print(f"PyTorch not measured: {e}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    import cupynn

    model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cpu", rng=0)
    x = np.random.default_rng(0).standard_normal((args.batch, 1))
    table = variants()

    calls = {}
    for name, libs in table.items():
        for lib, fn in libs.items():
            calls[(name, lib)] = (lambda f=fn: cupynn.value_and_grad(model, x, f))
    ref = {}
    for (name, lib), call in calls.items():  # every variant gives the same value and gradient
        v, g = call()
        flat = np.concatenate([a.ravel() for d in g for a in (d["weight"], d["bias"])])
        if lib == "hand":
            ref[name] = (float(v), flat)
        else:
            rv, rf = ref[name]
            err = np.linalg.norm(flat - rf) / np.linalg.norm(rf)
            assert abs(float(v) - rv) <= 1e-12 * abs(rv) and err <= 1e-12, (name, lib, err)

    try:
        import torch

        import cupynn.torch

        net = cupynn.torch.Module(model)
        xt = torch.from_numpy(x)

        def module_step():
            for q in net.parameters():
                q.grad = None
            (net(xt) ** 2).sum().backward()

        calls[("step", "torch.Module")] = module_step
        calls[("step", "native")] = lambda: cupynn.value_and_grad(model, x, "sum_squares")
    except ImportError:
        pass

    times = {k: [] for k in calls}
    for rep in range(args.warmup + args.reps):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            if rep >= args.warmup:
                times[k].append(time.perf_counter() - t0)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"seed network 1->1000->20->1 identity, float64, batch {args.batch}, {args.reps} "
          f"interleaved repetitions, load average {load:.2f} on {os.cpu_count()} CPUs")
    results = {}
    for (name, lib), ts in times.items():
        base = ("step", "native") if name == "step" else (name, "hand")
        ratio = float(np.median(np.array(ts) / np.array(times[base])))
        results[(name, lib)] = (float(np.median(ts)), ratio)
        print(f"  {name:12s} {lib:13s} {1e3 * np.median(ts):8.2f} ms   x{ratio:.3f} of "
              f"{'cupynn native' if name == 'step' else 'the hand-written dL/dy'}")
    return results


if __name__ == "__main__":
    main()
