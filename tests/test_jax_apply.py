"""cupynn.jax.apply: a cupynn model as a jax.custom_vjp function, inside jax.jit.

float64 comparisons enable x64 for the duration of one test. Skipped without JAX.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import functional as F

from .conftest import random_model

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import cupynn.jax as cj  # noqa: E402

JNP_ACTS = {
    "identity": lambda z: z, "relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus, "silu": jax.nn.silu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=True),
}


@pytest.fixture
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def jnp_network(model):
    """The same network written in jax.numpy, as a function of (params, x)."""
    acts = [JNP_ACTS[l.activation.name] for l in model.layers]

    def run(params, x):
        h = x
        for p, act in zip(params, acts):
            h = h @ p["weight"].T
            if p["bias"] is not None:
                h = h + p["bias"]
            h = act(h)
        return h

    return run


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_grad_matches_jax_numpy_float64(bias, rng, x64):
    # one network through every activation (each jit compile costs a second on 2 cores)
    acts = ["tanh", "relu", "gelu", "silu", "sigmoid", "softplus", "identity"]
    model = random_model([3, 17, 9, 8, 7, 6, 5, 2], acts, np.float64, rng, bias=bias)
    f, ref = cj.apply(model), jnp_network(model)
    params = cj.parameters(model)
    x = jnp.asarray(rng.standard_normal((23, 3)))
    t = jnp.asarray(rng.standard_normal((23, 2)))

    def loss(fn):  # a nonlinear function of the output, so dL/dy is not y
        return lambda p, x: jnp.sum(jnp.sin(fn(p, x)) * t) + jnp.sum(fn(p, x) ** 2)

    (gp, gx) = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(params, x)
    (rp, rx) = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    assert rel(gx, rx) <= 1e-12
    for g, r in zip(gp, rp):
        assert rel(g["weight"], r["weight"]) <= 1e-12
        assert (g["bias"] is None) == (not bias)
        if bias:
            assert rel(g["bias"], r["bias"]) <= 1e-12
    assert rel(jax.jit(f)(params, x), ref(params, x)) <= 1e-12


def test_forward_and_backward_are_cupynn_calls(rng, x64, monkeypatch):
    model = random_model([2, 6, 1], "tanh", np.float64, rng)
    f, params = cj.apply(model), cj.parameters(model)
    calls = []
    real = F.vjp
    monkeypatch.setattr(F, "vjp", lambda *a, **k: calls.append(k["wrt_input"]) or real(*a, **k))
    x = rng.standard_normal((9, 2))
    value, grads, dx = cupynn.value_and_grad(model, x, "sum_squares", wrt_input=True)
    v, (gp, gx) = jax.value_and_grad(lambda p, x: jnp.sum(f(p, x) ** 2), argnums=(0, 1))(
        params, jnp.asarray(x))
    assert calls == [True]  # one backward call for all the cotangents
    assert rel(v, value) <= 1e-14 and rel(gx, dx) <= 1e-12
    for g, r in zip(gp, grads):
        assert rel(g["weight"], r["weight"]) <= 1e-12 and rel(g["bias"], r["bias"]) <= 1e-12
    # x not differentiated: no dL/dx is computed
    gp2 = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2)))(params, jnp.asarray(x))
    assert calls == [True, False]
    for g, r in zip(gp2, grads):
        assert rel(g["weight"], r["weight"]) <= 1e-12 and rel(g["bias"], r["bias"]) <= 1e-12


def test_float32_one_sample_vmap_and_a_dense(rng):
    model = random_model([4, 8, 3], "relu", np.float32, rng)
    f, params, ref = cj.apply(model), cj.parameters(model), jnp_network(model)
    x = jnp.asarray(rng.standard_normal((5, 4)).astype(np.float32))
    assert f(params, x).dtype == jnp.float32
    assert rel(f(params, x[0]), ref(params, x[0])) <= 1e-6
    per_row = jax.jit(jax.vmap(lambda xx: f(params, xx)))(x)
    assert per_row.shape == (5, 3) and rel(per_row, ref(params, x)) <= 1e-6
    layer = cupynn.Dense.from_arrays(rng.standard_normal((3, 4)).astype(np.float32), None, "tanh")
    g = jax.grad(lambda p: jnp.sum(cj.apply(layer)(p, x)))(cj.parameters(layer))
    want = (1 - np.tanh(np.asarray(x) @ layer.weight.T) ** 2).T @ np.asarray(x)
    assert g["bias"] is None and rel(g["weight"], want) <= 1e-5


def test_errors_at_trace_time(rng):
    model = random_model([3, 2], "identity", np.float64, rng)
    with _x64_off():
        f = cj.apply(model)
        with pytest.raises(TypeError, match=r"dtype float32 but the model is float64.*jax_enable_x64"):
            f(cj.parameters(model), jnp.ones((2, 3), jnp.float32))
    f32 = random_model([3, 2], "identity", np.float32, rng)
    f = cj.apply(f32)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        f(cj.parameters(f32), jnp.ones((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="structured like cupynn.jax.parameters"):
        f([cj.parameters(f32)[0], cj.parameters(f32)[0]], jnp.ones((2, 3), jnp.float32))
    with pytest.raises(TypeError, match="takes a cupynn Dense or Chain"):
        cj.apply(lambda x: x)


class _x64_off:
    def __enter__(self):
        self.old = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", False)

    def __exit__(self, *exc):
        jax.config.update("jax_enable_x64", self.old)


@pytest.mark.gpu
def test_cuda_model_under_jit_matches_jax_numpy(rng, x64):
    """A CUDA model: the callbacks copy JAX's host arrays to the GPU and back."""
    if not cupynn.cuda_available():
        pytest.skip("cupynn's CUDA backend is not usable here")
    model = random_model([3, 33, 17, 2], ["tanh", "relu", "identity"], np.float64, rng,
                         device="cuda")
    f, params, ref = cj.apply(model), cj.parameters(model), jnp_network(model)
    x = jnp.asarray(rng.standard_normal((129, 3)))

    def loss(fn):
        return lambda p, x: jnp.sum(jnp.sin(fn(p, x)))

    (gp, gx) = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(params, x)
    (rp, rx) = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    assert rel(gx, rx) <= 1e-12
    for g, r in zip(gp, rp):
        assert rel(g["weight"], r["weight"]) <= 1e-12 and rel(g["bias"], r["bias"]) <= 1e-12


