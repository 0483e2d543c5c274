"""Functional operations: the one place that dispatches on the backend.

Layers call :func:`forward` and :func:`value_and_grad`; users who compose
their own computations can call the single-layer operations
(:func:`dense_forward`, :func:`dense_backward`) and the losses
(:func:`loss_forward`, :func:`loss_backward`) directly. The derivatives with
respect to the inputs (:mod:`cupynn.derivatives`) are built on these and on the
elementwise step of the forward Laplacian (:func:`taylor_activation_forward`,
:func:`taylor_activation_backward`). Every function
checks its arguments (shape, dtype, device) here, once, so backends only
ever see well-formed inputs. Arrays may be any DLPack producer on the
model's device (a torch tensor, a JAX array): they are read in place, without
a copy (see ``cupynn/_arrays.py``); results are NumPy/CuPy arrays.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import intake
from ._devices import array_device
from ._validate import (
    as_float_dtype,
    check_array,
    check_count,
    check_int,
    check_out_array,
    check_precision,
    check_writeable,
    first_overlap,
)
from .activations import get_activation
from .backends import get_backend
from .backends.base import (
    OPTIMIZER_KINDS,
    SECOND_ORDER,
    LayerSpec,
    LossSpec,
    NetSpec,
    OptimizerState,
    taylor_blocks,
)
from .losses import BUILTIN_LOSSES, make_loss
from .losses import loss_backward as _loss_backward
from .losses import loss_forward as _loss_forward

__all__ = [
    "forward",
    "value_and_grad",
    "execution_path",
    "vjp",
    "forward_saved",
    "vjp_saved",
    "SavedForward",
    "dense_forward",
    "dense_backward",
    "DenseContext",
    "loss_forward",
    "loss_backward",
    "taylor_activation_forward",
    "taylor_activation_backward",
    "optimizer_state",
    "optimizer_step",
    "optimizer_sync",
    "optimizer_get_step",
    "optimizer_set_step",
    "jacobian_rows",
    "gram_update",
]


# -- whole models ---------------------------------------------------------------

_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (signature, parts)

def _model_parts(model):
    """(layers, NetSpec, [(W, b)], backend) of a Dense or Chain.

    Kept (weakly, beside the model: nothing is pickled with it) while the model's layers hold
    the same arrays and activations -- the cache holds them, so their ids cannot be reused --
    and a repeated call hands the backend the same NetSpec object, which it recognises
    without hashing."""
    layers = model._dense_layers()
    sig = [model.precision]
    for l in layers:
        sig += (id(l.weight), id(l.bias), id(l.activation), l._device, l.in_features,
                l.out_features)
    cached = _PARTS.get(model)
    if cached is not None and cached[0] == sig:
        return cached[1]
    net = NetSpec(
        tuple(LayerSpec(l.in_features, l.out_features, l.activation.name, l.bias is not None)
              for l in layers),
        model.dtype,
        model.precision,
    )
    params = [(l.weight, l.bias) for l in layers]
    backend = get_backend(model.device)
    if net.precision != "strict" and backend.device == "cpu":
        _warn_cpu_precision(net.precision)
    parts = (layers, net, params, backend)
    _PARTS[model] = (sig, parts)
    return parts


_CPU_PRECISION_WARNED: set = set()


def _warn_cpu_precision(precision: str) -> None:
    """Say once per process (per precision) that the setting does nothing on the CPU."""
    if precision in _CPU_PRECISION_WARNED:
        return
    _CPU_PRECISION_WARNED.add(precision)
    warnings.warn(
        f"precision={precision!r} has no effect on the CPU: the NumPy backend computes float32 "
        "products in strict FP32; the setting selects the CUDA kernels' tensor-core mode after "
        "model.to('cuda')", UserWarning, stacklevel=4)


def _check_batch(model, layers, x, what="x"):
    """Check ``x`` against the first layer; return it as 2-D and whether it was 1-D."""
    first = layers[0]
    check_array(x, what=what, device=model.device, dtype=model.dtype, ndim=(1, 2))
    if x.shape[-1] != first.in_features:
        raise ValueError(
            f"{first._label(None if model is first else 0)} expects {what} of "
            f"shape (batch, {first.in_features}) or ({first.in_features},), got {tuple(x.shape)}"
        )
    single = x.ndim == 1
    return (x.reshape(1, -1) if single else x), single


def _intake_loss(loss, device, dtype):
    """A callable loss whose ``dL/dy`` may be any DLPack producer, read in place."""
    if not callable(loss):
        return loss
    make_loss(loss)  # a residual passed as a loss is refused here, by what it is

    def fn(y):
        out = loss(y)
        if isinstance(out, tuple) and len(out) == 2:
            return out[0], intake(out[1], what="dL/dy", device=device, dtype=dtype)
        return out  # call_loss says what is wrong with it

    return fn


def _check_target(model, net, x, target):
    """The one rule for a built-in loss's ``target``: an array of the model's dtype and device
    with exactly the shape of ``model(x)`` -- ``(batch, out)`` for a 2-D ``x``, ``(out,)``
    for one sample -- never broadcast. Returns it 2-D (``(1, out)`` for one sample)."""
    target = intake(target, what="target", device=model.device, dtype=model.dtype)
    single = x.ndim == 1
    out_shape = (net.out_features,) if single else (x.shape[0], net.out_features)
    check_array(target, what="target", device=model.device, dtype=model.dtype, ndim=(1, 2))
    if tuple(target.shape) != out_shape:
        raise _target_shape_error(tuple(target.shape), out_shape, single=single)
    return target.reshape(1, -1) if single else target


def _target_shape_error(got: tuple, out_shape: tuple, *, single: bool) -> ValueError:
    """What a target of the wrong shape is told: the expected shape, and the reshape when
    the sizes agree (a 1-D target for a (batch, 1) output)."""
    hint = ""
    if int(np.prod(got)) == int(np.prod(out_shape)):
        hint = f": reshape it with target.reshape{out_shape}"
    return ValueError(f"target must have the output's shape {out_shape} "
                      f"{'(out_features,)' if single else '(batch, out_features)'}, got {got}"
                      f"{hint}")


def forward(model, x):
    """The model's output for a batch ``x`` of shape ``(batch, in)`` (or one sample ``(in,)``).

    ``y = act_n(... act_1(x @ W_1.T + b_1) ...)``, shape ``(batch, out)`` (``(out,)`` for
    one sample); the same as ``model(x)``. ``x`` is a NumPy/CuPy array or any DLPack
    producer on the model's device (read without a copy); the output is a NumPy/CuPy array.

    >>> import numpy as np, cupynn
    >>> from cupynn import functional
    >>> m = cupynn.MLP([3, 4, 2], "relu", device="cpu", rng=0)
    >>> functional.forward(m, np.ones((5, 3))).shape, functional.forward(m, np.ones(3)).shape
    ((5, 2), (2,))
    """
    layers, net, params, backend = _model_parts(model)
    x = intake(x, what="x", device=model.device, dtype=model.dtype)
    x2, single = _check_batch(model, layers, x)
    y = backend.network_forward(net, params, x2)
    return y.reshape(-1) if single else y


def _out_pairs(model, out, wrt_input, single, x, target):
    """``out`` of value_and_grad as the backend's ``(value, [(dW, db)], dx)``, every array
    checked before anything is computed or written: exactly the result's dtype, device and
    shape (no cast, no broadcast), writeable, and sharing no memory with the model's
    parameters, ``x``, ``target`` or one another."""
    n = 3 if wrt_input else 2
    if not isinstance(out, tuple) or len(out) != n:
        raise TypeError(
            "out= must be what an earlier value_and_grad call with the same arguments returned: "
            f"a tuple (value, grads{', dx' if wrt_input else ''}), got "
            f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, tuple) else ''}")
    value, grads = out[0], out[1]
    dx = out[2] if wrt_input else None
    layers = model._dense_layers()
    want = model.parameters()
    if isinstance(want, dict) != isinstance(grads, dict) or (
            not isinstance(grads, dict) and not isinstance(grads, (list, tuple))):
        raise TypeError(f"out= gradients must be shaped like model.parameters() (a "
                        f"{type(want).__name__}), got {type(grads).__name__}")
    items = [grads] if isinstance(grads, dict) else list(grads)
    if len(items) != len(layers):
        raise ValueError(f"out= gradients have {len(items)} layers; the model has {len(layers)}")
    dev, dt = model.device, model.dtype
    check_out_array(value, what="out= value", device=dev, dtype=dt, shape=())
    pairs, arrays = [], [("out= value", value)]
    for i, (g, layer) in enumerate(zip(items, layers)):
        if not isinstance(g, dict) or "weight" not in g or set(g) - {"weight", "bias"}:
            raise TypeError(f"out= gradients of layer {i} must be a dict with 'weight' (and 'bias')")
        gw, gb = g["weight"], g.get("bias")
        check_out_array(gw, what=f"out= gradient of layer {i} weight", device=dev, dtype=dt,
                        shape=tuple(layer.weight.shape))
        arrays.append((f"out= gradient of layer {i} weight", gw))
        if (gb is None) != (layer.bias is None):
            raise ValueError(f"out= gradient of layer {i} bias: expected "
                             f"{'None' if layer.bias is None else 'an array'}")
        if gb is not None:
            check_out_array(gb, what=f"out= gradient of layer {i} bias", device=dev, dtype=dt,
                            shape=tuple(layer.bias.shape))
            arrays.append((f"out= gradient of layer {i} bias", gb))
        pairs.append((gw, gb))
    if wrt_input:
        check_out_array(dx, what="out= dx", device=dev, dtype=dt, shape=tuple(x.shape))
        arrays.append(("out= dx", dx))
    inputs = [((i, k), a) for i, layer in enumerate(layers)  # named only on an error
              for k, a in (("weight", layer.weight), ("bias", layer.bias)) if a is not None]
    inputs += [("x", x)] + ([("target", target)] if target is not None else [])
    clash = first_overlap(arrays, inputs)
    if clash is not None:
        other = clash[1]
        if isinstance(other, tuple):
            other = f"{layers[other[0]]._label(other[0])} {other[1]}"
        raise ValueError(f"{clash[0]} shares memory with {other}: out= takes the arrays an "
                         "earlier value_and_grad call returned, which nothing else uses")
    if dx is not None and single:
        dx = dx.reshape(1, -1)
    return value, pairs, dx


def value_and_grad(model, x, loss="sum_squares", *, target=None, wrt_input=False, out=None):
    """The scalar ``loss(model(x))`` and its gradient w.r.t. every weight and bias.

    Parameters
    ----------
    model : Dense or Chain
    x : array of shape ``(batch, in)`` or ``(in,)``, the model's dtype and device
        (NumPy/CuPy, or any DLPack producer such as a torch tensor, read without a copy)
    loss : ``"sum_squares"`` (``sum((y - target)**2)``), ``"mse"`` (the same
        divided by ``y.size``), a callable ``loss(y) -> (value, dL/dy)``
        working on the model's array type, or a scalar ``f(y)`` written in ``jax.numpy``
        or torch and wrapped as ``cupynn.jax.loss(f)`` / ``cupynn.torch.loss(f)``
        (the library differentiates it; ``y`` and ``dL/dy`` cross through DLPack).
        ``x`` may instead be a :class:`cupynn.Composite` (or a single term), which states
        its own points and losses: ``value_and_grad(model, composite)``.
    target : optional array shaped like the output (built-in losses only)
    wrt_input : also return ``dL/dx``
    out : the result of an earlier call with the same model, batch shape and ``wrt_input``:
        the new value and gradients are written into those arrays, which are returned (on
        CUDA's fused path such a call allocates nothing).  Without ``out`` every call returns
        new arrays that later calls never overwrite.

    Returns
    -------
    ``(value, grads)`` or ``(value, grads, dx)``: ``value`` a 0-d array of the
    model's dtype on its device; ``grads`` shaped like ``model.parameters()``.

    Example
    -------
    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 8, 1], "tanh", device="cpu", rng=0)
    >>> v, g = cupynn.value_and_grad(m, np.linspace(-1, 1, 5).reshape(5, 1))
    >>> g[0]["weight"].shape
    (8, 1)
    >>> v, g = cupynn.value_and_grad(m, np.zeros((5, 1)), out=(v, g))   # reuses v and g
    """
    if getattr(x, "_cupynn_objective", False):  # a LossTerm / ResidualTerm / Composite
        return _objective_value_and_grad(model, x, loss, target, wrt_input, out)
    layers, net, params, backend = _model_parts(model)
    if not isinstance(wrt_input, (bool, np.bool_)):
        raise TypeError(f"wrt_input must be True or False, got {wrt_input!r}")
    x = intake(x, what="x", device=model.device, dtype=model.dtype)
    x2, single = _check_batch(model, layers, x)
    spec = make_loss(_intake_loss(loss, model.device, model.dtype), target)
    if spec.target is not None:
        spec = type(spec)(spec.kind, _check_target(model, net, x, spec.target), None)
    if spec.kind == "callable" and single:
        fn = spec.fn

        def fn2d(y2):
            out = fn(y2.reshape(-1))
            if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "reshape"):
                return out[0], out[1].reshape(1, -1)
            return out  # the backend's check says what is wrong with it

        spec = type(spec)("callable", None, fn2d)
    dest = None if out is None else _out_pairs(model, out, wrt_input, single, x, spec.target)
    value, pairs, dx = backend.network_value_and_grad(net, params, x2, spec, need_dx=wrt_input,
                                                      out=dest)
    grads = model._grads_like_parameters(pairs) if out is None else out[1]
    if out is not None:
        value = out[0]
        if wrt_input:
            return value, grads, out[2]
        return value, grads
    if wrt_input:
        return value, grads, (dx.reshape(-1) if single else dx)
    return value, grads


def _objective_value_and_grad(model, objective, loss, target, wrt_input, out):
    """``value_and_grad(model, composite)``: the objective states its own points and losses."""
    if loss != "sum_squares" or target is not None or wrt_input or out is not None:
        raise TypeError(f"value_and_grad(model, {type(objective).__name__}) takes no loss, target, "
                        "wrt_input or out: the terms state their own points and losses")
    return objective.value_and_grad(model)


def execution_path(model, batch: int, *, loss="sum_squares", wrt_input=False, kind="grad") -> str:
    """Which implementation runs ``kind`` (``"grad"``: value_and_grad, ``"value"``, or
    ``"forward"``: ``model(x)``) for ``model`` at ``batch`` rows.

    On CUDA ``"fused"`` (one kernel per batch range for the whole step, kernels/fused.cu, plus
    one reduction) or ``"per-layer: <why not fused>"``; on the CPU ``"numpy"``.

    >>> import cupynn
    >>> cupynn.execution_path(cupynn.MLP([1, 8, 1], device="cpu", rng=0), 10_000)
    'numpy'
    """
    _layers, net, _params, backend = _model_parts(model)
    batch = check_int(batch, "batch (the number of rows)", minimum=0)
    if kind not in ("grad", "value", "forward"):
        raise ValueError(f"kind must be 'grad', 'value' or 'forward', got {kind!r}")
    if not isinstance(wrt_input, (bool, np.bool_)):
        raise TypeError(f"wrt_input must be True or False, got {wrt_input!r}")
    spec = None if kind == "forward" else make_loss(loss)
    return backend.execution_path(net, batch, mode=kind, need_dx=bool(wrt_input), loss=spec)


def vjp(model, x, g, *, wrt_input=True):
    """The vector-Jacobian product of the model at ``x`` for the cotangent ``g``.

    The gradients of ``L = sum(model(x) * g)`` (whose ``dL/dy`` is ``g``):
    ``grads[i]["weight"] = sum_b dL/dW_i``, ... and ``dx = g @ dy/dx``, from one
    backward call — what a framework's autograd asks of a layer (the backward of
    :class:`cupynn.torch.Module`, the VJP of :func:`cupynn.jax.apply`).

    Parameters
    ----------
    model : Dense or Chain
    x : ``(batch, in)`` or ``(in,)``; ``g`` : the output's shape, ``(batch, out)`` / ``(out,)``;
        both of the model's dtype, on its device (NumPy/CuPy or any DLPack producer,
        read without a copy; ``g`` may be strided, e.g. a broadcast)
    wrt_input : also compute ``dx`` (else it is None, and cheaper)

    Returns ``(grads, dx)``, ``grads`` shaped like ``model.parameters()``.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 3], "tanh", device="cpu", rng=0)
    >>> grads, dx = cupynn.functional.vjp(m, np.ones((5, 2)), np.ones((5, 3)))
    >>> grads[1]["weight"].shape, dx.shape
    ((3, 8), (5, 2))
    """
    layers, net, params, backend = _model_parts(model)
    x = intake(x, what="x", device=model.device, dtype=model.dtype)
    g = intake(g, what="g", device=model.device, dtype=model.dtype)
    x2, single = _check_batch(model, layers, x)
    out_shape = (net.out_features,) if single else (x.shape[0], net.out_features)
    check_array(g, what="g", device=model.device, dtype=model.dtype, ndim=(len(out_shape),))
    if tuple(g.shape) != out_shape:
        raise ValueError(f"g must have the output's shape {out_shape}, got {tuple(g.shape)}")
    g2 = g.reshape(1, -1) if single else g
    if "dot" in backend.loss_kinds:
        spec = LossSpec("dot", g2, None)
    else:  # the same loss as a callable: sum(y * g), dL/dy = g
        spec = LossSpec("callable", None, lambda y: ((y * g2).sum(), g2))
    _, pairs, dx = backend.network_value_and_grad(net, params, x2, spec, need_dx=wrt_input)
    grads = model._grads_like_parameters(pairs)
    return grads, (None if dx is None else dx.reshape(-1) if single else dx)


@dataclass(frozen=True)
class SavedForward:
    """What :func:`forward_saved` keeps for :func:`vjp_saved`: the batch, and (where the
    backend can keep them: the NumPy backend) every chunk's activations; ``state`` None
    means the backward recomputes the forward.

    >>> import numpy as np, cupynn
    >>> from cupynn import functional as F
    >>> y, saved = F.forward_saved(cupynn.MLP([1, 8, 1], device="cpu", rng=0), np.ones((3, 1)))
    >>> type(saved).__name__
    'SavedForward'
    """

    net: Any
    params: Any
    x: Any
    single: bool
    state: Any


def forward_saved(model, x):
    """``(y, saved)``: :func:`forward`, keeping what :func:`vjp_saved` needs so that the
    backward does not run the forward again (the forward of an autograd framework's layer:
    :class:`cupynn.torch.Module`). Costs the activations' memory until ``saved`` is
    dropped; on CUDA (whose fused gradient kernel recomputes the forward inside its one
    launch) and for small batches ``saved`` keeps only ``x``.

    >>> import numpy as np, cupynn
    >>> from cupynn import functional as F
    >>> m = cupynn.MLP([2, 64, 3], "tanh", device="cpu", rng=0)
    >>> x, g = np.ones((500, 2)), np.ones((500, 3))
    >>> y, saved = F.forward_saved(m, x)
    >>> grads, dx = F.vjp_saved(m, saved, g)
    >>> bool(np.allclose(dx, F.vjp(m, x, g)[1]))
    True
    """
    layers, net, params, backend = _model_parts(model)
    x = intake(x, what="x", device=model.device, dtype=model.dtype)
    x2, single = _check_batch(model, layers, x)
    keep = getattr(backend, "network_forward_saved", None)
    if keep is None:
        y, state = backend.network_forward(net, params, x2), None
    else:
        y, state = keep(net, params, x2)
    return (y.reshape(-1) if single else y), SavedForward(net, params, x, single, state)


def vjp_saved(model, saved: SavedForward, g, *, wrt_input=True):
    """:func:`vjp` at the batch of a :func:`forward_saved` call, from its saved activations
    (no second forward). The parameters must not have changed in between (they are the
    same arrays; an autograd framework's version counters guard their values).

    >>> import numpy as np, cupynn
    >>> from cupynn import functional as F
    >>> m = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> y, saved = F.forward_saved(m, np.ones((4, 2)))
    >>> grads, dx = F.vjp_saved(m, saved, np.ones((4, 1)), wrt_input=False)
    >>> grads[0]["weight"].shape, dx
    ((8, 2), None)
    """
    if not isinstance(saved, SavedForward):
        raise TypeError(f"saved must be what functional.forward_saved returned, got "
                        f"{type(saved).__name__}")
    layers, net, params, backend = _model_parts(model)
    if (saved.state is None or net is not saved.net
            or any(a is not b for pa, pb in zip(params, saved.params) for a, b in zip(pa, pb))):
        return vjp(model, saved.x, g, wrt_input=wrt_input)  # nothing kept (or a new model)
    g = intake(g, what="g", device=model.device, dtype=model.dtype)
    x = saved.x
    out_shape = (net.out_features,) if saved.single else (x.shape[0], net.out_features)
    check_array(g, what="g", device=model.device, dtype=model.dtype, ndim=(len(out_shape),))
    if tuple(g.shape) != out_shape:
        raise ValueError(f"g must have the output's shape {out_shape}, got {tuple(g.shape)}")
    g2 = g.reshape(1, -1) if saved.single else g
    pairs, dx = backend.network_backward_saved(net, params, saved.state, g2, need_dx=wrt_input)
    grads = model._grads_like_parameters(pairs)
    return grads, (None if dx is None else dx.reshape(-1) if saved.single else dx)


# -- one layer at a time ----------------------------------------------------------

@dataclass(frozen=True)
class DenseContext:
    """What :func:`dense_backward` needs from a :func:`dense_forward` call.

    Made by ``dense_forward(..., save=True)``; holds ``x``, ``W``, whether there is a
    bias, the activation, the array saved for the derivative (``y`` or ``z``), the
    precision and the device.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> y, ctx = F.dense_forward(np.ones((2, 3)), np.ones((4, 3)), None, "tanh", save=True)
    >>> ctx.activation, ctx.has_bias, ctx.saved.shape
    ('tanh', False, (2, 4))
    """

    x: Any
    W: Any
    has_bias: bool
    activation: str
    saved: Any
    precision: str
    device: str


def _intake_layer_args(x, W, b):
    """``(x, W, b)`` with DLPack producers read in place, on ``W``'s device and dtype."""
    W = intake(W, what="W")
    device = array_device(W)
    dtype = W.dtype if device is not None and W.dtype in (np.float32, np.float64) else None
    x = intake(x, what="x", device=device, dtype=dtype)
    if b is not None:
        b = intake(b, what="b", device=device, dtype=dtype)
    return x, W, b


def _check_layer_args(x, W, b, activation, precision):
    device = array_device(W)
    if device is None:
        raise TypeError(f"W must be a NumPy or CuPy array (or a DLPack producer such as a "
                        f"torch tensor), got {type(W).__name__}")
    dtype = as_float_dtype(W.dtype)
    check_precision(precision, dtype)
    check_array(W, what="W", device=device, dtype=dtype, ndim=(2,))
    check_array(x, what="x", device=device, dtype=dtype, ndim=(2,))
    if x.shape[1] != W.shape[1]:
        raise ValueError(
            f"dense layer ({W.shape[1]} => {W.shape[0]}) expects x of shape (batch, {W.shape[1]}), "
            f"got {tuple(x.shape)}"
        )
    if b is not None:
        check_array(b, what="b", device=device, dtype=dtype, ndim=(1,))
        if b.shape[0] != W.shape[0]:
            raise ValueError(f"b must have shape ({W.shape[0]},), got {tuple(b.shape)}")
    if not W.flags.c_contiguous or (b is not None and not b.flags.c_contiguous):
        raise ValueError("W and b must be C-contiguous: pass np.ascontiguousarray(W) (or cupy's)")
    return device, get_activation(activation).name


def dense_forward(x, W, b=None, activation="identity", *, precision="strict", save=False):
    """``act(x @ W.T + b)`` for ``x (batch, in)``, ``W (out, in)``, ``b (out,)``.

    Returns ``y`` of shape ``(batch, out)``; with ``save=True`` returns ``(y, ctx)`` where
    ``ctx`` feeds :func:`dense_backward`. The device is ``W``'s; arrays may be DLPack
    producers (read without a copy); ``y`` is a NumPy/CuPy array.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> x, W, b = np.ones((2, 3)), np.full((4, 3), 0.5), np.zeros(4)
    >>> F.dense_forward(x, W, b, "relu")
    array([[1.5, 1.5, 1.5, 1.5],
           [1.5, 1.5, 1.5, 1.5]])
    """
    x, W, b = _intake_layer_args(x, W, b)
    device, act = _check_layer_args(x, W, b, activation, precision)
    backend = get_backend(device)
    if not save:
        return backend.dense_forward(x, W, b, act, precision=precision)
    y, saved = backend.dense_forward_train(x, W, b, act, precision=precision)
    return y, DenseContext(x, W, b is not None, act, saved, precision, device)


def dense_backward(g, ctx: DenseContext, *, need_dx=True):
    """Given ``g = dL/dy``, return ``(dx, dW, db)`` (``dx``/``db`` None when not needed/no bias).

    ``dz = g * act'(.)``, ``dW = dz.T @ x``, ``db = dz.sum(0)``, ``dx = dz @ W``; ``g`` is
    ``(batch, out)``, the results have the shapes of ``x``, ``W`` and ``b``.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> x, W, b = np.ones((2, 3)), np.full((4, 3), 0.5), np.zeros(4)
    >>> y, ctx = F.dense_forward(x, W, b, "identity", save=True)
    >>> dx, dW, db = F.dense_backward(np.ones_like(y), ctx)
    >>> dx.shape, dW.shape, db
    ((2, 3), (4, 3), array([2., 2., 2., 2.]))
    """
    g = intake(g, what="g", device=ctx.device, dtype=ctx.W.dtype)
    check_array(g, what="g", device=ctx.device, dtype=ctx.W.dtype, ndim=(2,))
    expected = (ctx.x.shape[0], ctx.W.shape[0])
    if tuple(g.shape) != expected:
        raise ValueError(f"g must have the layer output's shape {expected}, got {tuple(g.shape)}")
    backend = get_backend(ctx.device)
    return backend.dense_backward(g, ctx.x, ctx.saved, ctx.W, ctx.activation,
                                  has_bias=ctx.has_bias, need_dx=need_dx,
                                  precision=ctx.precision)


# -- the built-in losses on their own ------------------------------------------------

def _check_loss_args(y, loss, target):
    """``(y, target)`` of :func:`loss_forward` / :func:`loss_backward`, checked."""
    if not isinstance(loss, str):
        raise TypeError(f"loss must be the name of a built-in loss, one of {BUILTIN_LOSSES}, got "
                        f"{type(loss).__name__} {loss!r}")
    if loss not in BUILTIN_LOSSES:
        raise ValueError(f"loss must be one of {BUILTIN_LOSSES}, got {loss!r}")
    y = intake(y, what="y")
    device = array_device(y)
    if device is None:
        raise TypeError(f"y must be a NumPy or CuPy array of dtype float32 or float64, got "
                        f"{type(y).__name__}")
    dtype = as_float_dtype(y.dtype)
    if target is not None:
        target = intake(target, what="target", device=device, dtype=dtype)
        check_array(target, what="target", device=device, dtype=dtype, ndim=(target.ndim,))
        if tuple(target.shape) != tuple(y.shape):
            raise ValueError(f"target must have y's shape {tuple(y.shape)} (it is never "
                             f"broadcast), got {tuple(target.shape)}")
    return y, target


def loss_forward(y, loss, target=None):
    """The built-in loss ``loss`` (``"sum_squares"`` or ``"mse"``) of the output ``y``.

    ``sum((y - target)**2)`` (``target`` None means 0), divided by ``y.size`` for ``"mse"``;
    a 0-d array of ``y``'s dtype on its device. ``y`` is a float32/float64 array, ``target``
    exactly ``y``'s shape, dtype and device (never cast or broadcast).

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> F.loss_forward(np.array([[1.0, 2.0]]), "mse")
    array(2.5)
    """
    y, target = _check_loss_args(y, loss, target)
    return _loss_forward(y, loss, target)


def loss_backward(y, loss, target=None):
    """``dL/dy = 2 (y - target) * scale`` of the built-in loss ``loss`` (``scale`` 1, or
    ``1 / y.size`` for ``"mse"``): a new array shaped like ``y``. Arguments as for
    :func:`loss_forward`.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> F.loss_backward(np.array([[1.0, 2.0]]), "sum_squares", np.array([[1.0, 0.0]]))
    array([[0., 4.]])
    """
    y, target = _check_loss_args(y, loss, target)
    return _loss_backward(y, loss, target)


# -- the forward Laplacian's elementwise step (cupynn.derivatives) --------------------

def _check_stack(what, a, device, dtype, shape):
    check_array(a, what=what, device=device, dtype=dtype, ndim=(len(shape),))
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous: pass np.ascontiguousarray({what}) "
                         "(or cupy's)")


