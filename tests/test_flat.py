"""The flat-vector bridge to SciPy: get_flat / set_flat / flat_value_and_grad, L-BFGS-B."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn

from .conftest import random_model


def test_flat_layout_and_round_trip(rng):
    model = cupynn.Chain(
        cupynn.Dense.from_arrays(rng.standard_normal((4, 3)), rng.standard_normal(4), "tanh"),
        cupynn.Dense.from_arrays(rng.standard_normal((2, 4)), None),
    )
    theta = cupynn.get_flat(model)
    assert theta.dtype == np.float64 and theta.shape == (cupynn.num_parameters(model),) == (24,)
    W0, b0, W1 = model.layers[0].weight, model.layers[0].bias, model.layers[1].weight
    np.testing.assert_array_equal(theta, np.concatenate([W0.ravel(), b0, W1.ravel()]))
    new = rng.standard_normal(24)
    cupynn.set_flat(model, new)
    assert model.layers[0].weight is W0  # written in place: optimizers and graphs keep working
    np.testing.assert_array_equal(cupynn.get_flat(model), new)
    np.testing.assert_array_equal(W1, new[16:].reshape(2, 4))


def test_set_flat_refuses_bad_vectors(rng):
    model = random_model([2, 3, 1], "tanh", np.float64, rng)
    before = cupynn.get_flat(model)
    n = before.size
    for bad, exc, msg in [(np.zeros(n + 1), ValueError, rf"\({n},\)"),
                          (np.zeros((n, 1)), ValueError, "shape"),
                          (list(before), TypeError, "NumPy float vector"),
                          (np.zeros(n, dtype=np.int64), TypeError, "NumPy float vector")]:
        with pytest.raises(exc, match=msg):
            cupynn.set_flat(model, bad)
        np.testing.assert_array_equal(cupynn.get_flat(model), before)


def _central_differences(f, theta, directions, h):
    out = []
    for d in directions:
        out.append((f(theta + h * d)[0] - f(theta - h * d)[0]) / (2 * h))
    return np.array(out)


def test_gradient_matches_finite_differences_every_coordinate(rng):
    model = random_model([2, 12, 5, 1], ["tanh", "softplus", "identity"], np.float64, rng)
    x = rng.standard_normal((23, 2))
    target = rng.standard_normal((23, 1))
    f = cupynn.flat_value_and_grad(model, x, "mse", target=target)
    theta = cupynn.get_flat(model)
    value, grad = f(theta)
    assert isinstance(value, float) and grad.dtype == np.float64 and grad.shape == theta.shape
    fd = _central_differences(f, theta, np.eye(theta.size), 1e-5)
    err = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
    assert err <= 1e-7, f"relative error against central differences {err:.2e}"


def test_seed_network_gradient_matches_directional_differences(rng):
    model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cpu", rng=5)
    x = np.linspace(-1, 1, 101).reshape(-1, 1)
    f = cupynn.flat_value_and_grad(model, x, "sum_squares")
    theta = cupynn.get_flat(model)
    _, grad = f(theta)
    directions = rng.standard_normal((4, theta.size))
    fd = _central_differences(f, theta, directions, 1e-6)
    err = np.abs(directions @ grad - fd) / np.abs(fd)
    assert err.max() <= 1e-7, err


def test_lbfgs_fits_the_seed_network_in_float64():
    """L-BFGS-B through SciPy on the thread's 1→1000→20→1 (identity) network: a linear
    target is exactly representable, so the mse must fall from ~0.3 to below 1e-9."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cpu", rng=1)
    x = np.linspace(-1, 1, 256).reshape(-1, 1)
    f = cupynn.flat_value_and_grad(model, x, "mse", target=0.7 * x - 0.3)
    theta0 = cupynn.get_flat(model)
    start = f(theta0)[0]
    res = scipy_optimize.minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 200})
    cupynn.set_flat(model, res.x)
    value, _ = cupynn.value_and_grad(model, x, "mse", target=0.7 * x - 0.3)
    assert start > 0.1 and float(value) < 1e-9, (start, float(value), res.message)


def test_lbfgs_fits_a_tanh_network():
    """A nonlinear fit (1→20→20→1 tanh to sin(2x), float64): mse below 1e-4 (from ~0.6)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    model = cupynn.MLP([1, 20, 20, 1], "tanh", device="cpu", rng=1)
    x = np.linspace(-1, 1, 128).reshape(-1, 1)
    f = cupynn.flat_value_and_grad(model, x, "mse", target=np.sin(2 * x))
    res = scipy_optimize.minimize(f, cupynn.get_flat(model), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 400})
    assert res.fun < 1e-4, res


def test_float32_model_gives_a_float64_gradient(rng):
    model = random_model([2, 4, 1], "tanh", np.float32, rng)
    f = cupynn.flat_value_and_grad(model, rng.standard_normal((5, 2)).astype(np.float32))
    value, grad = f(cupynn.get_flat(model))
    assert grad.dtype == np.float64 and model.layers[0].weight.dtype == np.float32
