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
call: wrap the model again (``cupynn.torch.Module(model)``), or load values through torch
(``module.load_state_dict``) instead of through cupynn.

The backward does not run the forward again: the forward keeps what it needs
(:func:`cupynn.functional.forward_saved`; on the CPU the outputs of the layers with a large
fan-in, recomputing the narrow ones, which is cheaper than storing them). ``torch.func``
transforms work: ``grad``, ``vjp`` and ``functional_call``; ``vmap`` over the inputs (the
mapped dimension becomes part of cupynn's batch) and over the cotangents (``jacrev``: one
backward per cotangent); forward mode (``jvp``, ``jacfwd``, ``hessian``) and ``vmap`` over
the parameters are refused with a message. ``torch.compile(net)`` compiles the torch code
around the module and runs cupynn's own kernels as they are (a graph break). Converters:
:func:`from_sequential` and :func:`to_sequential` between a ``torch.nn.Sequential`` of
``Linear`` and activation modules and a cupynn model (the weights copied).

:func:`loss` and :func:`residual` let torch's autograd differentiate a scalar function of
cupynn's outputs (a loss ``f(y)``, a PDE residual ``r(u, du, lap[, x])``) for
:func:`cupynn.value_and_grad` / :func:`cupynn.residual_value_and_grad`.

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

__all__ = ["Module", "loss", "residual", "from_sequential", "to_sequential"]


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


def _resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with a lazy negation or conjugation applied (a copy only then): torch's
    autograd hands such views to a backward (the gradient of ``-y``), and cupynn reads memory."""
    return t.detach().resolve_neg().resolve_conj()


def _check_writeable_params(model) -> None:
    """Refuse arrays torch's optimizers could not write in place: a read-only NumPy array (a
    read-only ``np.memmap`` held by ``Dense.from_arrays(..., copy=False)``) would be written
    anyway through DLPack -- or crash the process; and one array held twice (a layer used
    twice in a Chain), which would become two Parameters updated separately."""
    labels, arrays = [], []
    for i, layer in enumerate(_layers(model)):
        for k, a in (("weight", layer.weight), ("bias", layer.bias)):
            if a is not None:
                labels.append(f"layer {i} {k}")
                arrays.append(a)
    functional._check_distinct(arrays, labels)
    for i, layer in enumerate(_layers(model)):
        for k, a in (("weight", layer.weight), ("bias", layer.bias)):
            flags = getattr(a, "flags", None)
            if flags is not None and not getattr(flags, "writeable", True):
                raise ValueError(
                    f"layer {i} {k} is a read-only array (e.g. a read-only np.memmap held with "
                    "Dense.from_arrays(..., copy=False)), and torch's optimizers write Parameters "
                    "in place: build the layer with copy=True, or from a writeable array")


def _layers(model) -> list[Dense]:
    return list(model.layers) if isinstance(model, Chain) else [model]


def _vjp_tensors(g, x, model, need_dx, saved):
    """``(dx?, dW0, db0, ...)`` as torch tensors from one cupynn backward call."""
    with _stream(x.device):
        if saved is not None:  # the forward's kept activations: no second forward
            grads, dx = functional.vjp_saved(model, saved, _resolved(g), wrt_input=need_dx)
        else:
            grads, dx = functional.vjp(model, _resolved(x), _resolved(g), wrt_input=need_dx)
    grads = grads if isinstance(grads, list) else [grads]
    flat = [_tensor(arr) for gr in grads for arr in (gr["weight"], gr["bias"]) if arr is not None]
    return tuple(([_tensor(dx)] if need_dx else []) + flat)


_NO_FORWARD_MODE = (
    "cupynn.torch.Module has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
    "torch.autograd.forward_ad): cupynn computes reverse-mode gradients only. Use "
    "torch.func.grad / vjp / jacrev, or cupynn.input_derivatives / cupynn.input_hessian for "
    "derivatives with respect to the inputs")


class _Backward(torch.autograd.Function):
    """``(dx, dW0, db0, dW1, ...)`` from one cupynn backward call.

    A Function of its own so that differentiating these gradients (double
    backward) reaches :meth:`backward` and its error, instead of silently
    treating them as constants. ``torch.func.vmap`` over the cotangent (``jacrev``) runs
    one backward per cotangent.
    """

    @staticmethod
    def forward(g, x, model, need_dx, saved, *params):
        return _vjp_tensors(g, x, model, need_dx, saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "cupynn.torch.Module does not support double backward: its gradients come from "
            "cupynn's hand-written backward, which torch's autograd cannot differentiate. "
            "Differentiate once (no create_graph=True through this module), or write this part "
            "of the network in torch for higher-order derivatives"
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_FORWARD_MODE)

    @staticmethod
    def vmap(info, in_dims, g, x, model, need_dx, saved, *params):
        # a batch of cotangents (jacrev), and of inputs too (vmap(jacrev(net))): one
        # backward per mapped element; batched parameters (an ensemble) are refused
        if any(d is not None for d in in_dims[5:]):
            raise RuntimeError(
                "torch.func.vmap over cupynn.torch.Module's parameters (a batch of models, an "
                "ensemble) is not supported: map over the inputs only, or loop over the models")
        gd, xd = in_dims[0], in_dims[1]
        if gd is None and xd is None:
            out = _Backward.apply(g, x, model, need_dx, saved, *params)
            return out, (None,) * len(out)
        gs = g if gd is None else g.movedim(gd, 0)
        xs = x if xd is None else x.movedim(xd, 0)
        if xd is not None:
            saved = None  # the forward's state is of the folded batch: recompute per element
        n = info.batch_size
        outs = [_Backward.apply(gs if gd is None else gs[v], xs if xd is None else xs[v], model,
                                need_dx, saved, *params) for v in range(n)]
        stacked = tuple(torch.stack(parts) for parts in zip(*outs))
        return stacked, (0,) * len(stacked)


def _wrapped(t) -> bool:
    """Whether ``t`` is a torch.func transform's wrapper (it has no storage of its own)."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class _Box:
    """What the forward hands to setup_context (the model it ran, the kept activations)."""

    __slots__ = ("keep", "model", "saved")

    def __init__(self, keep):
        self.keep, self.model, self.saved = keep, None, None


