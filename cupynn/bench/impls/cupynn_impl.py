"""cupynn itself: the plain call, and the graph-captured step where the CUDA backend offers one."""

from __future__ import annotations

import numpy as np

from .base import Implementation, Problem, Runner, Skip


def _to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _backend_reason(device: str) -> str | None:
    try:
        from cupynn.backends import get_backend

        get_backend(device)
    except Exception as e:
        return f"cupynn's {device} backend is not usable ({type(e).__name__}: {e})"
    return None


def _build(problem: Problem):
    import cupynn

    if problem.device == "cuda":
        import cupy as xp
    else:
        xp = np
    layers = [
        cupynn.Dense.from_arrays(xp.asarray(W), xp.asarray(b), activation=act)
        for (W, b), act in zip(problem.params, problem.activations)
    ]
    model = cupynn.Chain(*layers)
    xs = [xp.asarray(x) for x in problem.inputs]
    return xp, model, xs


def _fetch_gradient(res):
    value, grads = res[0], res[1]
    return float(value), [(_to_host(g["weight"]), _to_host(g["bias"])) for g in grads]


def _sync_for(device):
    if device != "cuda":
        return lambda: None
    import cupy

    return lambda: cupy.cuda.Device().synchronize()


def _close_for(device, *holders):
    def close():
        for h in holders:
            h.clear()
        if device == "cuda":
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()

    return close


def _compile_fn():
    """``cupynn.compile``, or ``cupynn.graph.compile`` before it is re-exported; else None."""
    import cupynn

    fn = getattr(cupynn, "compile", None)
    if fn is None:
        try:
            from cupynn.graph import compile as fn
        except ImportError:
            return None
    return fn if callable(fn) else None


class Cupynn(Implementation):
    name, label, is_cupynn = "cupynn", "cupynn", True
    memory_factor = 1.5

    def unavailable(self, device):
        return super().unavailable(device) or _backend_reason(device)

    def versions(self):
        import cupynn

        return {"cupynn": cupynn.__version__}

    def prepare(self, problem: Problem) -> Runner:
        import cupynn

        xp, model, xs = _build(problem)
        sync = _sync_for(problem.device)

        def forward(i):
            y = model(xs[i])
            return (y ** 2).sum()

        def gradient(i):
            return cupynn.value_and_grad(model, xs[i], "sum_squares")

        def thread_forward(n):
            x, total = xs[0], 0.0
            for i in range(n):
                y = model(x[i])
                total = total + (y ** 2).sum()
            sync()
            return total

        def thread_gradient(n):
            x, total, acc = xs[0], 0.0, None
            for i in range(n):
                value, grads = cupynn.value_and_grad(model, x[i], "sum_squares")
                total = total + value
                if acc is None:
                    acc = [{k: v.copy() for k, v in g.items()} for g in grads]
                else:
                    for a, g in zip(acc, grads):
                        a["weight"] += g["weight"]
                        a["bias"] += g["bias"]
            sync()
            return total, acc

        holder = [model]
        return Runner(
            forward=forward,
            gradient=gradient,
            fetch_forward=float,
            fetch_gradient=_fetch_gradient,
            timer="cuda-event" if problem.device == "cuda" else "cpu",
            sync=sync,
            close=_close_for(problem.device, xs, holder),
            thread_forward=thread_forward,
            thread_gradient=thread_gradient,
        )


class CupynnGraph(Implementation):
    """``cupynn.compile(model, loss)``: one CUDA graph launch per step."""

    name, label, is_cupynn = "cupynn-graph", "cupynn graph", True
    devices = ("cuda",)
    memory_factor = 1.5

    def unavailable(self, device):
        reason = super().unavailable(device) or _backend_reason(device)
        if reason:
            return reason
        if _compile_fn() is None:
            return "cupynn.compile is not available in this build (cupynn/graph.py)"
        return None

    def prepare(self, problem: Problem) -> Runner:

        xp, model, xs = _build(problem)
        try:
            step = _compile_fn()(model, "sum_squares")
        except Exception as e:
            raise Skip(f"cupynn.compile refused this model ({type(e).__name__}: {e})") from e
        fwd = getattr(step, "forward", None)
        return Runner(
            forward=(lambda i: fwd(xs[i])) if callable(fwd) else None,
            gradient=lambda i: step(xs[i]),
            fetch_forward=float,
            fetch_gradient=_fetch_gradient,
            timer="cuda-event",
            sync=_sync_for("cuda"),
            close=_close_for("cuda", xs, [model, step]),
        )


CUPYNN = Cupynn()
CUPYNN_GRAPH = CupynnGraph()
