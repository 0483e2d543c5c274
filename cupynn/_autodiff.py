"""What :mod:`cupynn.jax` and :mod:`cupynn.torch` share to differentiate a user's scalar function.

A loss ``f(y) -> scalar`` or a residual ``r(u, du, lap[, x]) -> scalar`` written in
``jax.numpy`` or torch becomes the protocol the rest of cupynn already speaks: a callable
that returns ``(value, dL/dy)`` (a loss) or ``(value, dL/du, dL/d(du), dL/d(lap))`` (a
residual), each partial a NumPy/CuPy array on the model's device. The arrays go to the
library through DLPack and the partials come back the same way, without a copy where the
library allows it (JAX on the CPU needs 64-byte aligned memory: a NumPy array that is not
is copied once into an aligned buffer).

This module imports neither JAX nor torch; the two front-ends pass their own converters.
"""

from __future__ import annotations

import inspect

import numpy as np

from ._arrays import intake
from ._devices import array_device

__all__ = ["AutodiffLoss", "AutodiffResidual", "wants_x", "from_library", "aligned_host"]

_ALIGN = 64


def wants_x(fn) -> bool:
    """Whether a residual function takes ``x`` as a fourth positional argument."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4


def aligned_host(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it is C-contiguous and 64-byte aligned, else such a copy of it."""
    if a.flags.c_contiguous and a.ctypes.data % _ALIGN == 0:
        return a
    buf = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def from_library(a, like, what: str):
    """A JAX array or torch tensor ``a`` as a NumPy/CuPy array on ``like``'s device and of its
    dtype (through DLPack, no copy); a wrong dtype or device is an error, never a cast."""
    device = array_device(like)
    out = intake(a, what=what, device=device, dtype=like.dtype)
    if array_device(out) is None:
        raise TypeError(f"{what} must be an array of the autodiff library, got {type(a).__name__}")
    return out


def _scalar(value, like, what: str, library: str):
    """The function's value as a 0-d array of ``like``'s dtype on its device."""
    shape = tuple(getattr(value, "shape", ()))
    if int(np.prod(shape)) != 1:
        raise ValueError(f"the {what} must return a scalar; it returned an array of shape {shape} "
                         f"(sum or average it in {library})")
    out = from_library(value, like, f"the {what}'s value")
    return out.reshape(())


class AutodiffLoss:
    """``loss(y) -> (value, dL/dy)`` for a scalar ``f(y)``, differentiated by a library.

    Made by ``cupynn.jax.loss(f)`` or ``cupynn.torch.loss(f)``; the callable protocol that
    :func:`cupynn.value_and_grad` accepts. ``f`` sees the whole batch ``y (batch, out)``
    (``(out,)`` for one sample), so it may couple samples.

    >>> import numpy as np
    >>> from cupynn._autodiff import AutodiffLoss
    >>> hand = AutodiffLoss("numpy", lambda y: ((y * y).sum(), 2 * y))   # a stand-in library
    >>> hand(np.ones((2, 1)))[1].shape
    (2, 1)
    """

    def __init__(self, library: str, value_and_grad, fn=None):
        self.library = library
        self._value_and_grad = value_and_grad  # y (backend array) -> (value, dL/dy) in the library
        self.fn = fn

    def __call__(self, y):
        value, g = self._value_and_grad(y)
        if array_device(g) is not None:  # a stand-in returning NumPy/CuPy already
            return value, g
        return (_scalar(value, y, "loss", self.library),
                from_library(g, y, f"dL/dy from {self.library}"))

    def __repr__(self) -> str:
        return f"cupynn.{self.library}.loss({getattr(self.fn, '__name__', self.fn)!r})"


class AutodiffResidual:
    """``residual(u, du, lap, x) -> (value, dL/du, dL/d(du), dL/d(lap))`` for a scalar
    ``r(u, du, lap[, x])``, differentiated by a library.

    Made by ``cupynn.jax.residual(r)`` or ``cupynn.torch.residual(r)``; the callable protocol
    :func:`cupynn.residual_value_and_grad` accepts (it always passes ``x``; ``r`` gets it
    when it has four positional parameters).

    >>> import numpy as np
    >>> from cupynn._autodiff import AutodiffResidual
    >>> def vg(u, du, lap):                        # a stand-in library: r = sum(lap**2)
    ...     return (lap ** 2).sum(), (None, None, 2 * lap)
    >>> out = AutodiffResidual("numpy", vg, False)(np.ones(3), np.ones((3, 2)), np.ones(3), None)
    >>> out[3]
    array([2., 2., 2.])
    """

    def __init__(self, library: str, value_and_grads, pass_x: bool, fn=None):
        self.library = library
        self._value_and_grads = value_and_grads  # (u, du, lap[, x]) -> (value, (gu, gdu, glap))
        self.pass_x = pass_x
        self.fn = fn

    def __call__(self, u, du, lap, x=None):
        args = (u, du, lap, x) if self.pass_x else (u, du, lap)
        value, grads = self._value_and_grads(*args)
        names = ("dL/du", "dL/d(du)", "dL/d(lap)")
        parts = []
        for g, ref, name in zip(grads, (u, du, lap), names):
            if g is None or array_device(g) is not None:
                parts.append(g)
            else:
                parts.append(from_library(g, ref, f"{name} from {self.library}"))
        if array_device(value) is None:
            value = _scalar(value, u, "residual", self.library)
        return (value, *parts)

    def __repr__(self) -> str:
        return f"cupynn.{self.library}.residual({getattr(self.fn, '__name__', self.fn)!r})"
