"""The public API: construction, repr, errors on bad input, parameters, devices, files."""

import numpy as np
import pytest

import cupynn
from cupynn import functional as F

from . import reference as ref
from .conftest import host_params, random_model


class FakeCupyArray:
    """Stands in for a CuPy array on machines without CuPy (only its module name matters)."""

    __module__ = "cupy._core.core"
    dtype = np.dtype(np.float64)
    ndim = 2
    shape = (3, 2)


def test_repr_like_flux():
    assert repr(cupynn.Dense(1000, 20, "tanh", device="cpu")) == "Dense(1000 => 20, tanh)"
    assert repr(cupynn.Dense(3, 2, device="cpu", bias=False)) == "Dense(3 => 2, bias=false)"
    m = cupynn.MLP([1, 1000, 20, 1], "relu", device="cpu")
    assert repr(m) == "Chain(\n  Dense(1 => 1000, relu),\n  Dense(1000 => 20, relu),\n  Dense(20 => 1),\n)"


def test_dense_construction_and_init(rng):
    layer = cupynn.Dense(4, 3, "relu", dtype="float32", device="cpu", rng=0)
    assert layer.weight.shape == (3, 4) and layer.weight.dtype == np.float32
    assert layer.bias.shape == (3,) and layer.device == "cpu"
    again = cupynn.Dense(4, 3, "relu", dtype="float32", device="cpu", rng=0)
    np.testing.assert_array_equal(layer.weight, again.weight)
    assert np.all(np.abs(layer.weight) <= 0.5)  # uniform(-1/sqrt(4), 1/sqrt(4))
    normal = cupynn.Dense(4, 3, device="cpu", init="normal", rng=1)
    assert normal.weight.std() > 0.3
    custom = cupynn.Dense(2, 2, device="cpu", init=lambda r, shape, dt: np.full(shape, 0.5, dt))
    assert np.all(custom.weight == 0.5) and np.all(custom.bias == 0.5)
    assert cupynn.Dense(2, 2, device="cpu", bias=False).bias is None
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        cupynn.Dense(0, 3)
    with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
        cupynn.Dense(2, 3, dtype="float16")
    with pytest.raises(ValueError, match="device must be"):
        cupynn.Dense(2, 3, device="tpu")
    with pytest.raises(ValueError, match="init must be"):
        cupynn.Dense(2, 3, device="cpu", init="zeros")


def test_from_arrays_copies_and_checks(rng):
    W, b = rng.standard_normal((3, 2)), rng.standard_normal(3)
    layer = cupynn.Dense.from_arrays(W, b, "tanh")
    W[0, 0] = 99.0
    assert layer.weight[0, 0] != 99.0
    assert layer.dtype == np.float64 and layer.in_features == 2 and layer.out_features == 3
    with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
        cupynn.Dense.from_arrays(W, rng.standard_normal(4))
    with pytest.raises(TypeError, match="dtype"):
        cupynn.Dense.from_arrays(W, b.astype(np.float32))
    with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
        cupynn.Dense.from_arrays(W.astype(np.int64))


def test_chain_checks_sizes_dtypes():
    a = cupynn.Dense(2, 5, device="cpu")
    msg = r"Dense\[1\] \(4 => 1\) expects 4 inputs but Dense\[0\] \(2 => 5\) produces 5"
    with pytest.raises(ValueError, match=msg):
        cupynn.Chain(a, cupynn.Dense(4, 1, device="cpu"))
    with pytest.raises(ValueError, match="use one dtype and device"):
        cupynn.Chain(a, cupynn.Dense(5, 1, device="cpu", dtype="float32"))
    with pytest.raises(ValueError, match="precision"):
        cupynn.Chain(a, precision="tf32")  # float64 model
    m = cupynn.MLP([2, 3, 1], dtype="float32", device="cpu", precision="3xtf32")
    assert m.precision == "3xtf32" and "precision='3xtf32'" in repr(m)


def test_shape_errors_name_the_layer(rng):
    model = random_model([3, 4, 2], "relu", np.float64, rng)
    with pytest.raises(ValueError, match=r"Dense\[0\] \(3 => 4\) expects x of shape \(batch, 3\).*got \(5, 2\)"):
        model(np.ones((5, 2)))
    with pytest.raises(ValueError, match="must be 1-D or 2-D"):
        model(np.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"target must have the output's shape \(5, 2\)"):
        cupynn.value_and_grad(model, np.ones((5, 3)), target=np.ones((5, 3)))
    layer = cupynn.Dense(3, 4, device="cpu")
    with pytest.raises(ValueError, match=r"Dense \(3 => 4\) expects x"):
        layer(np.ones(4))


def test_dtype_errors_do_not_cast(rng):
    model = random_model([3, 2], "relu", np.float64, rng)
    with pytest.raises(TypeError, match=r"dtype float32 but the model is float64.*astype"):
        model(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="dtype int64"):
        model(np.ones((2, 3), np.int64))
    with pytest.raises(TypeError, match="must be a NumPy array"):
        model([[1.0, 2.0, 3.0]])


