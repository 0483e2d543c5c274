"""Functional operations: the one place that dispatches on the backend.

Layers call :func:`forward` and :func:`value_and_grad`; users who compose
their own computations can call the single-layer operations
(:func:`dense_forward`, :func:`dense_backward`) and the losses
(:func:`loss_forward`, :func:`loss_backward`) directly. Every function
checks its arguments (shape, dtype, device) here, once, so backends only
ever see well-formed inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._devices import array_device
from ._validate import as_float_dtype, check_array, check_precision
from .activations import get_activation
from .backends import get_backend
from .backends.base import LayerSpec, NetSpec
from .losses import loss_backward, loss_forward, make_loss

__all__ = [
    "forward",
    "value_and_grad",
    "dense_forward",
    "dense_backward",
    "DenseContext",
    "loss_forward",
    "loss_backward",
]


# -- whole models ---------------------------------------------------------------

def _model_parts(model):
    """(layers, NetSpec, [(W, b)], backend) of a Dense or Chain."""
    layers = model._dense_layers()
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
    return layers, net, params, backend


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


def forward(model, x):
    """The model's output for a batch ``x`` of shape ``(batch, in)`` (or one sample ``(in,)``).

    ``y = act_n(... act_1(x @ W_1.T + b_1) ...)``, shape ``(batch, out)`` (``(out,)`` for
    one sample); the same as ``model(x)``.

    >>> import numpy as np, cupynn
    >>> from cupynn import functional
    >>> m = cupynn.MLP([3, 4, 2], "relu", device="cpu", rng=0)
    >>> functional.forward(m, np.ones((5, 3))).shape, functional.forward(m, np.ones(3)).shape
    ((5, 2), (2,))
    """
    layers, net, params, backend = _model_parts(model)
    x2, single = _check_batch(model, layers, x)
    y = backend.network_forward(net, params, x2)
    return y.reshape(-1) if single else y


def value_and_grad(model, x, loss="sum_squares", *, target=None, wrt_input=False):
    """The scalar ``loss(model(x))`` and its gradient w.r.t. every weight and bias.

    Parameters
    ----------
    model : Dense or Chain
    x : array of shape ``(batch, in)`` or ``(in,)``, the model's dtype and device
    loss : ``"sum_squares"`` (``sum((y - target)**2)``), ``"mse"`` (the same
        divided by ``y.size``), or a callable ``loss(y) -> (value, dL/dy)``
        working on the model's array type
    target : optional array shaped like the output (built-in losses only)
    wrt_input : also return ``dL/dx``

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
    """
    layers, net, params, backend = _model_parts(model)
    x2, single = _check_batch(model, layers, x)
    spec = make_loss(loss, target)
    if spec.target is not None:
        out_shape = (x.shape[0], net.out_features) if not single else (net.out_features,)
        check_array(spec.target, what="target", device=model.device, dtype=model.dtype,
                    ndim=(spec.target.ndim,) if hasattr(spec.target, "ndim") else (len(out_shape),))
        got = tuple(spec.target.shape)
        if got != out_shape:
            hint = ""
            if int(np.prod(got)) == int(np.prod(out_shape)):
                hint = f": reshape it with target.reshape{out_shape}"
            raise ValueError(
                f"target must have the output's shape {out_shape} "
                f"{'(out_features,)' if single else '(batch, out_features)'}, got {got}{hint}"
            )
        if single:
            spec = type(spec)(spec.kind, spec.target.reshape(1, -1), None)
    if spec.kind == "callable" and single:
        fn = spec.fn

        def fn2d(y2):
            out = fn(y2.reshape(-1))
            if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "reshape"):
                return out[0], out[1].reshape(1, -1)
            return out  # the backend's check says what is wrong with it

        spec = type(spec)("callable", None, fn2d)
    value, pairs, dx = backend.network_value_and_grad(net, params, x2, spec, need_dx=wrt_input)
    grads = model._grads_like_parameters(pairs)
    if wrt_input:
        return value, grads, (dx.reshape(-1) if single else dx)
    return value, grads


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


def _check_layer_args(x, W, b, activation, precision):
    device = array_device(W)
    if device is None:
        raise TypeError(f"W must be a NumPy or CuPy array, got {type(W).__name__}")
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
    ``ctx`` feeds :func:`dense_backward`. The device is ``W``'s (NumPy or CuPy arrays).

    >>> import numpy as np
    >>> from cupynn import functional as F
    >>> x, W, b = np.ones((2, 3)), np.full((4, 3), 0.5), np.zeros(4)
    >>> F.dense_forward(x, W, b, "relu")
    array([[1.5, 1.5, 1.5, 1.5],
           [1.5, 1.5, 1.5, 1.5]])
    """
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
    check_array(g, what="g", device=ctx.device, dtype=ctx.W.dtype, ndim=(2,))
    expected = (ctx.x.shape[0], ctx.W.shape[0])
    if tuple(g.shape) != expected:
        raise ValueError(f"g must have the layer output's shape {expected}, got {tuple(g.shape)}")
    backend = get_backend(ctx.device)
    return backend.dense_backward(g, ctx.x, ctx.saved, ctx.W, ctx.activation,
                                  has_bias=ctx.has_bias, need_dx=need_dx,
                                  precision=ctx.precision)
