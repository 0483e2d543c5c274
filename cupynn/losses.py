"""Scalar losses of a network's output ``y``: value and ``dL/dy``.

Plain array code shared by every backend through the array's own module
(NumPy or CuPy), the Chainer way. Backends may fuse these into their last
layer; this module is the definition they are tested against.

``sum_squares``: ``L = sum((y - t)**2)``, ``dL/dy = 2 (y - t)``
(the seed thread's ``sum(abs2, m(x))`` when ``t`` is ``None``).

``mse``: ``L = sum((y - t)**2) / y.size``, ``dL/dy = 2 (y - t) / y.size``;
an empty batch gives ``L = 0``.
"""

from __future__ import annotations

from collections.abc import Callable

from ._validate import check_loss_value
from .backends.base import LossSpec

__all__ = ["BUILTIN_LOSSES", "make_loss", "loss_forward", "loss_backward", "loss_scale",
           "call_loss"]

BUILTIN_LOSSES = ("sum_squares", "mse")


def _xp(a):
    mod = type(a).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    import numpy

    return numpy


def make_loss(loss: str | Callable, target=None) -> LossSpec:
    """Turn the user's ``loss`` argument into a :class:`LossSpec`.

    ``loss`` is ``"sum_squares"``, ``"mse"`` or a callable ``loss(y) -> (value, dL/dy)``
(``cupynn.jax.loss(f)`` / ``cupynn.torch.loss(f)`` make one from a scalar ``f(y)``);
    ``target`` (built-in losses only) is an array shaped like the output, or None (0).

    >>> from cupynn.losses import make_loss
    >>> make_loss("mse").kind, make_loss(lambda y: ((y**2).sum(), 2 * y)).kind
    ('mse', 'callable')
    """
    if callable(loss):
        if hasattr(loss, "pass_x") and hasattr(loss, "library"):  # cupynn.<lib>.residual(r)
            raise TypeError(f"{loss!r} is a residual of the input derivatives (u, du, lap), not a "
                            "loss of the outputs: pass it to cupynn.residual_value_and_grad, or "
                            "use cupynn.jax.loss / cupynn.torch.loss for a loss f(y)")
        if target is not None:
            raise ValueError("target= is for the built-in losses; a callable loss closes over its own")
        return LossSpec("callable", None, loss)
    if isinstance(loss, str):
        if loss not in BUILTIN_LOSSES:
            raise ValueError(
                f"unknown loss {loss!r}: use one of {BUILTIN_LOSSES} or a callable "
                "loss(y) -> (value, dL/dy)"
            )
        return LossSpec(loss, target, None)
    raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")


def loss_scale(kind: str, size: int) -> float:
    """The factor in front of ``sum((y - t)**2)``: 1, or ``1/size`` for mse (0 when empty).

    >>> from cupynn.losses import loss_scale
    >>> loss_scale("sum_squares", 10), loss_scale("mse", 10), loss_scale("mse", 0)
    (1.0, 0.1, 0.0)
    """
    if kind == "mse":
        return 1.0 / size if size else 0.0
    return 1.0


def _residual(y, target):
    return y if target is None else y - target


def loss_forward(y, loss: str, target=None):
    """The loss value as a 0-d array of ``y``'s dtype, on ``y``'s device.

    ``sum((y - target)**2)`` (``target`` None means 0), divided by ``y.size`` for ``"mse"``.

    >>> import numpy as np
    >>> from cupynn.losses import loss_forward
    >>> loss_forward(np.array([[1.0, 2.0]]), "sum_squares"), loss_forward(np.array([[1.0, 2.0]]), "mse")
    (array(5.), array(2.5))
    """
    xp = _xp(y)
    r = _residual(y, target)
    flat = r.reshape(-1)
    value = xp.dot(flat, flat) if flat.size else xp.zeros((), dtype=y.dtype)
    return xp.asarray(value * y.dtype.type(loss_scale(loss, y.size)), dtype=y.dtype)


def loss_backward(y, loss: str, target=None):
    """``dL/dy = 2 (y - target) * scale``, a new array shaped like ``y``
    (``scale`` is 1, or ``1 / y.size`` for ``"mse"``).

    >>> import numpy as np
    >>> from cupynn.losses import loss_backward
    >>> loss_backward(np.array([[1.0, 2.0]]), "sum_squares", target=np.array([[1.0, 0.0]]))
    array([[0., 4.]])
    """
    r = _residual(y, target)
    return r * y.dtype.type(2.0 * loss_scale(loss, y.size))


def call_loss(fn, y, array_type):
    """``(value, dL/dy)`` of a user's loss callable at ``y``, its gradient checked.

    ``dL/dy`` must be an ``array_type`` (the backend's array class) of ``y``'s shape and
    dtype: it is never cast or moved silently; anything else is an error that says what
    the callable must return. A callable that returns a JAX scalar (it is written in
    ``jax.numpy``) is differentiated by JAX, as ``cupynn.jax.loss(fn, jit=False)`` would.

    >>> import numpy as np
    >>> from cupynn.losses import call_loss
    >>> y = np.array([[1.0], [2.0]])
    >>> call_loss(lambda y: ((y**2).sum(), 2 * y), y, np.ndarray)[1].shape
    (2, 1)
    """
    out = fn(y)
    if not isinstance(out, tuple) and type(out).__module__.split(".")[0] in ("jax", "jaxlib") \
            and getattr(out, "size", 0) == 1:
        # a plain callable written in jax.numpy (it returned a JAX scalar for a NumPy/CuPy
        # y): JAX is the library, no guess involved; differentiated as cupynn.jax.loss(fn)
        # would, without jit (wrap it yourself to have it compiled once)
        from . import jax as cupynn_jax

        out = cupynn_jax.loss(fn, jit=False)(y)
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            "the loss callable must return a pair (value, dL/dy); got "
            f"{type(out).__name__}. Two ways out: let an autodiff library differentiate it -- "
            "write it in jax.numpy and pass cupynn.jax.loss(f), or in torch and pass "
            "cupynn.torch.loss(f) -- or return the gradient too, e.g. "
            "(float((y**2).sum()), 2 * y)"
        )
    value, g = out
    value = check_loss_value(value, y.dtype, "the loss callable")
    if not isinstance(g, array_type) or g.shape != y.shape:
        raise ValueError(
            f"the loss callable must return (value, dL/dy) with dL/dy a "
            f"{array_type.__module__.split('.')[0]} array of shape {tuple(y.shape)}; got "
            f"{type(g).__name__} {tuple(getattr(g, 'shape', ()))}"
        )
    if g.dtype != y.dtype:
        raise TypeError(
            f"the loss callable returned dL/dy of dtype {g.dtype}; the model is {y.dtype}: "
            f"return it as {y.dtype}"
        )
    return value, g
