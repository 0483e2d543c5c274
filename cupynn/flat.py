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

from ._arrays import intake
from ._validate import check_writeable
from .backends import get_backend
from .derivatives import residual_value_and_grad
from .functional import _check_distinct, value_and_grad
from .losses import make_loss

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

    ``theta``: a 1-D NumPy float32 or float64 array (native byte order) of length
    :func:`num_parameters`. It is rounded to the model's dtype (float64 into a float32
    model: the only cast, stated here; a value beyond float32's range is an error, not an
    ``inf``). Every check is made before the first write: a refused ``theta`` leaves the
    model as it was. On CUDA it is
    copied to the device once, then split into the parameters there. In place, so an
    optimizer or a compiled step holding the arrays sees the new values.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 3, 1], "tanh", device="cpu", rng=0)
    >>> cupynn.set_flat(m, np.zeros(10))
    >>> float(abs(m.layers[0].weight).sum())
    0.0
    """
    arrays = _arrays(model)
    host = _checked_theta(model, theta, arrays)
    backend = get_backend(model.device)
    dev = backend.asarray_from_host(host)  # the one host-to-device copy
    offset = 0
    for a in arrays:  # every check is done: nothing below can refuse
        a[...] = dev[offset:offset + a.size].reshape(a.shape)
        offset += a.size


def _checked_theta(model, theta, arrays) -> np.ndarray:
    """``theta`` as a C-contiguous NumPy vector of the model's dtype, after every check that
    :func:`set_flat` makes before its first write."""
    n = sum(int(a.size) for a in arrays)
    theta = intake(theta, what="theta")
    if not isinstance(theta, np.ndarray):
        raise TypeError(f"theta must be a NumPy float vector (float32 or float64) of length {n}, got "
                        f"{type(theta).__name__}")
    if theta.dtype not in (np.float32, np.float64):
        raise TypeError(f"theta must be a NumPy float vector of dtype float32 or float64 (native "
                        "byte order), "
                        f"got dtype {theta.dtype.str!r} ({theta.dtype}); convert it explicitly, "
                        f"e.g. theta.astype({model.dtype.name!r})")
    if theta.shape != (n,):
        raise ValueError(f"theta must have shape ({n},) (every weight and bias of the model), "
                         f"got {theta.shape}")
    labels = []
    for i, layer in enumerate(model._dense_layers()):
        for k, a in (("weight", layer.weight), ("bias", layer.bias)):
            if a is not None:
                check_writeable(a, f"{layer._label(i)} {k}")
                labels.append(f"{layer._label(i)} {k}")
    _check_distinct(arrays, labels)
    with np.errstate(over="ignore"):  # an overflow is reported below, as an error
        host = np.ascontiguousarray(theta, dtype=model.dtype)
    if host.dtype != theta.dtype:  # float64 -> float32: the one rounding, never an overflow
        overflow = np.isfinite(theta) & ~np.isfinite(host)
        if overflow.any():
            i = int(np.flatnonzero(overflow)[0])
            raise ValueError(f"theta[{i}] = {float(theta[i])!r} is out of the {model.dtype} model's range "
                             f"(it would become {host[i]}): {int(overflow.sum())} entries overflow")
    return host


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
    float32 L-BFGS is rarely what you want: use a float64 model). ``x``, ``target`` and
    ``loss`` are checked when ``f`` is made; ``theta`` on each call before it is written, and
    a call that fails after writing it (a loss callable that raises) puts the old
    parameters back.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 3, 1], "tanh", device="cpu", rng=0)
    >>> f = cupynn.flat_value_and_grad(m, np.linspace(-1, 1, 7).reshape(-1, 1), "mse")
    >>> value, grad = f(cupynn.get_flat(m))
    >>> grad.shape
    (10,)
    """
    from .functional import _check_batch, _check_target, _model_parts

    backend = get_backend(model.device)
    xp = backend.xp
    # x, target and loss are checked here, once, so that f never writes theta into the
    # model and then refuses them
    layers, net, _params, _backend = _model_parts(model)
    if getattr(x, "_cupynn_objective", False):  # LossTerm / ResidualTerm / Composite
        if loss != "sum_squares" or target is not None:
            raise TypeError(f"flat_value_and_grad(model, {type(x).__name__}) takes no loss or "
                            "target: the terms state their own")

        def evaluate():
            return x.value_and_grad(model)
    else:
        x = intake(x, what="x", device=model.device, dtype=model.dtype)
        _check_batch(model, layers, x)
        if residual is not None:  # residual= : any residual residual_value_and_grad takes
            if loss != "sum_squares" or target is not None:
                raise TypeError("flat_value_and_grad(model, x, residual=...) takes no loss or target")

            def evaluate():
                return residual_value_and_grad(model, x, residual, rhs=rhs, k=k, diag=diag)
        elif getattr(loss, "library", None) and hasattr(loss, "pass_x"):  # cupynn.<lib>.residual(r)
            def evaluate():
                return residual_value_and_grad(model, x, loss, rhs=rhs, k=k, diag=diag)
        else:
            spec = make_loss(loss, target)
            if spec.target is not None:
                _check_target(model, net, x, spec.target)

            def evaluate():
                return value_and_grad(model, x, loss, target=target)

    def f(theta):
        arrays = _arrays(model)
        host = _checked_theta(model, theta, arrays)
        kept = [a.copy() for a in arrays]
        set_flat(model, host)
        try:
            value, grads = evaluate()
        except BaseException:  # a loss callable that raised, an interrupt: the model as it was
            for a, old in zip(arrays, kept):
                a[...] = old
            raise
        items = grads if isinstance(grads, list) else [grads]
        parts = [xp.asarray(value, dtype=model.dtype).reshape(1)]
        for item in items:
            parts.append(item["weight"].reshape(-1))
            if item["bias"] is not None:
                parts.append(item["bias"].reshape(-1))
        host = np.asarray(backend.to_host(xp.concatenate(parts)), dtype=np.float64)
        return float(host[0]), host[1:]

    return f