def _check_taylor_args(z, b, activation, d, second):
    device = array_device(z)
    if device is None:
        raise TypeError(f"z must be a NumPy or CuPy array, got {type(z).__name__}")
    dtype = as_float_dtype(z.dtype)
    if second not in SECOND_ORDER:
        raise ValueError(f"second must be one of {SECOND_ORDER}, got {second!r}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d (the number of inputs) must be a positive int, got {d!r}")
    nb = taylor_blocks(d, second)
    if z.ndim != 3 or z.shape[0] != nb:
        raise ValueError(f"z must be a stack of shape ({nb}, batch, width) for d={d}, "
                         f"second={second!r}; got {tuple(z.shape)}")
    _check_stack("z", z, device, dtype, z.shape)
    if b is not None:
        _check_stack("b", b, device, dtype, (z.shape[2],))
    return device, dtype, get_activation(activation).name


def taylor_activation_forward(z, b, activation, *, d, second="laplacian"):
    """The elementwise step of the forward Laplacian for one dense layer.

    A layer carries the stack ``S = [h; J_1 .. J_d; second-order blocks]`` of shape
    ``(nb, batch, width)``: the activations, their derivatives along each of the ``d``
    inputs, and their Laplacian (``second="laplacian"``, ``nb = d + 2``), their ``d``
    diagonal second derivatives (``"diagonal"``, ``nb = 2 d + 1``) or nothing
    (``"none"``, ``nb = d + 1``). Given ``z = S @ W.T`` (one GEMM over the stacked rows,
    no bias), ``zh = z[0] + b`` and ``p, q`` = f', f'' at ``zh``, it returns

    ``out[0] = f(zh)``, ``out[i] = p z[i]`` (``i = 1..d``), and
    ``out[d+1] = p z[d+1] + q sum_i z[i]**2`` (Laplacian) or
    ``out[d+i] = p z[d+i] + q z[i]**2`` (diagonal).

    Example
    -------
    >>> import numpy as np, cupynn.functional as F
    >>> z = np.random.default_rng(0).standard_normal((4, 5, 3))    # d = 2: [h, J1, J2, L]
    >>> F.taylor_activation_forward(z, np.zeros(3), "tanh", d=2).shape
    (4, 5, 3)
    """
    device, _, act = _check_taylor_args(z, b, activation, d, second)
    return get_backend(device).taylor_activation_forward(z, b, act, d=d, second=second)


