"""Each activation against the independent reference, and its derivative against finite differences."""

import numpy as np
import pytest

from cupynn.activations import ACTIVATIONS, get_activation

from .reference import act_derivative_of_z, act_forward, rel_err

NAMES = list(ACTIVATIONS)


def _z(rng, n=2001):
    # spans both signs and the saturating tails; no exact zeros
    return np.concatenate([rng.standard_normal(n) * 3, rng.uniform(-40, 40, 50)])


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_reference(name, rng):
    z = _z(rng)
    assert rel_err(get_activation(name).forward(z), act_forward(name, z)) < 1e-14


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_derivative_matches_reference(name, dtype, rng):
    act = get_activation(name)
    z = _z(rng).astype(dtype)
    y = act.forward(z)
    assert y.dtype == dtype
    d = act.derivative(y if act.from_output else z)
    assert d.dtype == dtype
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert rel_err(d, act_derivative_of_z(name, z.astype(np.float64))) < tol


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_finite_differences(name, rng):
    z = rng.standard_normal(500) * 2
    z = z[np.abs(z) > 1e-3]  # keep away from the kinks of relu / leaky_relu / elu
    h = 1e-6
    f = get_activation(name).forward
    fd = (f(z + h) - f(z - h)) / (2 * h)
    assert rel_err(act_derivative_of_z(name, z), fd) < 1e-7


@pytest.mark.parametrize("name", NAMES)
def test_nan_propagates(name):
    z = np.array([np.nan, 1.0, -1.0])
    y = get_activation(name).forward(z)
    assert np.isnan(y[0]) and np.all(np.isfinite(y[1:]))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation 'relu6'.*known: identity"):
        get_activation("relu6")
    with pytest.raises(TypeError):
        get_activation(3)


def test_models_pickle_by_activation_name():
    import pickle

    import cupynn

    model = cupynn.MLP([3, 5, 2], "gelu", device="cpu", rng=1)
    back = pickle.loads(pickle.dumps(model))
    assert [l.activation for l in back.layers] == [l.activation for l in model.layers]
    assert back.layers[0].activation is cupynn.activations.get_activation("gelu")
    x = np.random.default_rng(2).standard_normal((4, 3))
    np.testing.assert_array_equal(back(x), model(x))
