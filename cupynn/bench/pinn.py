"""The ``pinn`` workload: the parameter gradient of a Poisson residual loss.

``python -m cupynn bench pinn`` times one physics-informed training step: a
2→64→64→64→1 tanh network ``u(x, y)`` on 2^16 collocation points of the unit square,
the loss ``mean((Δu - f)²)`` with ``f = -2π² sin(πx) sin(πy)``, and its gradient with
respect to every weight and bias, in float64 (``--quick``: 1,024 points). Every
implementation runs in the same process on the same data:

- ``cupynn``: :func:`cupynn.residual_value_and_grad` (the forward Laplacian, d + 2
  forwards and their hand-written reverse);
- ``jax-jvp``: ``jit(value_and_grad(loss))`` with Δu by ``jvp`` of ``grad`` along each
  input (forward over reverse), ``vmap`` over the points;
- ``jax-hessian``: the same with ``trace(jax.hessian(u))``;
- ``torch-func``: ``torch.func.vmap(torch.func.hessian(u))``, then ``torch.autograd.grad``;
- ``torch-double``: double backward (``create_graph=True``) along each input.

Before any timing, each implementation's loss and gradient must agree with cupynn's NumPy
backend in float64 to 1e-9 (relative norm over all gradient entries); a mismatch is
reported as ``wrong`` and not timed. Peers run where importable.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import report, timing
from .impls.base import Skip, import_reason
from .runner import record_error

__all__ = ["PinnProblem", "make_problem", "run", "table", "markdown_table", "IMPLS", "SIZES",
           "BATCH", "QUICK_BATCH"]

SIZES = (2, 64, 64, 64, 1)
BATCH = 1 << 16
QUICK_BATCH = 1 << 10
TOLERANCE = 1e-9


@dataclass
class PinnProblem:
    params: list  # [(W, b)] float64 host arrays
    x: np.ndarray  # (batch, 2)
    f: np.ndarray  # (batch,)
    device: str

    @property
    def batch(self) -> int:
        return self.x.shape[0]


def make_problem(batch: int, device: str, seed: int = 0) -> PinnProblem:
    rng = np.random.default_rng(seed)
    params = [(rng.standard_normal((o, i)) / math.sqrt(i), 0.1 * rng.standard_normal(o))
              for i, o in zip(SIZES, SIZES[1:])]
    x = rng.uniform(0.0, 1.0, (batch, 2))
    f = -2 * math.pi ** 2 * np.sin(math.pi * x[:, 0]) * np.sin(math.pi * x[:, 1])
    return PinnProblem(params, x, f, device)


def _acts(n_layers: int) -> list[str]:
    return ["tanh"] * (n_layers - 1) + ["identity"]


# -- implementations: prepare(problem) -> (step, fetch, sync) -----------------------------

def _cupynn(problem: PinnProblem):
    import cupynn

    layers = [cupynn.Dense.from_arrays(W, b, a)
              for (W, b), a in zip(problem.params, _acts(len(problem.params)))]
    model = cupynn.Chain(*layers).to(problem.device)
    xp = cupynn.backends.get_backend(problem.device).xp
    x, f = xp.asarray(problem.x), xp.asarray(problem.f)
    to_host = cupynn.backends.get_backend(problem.device).to_host

    def fetch(res):
        v, g = res
        return float(v), [(to_host(p["weight"]), to_host(p["bias"])) for p in g]

    sync = (lambda: xp.cuda.Device().synchronize()) if problem.device == "cuda" else (lambda: None)
    return (lambda: cupynn.residual_value_and_grad(model, x, "poisson", rhs=f)), fetch, sync


def _jax(problem: PinnProblem, variant: str):
    from .impls.jax_impl import _jax as load_jax

    jax = load_jax()
    import jax.numpy as jnp

    try:
        dev = jax.devices("gpu" if problem.device == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise Skip(f"JAX has no {problem.device} backend here ({str(e).splitlines()[0][:100]})") from None
    params = [(jax.device_put(W, dev), jax.device_put(b, dev)) for W, b in problem.params]
    x, f = jax.device_put(problem.x, dev), jax.device_put(problem.f, dev)
    n = len(params)

    def u(p, xx):
        h = xx
        for i, (W, b) in enumerate(p):
            h = jnp.matmul(h, W.T, precision="highest") + b
            if i < n - 1:
                h = jnp.tanh(h)
        return h[0]

    d = problem.x.shape[1]
    if variant == "jvp":
        def lap(p, xx):
            g = jax.grad(u, argnums=1)
            eye = jnp.eye(d, dtype=xx.dtype)
            return sum(jax.jvp(lambda y: g(p, y), (xx,), (eye[i],))[1][i] for i in range(d))
    else:
        def lap(p, xx):
            return jnp.trace(jax.hessian(u, argnums=1)(p, xx))

    def loss(p):
        r = jax.vmap(lap, in_axes=(None, 0))(p, x) - f
        return jnp.mean(r * r)

    vg = jax.jit(jax.value_and_grad(loss))

    def fetch(res):
        v, g = res
        return float(v), [(np.asarray(dW), np.asarray(db)) for dW, db in g]

    return (lambda: jax.block_until_ready(vg(params))), fetch, (lambda: None)


def _torch(problem: PinnProblem, variant: str):
    import torch

    if problem.device == "cuda" and not torch.cuda.is_available():
        raise Skip("this PyTorch build sees no CUDA device")
    dev = "cuda" if problem.device == "cuda" else "cpu"
    params = [(torch.tensor(W, device=dev, requires_grad=True),
               torch.tensor(b, device=dev, requires_grad=True)) for W, b in problem.params]
    flat = [t for pair in params for t in pair]
    x, f = torch.tensor(problem.x, device=dev), torch.tensor(problem.f, device=dev)
    n, d = len(params), problem.x.shape[1]

    def net(p, xx):
        h = xx
        for i, (W, b) in enumerate(p):
            h = h @ W.T + b
            if i < n - 1:
                h = torch.tanh(h)
        return h

    if variant == "func":
        from torch.func import hessian, vmap

        def lap():
            H = vmap(hessian(lambda p, xx: net(p, xx)[0], argnums=1), in_dims=(None, 0))(params, x)
            return H.diagonal(dim1=1, dim2=2).sum(1)
    else:
        def lap():
            xx = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net(params, xx).sum(), xx, create_graph=True)
            return sum(torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0][:, i]
                       for i in range(d))

    def step():
        r = lap() - f
        loss = (r * r).mean()
        grads = torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True)
        return loss.detach(), grads

    def fetch(res):
        loss, grads = res
        host = [g.detach().cpu().numpy() for g in grads]
        return float(loss), list(zip(host[0::2], host[1::2]))

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return step, fetch, sync


@dataclass(frozen=True)
class PinnImpl:
    name: str
    label: str
    module: str | None  # the peer library, None for cupynn

    def unavailable(self) -> str | None:
        return None if self.module is None else import_reason(self.module)

    def prepare(self, problem: PinnProblem):
        if self.name == "cupynn":
            return _cupynn(problem)
        lib, variant = self.name.split("-")
        return (_jax if lib == "jax" else _torch)(problem, variant)


IMPLS = (
    PinnImpl("cupynn", "cupynn (forward Laplacian)", None),
    PinnImpl("jax-jvp", "JAX jit, jvp of grad", "jax"),
    PinnImpl("jax-hessian", "JAX jit, jax.hessian", "jax"),
    PinnImpl("torch-func", "PyTorch torch.func.hessian", "torch"),
    PinnImpl("torch-double", "PyTorch double backward", "torch"),
)


def reference(problem: PinnProblem):
    """cupynn's NumPy backend in float64: (loss, [(dW, db)])."""
    step, fetch, _ = _cupynn(PinnProblem(problem.params, problem.x, problem.f, "cpu"))
    return fetch(step())


