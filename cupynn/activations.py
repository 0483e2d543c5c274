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

Higher derivatives (``Activation.higher_derivatives(v, order)``: f', f'', f'''
from the same ``v`` as ``derivative``) serve the derivatives with respect to the
network's *inputs* (:mod:`cupynn.derivatives`: the Laplacian needs f'', the
parameter gradient of a loss built on it also f'''):

============  =====================================================================
name          f''  and  f'''
============  =====================================================================
identity      0,  0
relu          0,  0   (almost everywhere: the kink at z = 0 is not seen)
leaky_relu    0,  0   (the same)
tanh          -2 y f',   f' (6 y^2 - 2)
sigmoid       f' (1 - 2 y),   f' (1 - 6 y + 6 y^2)
softplus      s',   s' (1 - 2 s)                    (s = sigmoid(z), s' = s (1 - s))
silu          s' (2 + z (1 - 2 s)),   s' (3 (1 - 2 s) + z (1 - 6 s + 6 s^2))
gelu          t' + z t''/2,   3 t''/2 + z t'''/2    (t = tanh(c (z + 0.044715 z^3)))
gelu_erf      phi (2 - z^2),   z phi (z^2 - 4)      (phi the normal density)
elu           0 if z > 0 else exp(z)  (both)
============  =====================================================================

relu and leaky_relu networks are piecewise linear: their Laplacian is 0 wherever it
exists (the true second derivative is a Dirac measure on each kink hyperplane, which
no pointwise formula sees), so a loss built on it gives no signal; use a smooth
activation (tanh, silu, softplus, gelu, gelu_erf) for physics-informed losses. elu's
f'' jumps at 0. ``higher_derivatives`` is NaN wherever ``v`` is NaN, in every order and
for every activation except identity (whose derivatives do not depend on ``v``); relu's
and leaky_relu's ``derivative`` maps NaN to 0 instead, as the plain backward does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "LEAKY_RELU_SLOPE"]

_SQRT_2PI_INV = 1.0 / math.sqrt(2.0 * math.pi)

LEAKY_RELU_SLOPE = 0.01
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@dataclass(frozen=True)
class Activation:
    """One activation: its name, kernel id, and NumPy forward/derivative.

    ``forward(z)`` returns ``f(z)`` (a new array). ``derivative(v)`` returns
    ``f'`` evaluated from ``v``, which is the output ``y`` when
    ``from_output`` is true and the pre-activation ``z`` otherwise.
    ``higher_derivatives(v, order)`` returns the first ``order`` derivatives
    ``(f', f'', f''')[:order]`` from the same ``v``, NaN wherever ``v`` is NaN.

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
    higher: Callable[[np.ndarray, int], tuple] | None = None

    def higher_derivatives(self, v: np.ndarray, order: int = 3) -> tuple[np.ndarray, ...]:
        """The first ``order`` derivatives (f', f'', f''') from ``v`` (y or z, as ``derivative``).

        >>> import numpy as np
        >>> from cupynn.activations import get_activation
        >>> d1, d2 = get_activation("tanh").higher_derivatives(np.array([0.5]), 2)  # v = y
        >>> float(d2[0])  # -2 y (1 - y^2)
        -0.75
        """
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        return tuple(self.higher(v, order))[:order]

    def second_derivative(self, v: np.ndarray) -> np.ndarray:
        """f'' evaluated from ``v`` (y or z, as for ``derivative``)."""
        return self.higher_derivatives(v, 2)[1]

    def third_derivative(self, v: np.ndarray) -> np.ndarray:
        """f''' evaluated from ``v`` (y or z, as for ``derivative``)."""
        return self.higher_derivatives(v, 3)[2]

    def __repr__(self) -> str:
        return f"Activation({self.name})"

    def __reduce__(self):
        # by name: the formulas are module-level lambdas, which pickle cannot carry, and an
        # unpickled model must share the registry's instances
        return get_activation, (self.name,)


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


# -- f', f'', f''' together: shared intermediates; NaN in, NaN out in every order -----

def _keep_nan(v, value):
    """``value`` where ``v`` is a number, NaN where ``v`` is NaN."""
    return np.where(np.isnan(v), v, np.asarray(value, dtype=v.dtype))


def _identity_h(v, order):
    return (np.ones_like(v), np.zeros_like(v), np.zeros_like(v))[:order]


def _relu_h(y, order):
    d1 = np.sign(y)  # y >= 0 or NaN: 1 where y > 0, 0 at 0, NaN at NaN
    zero = _keep_nan(y, 0) if order > 1 else None
    return (d1, zero, zero)[:order]


def _leaky_h(y, order):
    t = y.dtype.type
    d1 = _keep_nan(y, np.where(y > 0, t(1), t(LEAKY_RELU_SLOPE)))
    zero = _keep_nan(y, 0) if order > 1 else None
    return (d1, zero, zero)[:order]


def _tanh_h(y, order):
    t = y.dtype.type
    d1 = t(1) - y * y
    if order == 1:
        return (d1,)
    d2 = t(-2) * y * d1
    if order == 2:
        return d1, d2
    return d1, d2, d1 * (t(6) * y * y - t(2))


def _sigmoid_h(y, order):
    t = y.dtype.type
    d1 = y * (t(1) - y)
    if order == 1:
        return (d1,)
    d2 = d1 * (t(1) - t(2) * y)
    if order == 2:
        return d1, d2
    return d1, d2, d1 * (t(1) - t(6) * y + t(6) * y * y)


def _softplus_h(z, order):
    t = z.dtype.type
    s = _sigmoid(z)
    if order == 1:
        return (s,)
    s1 = s * (t(1) - s)
    if order == 2:
        return s, s1
    return s, s1, s1 * (t(1) - t(2) * s)


def _silu_h(z, order):
    t = z.dtype.type
    one = t(1)
    s = _sigmoid(z)
    d1 = s * (one + z * (one - s))
    if order == 1:
        return (d1,)
    s1 = s * (one - s)
    d2 = s1 * (t(2) + z * (one - t(2) * s))
    if order == 2:
        return d1, d2
    return d1, d2, s1 * (t(3) * (one - t(2) * s) + z * (one - t(6) * s + t(6) * s * s))


def _gelu_h(z, order):
    # f = z (1 + th)/2 with th = tanh(u), u = c (z + a z^3), w = 1 - th^2:
    #   th' = w u',  th'' = w (u'' - 2 th u'^2),
    #   th''' = -2 th w u' (u'' - 2 th u'^2) + w (u''' - 2 w u'^3 - 4 th u' u'');
    #   f' = (1 + th)/2 + z th'/2,  f'' = th' + z th''/2,  f''' = 3 th''/2 + z th'''/2.
    t = z.dtype.type
    c, a = t(_GELU_C), t(_GELU_A)
    th = np.tanh(c * (z + a * z * z * z))
    w = t(1) - th * th
    u1 = c * (t(1) + t(3) * a * z * z)
    th1 = w * u1
    d1 = t(0.5) * (t(1) + th) + t(0.5) * z * th1
    if order == 1:
        return (d1,)
    u2 = t(6) * c * a * z
    inner = u2 - t(2) * th * u1 * u1
    th2 = w * inner
    d2 = th1 + t(0.5) * z * th2
    if order == 2:
        return d1, d2
    u3 = t(6) * c * a
    th3 = t(-2) * th * w * u1 * inner + w * (u3 - t(2) * w * u1 * u1 * u1 - t(4) * th * u1 * u2)
    return d1, d2, t(1.5) * th2 + t(0.5) * z * th3


def _gelu_erf_h(z, order):
    t = z.dtype.type
    pdf = np.exp(t(-0.5) * z * z) * t(_SQRT_2PI_INV)
    d1 = t(0.5) * (t(1) + _erf(z * t(1 / math.sqrt(2.0)))) + z * pdf
    if order == 1:
        return (d1,)
    z2 = z * z
    d2 = pdf * (t(2) - z2)
    if order == 2:
        return d1, d2
    return d1, d2, z * pdf * (z2 - t(4))


def _elu_h(z, order):
    e = np.exp(np.minimum(z, z.dtype.type(0)))  # NaN stays NaN
    d1 = np.where(z > 0, _one(z.dtype), e)
    if order == 1:
        return (d1,)
    d2 = np.where(z > 0, np.zeros((), z.dtype), e)
    return (d1, d2, d2)[:order]


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", 0, True, lambda z: z.copy(), _identity_d, _identity_h),
        Activation("relu", 1, True, _relu, _relu_d, _relu_h),
        Activation("leaky_relu", 2, True, _leaky, _leaky_d, _leaky_h),
        Activation("tanh", 3, True, np.tanh, _tanh_d, _tanh_h),
        Activation("sigmoid", 4, True, _sigmoid, _sigmoid_d, _sigmoid_h),
        Activation("softplus", 5, False, _softplus, _sigmoid, _softplus_h),
        Activation("silu", 6, False, _silu, _silu_d, _silu_h),
        Activation("gelu", 7, False, _gelu_tanh, _gelu_tanh_derivative, _gelu_h),
        Activation("gelu_erf", 8, False, _gelu_erf, _gelu_erf_d, _gelu_erf_h),
        Activation("elu", 9, False, _elu, _elu_d, _elu_h),
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
