"""An independent float64 reference: the formulas of docs/design.md (section 2) written plainly.

It shares no code with cupynn: activations are re-derived here with
``math`` functions, and the network is a plain loop that keeps every
activation. Tests compare every backend with it.
"""

from __future__ import annotations

import math

import numpy as np

_vec_erf = np.vectorize(math.erf, otypes=[np.float64])
_C = math.sqrt(2 / math.pi)


def _sig(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def act_forward(name, z):
    z = np.asarray(z, np.float64)
    if name == "identity":
        return z.copy()
    if name == "relu":
        return np.where(np.isnan(z), z, np.where(z > 0, z, 0.0))
    if name == "leaky_relu":
        return np.where(np.isnan(z), z, np.where(z > 0, z, 0.01 * z))
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return _sig(z)
    if name == "softplus":
        with np.errstate(over="ignore"):
            return np.where(z > 30, z, np.log1p(np.exp(np.minimum(z, 30))))
    if name == "silu":
        return z * _sig(z)
    if name == "gelu":
        return 0.5 * z * (1 + np.tanh(_C * (z + 0.044715 * z**3)))
    if name == "gelu_erf":
        return 0.5 * z * (1 + _vec_erf(z / math.sqrt(2)))
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    raise KeyError(name)


@np.errstate(over="ignore")
def act_derivative_of_z(name, z):
    """f'(z), written from z for every activation (independently of cupynn's choice)."""
    z = np.asarray(z, np.float64)
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, 0.01)
    if name == "tanh":
        return 1 / np.cosh(z) ** 2
    if name == "sigmoid":
        s = _sig(z)
        return s * (1 - s)
    if name == "softplus":
        return _sig(z)
    if name == "silu":
        s = _sig(z)
        return s + z * s * (1 - s)
    if name == "gelu":
        u = _C * (z + 0.044715 * z**3)
        return 0.5 * (1 + np.tanh(u)) + 0.5 * z / np.cosh(u) ** 2 * _C * (1 + 3 * 0.044715 * z**2)
    if name == "gelu_erf":
        return 0.5 * (1 + _vec_erf(z / math.sqrt(2))) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    if name == "elu":
        return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))
    raise KeyError(name)


def net_forward(params, activations, x):
    """params: [(W, b or None)]; returns (y, [inputs of each layer], [pre-activations])."""
    h = np.asarray(x, np.float64)
    inputs, pres = [], []
    for (W, b), act in zip(params, activations):
        inputs.append(h)
        z = h @ np.asarray(W, np.float64).T
        if b is not None:
            z = z + np.asarray(b, np.float64)
        pres.append(z)
        h = act_forward(act, z)
    return h, inputs, pres


def value_and_grad(params, activations, x, loss="sum_squares", target=None):
    """(value, [(dW, db)], dx) in float64 for the built-in losses."""
    y, inputs, pres = net_forward(params, activations, x)
    r = y if target is None else y - np.asarray(target, np.float64)
    scale = 1.0 if loss == "sum_squares" else (1.0 / y.size if y.size else 0.0)
    value = float(np.sum(r * r)) * scale
    g = 2 * scale * r
    grads = []
    for (W, b), act, h, z in reversed(list(zip(params, activations, inputs, pres))):
        dz = g * act_derivative_of_z(act, z)
        grads.append((dz.T @ h, None if b is None else dz.sum(0)))
        g = dz @ np.asarray(W, np.float64)
    return value, grads[::-1], g


def rel_err(a, b):
    """||a - b|| / ||b|| (absolute when the reference is zero)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    return d / nb if nb > 0 else d