def taylor_activation_backward(g, z, y, b, activation, *, d, second="laplacian"):
    """The reverse of :func:`taylor_activation_forward`: ``dloss/dz`` from ``g = dloss/dout``.

    ``z`` and ``b`` are the forward's arguments, ``y = out[0]`` its activations. With
    ``r`` = f''' at ``zh`` and ``g_sec(i)`` the second-order block that ``z[i]`` feeds
    (``g[d+1]`` or ``g[d+i]``): ``dz[sec] = p g[sec]``,
    ``dz[i] = p g[i] + 2 q g_sec(i) z[i]`` and
    ``dz[0] = p g[0] + q sum_{k>=1} g[k] z[k] + r sum_i g_sec(i) z[i]**2``;
    ``dz[0].sum(0)`` is the bias gradient.

    Example
    -------
    >>> import numpy as np, cupynn.functional as F
    >>> rng = np.random.default_rng(0)
    >>> z, b = rng.standard_normal((4, 5, 3)), rng.standard_normal(3)
    >>> out = F.taylor_activation_forward(z, b, "tanh", d=2)
    >>> g = rng.standard_normal(out.shape)
    >>> F.taylor_activation_backward(g, z, out[0], b, "tanh", d=2).shape
    (4, 5, 3)
    """
    device, dtype, act = _check_taylor_args(z, b, activation, d, second)
    _check_stack("g", g, device, dtype, z.shape)
    _check_stack("y", y, device, dtype, z.shape[1:])
    return get_backend(device).taylor_activation_backward(g, z, y, b, act, d=d, second=second)