def test_device_errors_say_how_to_move(rng):
    model = random_model([2, 2], "relu", np.float64, rng)
    with pytest.raises(cupynn.DeviceMismatchError, match=r"on 'cuda' but the model is on 'cpu'.*cupy.asnumpy"):
        model(FakeCupyArray())
    assert issubclass(cupynn.DeviceMismatchError, TypeError)


@pytest.mark.skipif(cupynn.cuda_available(), reason="this machine has a usable GPU")
def test_cuda_unavailable_is_explained():
    with pytest.raises(RuntimeError, match="device='cuda' is not usable here"):
        cupynn.Dense(2, 2, device="cuda")
    assert cupynn.Dense(2, 2).device == "cpu"  # "auto"


def test_parameters_roundtrip_and_atomic_load(rng):
    model = random_model([3, 4, 2], "tanh", np.float64, rng)
    before = [(W.copy(), b.copy()) for W, b in host_params(model)]
    params = model.parameters()
    assert [p["weight"].shape for p in params] == [(4, 3), (2, 4)]
    bad = [{"weight": p["weight"] + 1, "bias": p["bias"] + 1} for p in params]
    bad[1]["weight"] = np.ones((2, 5))  # the last layer is wrong: nothing may change
    with pytest.raises(ValueError, match=r"Dense\[1\] \(4 => 2\) weight must have shape \(2, 4\)"):
        model.load_parameters(bad)
    for (W, b), (W0, b0) in zip(host_params(model), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    good = [{"weight": p["weight"] * 2, "bias": p["bias"]} for p in params]
    model.load_parameters(good)
    np.testing.assert_array_equal(model.layers[0].weight, before[0][0] * 2)


def test_failed_value_and_grad_leaves_parameters_untouched(rng):
    model = random_model([3, 4, 2], "tanh", np.float64, rng)
    before = [W.copy() for W, _ in host_params(model)]

    def broken(y):
        raise FloatingPointError("boom")

    with pytest.raises(FloatingPointError):
        cupynn.value_and_grad(model, np.ones((4, 3)), broken)
    with pytest.raises(ValueError, match="callable must return"):
        cupynn.value_and_grad(model, np.ones((4, 3)), lambda y: (0.0, y[:1]))
    for (W, _), W0 in zip(host_params(model), before):
        np.testing.assert_array_equal(W, W0)


def test_save_and_load(tmp_path, rng):
    model = cupynn.Chain(cupynn.Dense(3, 5, "gelu", device="cpu", rng=2),
                         cupynn.Dense(5, 1, device="cpu", bias=False, rng=3))
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = cupynn.load(path, device="cpu")
    assert repr(loaded) == repr(model)
    x = rng.standard_normal((7, 3))
    np.testing.assert_array_equal(loaded(x), model(x))
    single = cupynn.Dense(2, 2, "relu", device="cpu", rng=0)
    single.save(tmp_path / "d.npz")
    assert repr(cupynn.load(tmp_path / "d.npz", device="cpu")) == "Dense(2 => 2, relu)"


def test_to_cpu_is_a_noop_and_returns_self(rng):
    model = random_model([2, 2], "relu", np.float64, rng)
    W = model.layers[0].weight
    assert model.to("cpu") is model and model.layers[0].weight is W


def test_dense_as_a_model(rng):
    layer = cupynn.Dense(3, 2, "sigmoid", device="cpu", rng=0)
    x = rng.standard_normal((5, 3))
    v, g = cupynn.value_and_grad(layer, x, "mse")
    rv, rg, _ = ref.value_and_grad([(layer.weight, layer.bias)], ["sigmoid"], x, "mse")
    assert ref.rel_err(v, rv) < 1e-12
    assert ref.rel_err(g["weight"], rg[0][0]) < 1e-12 and ref.rel_err(g["bias"], rg[0][1]) < 1e-12


@pytest.mark.parametrize("act", ["relu", "softplus", "identity"])
def test_functional_single_layer(act, rng):
    x = rng.standard_normal((9, 4))
    W, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    y, ctx = F.dense_forward(x, W, b, act, save=True)
    ry, _, _ = ref.net_forward([(W, b)], [act], x)
    assert ref.rel_err(y, ry) < 1e-14
    g = rng.standard_normal((9, 3))
    dx, dW, db = F.dense_backward(g, ctx)
    dz = g * ref.act_derivative_of_z(act, x @ W.T + b)
    assert ref.rel_err(dW, dz.T @ x) < 1e-13 and ref.rel_err(db, dz.sum(0)) < 1e-13
    assert ref.rel_err(dx, dz @ W) < 1e-13
    assert F.dense_backward(g, ctx, need_dx=False)[0] is None
    with pytest.raises(ValueError, match=r"g must have the layer output's shape \(9, 3\)"):
        F.dense_backward(g[:, :2], ctx)
    value = F.loss_forward(y, "sum_squares")
    assert ref.rel_err(value, (y * y).sum()) < 1e-14
    assert ref.rel_err(F.loss_backward(y, "mse"), 2 * y / y.size) < 1e-15
