"""A cupynn model as a ``torch.nn.Module``, differentiable by torch's autograd.

``cupynn.torch.Module(model)`` wraps a :class:`cupynn.Dense` or
:class:`cupynn.Chain`. Its parameters are ``torch.nn.Parameter``\\ s sharing
memory with the model's arrays through DLPack (no copy, either way: an
optimizer's in-place step is the model's new weights); its forward runs
cupynn — the NumPy backend for CPU tensors, cupynn's CUDA kernels for CUDA
tensors (on torch's current stream) — and its backward is ONE cupynn
gradient call, :func:`cupynn.functional.vjp`: the gradients of
``L(y) = sum(y * g)`` for the incoming ``g = dL/dy`` (whose gradient is
``g``), i.e. ``dL/dx`` and every weight and bias gradient.

Shapes: ``x (batch, in)`` or one sample ``(in,)`` -> ``y (batch, out)`` /
``(out,)``; ``x`` must be on the parameters' device, in their dtype
(float32 or float64). Double backward (``create_graph=True`` followed by a
second differentiation through this module) is refused with an error.

The torch Parameters are the module's parameters: ``module.to('cuda')``,
``module.double()`` or ``p.data = ...`` re-allocate them, and the module
then runs a cupynn model built on the new memory (``module.model``; still
no copy). Replacing the wrapped model's arrays from cupynn's side after
wrapping (``model.load_parameters``, ``model.to``) is refused at the next
call: load values through torch (``module.load_state_dict``).

>>> import torch, cupynn, cupynn.torch
>>> net = cupynn.torch.Module(cupynn.MLP([3, 16, 1], "tanh", device="cpu", rng=0))
>>> x = torch.randn(8, 3, dtype=torch.float64)
>>> loss = torch.nn.functional.mse_loss(net(x), torch.zeros(8, 1, dtype=torch.float64))
>>> loss.backward()
>>> net.layers[0].weight.grad.shape
torch.Size([16, 3])
"""

from __future__ import annotations

import contextlib

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised where torch is absent
    raise ImportError(
        "cupynn.torch needs PyTorch: pip install 'cupynn[torch]' (or a torch build of your "
        f"choice) ({e})"
    ) from e

from . import functional
from ._arrays import intake
from .layers import Chain, Dense

__all__ = ["Module"]


def _stream(device: torch.device):
    """cupynn's CUDA work on torch's current stream (nothing to do on the CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    return _cupy_stream(torch.cuda.current_stream(device), cupy)


def _cupy_stream(ts, cupy):
    """CuPy's view of the torch stream ``ts``: ``Stream.from_external`` where ``ts`` speaks the
    ``__cuda_stream__`` protocol (torch >= 2.10) and CuPy has it (>= 14), else
    ``ExternalStream(ts.cuda_stream, ts.device_index)`` (torch 2.1-2.9, whose streams lack the
    protocol that CuPy 14's ``from_external`` requires: it would raise TypeError)."""
    if hasattr(ts, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(ts)
    return cupy.cuda.ExternalStream(ts.cuda_stream, ts.device_index)


def _tensor(a) -> torch.Tensor:
    """A NumPy/CuPy result as a torch tensor, sharing its memory."""
    return torch.from_dlpack(a)


def _layers(model) -> list[Dense]:
    return list(model.layers) if isinstance(model, Chain) else [model]


class _Backward(torch.autograd.Function):
    """``(dx, dW0, db0, dW1, ...)`` from one :func:`cupynn.functional.vjp` call.

    A Function of its own so that differentiating these gradients (double
    backward) reaches :meth:`backward` and its error, instead of silently
    treating them as constants.
    """

    @staticmethod
    def forward(ctx, g, x, model, need_dx, *params):
        with _stream(x.device):
            grads, dx = functional.vjp(model, x.detach(), g.detach(), wrt_input=need_dx)
        grads = grads if isinstance(grads, list) else [grads]
        flat = [_tensor(arr) for gr in grads for arr in (gr["weight"], gr["bias"]) if arr is not None]
        return tuple(([_tensor(dx)] if need_dx else []) + flat)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "cupynn.torch.Module does not support double backward: its gradients come from "
            "cupynn's hand-written backward, which torch's autograd cannot differentiate. "
            "Differentiate once (no create_graph=True through this module), or write this part "
            "of the network in torch for higher-order derivatives"
        )


class _Apply(torch.autograd.Function):
    """``y = model(x)`` in cupynn; backward through :class:`_Backward`."""

    @staticmethod
    def forward(ctx, x, model, *params):
        xa = intake(x.detach(), what="x", device=model.device, dtype=model.dtype)
        with _stream(x.device):
            y = functional.forward(model, xa)
        ctx.model = model
        ctx.save_for_backward(x, *params)
        return _tensor(y)

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        out = _Backward.apply(g, x, ctx.model, need_dx, *params)
        dx, grads = (out[0], out[1:]) if need_dx else (None, out)
        grads = [gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[2:])]
        return (dx, None, *grads)