# -- optimizers (cupynn/optim.py) ------------------------------------------------------

def _check_param_list(params, labels, what="parameter", *, distinct=True):
    """(device, dtype) shared by every array of ``params``; raise on the first that differs."""
    if len(params) == 0:
        raise ValueError("an optimizer needs at least one parameter array")
    params = list(params)
    first = params[0]
    device = array_device(first)
    if device is None:
        raise TypeError(f"{labels[0]} must be a NumPy or CuPy array, got {type(first).__name__}")
    dtype = as_float_dtype(first.dtype)
    for a, label in zip(params, labels):
        check_array(a, what=label, device=device, dtype=dtype, ndim=(getattr(a, "ndim", 0),))
        if not a.flags.c_contiguous:
            raise ValueError(f"{label} must be C-contiguous: pass xp.ascontiguousarray(...)")
        check_writeable(a, f"the parameter {label}")
    if distinct:
        _check_distinct(params, labels)
    return device, dtype


def _check_distinct(arrays, labels) -> None:
    """Refuse a parameter list holding one array twice (a layer used twice in a Chain): an
    update or a flat vector would write it twice with different values."""
    clash = first_overlap(list(zip(labels, arrays)))
    if clash is not None:
        raise ValueError(
            f"{clash[0]} and {clash[1]} are the same memory (a layer used twice in a Chain, or "
            "layers built on one array): an update or a flat vector would write it twice; share "
            "weights by adding the two gradients yourself, or copy the layer")


