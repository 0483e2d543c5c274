"""cupynn.functional.vjp: the gradients of sum(model(x) * g), against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import functional as F
from cupynn.backends import get_backend
from cupynn.backends.numpy_backend import NumpyBackend

from . import reference as ref
from .conftest import TOL, activations_of, host_params, random_model


def reference_vjp(model, x, g):
    params, acts = host_params(model), activations_of(model)
    _, inputs, pres = ref.net_forward(params, acts, x)
    g = np.asarray(g, np.float64)
    grads = []
    for (W, b), act, h, z in reversed(list(zip(params, acts, inputs, pres))):
        dz = g * ref.act_derivative_of_z(act, z)
        grads.append((dz.T @ h, None if b is None else dz.sum(0)))
        g = dz @ np.asarray(W, np.float64)
    return grads[::-1], g


def check(model, got, want, dtype):
    (grads, dx), (rgrads, rdx) = got, want
    tol = TOL[np.dtype(dtype)]
    if dx is not None:
        assert ref.rel_err(dx, rdx) <= tol
    for gr, (rW, rb) in zip(grads, rgrads):
        assert gr["weight"].dtype == dtype and ref.rel_err(gr["weight"], rW) <= tol
        assert (gr["bias"] is None) == (rb is None)
        if rb is not None:
            assert ref.rel_err(gr["bias"], rb) <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("acts,bias", [
    (["identity", "identity"], True),  # the seed's reassociated first layer
    (["tanh", "relu", "sigmoid"], True),
    (["gelu", "softplus", "elu"], False),
])
def test_matches_the_reference(acts, bias, dtype, rng):
    sizes = [3, 600, 11, 5][:len(acts) + 1]  # 600 wide: the NumPy backend's chunks are 512 rows
    model = random_model(sizes, acts, dtype, rng, bias=bias)
    for batch in (1, 17, 1031):  # 1031 = two chunks of 512 and 7 rows
        x = rng.standard_normal((batch, sizes[0])).astype(dtype)
        g = rng.standard_normal((batch, sizes[-1])).astype(dtype)
        want = reference_vjp(model, x, g)
        check(model, F.vjp(model, x, g), want, dtype)
        grads, dx = F.vjp(model, x, g, wrt_input=False)
        assert dx is None
        check(model, (grads, None), want, dtype)


def test_same_as_value_and_grad_with_the_callable_loss(rng, monkeypatch):
    model = random_model([4, 50, 6, 2], ["identity", "tanh", "identity"], np.float64, rng)
    x, g = rng.standard_normal((300, 4)), rng.standard_normal((300, 2))
    value, grads, dx = cupynn.value_and_grad(model, x, lambda y: ((y * g).sum(), g), wrt_input=True)
    fused = F.vjp(model, x, g)
    # a backend without the fused "dot" loss gets the callable: the same numbers
    monkeypatch.setattr(NumpyBackend, "loss_kinds", ("sum_squares", "mse"))
    kinds = []
    backend = get_backend("cpu")
    real = backend.network_value_and_grad
    monkeypatch.setattr(backend, "network_value_and_grad",
                        lambda net, p, x, loss, **k: kinds.append(loss.kind) or real(net, p, x, loss, **k))
    fallback = F.vjp(model, x, g)
    assert kinds == ["callable"]
    for got in (fused, fallback):
        assert ref.rel_err(got[1], dx) <= 1e-13
        for a, b in zip(got[0], grads):
            assert ref.rel_err(a["weight"], b["weight"]) <= 1e-13
            assert ref.rel_err(a["bias"], b["bias"]) <= 1e-13


def test_one_sample_empty_batch_broadcast_g_and_errors(rng):
    model = random_model([3, 4, 2], "tanh", np.float64, rng)
    x, g = rng.standard_normal(3), rng.standard_normal(2)
    grads, dx = F.vjp(model, x, g)
    rgrads, rdx = reference_vjp(model, x[None], g[None])
    assert dx.shape == (3,) and ref.rel_err(dx, rdx[0]) <= 1e-12
    grads, dx = F.vjp(model, np.empty((0, 3)), np.empty((0, 2)))
    assert dx.shape == (0, 3) and all(np.all(gr["weight"] == 0) for gr in grads)
    xb = rng.standard_normal((9, 3))
    ones = np.broadcast_to(np.ones(2), (9, 2))  # stride 0, as torch's sum() backward gives
    check(model, F.vjp(model, xb, ones), reference_vjp(model, xb, ones), np.float64)
    with pytest.raises(ValueError, match=r"g must have the output's shape \(9, 2\)"):
        F.vjp(model, xb, np.ones((9, 3)))
    with pytest.raises(TypeError, match="dtype float32 but the model is float64"):
        F.vjp(model, xb, np.ones((9, 2), np.float32))
