"""JAX peer: ``jax.jit`` of the loss and of ``jax.value_and_grad`` of it.

float64 runs with x64 enabled; float32 products at ``precision="highest"``
(no TF32). GPU memory preallocation is turned off (unless the user set it)
so JAX does not take 75% of the card from the other implementations.
JAX dispatches asynchronously on non-blocking streams: every call here ends
in ``block_until_ready``, and it is timed with the wall clock.
"""

from __future__ import annotations

import os

import numpy as np

from .base import Implementation, Problem, Runner, Skip, import_reason


def _jax():
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def setup(problem: Problem):
    """``(jax, loss, params, xs)``: the problem's ``loss(params, x) = sum(net(x)**2)`` as
    JAX code (full-precision products), its parameters and inputs on its device."""
    jax = _jax()
    import jax.numpy as jnp

    acts = problem.activations
    fns = {"identity": lambda z: z, "relu": jax.nn.relu, "tanh": jnp.tanh,
           "sigmoid": jax.nn.sigmoid}
    if any(a not in fns for a in acts):
        raise Skip(f"activation not mapped to jax: {acts}")
    dev = jax.devices("gpu" if problem.device == "cuda" else "cpu")[0]
    params = [(jax.device_put(W, dev), jax.device_put(b, dev)) for W, b in problem.params]
    xs = [jax.device_put(x, dev) for x in problem.inputs]

    def loss(params, x):
        h = x
        for (W, b), act in zip(params, acts):
            h = fns[act](jnp.matmul(h, W.T, precision="highest") + b)
        return jnp.sum(h ** 2)

    return jax, loss, params, xs


class JaxImpl(Implementation):
    name, label = "jax", "JAX jit"
    memory_factor = 3.0

    def unavailable(self, device):
        reason = super().unavailable(device) or import_reason("jax")
        if reason:
            return reason
        jax = _jax()
        try:
            jax.devices("gpu" if device == "cuda" else "cpu")
        except RuntimeError as e:
            return f"JAX has no {device} backend here ({str(e).splitlines()[0][:120]})"
        return None

    def versions(self):
        jax = _jax()
        return {"jax": jax.__version__}

    def prepare(self, problem: Problem) -> Runner:
        jax, loss, params, xs = setup(problem)
        import jax.numpy as jnp

        fwd = jax.jit(loss)
        vg = jax.jit(jax.value_and_grad(loss))

        def fetch_gradient(res):
            value, grads = res
            return float(value), [(np.asarray(dW), np.asarray(db)) for dW, db in grads]

        def thread_forward(n):
            x, total = xs[0], 0.0
            for i in range(n):
                total = total + fwd(params, x[i])
            return jax.block_until_ready(total)

        def thread_gradient(n):
            x, total, acc = xs[0], 0.0, None
            for i in range(n):
                value, grads = vg(params, x[i])
                total = total + value
                acc = grads if acc is None else jax.tree_util.tree_map(jnp.add, acc, grads)
            return jax.block_until_ready((total, acc))

        return Runner(
            forward=lambda i: fwd(params, xs[i]).block_until_ready(),
            gradient=lambda i: jax.block_until_ready(vg(params, xs[i])),
            fetch_forward=float,
            fetch_gradient=fetch_gradient,
            timer="wall-sync" if problem.device == "cuda" else "cpu",
            close=lambda: (xs.clear(), params.clear()),
            thread_forward=thread_forward,
            thread_gradient=thread_gradient,
        )


JAX = JaxImpl()