def optimizer_state(kind: str, params, labels, buffers: tuple[str, ...]) -> OptimizerState:
    """Zeroed optimizer state (step 0) for the arrays ``params`` on their backend.

    ``params``: a flat list of arrays of one dtype on one device; ``labels``: their names
    for error messages; ``buffers``: the per-parameter state arrays to keep (e.g.
    ``("exp_avg", "exp_avg_sq")``). :mod:`cupynn.optim` is built on this and the
    ``optimizer_*`` functions below.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> W = np.ones((2, 3))
    >>> state = F.optimizer_state("sgd", [W], ["W"], ())
    >>> state.kind, state.shapes, F.optimizer_get_step(state, [W])
    ('sgd', ((2, 3),), 0)
    """
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"optimizer kind must be one of {OPTIMIZER_KINDS}, got {kind!r}")
    device, dtype = _check_param_list(params, labels)
    state = get_backend(device).optimizer_state(kind, tuple(tuple(p.shape) for p in params),
                                                dtype, tuple(buffers))
    state.device = device
    return state


def optimizer_step(state: OptimizerState, hyper: tuple, params, grads, labels) -> None:
    """One optimizer update of ``params`` (flat list) with ``grads`` (flat list), in place.

    Every gradient is checked (count, shape, dtype, device, C-contiguity) against its
    parameter before anything is written: a bad one raises and changes nothing.
    ``hyper`` is the tuple :class:`cupynn.backends.base.OptimizerState` describes; plain
    SGD: ``W -= lr * dW``.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> W = np.ones((2, 3))
    >>> state = F.optimizer_state("sgd", [W], ["W"], ())
    >>> F.optimizer_step(state, (0.5, 0.0, 0.0, 0.0, 0.0, 0.0), [W], [np.ones((2, 3))], ["W"])
    >>> W[0], F.optimizer_get_step(state, [W])
    (array([0.5, 0.5, 0.5]), 1)
    """
    ids = [id(p) for p in params]  # the same arrays as at the last step: known distinct
    seen = getattr(state, "_distinct_ids", None) == ids
    device, dtype = _check_param_list(params, labels, distinct=not seen)
    state._distinct_ids = ids
    if (dtype != state.dtype or device != state.device
            or tuple(tuple(p.shape) for p in params) != state.shapes):
        raise ValueError(
            f"the optimizer's state was made for {state.dtype} parameters on '{state.device}' "
            f"but its parameters are {dtype} on '{device}' (the model was moved or changed "
            "dtype?): make a new optimizer for model.parameters()")
    if len(grads) != len(params):
        raise ValueError(f"expected {len(params)} gradient arrays, got {len(grads)}")
    grads = list(grads)
    for i, (p, g, label) in enumerate(zip(params, grads, labels)):
        what = f"the gradient of {label}"
        if g is None:
            raise TypeError(f"{what} is None; pass an array shaped like the parameter "
                            f"{tuple(p.shape)} (e.g. from cupynn.value_and_grad)")
        grads[i] = g = intake(g, what=what, device=device, dtype=dtype)
        check_array(g, what=what, device=device, dtype=dtype, ndim=(p.ndim,))
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{what} has shape {tuple(g.shape)}; the parameter has "
                             f"{tuple(p.shape)}")
        if not g.flags.c_contiguous:
            raise ValueError(f"{what} is not C-contiguous: pass xp.ascontiguousarray(g) "
                             "(cupynn does not copy silently)")
    clash = first_overlap(list(zip(labels, params)), list(zip(labels, grads)))
    if clash is not None:
        raise ValueError(f"the parameter {clash[0]} shares memory with the gradient of {clash[1]}: "
                         "pass the gradients value_and_grad returned")
    backend = get_backend(device)
    if device != "cpu":  # one kernel launch: a launch that fails has written nothing
        backend.optimizer_step(state, tuple(hyper), list(params), list(grads))
        return
    # On the CPU the update is many in-place NumPy calls: keep what it overwrites (in
    # buffers made once per optimizer: no allocation per step), and put it back if anything
    # fails half-way (an interrupt, an error the user's np.seterr asked for), so that a step
    # happens whole or not at all.
    targets = list(params) + [b for bufs in state.buffers.values() for b in bufs]
    kept = getattr(state, "_step_copies", None)  # kept with the state, made on the first step
    if kept is None or len(kept) != len(targets):
        kept = [np.empty_like(a) for a in targets]
        state._step_copies = kept
    for dst, src in zip(kept, targets):
        np.copyto(dst, src)
    step = backend.optimizer_get_step(state)
    try:
        backend.optimizer_step(state, tuple(hyper), list(params), list(grads))
    except BaseException:
        for dst, src in zip(targets, kept):
            np.copyto(dst, src)
        backend.optimizer_set_step(state, step)
        raise


