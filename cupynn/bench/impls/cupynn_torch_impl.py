"""cupynn inside a PyTorch program: ``cupynn.torch.Module`` driven the way torch users drive it.

The forward is ``(net(x) ** 2).sum()`` under ``torch.no_grad()``; the gradient is
``loss = (net(x) ** 2).sum(); loss.backward()`` with the Parameters' ``.grad``
cleared first (set to None, as ``optimizer.zero_grad()`` does). Beside the plain
PyTorch rows of the same run, it shows what the wrapper (torch's autograd, DLPack,
the loss ``sum(y * g)`` of its backward) costs on top of cupynn.
"""

from __future__ import annotations

from .base import Implementation, Problem, Runner
from .cupynn_impl import _backend_reason
from .torch_impl import _torch_reason


class CupynnTorch(Implementation):
    name, label, is_cupynn = "cupynn-torch", "cupynn via torch", True
    memory_factor = 2.0

    def unavailable(self, device):
        return (super().unavailable(device) or _torch_reason(device)
                or _backend_reason(device))

    def versions(self):
        import torch

        return {"torch": torch.__version__}

    def prepare(self, problem: Problem) -> Runner:
        import torch

        import cupynn
        import cupynn.torch

        dev = "cuda" if problem.device == "cuda" else "cpu"
        dtype = getattr(torch, problem.dtype)
        layers = [
            cupynn.Dense.from_arrays(torch.from_numpy(W).to(dev), torch.from_numpy(b).to(dev),
                                     activation=act)
            for (W, b), act in zip(problem.params, problem.activations)
        ]
        net = cupynn.torch.Module(cupynn.Chain(*layers))
        params = list(net.parameters())
        xs = [torch.from_numpy(x).to(device=dev, dtype=dtype) for x in problem.inputs]

        def forward(i):
            with torch.no_grad():
                return (net(xs[i]) ** 2).sum()

        def gradient(i):
            for p in params:
                p.grad = None
            loss = (net(xs[i]) ** 2).sum()
            loss.backward()
            return loss.detach(), [p.grad for p in params]

        def fetch_gradient(res):
            loss, grads = res
            host = [g.detach().cpu().numpy() for g in grads]
            return float(loss), list(zip(host[0::2], host[1::2]))

        def sync():
            if dev == "cuda":
                torch.cuda.synchronize()

        def close():
            xs.clear()
            params.clear()
            if dev == "cuda":
                import cupy

                cupy.get_default_memory_pool().free_all_blocks()
                torch.cuda.empty_cache()

        return Runner(
            forward=forward,
            gradient=gradient,
            fetch_forward=float,
            fetch_gradient=fetch_gradient,
            # torch's current stream is the legacy null stream, on which cupynn.torch
            # launches too: CuPy's events see both.
            timer="cuda-event" if dev == "cuda" else "cpu",
            sync=sync,
            close=close,
        )


CUPYNN_TORCH = CupynnTorch()
