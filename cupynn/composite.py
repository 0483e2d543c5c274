"""Losses made of several weighted terms on different point sets, and gradient arithmetic.

A physics-informed loss is an interior residual plus boundary and data terms, each on its
own points, with weights. State the sum once::

    loss = cupynn.ResidualTerm(x_in, "poisson", rhs=f) + 10.0 * cupynn.LossTerm(x_b, "mse", target=g)
    value, grads = loss.value_and_grad(model)          # or cupynn.value_and_grad(model, loss)

and get one value and one gradient, shaped like ``model.parameters()``. Each term runs its
own fused path (:func:`cupynn.value_and_grad` for a :class:`LossTerm`,
:func:`cupynn.residual_value_and_grad` for a :class:`ResidualTerm`); the gradients are then
summed with their weights, in place, in the order the terms were stated (a fixed order:
the same inputs give the same bits). ``cupynn.flat_value_and_grad(model, loss)`` gives
SciPy's ``(value, gradient)`` of the whole sum.

Gradients of one model add and scale with :func:`add_grads` and :func:`scale_grads`, which
check that the structures match instead of a hand-written dict comprehension.
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from .derivatives import residual_value_and_grad
from .functional import value_and_grad

__all__ = ["LossTerm", "ResidualTerm", "Composite", "add_grads", "scale_grads"]


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, Real) or not np.isfinite(float(weight)):
        raise TypeError(f"a term's weight must be a finite real number, got {weight!r}")
    return float(weight)


class _Objective:
    """What every term and sum shares: ``w * term``, ``term + term``, and the protocol that
    :func:`cupynn.value_and_grad` and :func:`cupynn.flat_value_and_grad` recognise."""

    _cupynn_objective = True

    def _weighted_terms(self):
        raise NotImplementedError

    def __add__(self, other):
        if not isinstance(other, _Objective):
            return NotImplemented
        return Composite(*self._weighted_terms(), *other._weighted_terms())

    def __mul__(self, weight):
        if not isinstance(weight, Real) or isinstance(weight, bool):
            return NotImplemented
        w = _check_weight(weight)
        return Composite(*[(w * wi, t) for wi, t in self._weighted_terms()])

    __rmul__ = __mul__

    def value(self, model):
        """The value alone (a 0-d array of the model's dtype), from :meth:`value_and_grad`."""
        return self.value_and_grad(model)[0]


class LossTerm(_Objective):
    """A loss of the network's outputs on the points ``x``: ``loss(model(x))``.

    ``loss`` and ``target`` are those of :func:`cupynn.value_and_grad`: ``"sum_squares"``,
    ``"mse"``, a hand-written ``loss(y) -> (value, dL/dy)``, or ``cupynn.jax.loss(f)`` /
    ``cupynn.torch.loss(f)``. ``weight`` multiplies the term in a sum (``w * term`` does
    the same).

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> xb = np.random.default_rng(0).uniform(size=(16, 2))
    >>> term = cupynn.LossTerm(xb, "mse", target=np.zeros((16, 1)))
    >>> value, grads = term.value_and_grad(model)
    >>> grads[1]["weight"].shape
    (1, 8)
    """

    def __init__(self, x, loss="sum_squares", *, target=None, weight=1.0):
        self.x, self.loss, self.target = x, loss, target
        self.weight = _check_weight(weight)

    def _weighted_terms(self):
        return [(self.weight, self)]

    def _term_value_and_grad(self, model):
        return value_and_grad(model, self.x, self.loss, target=self.target)

    def value_and_grad(self, model):
        """``(weight * value, weight * grads)`` of this term for ``model``."""
        return Composite(self).value_and_grad(model)

    def __repr__(self) -> str:
        return f"LossTerm({_points(self.x)}, {self.loss!r}, weight={self.weight:g})"


class ResidualTerm(_Objective):
    """A loss of the input derivatives ``(u, ∇u, Δu)`` on the points ``x``.

    ``residual``, ``rhs``, ``k``, ``diag`` and ``dims`` are those of
    :func:`cupynn.residual_value_and_grad`: ``"poisson"``, ``"helmholtz"``, a hand-written
    callable, or ``cupynn.jax.residual(r)`` / ``cupynn.torch.residual(r)``.

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(32, 2))
    >>> loss = cupynn.ResidualTerm(x, "poisson", rhs=1.0) + 10 * cupynn.LossTerm(x[:4], "mse",
    ...                                                                       target=np.zeros((4, 1)))
    >>> value, grads = loss.value_and_grad(model)
    >>> grads[0]["weight"].shape
    (8, 2)
    """

    def __init__(self, x, residual, *, rhs=None, k=None, diag=False, dims=None, grad_dims=None,
                 weight=1.0):
        self.x, self.residual, self.rhs, self.k, self.diag = x, residual, rhs, k, diag
        self.dims, self.grad_dims = dims, grad_dims
        self.weight = _check_weight(weight)

    def _weighted_terms(self):
        return [(self.weight, self)]

    def _term_value_and_grad(self, model):
        extra = {}
        if self.dims is not None:
            extra["dims"] = self.dims
        if self.grad_dims is not None:
            extra["grad_dims"] = self.grad_dims
        return residual_value_and_grad(model, self.x, self.residual, rhs=self.rhs, k=self.k,
                                       diag=self.diag, **extra)

    def value_and_grad(self, model):
        """``(weight * value, weight * grads)`` of this term for ``model``."""
        return Composite(self).value_and_grad(model)

    def __repr__(self) -> str:
        return f"ResidualTerm({_points(self.x)}, {self.residual!r}, weight={self.weight:g})"


def _points(x) -> str:
    return f"<{tuple(getattr(x, 'shape', ()))[0] if getattr(x, 'shape', ()) else '?'} points>"


class Composite(_Objective):
    """The weighted sum of terms, ``Σ_i w_i term_i``: one value and one gradient.

    Build it with ``+`` and ``*`` on :class:`LossTerm` / :class:`ResidualTerm` objects, or
    as ``Composite(term, (weight, term), ...)``. :meth:`value_and_grad` evaluates each term
    on its own points (its own fused path) and sums values and gradients with the weights,
    in the order stated; ``terms=True`` also returns the terms' unweighted values (to
    print them). :func:`cupynn.value_and_grad` ``(model, composite)`` and
    :func:`cupynn.flat_value_and_grad` ``(model, composite)`` take it too.

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([1, 8, 1], "tanh", device="cpu", rng=0)
    >>> x1, x2 = np.linspace(-1, 1, 20).reshape(-1, 1), np.zeros((1, 1)) + 0.3
    >>> loss = cupynn.LossTerm(x1, "mse", target=np.sin(x1)) + 5.0 * cupynn.LossTerm(x2, "sum_squares")
    >>> value, grads, parts = loss.value_and_grad(model, terms=True)
    >>> bool(np.isclose(value, parts[0] + 5.0 * parts[1]))
    True
    """

    def __init__(self, *terms):
        items = []
        for t in terms:
            if isinstance(t, tuple) and len(t) == 2:
                w, t = _check_weight(t[0]), t[1]
            else:
                w = 1.0
            if not isinstance(t, _Objective):
                raise TypeError(f"a Composite sums LossTerm, ResidualTerm or Composite objects "
                                f"(optionally as (weight, term) pairs), got {type(t).__name__}")
            items += [(w * wi, ti) for wi, ti in t._weighted_terms()]
        if not items:
            raise ValueError("a Composite needs at least one term")
        self.terms = tuple(items)  # ((weight, LossTerm | ResidualTerm), ...)

    def _weighted_terms(self):
        return list(self.terms)

    def value_and_grad(self, model, *, terms: bool = False):
        """``(value, grads)`` of ``Σ w_i term_i`` (``(value, grads, [term values])`` with
        ``terms=True``): ``value`` a 0-d array of the model's dtype on its device, ``grads``
        shaped like ``model.parameters()``."""
        total = grads = None
        parts = []
        for w, term in self.terms:
            v, g = term._term_value_and_grad(model)
            parts.append(v)
            if grads is None:  # fresh arrays from the term's call: scaled in place
                total, grads = v * v.dtype.type(w), _scale_into(g, w)
            else:
                total = total + v * v.dtype.type(w)
                _axpy_into(grads, g, w)
        return (total, grads, parts) if terms else (total, grads)

    def __repr__(self) -> str:
        return "Composite(" + ", ".join(f"{w:g} * {t!r}" for w, t in self.terms) + ")"


# -- gradient arithmetic --------------------------------------------------------------------

def _items(grads, what: str):
    """``grads`` (a dict or a list of dicts) as a list of ``{"weight", "bias"}`` dicts."""
    items = [grads] if isinstance(grads, dict) else grads
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(d, dict) and "weight" in d for d in items):
        raise TypeError(f"{what} must be gradients as value_and_grad returns them: a dict "
                        f"{{'weight', 'bias'}} or a list of such dicts, got {type(grads).__name__}")
    return list(items)


