"""Training steps: one Adam step of cupynn against PyTorch + torch.optim and JAX + optax.

A step is the loss ``sum(net(x)**2)``, its gradient with respect to every parameter and
an Adam update (lr 1e-3, betas (0.9, 0.999), eps 1e-8) of all of them, on one batch:

* ``cupynn``: ``value_and_grad`` then ``opt.step(grads)`` (``cupynn.optim.Adam``);
* ``cupynn-graph``: ``step = cupynn.compile(model, "sum_squares", optimizer=opt)``,
  ``step(x)``: one CUDA graph (on the CPU the same call runs eagerly);
* ``torch`` / ``torch-foreach`` / ``torch-fused``: ``nn.Sequential``; ``zero_grad``,
  ``loss.backward()``, ``torch.optim.Adam(foreach=False | foreach=True | fused=True).step()``;
* ``jax-optax``: ``jax.jit`` of ``value_and_grad``, the ``optax.adam`` update and
  ``optax.apply_updates`` (parameters and state donated on GPU).

Each implementation runs its first step from the case's parameters on input 0, and the
loss and the updated parameters must match a float64 reference step (the plain network's
gradient, then the Adam formula) before the step is timed (inputs rotate as in the main
benchmark; the parameters keep training while timed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import timing
from .impls.base import Problem, Skip, import_reason
from .runner import Progress, close_quietly, compute_reference, make_problem, record_error, tolerance
from .workloads import Workload

__all__ = ["TRAIN_IMPLS", "TrainImpl", "TrainRunner", "run_train", "reference_step", "select_train"]

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


@dataclass
class TrainRunner:
    step: Callable[[int], Any]                 # one training step on input i; returns the loss
    params: Callable[[], list]                 # the current [(W, b)] as host arrays
    timer: str = "cpu"
    sync: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainImpl:
    name: str
    label: str
    prepare: Callable[[Problem], TrainRunner]
    needs: tuple[str, ...] = ()
    is_cupynn: bool = False
    family: str = ""  # the --peers name that selects it

    def unavailable(self, device: str) -> str | None:
        for module in self.needs:
            reason = import_reason(module)
            if reason:
                return reason
        if device == "cuda" and "torch" in self.needs:
            import torch

            if not torch.cuda.is_available():
                return "this PyTorch build sees no CUDA device"
        return None


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# -- cupynn -------------------------------------------------------------------------------

def _cupynn(compiled: bool):
    def prepare(problem: Problem) -> TrainRunner:
        import cupynn

        from .impls.cupynn_impl import _build, _close_for, _sync_for

        _xp, model, xs = _build(problem)
        opt = cupynn.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
        notes = []
        if compiled:
            train = cupynn.compile(model, "sum_squares", optimizer=opt)

            def step(i):
                return train(xs[i])

            if problem.device != "cuda":
                notes.append("no CUDA graph on the CPU: compile() runs the same step eagerly")
        else:
            def step(i):
                value, grads = cupynn.value_and_grad(model, xs[i], "sum_squares")
                opt.step(grads)
                return value

        def params():
            return [(_host(l.weight), _host(l.bias)) for l in model.layers]

        return TrainRunner(step, params, "cuda-event" if problem.device == "cuda" else "cpu",
                           _sync_for(problem.device), _close_for(problem.device, xs), notes)

    return prepare


# -- PyTorch --------------------------------------------------------------------------------

def _torch(variant: str):
    def prepare(problem: Problem) -> TrainRunner:
        from .impls.torch_impl import setup

        torch, dev, model = setup(problem)
        kw = {"foreach": False} if variant == "loop" else (
            {"foreach": True} if variant == "foreach" else {"fused": True})
        try:
            opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS, **kw)
        except (RuntimeError, ValueError, TypeError) as e:
            raise Skip(f"torch.optim.Adam({kw}) unavailable here: {e}") from None
        xs = [torch.from_numpy(x).to(dev) for x in problem.inputs]

        def step(i):
            opt.zero_grad(set_to_none=True)
            loss = (model(xs[i]) ** 2).sum()
            loss.backward()
            opt.step()
            return loss.detach()

        def params():
            ps = [p.detach().cpu().numpy().copy() for p in model.parameters()]
            return list(zip(ps[0::2], ps[1::2]))

        def sync():
            if dev == "cuda":
                torch.cuda.synchronize()

        def close():
            xs.clear()
            if dev == "cuda":
                torch.cuda.empty_cache()

        return TrainRunner(step, params, "cuda-event" if dev == "cuda" else "cpu", sync, close)

    return prepare


# -- JAX + optax ------------------------------------------------------------------------------

def _jax_optax(problem: Problem) -> TrainRunner:
    from .impls.jax_impl import setup

    jax, loss, params, xs = setup(problem)
    import optax

    gpu = problem.device == "cuda"
    tx = optax.adam(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS)

    def train_step(params, opt_state, x):
        value, grads = jax.value_and_grad(loss)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    # Donating the parameters and the optimizer state lets XLA update them in place (GPU;
    # the CPU backend ignores donation with a warning, so it is not asked for there).
    jitted = jax.jit(train_step, donate_argnums=(0, 1) if gpu else ())
    held = [params, tx.init(params)]

    def step(i):
        p, s, value = jitted(held[0], held[1], xs[i])
        held[0], held[1] = p, s
        return jax.block_until_ready((p, s, value))[2]

    def current():
        return [(np.asarray(W), np.asarray(b)) for W, b in held[0]]

    return TrainRunner(step, current, "wall-sync" if gpu else "cpu",
                       close=lambda: (xs.clear(), held.clear()))


TRAIN_IMPLS = [
    TrainImpl("cupynn", "cupynn", _cupynn(False), is_cupynn=True, family="cupynn"),
    TrainImpl("cupynn-graph", "cupynn compiled", _cupynn(True), is_cupynn=True,
              family="cupynn-graph"),
    TrainImpl("torch", "PyTorch eager + Adam", _torch("loop"), ("torch",), family="torch"),
    TrainImpl("torch-foreach", "PyTorch eager + Adam(foreach)", _torch("foreach"), ("torch",),
              family="torch"),
    TrainImpl("torch-fused", "PyTorch eager + Adam(fused)", _torch("fused"), ("torch",),
              family="torch"),
    TrainImpl("jax-optax", "JAX jit + optax.adam", _jax_optax, ("jax", "optax"), family="jax"),
]


def select_train(peers: str | None) -> list[TrainImpl]:
    """The training-step implementations for ``--peers``: all of them for None, "default",
    "all" or "none" (``--peers none --train``: the training table alone), else those whose
    family (cupynn, cupynn-graph, torch, jax) is named."""
    if peers in (None, "", "default", "all", "none"):
        return list(TRAIN_IMPLS)
    names = {n.strip() for n in peers.replace(" ", ",").split(",") if n.strip()}
    return [i for i in TRAIN_IMPLS if i.family in names]


def reference_step(problem: Problem):
    """(loss, [(W, b)] after one Adam step) in float64, from the case's parameters."""
    loss, grads = compute_reference(problem)
    out = []
    for (W, b), (dW, db) in zip(problem.params, grads):
        # step 1: m_hat = g, sqrt(v_hat) = |g|
        out.append(tuple(np.asarray(p, np.float64) - LR * g / (np.abs(g) + EPS)
                         for p, g in ((W, dW), (b, db))))
    return loss, out