def optimizer_sync(state: OptimizerState, hyper: tuple, params) -> None:
    """Make the hyperparameters the next (possibly graph-captured) update reads current
    (a no-op on the CPU).

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> W = np.ones(3)
    >>> F.optimizer_sync(F.optimizer_state("sgd", [W], ["W"], ()), (0.1, 0, 0, 0, 0, 0), [W])
    """
    get_backend(array_device(params[0])).optimizer_sync(state, tuple(hyper))


def optimizer_get_step(state: OptimizerState, params) -> int:
    """The number of updates applied so far (one small device-to-host copy on CUDA).

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> W = np.ones(3)
    >>> F.optimizer_get_step(F.optimizer_state("adam", [W], ["W"], ("exp_avg", "exp_avg_sq")), [W])
    0
    """
    return get_backend(array_device(params[0])).optimizer_get_step(state)


def optimizer_set_step(state: OptimizerState, params, n: int) -> None:
    """Set the step count (in place on the device): Adam's bias correction reads it.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> W = np.ones(3)
    >>> state = F.optimizer_state("adam", [W], ["W"], ("exp_avg", "exp_avg_sq"))
    >>> F.optimizer_set_step(state, [W], 7)
    >>> F.optimizer_get_step(state, [W])
    7
    """
    n = check_count(n, "the step count")
    get_backend(array_device(params[0])).optimizer_set_step(state, n)

