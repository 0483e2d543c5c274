"""A model's parameters as one flat float64 vector: the interface of SciPy's optimizers.

>>> import numpy as np, scipy.optimize, cupynn
>>> model = cupynn.MLP([1, 32, 1], "tanh", device="cpu", rng=0)
>>> x = np.linspace(-1, 1, 200).reshape(-1, 1)
>>> f = cupynn.flat_value_and_grad(model, x, "mse", target=np.sin(3 * x))
>>> res = scipy.optimize.minimize(f, cupynn.get_flat(model), jac=True, method="L-BFGS-B")
>>> cupynn.set_flat(model, res.x)

The vector holds the layers in order, each layer's weight (row-major, ``(out, in)``)
then its bias: ``theta = concat([W0.ravel(), b0, W1.ravel(), b1, ...])``, of length
``sum(out * in + out)``.
"""

from __future__ import annotations

import numpy as np

from .backends import get_backend
from .derivatives import residual_value_and_grad
from .functional import value_and_grad

__all__ = ["num_parameters", "get_flat", "set_flat", "flat_value_and_grad"]


def _arrays(model) -> list:
    return [a for layer in model._dense_layers() for a in (layer.weight, layer.bias)
            if a is not None]


def num_parameters(model) -> int:
    """The length of the flat vector: every weight and bias element of ``model``.

    ``sum(in * out + out)`` over the layers (without the ``out`` of a layer without bias).

    >>> import cupynn
    >>> cupynn.num_parameters(cupynn.MLP([1, 3, 1], "tanh", device="cpu", rng=0))
    10
    """
    return sum(int(a.size) for a in _arrays(model))


def get_flat(model) -> np.ndarray:
    """The parameters as a new float64 NumPy vector (one device-to-host copy on CUDA).

    >>> import cupynn
    >>> m = cupynn.MLP([1, 3, 1], "tanh", device="cpu", rng=0)
    >>> cupynn.get_flat(m).shape
    (10,)
    """
    backend = get_backend(model.device)
    arrays = _arrays(model)
    xp = backend.xp
    flat = xp.concatenate([a.reshape(-1) for a in arrays])
    return np.asarray(backend.to_host(flat), dtype=np.float64)


def set_flat(model, theta) -> None:
    """Write the flat vector ``theta`` into the model's parameter arrays, in place.

    ``theta``: a 1-D NumPy float array of length :func:`num_parameters`. It is rounded
    to the model's dtype (float32 models: the only cast, stated here); on CUDA it is
    copied to the device once, then split into the parameters there. In place, so an
    optimizer or a compiled step holding the arrays sees the new values.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 3, 1], "tanh", device="cpu", rng=0)
    >>> cupynn.set_flat(m, np.zeros(10))
    >>> float(abs(m.layers[0].weight).sum())
    0.0
    """
    n = num_parameters(model)
    if not isinstance(theta, np.ndarray) or theta.dtype.kind != "f":
        raise TypeError(f"theta must be a NumPy float vector of length {n}, got "
                        f"{type(theta).__name__} {getattr(theta, 'dtype', '')}")
    if theta.shape != (n,):
        raise ValueError(f"theta must have shape ({n},) (every weight and bias of the model), "
                         f"got {theta.shape}")
    backend = get_backend(model.device)
    host = np.ascontiguousarray(theta, dtype=model.dtype)
    dev = backend.asarray_from_host(host)  # the one host-to-device copy
    offset = 0
    for a in _arrays(model):
        a[...] = dev[offset:offset + a.size].reshape(a.shape)
        offset += a.size


def flat_value_and_grad(model, x, loss="sum_squares", *, target=None, residual=None, rhs=None, k=None,
                        diag=False):
    """``f(theta) -> (value, grad)`` for ``scipy.optimize.minimize(f, theta0, jac=True)``.

    Every kind of loss: a built-in or hand-written ``loss`` of the outputs, an autodiffed one
    (``cupynn.jax.loss(f)`` / ``cupynn.torch.loss(f)``), a residual of the input derivatives
    (``flat_value_and_grad(model, x, cupynn.jax.residual(r))``, or any residual as
    ``flat_value_and_grad(model, x, residual="poisson", rhs=f)`` with the ``rhs``, ``k`` and
    ``diag`` of :func:`cupynn.residual_value_and_grad`), or in place of ``x`` a
    :class:`cupynn.LossTerm`, :class:`cupynn.ResidualTerm` or :class:`cupynn.Composite`
    (``flat_value_and_grad(model, composite)``: no ``loss`` or ``target``), e.g. a PINN's
    interior residual plus its boundary term.

    ``f`` writes ``theta`` into the model (:func:`set_flat`, in place), computes
    the value and gradient (:func:`cupynn.value_and_grad` of ``loss`` at ``x`` and ``target``,
    or the objective's), and returns the
    value as a Python float and the gradient as a float64 NumPy vector in the order of
    :func:`get_flat`. On CUDA each call makes one host-to-device copy (``theta``) and one
    device-to-host copy (the value and every gradient, concatenated on the device first);
    ``x`` and ``target`` stay on the device. float32 models round ``theta`` to float32 (and
    float32 L-BFGS is rarely what you want: use a float64 model).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 3, 1], "tanh", device="cpu", rng=0)
    >>> f = cupynn.flat_value_and_grad(m, np.linspace(-1, 1, 7).reshape(-1, 1), "mse")
    >>> value, grad = f(cupynn.get_flat(m))
    >>> grad.shape
    (10,)
    """
    backend = get_backend(model.device)
    xp = backend.xp
    if getattr(x, "_cupynn_objective", False):  # LossTerm / ResidualTerm / Composite
        if loss != "sum_squares" or target is not None:
            raise TypeError(f"flat_value_and_grad(model, {type(x).__name__}) takes no loss or "
                            "target: the terms state their own")

        def evaluate():
            return x.value_and_grad(model)
    elif residual is not None:  # residual= : any residual residual_value_and_grad takes
        if loss != "sum_squares" or target is not None:
            raise TypeError("flat_value_and_grad(model, x, residual=...) takes no loss or target")

        def evaluate():
            return residual_value_and_grad(model, x, residual, rhs=rhs, k=k, diag=diag)
    elif getattr(loss, "library", None) and hasattr(loss, "pass_x"):  # cupynn.<lib>.residual(r)
        def evaluate():
            return residual_value_and_grad(model, x, loss, rhs=rhs, k=k, diag=diag)
    else:
        def evaluate():
            return value_and_grad(model, x, loss, target=target)

    def f(theta):
        set_flat(model, theta)
        value, grads = evaluate()
        items = grads if isinstance(grads, list) else [grads]
        parts = [xp.asarray(value, dtype=model.dtype).reshape(1)]
        for item in items:
            parts.append(item["weight"].reshape(-1))
            if item["bias"] is not None:
                parts.append(item["bias"].reshape(-1))
        host = np.asarray(backend.to_host(xp.concatenate(parts)), dtype=np.float64)
        return float(host[0]), host[1:]

    return f