def relative_error(got, ref) -> float:
    """max(|loss - ref| / |ref|, ||grads - ref|| / ||ref||) over all gradient entries."""
    (v, g), (vr, gr) = got, ref
    flat = np.concatenate([np.ravel(a) for pair in g for a in pair])
    flat_r = np.concatenate([np.ravel(a) for pair in gr for a in pair])
    return max(abs(v - vr) / abs(vr), float(np.linalg.norm(flat - flat_r) / np.linalg.norm(flat_r)))


def run(device: str, *, quick: bool = False, batch: int | None = None, budget_s: float = 20.0,
        cap_s: float = 2.0, seed: int = 0, libraries: set[str] | None = None,
        progress: bool = True) -> list[dict]:
    """Check, then time, cupynn and every importable peer whose library (``"jax"``,
    ``"torch"``) is in ``libraries`` (None: all); one result dict each."""
    n = batch or (QUICK_BATCH if quick else BATCH)
    problem = make_problem(n, device, seed)
    say = (lambda s: print(f"[pinn] {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
    say(f"batch {n:,}: float64 reference (cupynn, NumPy backend)")
    ref = reference(problem)
    impls = [i for i in IMPLS if i.module is None or libraries is None or i.module in libraries]
    budget = timing.TimeBudget(budget_s, len(impls), floor_s=0.01 if quick else 0.05, cap_s=cap_s)
    results = []
    for impl in impls:
        res = {"workload": "pinn", "shape": "→".join(map(str, SIZES)), "batch": n,
               "dtype": "float64", "device": device, "impl": impl.name, "label": impl.label,
               "is_cupynn": impl.module is None, "status": "skipped", "reason": ""}
        results.append(res)
        reason = impl.unavailable()
        if reason:
            res["reason"] = reason
            budget.done()
            continue
        try:
            say(f"{impl.label}: prepare + check")
            step, fetch, sync = impl.prepare(problem)
            t = time.perf_counter()
            out = step()
            sync()
            res["first_call_s"] = time.perf_counter() - t
            got = fetch(out)
            err = relative_error(got, ref)
            res["loss"], res["check"] = got[0], {"tolerance": TOLERANCE, "rel_err": err}
            if not err <= TOLERANCE:
                res["status"] = "wrong"
                res["reason"] = (f"does not match cupynn's NumPy float64 result: rel. error "
                                 f"{err:.2e} > {TOLERANCE:.0e}")
                budget.done()
                continue
            say(f"{impl.label}: timing")
            stats = timing.measure(lambda i, step=step: step(), budget_s=budget.per_measurement(),
                                   timer="wall-sync" if device == "cuda" else "cpu", sync=sync,
                                   min_runs=3)
            budget.done()
            res["gradient"] = stats.to_dict()
            res["status"] = "ok"
        except Skip as e:
            res["reason"] = str(e)
        except Exception as e:  # one failing peer must not end the run
            record_error(res, e)
    best = min((r["gradient"]["median_s"] for r in results
                if r["status"] == "ok" and not r["is_cupynn"]), default=None)
    for r in results:
        if r["status"] == "ok":
            r["vs_best_peer"] = r["gradient"]["median_s"] / best if best else None
    return results


def table(results) -> str:
    """The results as an aligned text table (``report`` formats every table)."""
    return report.pinn_table(results)


def markdown_table(results) -> str:
    """The results as a Markdown table."""
    return report.pinn_markdown_table(results)
