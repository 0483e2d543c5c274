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

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised where torch is absent
    raise ImportError(
        "cupynn.torch needs PyTorch: pip install 'cupynn[torch]' (or a torch build of your "
        f"choice) ({e})"
    ) from e

from . import functional
from ._arrays import intake
from ._autodiff import AutodiffLoss, AutodiffResidual, wants_x
from .layers import Chain, Dense

__all__ = ["Module", "loss", "residual"]


def _stream(device: torch.device):
    """cupynn's CUDA work on torch's current stream (nothing to do on the CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    ts = torch.cuda.current_stream(device)
    if hasattr(cupy.cuda.Stream, "from_external"):
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
    def forward(ctx, g, x, model, need_dx, saved, *params):
        with _stream(x.device):
            if saved is not None:  # the forward's activations: no second forward
                grads, dx = functional.vjp_saved(model, saved, g.detach(), wrt_input=need_dx)
            else:
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
            if any(ctx.needs_input_grad):  # keep the activations for the backward
                y, ctx.saved = functional.forward_saved(model, xa)
            else:
                y, ctx.saved = functional.forward(model, xa), None
        ctx.model = model
        ctx.save_for_backward(x, *params)  # torch's version counters guard their values
        return _tensor(y)

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        saved, ctx.saved = ctx.saved, None  # once: retain_graph backward recomputes
        out = _Backward.apply(g, x, ctx.model, need_dx, saved, *params)
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


# -- scalar functions of cupynn's outputs, differentiated by torch's autograd ---------------

def _leaf(a, differentiate: bool) -> torch.Tensor:
    """A NumPy/CuPy array as a torch tensor on the same memory (DLPack, no copy), a leaf that
    requires grad when ``differentiate``. A read-only NumPy array (which DLPack cannot export
    writable) is copied once."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    t = torch.from_dlpack(a)
    return t.requires_grad_(True) if differentiate else t


def _run_on_stream(a):
    """cupynn's CUDA arrays are used by torch on torch's current stream; nothing on the CPU."""
    return _stream(torch.device("cuda")) if not isinstance(a, np.ndarray) else contextlib.nullcontext()


def _check_scalar(v, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"the {what} given to cupynn.torch.{what} must return a torch scalar "
                        f"(a 0-d tensor computed from its arguments), got {type(v).__name__}")
    if v.numel() != 1:
        raise ValueError(f"the {what} must return a scalar; it returned a tensor of shape "
                         f"{tuple(v.shape)} (sum or average it)")
    return v.reshape(())


def loss(f):
    """A loss for :func:`cupynn.value_and_grad` from a scalar function ``f(y)`` in torch.

    ``f`` takes the network's output ``y`` as a torch tensor (``(batch, out)``, or ``(out,)``
    for one sample; the model's dtype and device, sharing cupynn's memory through DLPack: no
    copy) and returns a 0-d tensor; it may couple samples. torch's autograd gives ``dL/dy``
    (``torch.autograd.grad``), which comes back through DLPack without a copy, and cupynn runs
    its own backward. The result is a callable ``y -> (value, dL/dy)``, the protocol of a
    hand-written loss, so it works wherever one does (``cupynn.flat_value_and_grad``,
    :class:`cupynn.LossTerm`).

    >>> import numpy as np, torch, cupynn, cupynn.torch
    >>> model = cupynn.MLP([1, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.linspace(-1, 1, 100).reshape(-1, 1)
    >>> lse = cupynn.torch.loss(lambda y: torch.logsumexp(y.reshape(-1), 0))
    >>> value, grads = cupynn.value_and_grad(model, x, lse)
    >>> grads[0]["weight"].shape
    (16, 1)
    """
    if not callable(f):
        raise TypeError(f"cupynn.torch.loss takes a function f(y) -> scalar, got {type(f).__name__}")

    def value_and_grad(y):
        with _run_on_stream(y), torch.enable_grad():
            yt = _leaf(y, True)
            v = _check_scalar(f(yt), "loss")
            (g,) = torch.autograd.grad(v, yt, allow_unused=True)
        if g is None:
            g = torch.zeros_like(yt)
        return v.detach(), g

    return AutodiffLoss("torch", value_and_grad, f)


def residual(r):
    """A residual for :func:`cupynn.residual_value_and_grad` from a scalar ``r`` in torch.

    ``r(u, du, lap)`` or ``r(u, du, lap, x)`` (four positional parameters: it also gets the
    points ``x``) takes torch tensors sharing the memory of the arrays
    :func:`cupynn.input_derivatives` returns (with ``diag=True`` the second partials ``d2``
    instead of ``lap``) and returns a 0-d tensor. torch's autograd gives its gradient with
    respect to ``u``, ``du`` and ``lap``; cupynn runs the reverse of the forward Laplacian.

    >>> import numpy as np, torch, cupynn, cupynn.torch
    >>> model = cupynn.MLP([2, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(64, 2))
    >>> def r(u, du, lap, x):                        # -lap u = f on the unit square
    ...     f = 2 * torch.pi ** 2 * torch.sin(torch.pi * x[:, 0]) * torch.sin(torch.pi * x[:, 1])
    ...     return ((lap + f) ** 2).mean()
    >>> value, grads = cupynn.residual_value_and_grad(model, x, cupynn.torch.residual(r))
    >>> grads[0]["weight"].shape
    (16, 2)
    """
    if not callable(r):
        raise TypeError(f"cupynn.torch.residual takes a function r(u, du, lap[, x]) -> scalar, "
                        f"got {type(r).__name__}")
    pass_x = wants_x(r)

    def value_and_grads(u, du, lap, *x):
        with _run_on_stream(u), torch.enable_grad():
            leaves = [_leaf(a, True) for a in (u, du, lap)]
            v = _check_scalar(r(*leaves, *(_leaf(a, False) for a in x)), "residual")
            grads = torch.autograd.grad(v, leaves, allow_unused=True)
        return v.detach(), grads

    return AutodiffResidual("torch", value_and_grads, pass_x, r)