def test_the_callback_reads_jax_buffers_in_place(rng, monkeypatch):
    """cupynn computes on the very arrays JAX hands the callback (no copy of its own).

    JAX itself copies the arguments of a pure_callback into buffers of its own; that part
    is JAX's and not tested here.
    """
    model = random_model([3, 4, 2], "tanh", np.float32, rng)
    f, params = cj.apply(model), cj.parameters(model)
    x = jnp.asarray(rng.standard_normal((5, 3)).astype(np.float32))
    handed, seen = [], []
    real_cb, real_fwd = jax.pure_callback, F.forward

    def spy_cb(cb, structs, *args, **kw):
        def wrapped(*a):
            handed.append(a)
            return cb(*a)
        return real_cb(wrapped, structs, *args, **kw)

    monkeypatch.setattr(jax, "pure_callback", spy_cb)
    monkeypatch.setattr(F, "forward", lambda m, xa: seen.append((m, xa)) or real_fwd(m, xa))
    f(params, x).block_until_ready()
    (args,), ((m, xa),) = handed, seen
    ptr = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    addr = [a.unsafe_buffer_pointer() if hasattr(a, "unsafe_buffer_pointer") else ptr(a)
            for a in args]  # x, W0, b0, W1, b1
    assert isinstance(xa, np.ndarray) and ptr(xa) == addr[0]
    assert [ptr(l.weight) for l in m.layers] == [addr[1], addr[3]]
    assert [ptr(l.bias) for l in m.layers] == [addr[2], addr[4]]
