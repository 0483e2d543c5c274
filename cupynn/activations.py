"""Activation functions and their derivatives: the reference formulas.

Every activation has a small integer ``id`` shared with the CUDA kernels
(``kernels/activations.cuh`` switches on the same numbers), and says whether
its derivative is computed from the layer's *output* ``y`` (identity, relu,
leaky_relu, tanh, sigmoid) or from the *pre-activation* ``z`` (softplus, silu,
gelu, gelu_erf, elu). A layer's forward saves exactly that one array for its
backward (docs/design.md, section 2).

Formulas (``z`` the pre-activation, ``y = f(z)``):

============  ==================================  ===============================
name          f(z)                                f'(.)
============  ==================================  ===============================
identity      z                                   1
relu          0 if z < 0 else z                   1 if y > 0 else 0
leaky_relu    0.01 z if z < 0 else z              1 if y > 0 else 0.01
tanh          tanh z                              1 - y^2
sigmoid       1 / (1 + exp(-z))                   y (1 - y)
softplus      log1p(exp(-|z|)) + max(z, 0)        sigmoid(z)
silu          z sigmoid(z)                        s (1 + z (1 - s)),  s = sigmoid(z)
gelu          z/2 (1 + tanh(c (z + 0.044715 z^3)))  see ``_gelu_tanh_derivative``
gelu_erf      z/2 (1 + erf(z / sqrt 2))           Phi(z) + z phi(z)
elu           z if z > 0 else expm1(z)            1 if z > 0 else exp(z)
============  ==================================  ===============================

NaN propagates: relu(NaN) is NaN (``z < 0`` is false for NaN), and a NaN
upstream gradient stays NaN because backward multiplies ``g * f'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "LEAKY_RELU_SLOPE"]

LEAKY_RELU_SLOPE = 0.01
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@dataclass(frozen=True)
class Activation:
    """One activation: its name, kernel id, and NumPy forward/derivative.

    ``forward(z)`` returns ``f(z)`` (a new array). ``derivative(v)`` returns
    ``f'`` evaluated from ``v``, which is the output ``y`` when
    ``from_output`` is true and the pre-activation ``z`` otherwise.

    >>> import numpy as np
    >>> from cupynn.activations import ACTIVATIONS
    >>> tanh = ACTIVATIONS["tanh"]
    >>> y = tanh.forward(np.array([0.0, 1.0]))
    >>> tanh.id, tanh.from_output, np.allclose(tanh.derivative(y), 1 - y**2)
    (3, True, True)
    """

    name: str
    id: int
    from_output: bool
    forward: Callable[[np.ndarray], np.ndarray]
    derivative: Callable[[np.ndarray], np.ndarray]

    def __repr__(self) -> str:
        return f"Activation({self.name})"


def _one(dtype):
    return np.asarray(1, dtype=dtype)


def _relu(z):
    return np.where(z < 0, np.zeros((), z.dtype), z)


def _relu_d(y):
    return (y > 0).astype(y.dtype)


def _leaky(z):
    return np.where(z < 0, z * z.dtype.type(LEAKY_RELU_SLOPE), z)


def _leaky_d(y):
    return np.where(y > 0, _one(y.dtype), y.dtype.type(LEAKY_RELU_SLOPE))


def _sigmoid(z):
    # exp of a non-positive argument only: no overflow for large |z|.
    e = np.exp(-np.abs(z))
    one = z.dtype.type(1)
    return np.where(z >= 0, one / (one + e), e / (one + e))


def _sigmoid_d(y):
    return y * (y.dtype.type(1) - y)


def _tanh_d(y):
    return y.dtype.type(1) - y * y


def _softplus(z):
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, z.dtype.type(0))


def _silu(z):
    return z * _sigmoid(z)


def _silu_d(z):
    s = _sigmoid(z)
    one = z.dtype.type(1)
    return s * (one + z * (one - s))


def _gelu_tanh(z):
    t = z.dtype.type
    u = t(_GELU_C) * (z + t(_GELU_A) * z * z * z)
    return t(0.5) * z * (t(1) + np.tanh(u))


def _gelu_tanh_derivative(z):
    t = z.dtype.type
    u = t(_GELU_C) * (z + t(_GELU_A) * z * z * z)
    th = np.tanh(u)
    du = t(_GELU_C) * (t(1) + t(3 * _GELU_A) * z * z)
    return t(0.5) * (t(1) + th) + t(0.5) * z * (t(1) - th * th) * du


def _erf(z: np.ndarray) -> np.ndarray:
    """Elementwise erf: SciPy's when installed, else the C library's via math.erf."""
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - exercised where SciPy is absent
        erf = np.frompyfunc(math.erf, 1, 1)
        return erf(z).astype(z.dtype)
    return erf(z).astype(z.dtype, copy=False)


def _gelu_erf(z):
    t = z.dtype.type
    return t(0.5) * z * (t(1) + _erf(z * t(1 / math.sqrt(2.0))))


def _gelu_erf_d(z):
    t = z.dtype.type
    cdf = t(0.5) * (t(1) + _erf(z * t(1 / math.sqrt(2.0))))
    pdf = np.exp(t(-0.5) * z * z) * t(1 / math.sqrt(2 * math.pi))
    return cdf + z * pdf


def _elu(z):
    return np.where(z > 0, z, np.expm1(np.minimum(z, z.dtype.type(0))))


def _elu_d(z):
    return np.where(z > 0, _one(z.dtype), np.exp(np.minimum(z, z.dtype.type(0))))


def _identity_d(v):
    return np.ones_like(v)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", 0, True, lambda z: z.copy(), _identity_d),
        Activation("relu", 1, True, _relu, _relu_d),
        Activation("leaky_relu", 2, True, _leaky, _leaky_d),
        Activation("tanh", 3, True, np.tanh, _tanh_d),
        Activation("sigmoid", 4, True, _sigmoid, _sigmoid_d),
        Activation("softplus", 5, False, _softplus, _sigmoid),
        Activation("silu", 6, False, _silu, _silu_d),
        Activation("gelu", 7, False, _gelu_tanh, _gelu_tanh_derivative),
        Activation("gelu_erf", 8, False, _gelu_erf, _gelu_erf_d),
        Activation("elu", 9, False, _elu, _elu_d),
    )
}


def get_activation(activation: str | Activation) -> Activation:
    """Look an activation up by name (or pass an :class:`Activation` through).

    >>> from cupynn.activations import get_activation
    >>> get_activation("gelu_erf")
    Activation(gelu_erf)
    """
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(
            f"activation must be a name such as 'relu', got {type(activation).__name__}; "
            f"known: {', '.join(ACTIVATIONS)}"
        )
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}"
        ) from None