class _Apply(torch.autograd.Function):
    """``y = model(x)`` in cupynn; backward through :class:`_Backward`.

    ``forward`` / ``setup_context`` separate, so that ``torch.func.grad``, ``vjp`` and
    ``functional_call`` work; ``vmap`` over the input folds the mapped dimension into the
    batch (one cupynn call); forward mode is refused with a message.
    """

    @staticmethod
    def forward(x, module, box, *params):
        model = module._model_on(params)
        xa = intake(_resolved(x), what="x", device=model.device, dtype=model.dtype)
        with _stream(x.device):
            if box.keep:  # keep what the backward needs: it does not run the forward again
                y, box.saved = functional.forward_saved(model, xa)
            else:
                y = functional.forward(model, xa)
        box.model = model
        return _tensor(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _module, box, *params = inputs
        ctx.model, ctx.saved = box.model, box.saved
        ctx.save_for_backward(x, *params)  # torch's version counters guard their values

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        out = _Backward.apply(g, x, ctx.model, need_dx, ctx.saved, *params)
        dx, grads = (out[0], out[1:]) if need_dx else (None, out)
        grads = [gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[3:])]
        return (dx, None, None, *grads)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_FORWARD_MODE)

    @staticmethod
    def vmap(info, in_dims, x, module, box, *params):
        if any(d is not None for d in in_dims[3:]):
            raise RuntimeError(
                "torch.func.vmap over cupynn.torch.Module's parameters (a batch of models, an "
                "ensemble) is not supported: map over the inputs only, or loop over the models")
        if in_dims[0] is None:
            return _Apply.apply(x, module, box, *params), None
        xb = x.movedim(in_dims[0], 0)
        y = _Apply.apply(xb.reshape(-1, xb.shape[-1]), module, box, *params)
        return y.reshape(*xb.shape[:-1], y.shape[-1]), 0