class Module(torch.nn.Module):
    """``torch.nn.Module`` running a cupynn :class:`~cupynn.Dense` or :class:`~cupynn.Chain`.

    ``y = module(x)`` is ``model(x)`` (``x (batch, in) -> y (batch, out)``,
    ``y = act(x @ W.T + b)`` per layer); ``module.layers[i].weight`` /
    ``.bias`` are Parameters sharing memory with layer ``i``'s ``W (out, in)``
    and ``b (out,)``. Gradients reach every Parameter that requires grad and
    ``x``, from one cupynn backward call per ``loss.backward()``.

    >>> import torch, cupynn, cupynn.torch
    >>> model = cupynn.MLP([2, 8, 1], "relu", device="cpu", rng=0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 2, dtype=torch.float64),
    ...                           cupynn.torch.Module(model))
    >>> net(torch.ones(5, 4, dtype=torch.float64)).shape
    torch.Size([5, 1])
    """

    def __init__(self, model):
        super().__init__()
        if not isinstance(model, (Dense, Chain)):
            raise TypeError(f"cupynn.torch.Module wraps a cupynn Dense or Chain, got "
                            f"{type(model).__name__}")
        self._model = model
        self.layers = torch.nn.ModuleList()
        for layer in _layers(model):
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(_tensor(layer.weight))
            bias = None if layer.bias is None else torch.nn.Parameter(_tensor(layer.bias))
            holder.register_parameter("bias", bias)
            self.layers.append(holder)
        self._arrays = self._model_arrays(model)
        self._seen = self._signature()

    # -- keeping the cupynn model on the Parameters' memory ----------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for h in self.layers for p in (h.weight, h.bias) if p is not None]

    def _signature(self):
        return [(p.data_ptr(), p.device, p.dtype, tuple(p.shape)) for p in self._params()]

    @staticmethod
    def _model_arrays(model):
        return [a for layer in _layers(model) for a in (layer.weight, layer.bias) if a is not None]

    def _rebuild(self):
        """A cupynn model of the same layers on the Parameters' current memory (no copy)."""
        old = _layers(self._model)
        new = [Dense.from_arrays(h.weight.detach(),
                                 None if h.bias is None else h.bias.detach(),
                                 layer.activation.name, copy=False)
               for h, layer in zip(self.layers, old)]
        if isinstance(self._model, Chain):
            precision = self._model.precision
            self._model = Chain(*new, precision=precision if new[0].dtype.name == "float32"
                                else "strict")
        else:
            self._model = new[0]

    def _synced_model(self):
        now = self._signature()
        if now != self._seen:  # torch re-allocated the Parameters: follow them
            self._rebuild()
            self._arrays, self._seen = self._model_arrays(self._model), now
        elif any(a is not b for a, b in zip(self._model_arrays(self._model), self._arrays)):
            raise RuntimeError(
                "the wrapped cupynn model's arrays were replaced after wrapping "
                "(model.load_parameters or model.to), so they no longer share memory with the "
                "torch Parameters: load values through torch (module.load_state_dict, or "
                "p.copy_ under torch.no_grad()), or wrap the model again"
            )
        return self._model

    @property
    def model(self):
        """The cupynn model sharing memory with the Parameters now."""
        return self._synced_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        model = self._synced_model()
        return _Apply.apply(x, model, *self._params())

    def extra_repr(self) -> str:
        return repr(self._model)
