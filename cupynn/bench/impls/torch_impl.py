"""PyTorch peers: eager, and ``torch.compile`` in its default and "reduce-overhead" modes.

The model is what a PyTorch user writes: ``nn.Sequential`` of ``nn.Linear``
and activation modules, the loss ``(model(x) ** 2).sum()``, the forward under
``torch.no_grad()``, the gradient by ``torch.autograd.grad`` over the
parameters. float32 runs in strict FP32 (TF32 off).
"""

from __future__ import annotations

from .base import Implementation, Problem, Runner, Skip, import_reason


def _torch_reason(device: str) -> str | None:
    reason = import_reason("torch")
    if reason or device != "cuda":
        return reason
    import torch

    if not torch.cuda.is_available():
        return "this PyTorch build sees no CUDA device"
    return None


def _make_model(torch, problem: Problem, dev: str):
    nn = torch.nn
    modules = {"identity": None, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    dtype = getattr(torch, problem.dtype)
    layers = []
    for (W, b), act in zip(problem.params, problem.activations):
        lin = nn.Linear(W.shape[1], W.shape[0], device=dev, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if modules[act] is not None:
            layers.append(modules[act]())
    return nn.Sequential(*layers)


def setup(problem: Problem):
    """``(torch, device, model)``: the problem's network as a ``torch.nn`` model on its device,
    with TF32 off everywhere (full-precision float32 products, like every peer)."""
    import torch

    if problem.workload.activation not in ("identity", "relu", "tanh", "sigmoid"):
        raise Skip(f"activation {problem.workload.activation!r} not mapped to torch.nn")
    dev = "cuda" if problem.device == "cuda" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch, dev, _make_model(torch, problem, dev)


class TorchImpl(Implementation):
    memory_factor = 3.0

    def __init__(self, name: str, label: str, compile_mode: str | None):
        self.name, self.label, self.compile_mode = name, label, compile_mode
        self.on_request_only = compile_mode is not None
        if compile_mode == "reduce-overhead":
            self.devices = ("cuda",)

    def unavailable(self, device):
        reason = super().unavailable(device)
        if reason and self.compile_mode == "reduce-overhead":
            reason += " (its gain comes from CUDA graphs)"
        return reason or _torch_reason(device)

    def versions(self):
        import torch

        return {"torch": torch.__version__}

    def prepare(self, problem: Problem) -> Runner:
        torch, dev, model = setup(problem)
        params = list(model.parameters())
        xs = [torch.from_numpy(x).to(dev) for x in problem.inputs]

        def loss_fn(x):
            return (model(x) ** 2).sum()

        if self.compile_mode is not None:
            torch._dynamo.reset()
            loss_fn = torch.compile(loss_fn, mode=self.compile_mode, dynamic=False)
        step_begin = (torch.compiler.cudagraph_mark_step_begin
                      if self.compile_mode == "reduce-overhead" else (lambda: None))

        def forward(i):
            step_begin()
            with torch.no_grad():
                return loss_fn(xs[i])

        def gradient(i):
            step_begin()
            loss = loss_fn(xs[i])
            return loss.detach(), torch.autograd.grad(loss, params)

        def fetch_gradient(res):
            loss, grads = res
            host = [g.detach().cpu().numpy() for g in grads]
            return float(loss), list(zip(host[0::2], host[1::2]))

        def sync():
            if dev == "cuda":
                torch.cuda.synchronize()

        def thread_forward(n):
            x, total = xs[0], 0.0
            with torch.no_grad():
                for i in range(n):
                    total = total + loss_fn(x[i])
            sync()
            return total

        def thread_gradient(n):
            x, total, acc = xs[0], 0.0, None
            for i in range(n):
                loss = loss_fn(x[i])
                grads = torch.autograd.grad(loss, params)
                total = total + loss.detach()
                acc = list(grads) if acc is None else [a.add_(g) for a, g in zip(acc, grads)]
            sync()
            return total, acc

        def close():
            xs.clear()
            params.clear()
            if self.compile_mode is not None:
                torch._dynamo.reset()
            if dev == "cuda":
                torch.cuda.empty_cache()

        eager = self.compile_mode is None
        return Runner(
            forward=forward,
            gradient=gradient,
            fetch_forward=float,
            fetch_gradient=fetch_gradient,
            # torch's default stream is the legacy null stream: CuPy's events see its work.
            timer="cuda-event" if dev == "cuda" else "cpu",
            sync=sync,
            close=close,
            thread_forward=thread_forward if eager else None,
            thread_gradient=thread_gradient if eager else None,
        )


TORCH = TorchImpl("torch", "PyTorch eager", None)
TORCH_COMPILE = TorchImpl("torch-compile", "torch.compile", "default")
TORCH_COMPILE_RO = TorchImpl("torch-compile-ro", "torch.compile r-o", "reduce-overhead")