def _check_same(a, b, what: str):
    ia, ib = _items(a, "the first gradients"), _items(b, what)
    if isinstance(a, dict) != isinstance(b, dict) or len(ia) != len(ib):
        raise ValueError(f"{what} do not match the first gradients' structure "
                         f"({len(ia)} layers vs {len(ib)}): gradients of the same model only")
    for i, (da, db) in enumerate(zip(ia, ib)):
        for key in ("weight", "bias"):
            x, y = da.get(key), db.get(key)
            if (x is None) != (y is None) or (x is not None and (
                    tuple(x.shape) != tuple(y.shape) or x.dtype != y.dtype
                    or type(x) is not type(y))):
                raise ValueError(
                    f"{what}: layer {i}'s {key} is {_desc(y)} but the first gradients' is "
                    f"{_desc(x)}: gradients of the same model only")
    return ia, ib


def _desc(a) -> str:
    return "None" if a is None else f"{type(a).__module__.split('.')[0]} {a.dtype} {tuple(a.shape)}"


def _rebuild(like, items):
    return items[0] if isinstance(like, dict) else items


def _scale_into(grads, w: float):
    if w != 1.0:
        for d in _items(grads, "grads"):
            for key in ("weight", "bias"):
                if d.get(key) is not None:
                    d[key] *= d[key].dtype.type(w)
    return grads