def _rel(got, want) -> float:
    worst = 0.0
    for (W, b), (rW, rb) in zip(got, want):
        for a, r in ((W, rW), (b, rb)):
            a = np.asarray(a, np.float64)
            if a.shape != r.shape or not np.all(np.isfinite(a)):
                return float("inf")
            worst = max(worst, float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-300)))
    return worst


def run_train(cases: list[tuple[Workload, str]], device: str, *, budget_s: float, cap_s: float,
              floor_s: float = 0.05, seed: int = 0, progress: bool = True,
              impls: list[TrainImpl] | None = None) -> list[dict]:
    """One Adam step per implementation and case: checked, then timed."""
    impls = TRAIN_IMPLS if impls is None else impls
    todo = [(w, dt, impl, impl.unavailable(device)) for w, dt in cases for impl in impls]
    n_measure = sum(1 for *_, reason in todo if reason is None)
    prog = Progress(n_measure, progress)
    budget = timing.TimeBudget(budget_s, n_measure, floor_s=floor_s, cap_s=cap_s)
    results, cache = [], {}
    for w, dtype, impl, reason in todo:
        res = {"workload": w.name, "shape": w.shape, "batch": w.batch, "dtype": dtype,
               "device": device, "impl": impl.name, "label": impl.label,
               "is_cupynn": impl.is_cupynn, "status": "skipped", "reason": reason or ""}
        results.append(res)
        if reason:
            continue
        key = (w.name, w.batch, dtype)
        if key not in cache:
            prog(f"train {w.name} {dtype}: float64 reference step")
            problem = make_problem(w, dtype, device, seed)
            cache.clear()
            cache[key] = (problem, reference_step(problem))
        problem, (ref_loss, ref_params) = cache[key]
        tol = tolerance(dtype, 0.0, w.batch)
        runner = None
        try:
            prog(f"train {w.name} {dtype} {impl.label}: prepare + check")
            runner = impl.prepare(problem)
            t = time.perf_counter()
            loss = float(_host(runner.step(0)))
            runner.sync()
            first = time.perf_counter() - t
            err_p = _rel(runner.params(), ref_params)
            err_l = abs(loss - ref_loss) / abs(ref_loss)
            res["check"] = {"tolerance": tol, "loss_rel_err": err_l, "params_rel_err": err_p}
            res["first_call_s"] = first
            if not (err_p <= tol and err_l <= tol):
                res["status"] = "wrong"
                res["reason"] = (f"first step does not match the float64 reference: loss "
                                 f"{err_l:.2e}, parameters {err_p:.2e} > {tol:.0e}")
                budget.done()
                continue
            prog(f"train {w.name} {dtype} {impl.label}: timing")
            stats = timing.measure(runner.step, n_inputs=len(problem.inputs),
                                   budget_s=budget.per_measurement(), timer=runner.timer,
                                   sync=runner.sync)
            budget.done()
            res["step"] = stats.to_dict()
            res["status"] = "ok"
            res["timer"] = runner.timer
            res["notes"] = runner.notes
        except Skip as e:
            res["reason"] = str(e)
            budget.done()
        except Exception as e:  # one failing peer must not end the sweep
            record_error(res, e)
            budget.done()
        finally:
            prog.done += 1
            close_quietly(runner)
    best: dict = {}
    for r in results:
        if r["status"] == "ok" and not r["is_cupynn"]:
            k = (r["workload"], r["batch"], r["dtype"])
            best[k] = min(best.get(k, float("inf")), r["step"]["median_s"])
    for r in results:
        if r["status"] == "ok":
            b = best.get((r["workload"], r["batch"], r["dtype"]))
            r["vs_best_peer"] = r["step"]["median_s"] / b if b else None
    return results
