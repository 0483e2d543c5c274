"""Composite losses (LossTerm, ResidualTerm, Composite), gradient arithmetic (add_grads,
scale_grads) and flat_value_and_grad for every kind of loss, through SciPy's L-BFGS-B."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn

from .conftest import random_model
from .reference import rel_err


def _flat(grads):
    items = [grads] if isinstance(grads, dict) else grads
    return np.concatenate([a.ravel() for g in items for a in (g["weight"], g["bias"]) if a is not None])


@pytest.fixture
def rng():
    return np.random.default_rng()


def _poisson_hand(f):
    def res(u, du, lap):
        r = lap - f
        return (r * r).mean(), None, None, 2 * r / r.size
    return res


def test_composite_is_the_weighted_sum_of_its_terms(rng):
    model = random_model([2, 19, 7, 1], "tanh", "float64", rng)
    x_in, x_b, x_d = rng.uniform(-1, 1, (101, 2)), rng.uniform(-1, 1, (33, 2)), rng.uniform(-1, 1, (5, 2))
    f, g, t = rng.standard_normal(101), rng.standard_normal((33, 1)), rng.standard_normal((5, 1))
    terms = [cupynn.ResidualTerm(x_in, "poisson", rhs=f), cupynn.LossTerm(x_b, "mse", target=g),
             cupynn.LossTerm(x_d, lambda y: (((y - t) ** 2).sum(), 2 * (y - t)))]
    w = rng.uniform(0.5, 20, 3)
    loss = terms[0] * w[0] + w[1] * terms[1] + cupynn.Composite((w[2], terms[2]))
    assert [wi for wi, _ in loss.terms] == pytest.approx(list(w))
    value, grads, parts = loss.value_and_grad(model, terms=True)
    refs = [cupynn.residual_value_and_grad(model, x_in, "poisson", rhs=f),
            cupynn.value_and_grad(model, x_b, "mse", target=g),
            cupynn.value_and_grad(model, x_d, terms[2].loss)]
    want_v = sum(wi * float(v) for wi, (v, _) in zip(w, refs))
    want_g = sum(wi * _flat(gr) for wi, (_, gr) in zip(w, refs))
    assert abs(float(value) - want_v) <= 1e-13 * abs(want_v)
    assert rel_err(_flat(grads), want_g) <= 1e-13
    assert [float(p) for p in parts] == pytest.approx([float(v) for v, _ in refs], rel=1e-14)
    # the same through cupynn.value_and_grad, and grads shaped like the parameters
    v2, g2 = cupynn.value_and_grad(model, loss)
    assert float(v2) == float(value) and np.array_equal(_flat(g2), _flat(grads))
    assert [gr["weight"].shape for gr in g2] == [p["weight"].shape for p in model.parameters()]


def test_composite_on_a_dense_and_single_terms(rng):
    model = cupynn.Dense.from_arrays(rng.standard_normal((2, 3)), rng.standard_normal(2), "tanh")
    x = rng.standard_normal((9, 3))
    v, g = (3.0 * cupynn.LossTerm(x, "sum_squares")).value_and_grad(model)
    v0, g0 = cupynn.value_and_grad(model, x)
    assert isinstance(g, dict) and abs(float(v) - 3 * float(v0)) <= 1e-14 * abs(float(v))
    assert rel_err(_flat(g), 3 * _flat(g0)) <= 1e-15


def test_grad_arithmetic(rng):
    model = random_model([3, 8, 2], "tanh", "float64", rng)
    _, g1 = cupynn.value_and_grad(model, rng.standard_normal((4, 3)))
    _, g2 = cupynn.value_and_grad(model, rng.standard_normal((6, 3)))
    s = cupynn.add_grads(g1, g2, weights=(2.0, -0.5))
    assert rel_err(_flat(s), 2 * _flat(g1) - 0.5 * _flat(g2)) <= 1e-15
    assert rel_err(_flat(cupynn.add_grads(g1, g2)), _flat(g1) + _flat(g2)) <= 1e-15
    h = cupynn.scale_grads(g1, 3.0)
    assert rel_err(_flat(h), 3 * _flat(g1)) <= 1e-15
    assert h[0]["weight"] is not g1[0]["weight"]          # new arrays, inputs untouched
    other = random_model([3, 5, 2], "tanh", "float64", rng)
    _, g3 = cupynn.value_and_grad(other, rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="layer 0's weight is numpy float64 \\(5, 3\\).*same model"):
        cupynn.add_grads(g1, g3)
    with pytest.raises(ValueError, match="2 gradients but 1 weights"):
        cupynn.add_grads(g1, g2, weights=(1.0,))
    with pytest.raises(TypeError, match="finite real number"):
        cupynn.scale_grads(g1, "2")
    with pytest.raises(TypeError, match="gradients as value_and_grad returns them"):
        cupynn.add_grads(g1, [1, 2])


def test_composite_errors(rng):
    model = random_model([2, 4, 1], "tanh", "float64", rng)
    x = rng.standard_normal((3, 2))
    with pytest.raises(TypeError, match="sums LossTerm, ResidualTerm or Composite"):
        cupynn.Composite(cupynn.LossTerm(x), "mse")
    with pytest.raises(TypeError, match="weight must be a finite real"):
        cupynn.LossTerm(x, weight=float("nan"))
    with pytest.raises(TypeError, match="takes no loss, target"):
        cupynn.value_and_grad(model, cupynn.LossTerm(x), "mse")
    with pytest.raises(TypeError, match="takes no loss or target"):
        cupynn.flat_value_and_grad(model, cupynn.LossTerm(x), "mse")


def test_flat_value_and_grad_for_every_kind_of_loss(rng):
    model = random_model([2, 11, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (40, 2))
    f = rng.standard_normal(40)
    theta = cupynn.get_flat(model)
    objectives = [cupynn.ResidualTerm(x, "poisson", rhs=f),
                  cupynn.ResidualTerm(x, _poisson_hand(f)) + 2.0 * cupynn.LossTerm(x[:7], "mse")]
    for obj in objectives:
        fun = cupynn.flat_value_and_grad(model, obj)
        value, grad = fun(theta)
        v, g = obj.value_and_grad(model)
        assert value == float(v) and np.array_equal(grad, _flat(g))
        for _ in range(2):  # against finite differences along random directions
            d = rng.standard_normal(theta.size)
            h = 1e-5
            fd = (fun(theta + h * d)[0] - fun(theta - h * d)[0]) / (2 * h)
            assert abs(fd - grad @ d) <= 1e-7 * max(1.0, abs(fd))
        cupynn.set_flat(model, theta)


def test_scipy_lbfgs_trains_a_pinn_through_public_names(rng):
    scipy_opt = pytest.importorskip("scipy.optimize")
    model = cupynn.MLP([2, 16, 16, 1], "tanh", device="cpu", init="glorot", rng=1)
    x_in = np.random.default_rng(2).uniform(0, 1, (128, 2))
    t = np.random.default_rng(3).uniform(0, 1, 32)
    x_b = np.concatenate([np.stack([t, 0 * t], 1), np.stack([t, 1 + 0 * t], 1),
                          np.stack([0 * t, t], 1), np.stack([1 + 0 * t, t], 1)])
    f = -2 * np.pi ** 2 * np.sin(np.pi * x_in[:, 0]) * np.sin(np.pi * x_in[:, 1])
    loss = cupynn.ResidualTerm(x_in, "poisson", rhs=f) + 10.0 * cupynn.LossTerm(
        x_b, "mse", target=np.zeros((128, 1)))
    fun = cupynn.flat_value_and_grad(model, loss)
    start = fun(cupynn.get_flat(model))[0]
    res = scipy_opt.minimize(fun, cupynn.get_flat(model), jac=True, method="L-BFGS-B",
                             options={"maxiter": 150})
    cupynn.set_flat(model, res.x)
    assert res.fun < 0.02 * start
    assert float(loss.value(model)) == pytest.approx(res.fun, rel=1e-12)


def test_flat_value_and_grad_residual_keyword_and_misuse(rng):
    model = random_model([2, 6, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (30, 2))
    f = rng.standard_normal(30)
    theta = cupynn.get_flat(model)
    v1, g1 = cupynn.flat_value_and_grad(model, x, residual="poisson", rhs=f)(theta)
    v2, g2 = cupynn.flat_value_and_grad(model, x, residual=_poisson_hand(f))(theta)
    v3, g3 = cupynn.flat_value_and_grad(model, cupynn.ResidualTerm(x, "poisson", rhs=f))(theta)
    assert v1 == pytest.approx(v2, rel=1e-13) and v1 == v3
    assert rel_err(g1, g2) <= 1e-12 and np.array_equal(g1, g3)
    with pytest.raises(TypeError, match="takes no loss or target"):
        cupynn.flat_value_and_grad(model, x, "mse", residual="poisson")
    jax = pytest.importorskip("jax")
    cj = pytest.importorskip("cupynn.jax")
    r = cj.residual(lambda u, du, lap: jax.numpy.mean(lap ** 2))
    with pytest.raises(TypeError, match="is a residual of the input derivatives.*residual_value_and_grad"):
        cupynn.value_and_grad(model, x, r)