# -- Jacobians and Gauss-Newton matrices (cupynn/jacobian.py) --------------------------------

def _same_kind(what, a, device, dtype, ndim):
    check_array(a, what=what, device=device, dtype=dtype, ndim=(ndim,))


def jacobian_rows(dz, h, out, *, col=0, has_bias=True) -> None:
    """Write one layer's per-sample Jacobian columns ``[dz ⊗ h | dz]`` into ``out`` (in place).

    ``dz`` ``(nb, B, m, n)``: per sample ``b`` and output ``o``, the derivative of the row's
    value w.r.t. the layer's pre-activation (one block, ``nb = 1``, for the model's outputs;
    the forward-Laplacian blocks for a PDE residual); ``h`` ``(nb, B, k)``: the layer's input
    blocks; ``out`` a C-contiguous ``(B * m, P)`` chunk of Jacobian rows (row ``b * m + o``)
    whose columns ``col .. col + n k (+ n)`` are the layer's:
    ``out[b*m+o, col + i*k + j] = sum_s dz[s,b,o,i] h[s,b,j]`` (``s`` summed in order) and,
    with ``has_bias``, ``out[b*m+o, col + n*k + i] = dz[0,b,o,i]``.
    On CUDA: ``kernels/jacobian.cu`` (one thread per element written).

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> dz, h = np.ones((1, 2, 1, 3)), np.arange(8.0).reshape(1, 2, 4)
    >>> out = np.zeros((2, 16))
    >>> F.jacobian_rows(dz, h, out, col=1)
    >>> out[1, 1:5], out[1, 13:]
    (array([4., 5., 6., 7.]), array([1., 1., 1.]))
    """
    device = array_device(dz)
    if device is None:
        raise TypeError(f"dz must be a NumPy or CuPy array, got {type(dz).__name__}")
    dtype = as_float_dtype(dz.dtype)
    _same_kind("dz", dz, device, dtype, 4)
    _same_kind("h", h, device, dtype, 3)
    _same_kind("out", out, device, dtype, 2)
    nb, B, m, n = dz.shape
    k = h.shape[2]
    if tuple(h.shape[:2]) != (nb, B):
        raise ValueError(f"h must have shape ({nb}, {B}, k) to match dz {tuple(dz.shape)}, "
                         f"got {tuple(h.shape)}")
    width = n * k + (n if has_bias else 0)
    if isinstance(col, bool) or not isinstance(col, (int, np.integer)) or col < 0:
        raise ValueError(f"col must be a non-negative integer, got {col!r}")
    if out.shape[0] != B * m or out.shape[1] < col + width:
        raise ValueError(f"out must have {B * m} rows (B * m) and at least {col + width} columns "
                         f"(col + {width}) for dz {tuple(dz.shape)} and h {tuple(h.shape)}, "
                         f"got {tuple(out.shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous (a chunk of Jacobian rows)")
    get_backend(device).jacobian_rows(dz, h, out, int(col), bool(has_bias))


def gram_update(G, J) -> None:
    """``G += J^T J`` (in place) for a chunk ``J`` ``(R, P)`` of Jacobian rows; ``G`` ``(P, P)``.

    Summing the chunks in order gives the Gramian ``J^T J`` of all the rows without storing them.

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> G = np.zeros((2, 2))
    >>> F.gram_update(G, np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> G
    array([[10., 14.],
           [14., 20.]])
    """
    device = array_device(G)
    if device is None:
        raise TypeError(f"G must be a NumPy or CuPy array, got {type(G).__name__}")
    dtype = as_float_dtype(G.dtype)
    _same_kind("G", G, device, dtype, 2)
    _same_kind("J", J, device, dtype, 2)
    P = J.shape[1]
    if tuple(G.shape) != (P, P):
        raise ValueError(f"G must have shape ({P}, {P}) (J has {P} columns), got {tuple(G.shape)}")
    get_backend(device).gram_update(G, J)