def _axpy_into(acc, g, w: float):
    for da, dg in zip(*_check_same(acc, g, "the gradients to add")):
        for key in ("weight", "bias"):
            if da.get(key) is not None:
                da[key] += dg[key] if w == 1.0 else dg[key] * dg[key].dtype.type(w)


def scale_grads(grads, factor):
    """``factor * grads`` as new arrays, in the structure of ``grads``.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 4, 1], "tanh", device="cpu", rng=0)
    >>> _, g = cupynn.value_and_grad(m, np.ones((3, 1)))
    >>> h = cupynn.scale_grads(g, 0.5)
    >>> bool(np.allclose(h[0]["weight"], 0.5 * g[0]["weight"]))
    True
    """
    w = _check_weight(factor)
    items = _items(grads, "grads")
    out = [{key: (None if d.get(key) is None else d[key] * d[key].dtype.type(w))
            for key in ("weight", "bias")} for d in items]
    return _rebuild(grads, out)


def add_grads(*grads, weights=None):
    """``Σ_i weights[i] * grads[i]`` (weights default to 1) as new arrays, for gradients of
    the same model (their structures, shapes, dtypes and devices are checked).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 4, 1], "tanh", device="cpu", rng=0)
    >>> _, g1 = cupynn.value_and_grad(m, np.ones((3, 1)))
    >>> _, g2 = cupynn.value_and_grad(m, np.zeros((2, 1)) + 0.5)
    >>> s = cupynn.add_grads(g1, g2, weights=(1.0, 10.0))
    >>> bool(np.allclose(s[1]["bias"], g1[1]["bias"] + 10 * g2[1]["bias"]))
    True
    """
    if not grads:
        raise ValueError("add_grads needs at least one set of gradients")
    if weights is None:
        weights = (1.0,) * len(grads)
    weights = [_check_weight(w) for w in weights]
    if len(weights) != len(grads):
        raise ValueError(f"add_grads got {len(grads)} gradients but {len(weights)} weights")
    for i, g in enumerate(grads[1:], 1):
        _check_same(grads[0], g, f"gradients {i}")
    acc = scale_grads(grads[0], weights[0])
    for g, w in zip(grads[1:], weights[1:]):
        _axpy_into(acc, g, w)
    return acc