class _Layer(torch.nn.Module):
    """The Parameters of one cupynn Dense layer (``weight (out, in)``, ``bias (out,)``); printed
    like the layer, e.g. ``Dense(1000 => 20, tanh)``."""

    def __init__(self, layer):
        super().__init__()
        self.activation = layer.activation.name
        self.weight = torch.nn.Parameter(_tensor(layer.weight))
        self.register_parameter("bias", None if layer.bias is None else torch.nn.Parameter(_tensor(layer.bias)))

    def _get_name(self) -> str:
        return "Dense"

    def extra_repr(self) -> str:
        out, in_ = self.weight.shape
        extra = "" if self.activation == "identity" else f", {self.activation}"
        return f"{in_} => {out}{extra}" + (", bias=false" if self.bias is None else "")


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
        _check_writeable_params(model)
        self._model = model
        self.layers = torch.nn.ModuleList()
        for layer in _layers(model):
            self.layers.append(_Layer(layer))
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
                "torch Parameters, and this module cannot run it any more (load_state_dict "
                "would not reconnect them): wrap the model again, net = "
                "cupynn.torch.Module(model), and make a new optimizer for net.parameters(). "
                "To change the values while keeping this module, write them into its "
                "Parameters instead of calling model.load_parameters (module.load_state_dict, "
                "or p.copy_(...) under torch.no_grad())"
            )
        return self._model

    @property
    def model(self):
        """The cupynn model sharing memory with the Parameters now."""
        return self._synced_model()

    def _model_on(self, params):
        """The cupynn model on the tensors ``params`` (the Parameters themselves, or the
        tensors ``torch.func.functional_call`` put in their place: a model of the same
        layers on their memory, not kept)."""
        now = [(p.data_ptr(), p.device, p.dtype, tuple(p.shape)) for p in params]
        if now == self._seen:
            return self._model  # forward() synced it
        old = _layers(self._model)
        it = iter(p.detach() for p in params)
        new = [Dense.from_arrays(next(it), None if h.bias is None else next(it),
                                 layer.activation.name, copy=False)
               for h, layer in zip(self.layers, old)]
        if isinstance(self._model, Chain):
            return Chain(*new, precision=self._model.precision if new[0].dtype.name == "float32"
                         else "strict")
        return new[0]

    @torch.compiler.disable(reason="cupynn runs its own kernels (NumPy, or CUDA through CuPy): "
                                   "torch.compile compiles the torch code around this module")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` for a tensor ``x (batch, in)`` (or one sample ``(in,)``) on the model's device
        and dtype: ``y (batch, out)``, with ``y = act(x @ W.T + b)`` per layer, differentiable with
        respect to ``x`` and every Parameter (one cupynn backward call for all of them).

        >>> import torch, cupynn, cupynn.torch
        >>> module = cupynn.torch.Module(cupynn.MLP([3, 4, 2], "tanh", device="cpu", rng=0))
        >>> x = torch.ones(5, 3, dtype=torch.float64, requires_grad=True)
        >>> y = module(x)                     # calls forward
        >>> y.sum().backward()
        >>> y.shape, x.grad.shape, module.layers[0].weight.grad.shape
        (torch.Size([5, 2]), torch.Size([5, 3]), torch.Size([4, 3]))
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        params = self._params()
        if all(isinstance(p, torch.nn.Parameter) and not _wrapped(p) for p in params):
            self._synced_model()  # follow re-allocated Parameters; refuse replaced arrays
        return _Apply.apply(x, self, _Box(torch.is_grad_enabled()), *params)

    def extra_repr(self) -> str:
        first = _layers(self._model)[0]
        precision = getattr(self._model, "precision", "strict")
        return f"{first.dtype.name}, {first.device}" + ("" if precision == "strict" else f", precision={precision!r}")


# -- scalar functions of cupynn's outputs, differentiated by torch's autograd ---------------

def _leaf(a, differentiate: bool) -> torch.Tensor:
    """A NumPy/CuPy array as a torch tensor on the same memory (DLPack, no copy), a leaf that
    requires grad when ``differentiate``. A read-only NumPy array (which DLPack cannot export
    writable) is copied once."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    t = torch.from_dlpack(a)
    return t.requires_grad_(True) if differentiate else t


@contextlib.contextmanager
def _run_on_stream(a):
    """Where torch runs a user's function of cupynn's arrays: CUDA arrays on torch's current
    stream; on the CPU at one torch thread (a loss of ``y`` is small work, and torch's OpenMP
    threads spin after a parallel op, slowing the cupynn backward that follows: a torch
    logsumexp loss cost 1.35x the hand-written one at torch's default threads, 1.05x at one)."""
    if not isinstance(a, np.ndarray):
        with _stream(torch.device("cuda")):
            yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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


# -- converters between torch.nn.Sequential and cupynn models ------------------------------

def _torch_activations():
    nn = torch.nn
    return [
        ("relu", nn.ReLU, lambda m: True, lambda: nn.ReLU()),
        ("tanh", nn.Tanh, lambda m: True, lambda: nn.Tanh()),
        ("sigmoid", nn.Sigmoid, lambda m: True, lambda: nn.Sigmoid()),
        ("silu", nn.SiLU, lambda m: True, lambda: nn.SiLU()),
        ("gelu", nn.GELU, lambda m: m.approximate == "tanh", lambda: nn.GELU(approximate="tanh")),
        ("gelu_erf", nn.GELU, lambda m: m.approximate == "none", lambda: nn.GELU()),
        ("softplus", nn.Softplus, lambda m: m.beta == 1, lambda: nn.Softplus()),
        ("elu", nn.ELU, lambda m: m.alpha == 1.0, lambda: nn.ELU()),
        ("leaky_relu", nn.LeakyReLU, lambda m: m.negative_slope == 0.01, lambda: nn.LeakyReLU(0.01)),
        ("identity", nn.Identity, lambda m: True, lambda: nn.Identity()),
    ]


def _activation_name(mod, i: int) -> str:
    for name, cls, ok, _ in _torch_activations():
        if type(mod) is cls and ok(mod):
            return name
    supported = ", ".join(sorted({f"{cls.__name__}" for _, cls, _, _ in _torch_activations()}))
    raise TypeError(
        f"module {i} of the Sequential ({mod!r}) has no cupynn equivalent: cupynn models are "
        f"Linear layers each followed by at most one of {supported} (GELU with approximate="
        "'tanh' or 'none', Softplus with beta=1, ELU with alpha=1, LeakyReLU with slope 0.01)")


def from_sequential(seq, *, precision: str = "strict"):
    """A cupynn :class:`~cupynn.Chain` computing the same function as ``seq``, a
    ``torch.nn.Sequential`` of ``Linear`` layers each followed by at most one activation
    module (``ReLU``, ``Tanh``, ``Sigmoid``, ``SiLU``, ``GELU``, ``Softplus``, ``ELU``,
    ``LeakyReLU``, ``Identity``; torch's ``Softplus`` turns linear above its ``threshold``
    (20), cupynn's does not: they differ by less than ``exp(-20)`` there). The weights are
    copied (float32/float64, on the CPU or -- CUDA tensors -- on the GPU), so an existing
    torch ``state_dict`` loads through the Sequential it belongs to:
    ``seq.load_state_dict(sd); model = from_sequential(seq)``.
    :func:`to_sequential` goes the other way.

    >>> import torch, numpy as np, cupynn, cupynn.torch
    >>> seq = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> model = cupynn.torch.from_sequential(seq.double())
    >>> model.layers
    (Dense(2 => 16, tanh), Dense(16 => 1))
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> bool(np.allclose(model(x.numpy()), seq(x).detach().numpy()))
    True
    """
    if not isinstance(seq, torch.nn.Sequential):
        raise TypeError(f"from_sequential takes a torch.nn.Sequential, got {type(seq).__name__}")
    mods = list(seq)
    layers = []
    i = 0
    while i < len(mods):
        lin = mods[i]
        if not isinstance(lin, torch.nn.Linear):
            raise TypeError(f"module {i} of the Sequential is {type(lin).__name__}, where a "
                            "Linear layer was expected (cupynn models are Linear layers each "
                            "followed by at most one activation)")
        act = "identity"
        if i + 1 < len(mods) and not isinstance(mods[i + 1], torch.nn.Linear):
            act = _activation_name(mods[i + 1], i + 1)
            i += 1
        i += 1
        with torch.no_grad():
            W = lin.weight.detach().clone().contiguous()
            b = None if lin.bias is None else lin.bias.detach().clone().contiguous()
        layers.append(Dense.from_arrays(W, b, act))
    if not layers:
        raise ValueError("from_sequential got an empty Sequential")
    return Chain(*layers, precision=precision if layers[0].dtype.name == "float32" else "strict")


def to_sequential(model) -> torch.nn.Sequential:
    """A ``torch.nn.Sequential`` of ``Linear`` and activation modules computing the same
    function as the cupynn ``model`` (a Dense or Chain), with copies of its weights, in its
    dtype and on its device: ``to_sequential(model).state_dict()`` is a plain torch
    state_dict (keys ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ...).

    >>> import torch, cupynn, cupynn.torch
    >>> seq = cupynn.torch.to_sequential(cupynn.MLP([3, 8, 1], "silu", device="cpu", rng=0))
    >>> seq
    Sequential(
      (0): Linear(in_features=3, out_features=8, bias=True)
      (1): SiLU()
      (2): Linear(in_features=8, out_features=1, bias=True)
    )
    >>> list(seq.state_dict())
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    if not isinstance(model, (Dense, Chain)):
        raise TypeError(f"to_sequential takes a cupynn Dense or Chain, got {type(model).__name__}")
    makers = {name: make for name, _, _, make in _torch_activations()}
    mods = []
    for layer in _layers(model):
        W = _tensor(layer.weight)
        lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              dtype=W.dtype, device=W.device)
        with torch.no_grad():
            lin.weight.copy_(W)
            if layer.bias is not None:
                lin.bias.copy_(_tensor(layer.bias))
        mods.append(lin)
        if layer.activation.name != "identity":
            mods.append(makers[layer.activation.name]())
    return torch.nn.Sequential(*mods)
