"""The plain NumPy and CuPy peers: :mod:`cupynn.bench.reference` on the device's array module.

On the GPU this is cuBLAS for the products plus one CuPy elementwise kernel
each for the bias, the activation and its derivative: what a user gets by
porting NumPy code to CuPy line for line.
"""

from __future__ import annotations

import numpy as np

from .. import reference
from .base import Implementation, Problem, Runner, Skip, import_reason


def _accumulate(acc, grads):
    if acc is None:
        return [(dW.copy(), db.copy()) for dW, db in grads]
    for (aW, ab), (dW, db) in zip(acc, grads):
        aW += dW
        ab += db
    return acc


class NaiveArrays(Implementation):
    memory_factor = 3.0

    def __init__(self, name: str, label: str, module: str, device: str):
        self.name, self.label, self.module, self.devices = name, label, module, (device,)

    def unavailable(self, device):
        return super().unavailable(device) or import_reason(self.module)

    def versions(self):
        import importlib

        return {self.module: importlib.import_module(self.module).__version__}

    def prepare(self, problem: Problem) -> Runner:
        import importlib

        xp = importlib.import_module(self.module)
        acts = problem.activations
        params = [(xp.asarray(W), xp.asarray(b)) for W, b in problem.params]
        xs = [xp.asarray(x) for x in problem.inputs]
        on_gpu = self.module == "cupy"

        def to_host(a):
            return a.get() if on_gpu else np.asarray(a)

        def sync():
            if on_gpu:
                xp.cuda.Device().synchronize()

        def fetch_gradient(res):
            loss, grads = res
            return float(loss), [(to_host(dW), to_host(db)) for dW, db in grads]

        def thread_forward(n):
            x, total = xs[0], 0.0
            for i in range(n):
                total = total + reference.forward_loss(xp, params, acts, x[i:i + 1])
            sync()
            return total

        def thread_gradient(n):
            x, total, acc = xs[0], 0.0, None
            for i in range(n):
                loss, grads = reference.value_and_grad(xp, params, acts, x[i:i + 1])
                total = total + loss
                acc = _accumulate(acc, grads)
            sync()
            return total, acc

        def close():
            params.clear()
            xs.clear()
            if on_gpu:
                xp.get_default_memory_pool().free_all_blocks()

        return Runner(
            forward=lambda i: reference.forward_loss(xp, params, acts, xs[i]),
            gradient=lambda i: reference.value_and_grad(xp, params, acts, xs[i]),
            fetch_forward=float,
            fetch_gradient=fetch_gradient,
            timer="cuda-event" if on_gpu else "cpu",
            sync=sync,
            close=close,
            thread_forward=thread_forward,
            thread_gradient=thread_gradient,
        )


def _cuda_reason() -> str | None:
    reason = import_reason("cupy")
    if reason:
        return reason
    import cupy

    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    return None


class NaiveCupy(NaiveArrays):
    def __init__(self):
        super().__init__("cupy", "naive CuPy", "cupy", "cuda")

    def unavailable(self, device):
        return Implementation.unavailable(self, device) or _cuda_reason()


NUMPY = NaiveArrays("numpy", "naive NumPy", "numpy", "cpu")
CUPY = NaiveCupy()

__all__ = ["NUMPY", "CUPY", "Skip"]
