"""Derivatives along chosen inputs (dims=, grad_dims=), the input Hessian (input_hessian) and
one-point inputs, against jax.hessian / jax.jacobian of the same network written in JAX
(skipped without JAX) and against the full-input results."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import derivatives as D

from .conftest import host_params, random_model
from .reference import rel_err


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture
def jx():
    jax = pytest.importorskip("jax")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", old)


def _jax_net(jax, model):
    import jax.numpy as jnp

    acts = {"tanh": jnp.tanh, "silu": jax.nn.silu, "identity": lambda z: z,
            "softplus": jax.nn.softplus}
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in host_params(model)]
    fs = [acts[l.activation.name] for l in model.layers]

    def u(x):
        h = x
        for (W, b), f in zip(params, fs):
            h = f(h @ W.T + b)
        return h

    return u


def _jax_derivs(jax, model, x):
    u = _jax_net(jax, model)
    J = jax.vmap(jax.jacobian(u))(x)         # (B, m, d)
    H = jax.vmap(jax.hessian(u))(x)          # (B, m, d, d)
    return np.asarray(u(x)), np.asarray(J), np.asarray(H)


@pytest.mark.parametrize("m", [1, 3])
def test_hessian_and_its_blocks_match_jax(jx, rng, m):
    d = 4
    model = random_model([d, 13, 11, m], ["tanh", "silu", "identity"], "float64", rng)
    x = rng.uniform(-1, 1, (9, d))
    u_ref, J, H = _jax_derivs(jx, model, x)
    if m == 1:
        u_ref, J, H = u_ref[:, 0], J[:, 0], H[:, 0]
    u, du, hess = cupynn.input_hessian(model, x)
    assert hess.shape == H.shape and du.shape == J.shape
    assert rel_err(u, u_ref) <= 1e-13 and rel_err(du, J) <= 1e-12
    assert rel_err(hess, H) <= 1e-12
    for dims in [(2,), (3, 0), (1, 2, 3)]:
        u2, du2, blk = cupynn.input_hessian(model, x, dims=dims)
        idx = np.array(dims)
        assert rel_err(blk, H[..., idx[:, None], idx[None, :]]) <= 1e-12
        assert rel_err(du2, J[..., idx]) <= 1e-12


@pytest.mark.parametrize("dims", [(0,), (2, 1), (0, 2)])
def test_laplacian_over_chosen_inputs_matches_jax(jx, rng, dims):
    model = random_model([3, 17, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (21, 3))
    _, J, H = _jax_derivs(jx, model, x)
    idx = np.array(dims)
    u, du, lap = cupynn.input_derivatives(model, x, dims=dims)
    assert du.shape == (21, len(dims))
    assert rel_err(du, J[:, 0, idx]) <= 1e-12
    assert rel_err(lap, np.trace(H[:, 0][:, idx[:, None], idx[None, :]], axis1=1, axis2=2)) <= 1e-12
    _, _, d2 = cupynn.input_derivatives(model, x, diag=True, dims=dims)
    assert rel_err(d2, np.diagonal(H[:, 0], axis1=1, axis2=2)[:, idx]) <= 1e-12
    # the heat equation's pair: u_t (t = input 1 here) and the Laplacian over the others
    space = tuple(i for i in range(3) if i != 1)
    _, ut, lap_x = cupynn.input_derivatives(model, x, dims=space, grad_dims=(1,))
    assert ut.shape == (21, 1) and rel_err(ut[:, 0], J[:, 0, 1]) <= 1e-12
    assert rel_err(lap_x, H[:, 0, 0, 0] + H[:, 0, 2, 2]) <= 1e-12
    _, dall, _ = cupynn.input_derivatives(model, x, dims=space, grad_dims=(2, 1, 0))
    assert rel_err(dall, J[:, 0, [2, 1, 0]]) <= 1e-12


def test_subset_costs_d_sel_plus_2_passes(rng, monkeypatch):
    """The stack carries len(dims) tangents: one GEMM over (d_sel + 2) row blocks per layer."""
    model = random_model([5, 8, 1], "tanh", "float64", rng)
    rows = []
    real = D.F.dense_forward

    def spy(x, W, *a, **k):
        rows.append(x.shape[0])
        return real(x, W, *a, **k)

    monkeypatch.setattr(D.F, "dense_forward", spy)
    cupynn.input_derivatives(model, rng.uniform(size=(10, 5)), dims=(1, 3))
    assert rows == [10 * (2 + 2)] * 2
    rows.clear()
    cupynn.input_derivatives(model, rng.uniform(size=(10, 5)), dims=(1, 3), grad_dims=(0,))
    assert rows == [10 * 4, 10 * 4, 10 * 2, 10 * 2]  # (d_sel + 2) blocks, then u and u_t


def test_residual_over_chosen_inputs_matches_hand_and_fd(rng):
    """The heat residual mean((u_t - Δ_x u)^2) with dims/grad_dims, against the same loss
    computed from the full diagonal (the status quo) and finite differences."""
    model = random_model([3, 9, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (30, 3))

    def heat(u, du, lap):
        r = du[:, 0] - lap
        w = 2 * r / r.size
        return (r * r).mean(), None, w[:, None], -w

    def heat_diag(u, du, d2):
        r = du[:, 0] - d2[:, 1:].sum(1)
        w = 2 * r / r.size
        g2 = np.zeros_like(d2)
        g2[:, 1:] = -w[:, None]
        gdu = np.zeros_like(du)
        gdu[:, 0] = w
        return (r * r).mean(), None, gdu, g2

    v1, g1 = cupynn.residual_value_and_grad(model, x, heat, dims=(1, 2), grad_dims=(0,))
    v2, g2 = cupynn.residual_value_and_grad(model, x, heat_diag, diag=True)
    flat = lambda g: np.concatenate([a.ravel() for d in g for a in (d["weight"], d["bias"])])  # noqa: E731
    assert abs(float(v1) - float(v2)) <= 1e-13 * abs(float(v2))
    assert rel_err(flat(g1), flat(g2)) <= 1e-12
    loss = cupynn.ResidualTerm(x, heat, dims=(1, 2), grad_dims=(0,))
    fun = cupynn.flat_value_and_grad(model, loss)
    theta = cupynn.get_flat(model)
    _, g = fun(theta)
    d = rng.standard_normal(theta.size)
    fd = (fun(theta + 1e-5 * d)[0] - fun(theta - 1e-5 * d)[0]) / 2e-5
    assert abs(fd - g @ d) <= 1e-7 * max(1.0, abs(fd))


def test_one_point_is_a_1d_x(rng):
    model = random_model([3, 7, 2], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (4, 3))
    for args in ({}, {"diag": True}, {"order": 1}, {"dims": (2,)}):
        batch = cupynn.input_derivatives(model, x, **args)
        for i in range(4):
            one = cupynn.input_derivatives(model, x[i], **args)
            for a, b in zip(one, batch):
                assert a.shape == b.shape[1:] and np.array_equal(a, b[i])
    single = cupynn.MLP([2, 5, 1], "tanh", device="cpu", rng=0)
    u, du, lap = cupynn.input_derivatives(single, np.array([0.3, -0.2]))
    assert u.shape == () and du.shape == (2,) and lap.shape == ()
    u, du, H = cupynn.input_hessian(single, np.array([0.3, -0.2]))
    assert H.shape == (2, 2)


def test_selection_errors(rng):
    model = random_model([3, 4, 1], "tanh", "float64", rng)
    x = rng.uniform(size=(2, 3))
    for bad in [(), (0, 0), (3,), (-1,), (0.5,)]:
        with pytest.raises(ValueError, match="dims must be distinct input coordinates in 0..2"):
            cupynn.input_derivatives(model, x, dims=bad)
    with pytest.raises(TypeError, match="sequence of input coordinates"):
        cupynn.input_hessian(model, x, dims=2)
    with pytest.raises(ValueError, match="grad_dims= is for callable residuals"):
        cupynn.residual_value_and_grad(model, x, "poisson", grad_dims=(0,))
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 3\), got \(2,\) "
                                         r"\(one point: \(3,\)\)"):
        cupynn.input_derivatives(model, np.ones(2))
    big = random_model([12, 4, 1], "tanh", "float64", rng)
    with pytest.raises(ValueError, match="Hessian over 12 inputs.*has 78"):
        cupynn.input_hessian(big, rng.uniform(size=(2, 12)))


def test_builtin_residual_over_chosen_inputs(rng):
    model = random_model([3, 11, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (40, 3))
    f = rng.standard_normal(40)

    def res(u, du, lap):
        r = lap - f
        return (r * r).mean(), None, None, 2 * r / r.size

    flat = lambda g: np.concatenate([a.ravel() for d in g for a in (d["weight"], d["bias"])])  # noqa: E731
    for dims in [(0,), (2, 1)]:
        v1, g1 = cupynn.residual_value_and_grad(model, x, "poisson", rhs=f, dims=dims)
        v2, g2 = cupynn.residual_value_and_grad(model, x, res, dims=dims)
        _, _, lap = cupynn.input_derivatives(model, x, dims=dims)
        assert abs(float(v1) - np.mean((lap - f) ** 2)) <= 1e-13 * float(v1)
        assert abs(float(v1) - float(v2)) <= 1e-13 * float(v1)
        assert rel_err(flat(g1), flat(g2)) <= 1e-12
