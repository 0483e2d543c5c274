"""Arrays of other libraries (torch, JAX: any DLPack producer) where cupynn takes an array.

They are read in place (no copy), checked like NumPy/CuPy arrays, and results
stay NumPy arrays. Skipped without torch / JAX.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import functional as F
from cupynn._arrays import intake

from .conftest import random_model

torch = pytest.importorskip("torch")


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class FakeCudaTensor:
    """A DLPack producer that says it lives on CUDA device 0 (kDLCUDA = 2)."""

    dtype = np.dtype(np.float64)

    def __dlpack__(self, stream=None):  # pragma: no cover - never reached
        raise AssertionError("a CUDA producer must not be read for a CPU model")

    def __dlpack_device__(self):
        return (2, 0)


def test_torch_tensor_is_read_in_place_both_ways(rng):
    t = torch.from_numpy(rng.standard_normal((5, 3)))
    a = intake(t, what="x", device="cpu", dtype=np.dtype(np.float64))
    assert isinstance(a, np.ndarray) and _ptr(a) == t.data_ptr()
    a[2, 1] = 1234.5  # write through the converted array ...
    assert t[2, 1].item() == 1234.5  # ... and read it back in torch
    t[0, 0] = -7.25  # and the other way
    assert a[0, 0] == -7.25
    # a strided view keeps its strides: still no copy
    v = intake(t.T, what="x", device="cpu", dtype=np.dtype(np.float64))
    assert _ptr(v) == t.data_ptr() and v.shape == (3, 5) and not v.flags.c_contiguous


def test_numpy_arrays_and_non_arrays_pass_through():
    x = np.ones((2, 2))
    assert intake(x, what="x", device="cpu") is x
    assert intake([1.0, 2.0], what="x", device="cpu") == [1.0, 2.0]


def test_model_calls_take_torch_tensors_and_return_numpy(rng):
    model = random_model([3, 6, 2], "tanh", np.float64, rng)
    xn = rng.standard_normal((7, 3))
    xt = torch.from_numpy(xn.copy())
    y = model(xt)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, model(xn))
    target = rng.standard_normal((7, 2))
    v_t, g_t, dx_t = cupynn.value_and_grad(model, xt, "mse", target=torch.from_numpy(target),
                                           wrt_input=True)
    v_n, g_n, dx_n = cupynn.value_and_grad(model, xn, "mse", target=target, wrt_input=True)
    assert isinstance(dx_t, np.ndarray) and isinstance(g_t[0]["weight"], np.ndarray)
    assert float(v_t) == float(v_n)
    np.testing.assert_array_equal(dx_t, dx_n)
    for a, b in zip(g_t, g_n):
        np.testing.assert_array_equal(a["weight"], b["weight"])
        np.testing.assert_array_equal(a["bias"], b["bias"])
    # one sample, a strided (transposed) batch
    np.testing.assert_array_equal(model(torch.from_numpy(xn[0].copy())), model(xn[0]))
    xT = torch.from_numpy(np.ascontiguousarray(xn.T)).T
    np.testing.assert_array_equal(model(xT), model(xn))


def test_callable_loss_may_return_a_torch_gradient(rng):
    model = random_model([2, 4, 3], "relu", np.float64, rng)
    x = rng.standard_normal((6, 2))

    def loss(y):
        t = torch.from_numpy(y)
        return float((t ** 2).sum()), 2 * t

    v, g = cupynn.value_and_grad(model, x, loss)
    v0, g0 = cupynn.value_and_grad(model, x, "sum_squares")
    assert np.isclose(float(v), float(v0), rtol=1e-14)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(a["weight"], b["weight"], rtol=1e-13, atol=0)


def test_single_layer_ops_take_torch_tensors(rng):
    x, W, b = (rng.standard_normal(s) for s in ((5, 3), (4, 3), (4,)))
    y, ctx = F.dense_forward(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(b),
                             "tanh", save=True)
    y0, ctx0 = F.dense_forward(x, W, b, "tanh", save=True)
    np.testing.assert_array_equal(y, y0)
    g = rng.standard_normal((5, 4))
    for got, want in zip(F.dense_backward(torch.from_numpy(g), ctx), F.dense_backward(g, ctx0)):
        np.testing.assert_array_equal(got, want)


def test_from_arrays_without_copy_shares_torch_memory(rng):
    W, b = torch.from_numpy(rng.standard_normal((4, 3))), torch.from_numpy(rng.standard_normal(4))
    layer = cupynn.Dense.from_arrays(W, b, "tanh", copy=False)
    assert _ptr(layer.weight) == W.data_ptr() and _ptr(layer.bias) == b.data_ptr()
    x = rng.standard_normal((2, 3))
    before = layer(x)
    with torch.no_grad():
        W.mul_(2.0)
    np.testing.assert_allclose(layer(x), np.tanh(x @ W.numpy().T + b.numpy()), rtol=1e-14)
    assert not np.allclose(layer(x), before)
    copied = cupynn.Dense.from_arrays(W, b, "tanh")  # default: a copy
    assert _ptr(copied.weight) != W.data_ptr()
    with pytest.raises(ValueError, match="copy=False needs C-contiguous"):
        cupynn.Dense.from_arrays(W.T, None, copy=False)


def test_load_parameters_takes_torch_tensors(rng):
    model = random_model([3, 4, 1], "relu", np.float64, rng)
    new = [{"weight": torch.from_numpy(rng.standard_normal(l.weight.shape)),
            "bias": torch.from_numpy(rng.standard_normal(l.bias.shape))} for l in model.layers]
    model.load_parameters(new)
    np.testing.assert_array_equal(model.layers[1].weight, new[1]["weight"].numpy())
    assert _ptr(model.layers[1].weight) != new[1]["weight"].data_ptr()  # load_parameters copies
    with pytest.raises(TypeError, match=r"weight \(torch.Tensor\) has dtype float32.*a\.to\(torch\.float64\)"):
        model.load_parameters([{k: v.float() for k, v in d.items()} for d in new])


def test_errors_name_the_fix(rng):
    model = random_model([3, 2], "identity", np.float64, rng)
    x = torch.from_numpy(rng.standard_normal((4, 3)))
    with pytest.raises(TypeError, match=r"dtype float32 but the model is float64.*x\.to\(torch\.float64\)"):
        model(x.float())
    with pytest.raises(TypeError, match=r"requires grad.*cupynn\.torch\.Module.*x\.detach\(\)"):
        model(x.clone().requires_grad_(True))
    with pytest.raises(TypeError, match=r"bfloat16.*could not be read.*x\.to\(torch\.float64\)"):
        model(x.to(torch.bfloat16))
    with pytest.raises(cupynn.DeviceMismatchError, match=r"on 'cuda' but the model is on 'cpu'"):
        model(FakeCudaTensor())
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 3\)"):
        model(x[:, :2])


def test_jax_arrays_are_read_in_place(rng):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    xj = jnp.asarray(rng.standard_normal((5, 3)).astype(np.float32))
    a = intake(xj, what="x", device="cpu", dtype=np.dtype(np.float32))
    # JAX arrays are immutable: NumPy gets a read-only view of the same buffer
    assert _ptr(a) == xj.unsafe_buffer_pointer() and not a.flags.writeable
    model = random_model([3, 4, 2], "tanh", np.float32, rng)
    np.testing.assert_array_equal(model(xj), model(np.asarray(xj)))
    assert jax.devices()[0].platform == "cpu"
    with pytest.raises(TypeError, match=r"jax\.numpy\.float64.*jax_enable_x64"):
        random_model([3, 2], "identity", np.float64, rng)(xj)


def test_optimizer_step_takes_torch_gradients(rng):
    import cupynn.optim

    model = random_model([3, 4, 2], "tanh", np.float64, rng)
    twin = random_model([3, 4, 2], "tanh", np.float64, rng)
    twin.load_parameters(model.parameters())
    x = rng.standard_normal((6, 3))
    _, grads = cupynn.value_and_grad(model, x)
    as_torch = [{k: torch.from_numpy(v.copy()) for k, v in g.items()} for g in grads]
    cupynn.optim.SGD(model.parameters(), lr=0.1).step(as_torch)
    cupynn.optim.SGD(twin.parameters(), lr=0.1).step(grads)
    for a, b in zip(model.layers, twin.layers):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
    with pytest.raises(TypeError, match=r"torch\.float64"):
        cupynn.optim.SGD(model.parameters(), lr=0.1).step(
            [{k: v.float() for k, v in g.items()} for g in as_torch])
