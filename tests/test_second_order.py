"""PDE residual Jacobians, Levenberg-Marquardt, energy natural gradient and the SciPy
least_squares bridge (cupynn.second_order)."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn

from .conftest import random_model
from .reference import rel_err


def _pinn(rng, sizes=(2, 6, 5, 1)):
    return random_model(list(sizes), ["tanh"] * (len(sizes) - 2) + ["identity"], "float64", rng)


def _fd(fun, theta, h=1e-5):
    cols = []
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        cols.append((fun(theta + e) - fun(theta - e)) / (2 * h))
    return np.stack(cols, axis=1)


def _jax_residual(model, xi, xb, g, coef, wi, wb):
    """r(theta) of PDEResiduals written in JAX: a u + c.grad u + e lap u - f, and u - g."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    shapes = [(layer.out_features, layer.in_features) for layer in model.layers]
    a, c, e, f = coef

    def u(theta, x):
        h, off = x, 0
        for i, (n, k) in enumerate(shapes):
            W = theta[off:off + n * k].reshape(n, k)
            off += n * k
            h = W @ h + theta[off:off + n]
            off += n
            if i < len(shapes) - 1:
                h = jnp.tanh(h)
        return h[0]

    def r(theta):
        def one(x, aa, cc, ee, ff):
            lap = jnp.trace(jax.hessian(u, argnums=1)(theta, x))
            return aa * u(theta, x) + cc @ jax.grad(u, argnums=1)(theta, x) + ee * lap - ff
        ri = jax.vmap(one)(xi, a, c, e, f) * np.sqrt(wi / len(xi))
        if xb is None:
            return ri
        rb = (jax.vmap(lambda x: u(theta, x))(xb) - g) * np.sqrt(wb / len(xb))
        return jnp.concatenate([ri, rb])

    theta = jax.numpy.asarray(cupynn.get_flat(model))
    return np.asarray(r(theta)), np.asarray(jax.jacrev(r)(theta))


@pytest.mark.parametrize("kind", ["poisson", "helmholtz", "callable"])
def test_pde_jacobian_matches_jax_jacrev(rng, kind):
    model = _pinn(rng)
    N, Nb = 17, 6
    xi, xb = rng.uniform(size=(N, 2)), rng.uniform(size=(Nb, 2))
    f, g = rng.standard_normal(N), rng.standard_normal(Nb)
    zeros = np.zeros(N)
    if kind == "poisson":
        res = cupynn.PDEResiduals(xi, "poisson", rhs=f, boundary=xb, boundary_values=g,
                                  interior_weight=2.0, boundary_weight=3.0, chunk_rows=5)
        coef = (zeros, np.zeros((N, 2)), np.ones(N), f)
    elif kind == "helmholtz":
        res = cupynn.PDEResiduals(xi, "helmholtz", k=1.7, rhs=f, boundary=xb, boundary_values=g,
                                  interior_weight=2.0, boundary_weight=3.0)
        coef = (np.full(N, 1.7 ** 2), np.zeros((N, 2)), np.ones(N), f)
    else:
        coef = (rng.standard_normal(N), rng.standard_normal((N, 2)), rng.standard_normal(N), f)
        res = cupynn.PDEResiduals(xi, lambda x: coef, boundary=xb, boundary_values=g,
                                  interior_weight=2.0, boundary_weight=3.0, chunk_rows=4)
    r, J = res.jacobian(model)
    rj, Jj = _jax_residual(model, xi, xb, g, coef, 2.0, 3.0)
    assert rel_err(r, rj) < 1e-10
    assert rel_err(J, Jj) < 1e-10
    assert rel_err(res.residuals(model), r) < 1e-14


def test_pde_jacobian_matches_central_differences(rng):
    model = _pinn(rng, (2, 5, 1))
    xi, xb = rng.uniform(size=(9, 2)), rng.uniform(size=(3, 2))
    res = cupynn.PDEResiduals(xi, "helmholtz", k=2.0, rhs=1.0, boundary=xb, boundary_values=0.5)
    r, J = res.jacobian(model)
    theta = cupynn.get_flat(model)

    def fun(t):
        cupynn.set_flat(model, t)
        return res.residuals(model)

    fd = _fd(fun, theta)
    cupynn.set_flat(model, theta)
    assert rel_err(J, fd) < 1e-8


def test_pde_rows_agree_with_residual_value_and_grad(rng):
    """||r||^2 is residual_value_and_grad's mean((lap u - f)^2), and 2 J^T r its gradient."""
    model = _pinn(rng)
    xi = rng.uniform(size=(40, 2))
    f = rng.standard_normal(40)
    r, J = cupynn.pde_jacobian(model, xi, "poisson", rhs=f, chunk_rows=7)
    value, grads = cupynn.residual_value_and_grad(model, xi, "poisson", rhs=f)
    flat = np.concatenate([a.ravel() for item in grads for a in (item["weight"], item["bias"])])
    assert rel_err(r @ r, value) < 1e-13
    assert rel_err(2 * J.T @ r, flat) < 1e-12


def test_pde_batch_one_zero_boundary_and_strided_points(rng):
    model = _pinn(rng)
    xi = rng.uniform(size=(6, 2))
    r, J = cupynn.pde_jacobian(model, xi, "poisson", rhs=np.arange(6.0))
    r1, J1 = cupynn.pde_jacobian(model, xi[2:3], "poisson", rhs=np.arange(2.0, 3.0))
    assert rel_err(r1, r[2:3] * np.sqrt(6)) < 1e-13 and rel_err(J1, J[2:3] * np.sqrt(6)) < 1e-13
    rs, Js = cupynn.pde_jacobian(model, np.asfortranarray(xi), "poisson", rhs=np.arange(6.0))
    assert rel_err(Js, J) < 1e-14
    r0, J0 = cupynn.pde_jacobian(model, xi[:0], "poisson")
    assert r0.shape == (0,) and J0.shape == (0, cupynn.num_parameters(model))
    rb, Jb = cupynn.pde_jacobian(model, xi[:0], "poisson", boundary=xi, boundary_values=0.0)
    assert rel_err(Jb, cupynn.jacobian(model, xi) / np.sqrt(6)) < 1e-14


def test_pde_bad_input(rng):
    model = _pinn(rng)
    xi = rng.uniform(size=(6, 2))
    with pytest.raises(ValueError, match=r"rhs must have shape \(6,\)"):
        cupynn.pde_jacobian(model, xi, "poisson", rhs=np.ones(5))
    with pytest.raises(ValueError, match="needs the wave number"):
        cupynn.PDEResiduals(xi, "helmholtz")
    with pytest.raises(ValueError, match="unknown residual"):
        cupynn.PDEResiduals(xi, "heat")
    with pytest.raises(ValueError, match="go together"):
        cupynn.PDEResiduals(xi, boundary=xi)
    with pytest.raises(ValueError, match="one output"):
        cupynn.pde_jacobian(random_model([2, 3, 2], "tanh", "float64", rng), xi)
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        cupynn.pde_jacobian(model, xi, chunk_rows=0)
    with pytest.raises(ValueError, match=r"c must have shape \(6, 2\)"):
        cupynn.pde_jacobian(model, xi, lambda x: (None, np.ones((6, 3)), 1.0, 0.0))


def test_levenberg_marquardt_fits_data(rng):
    model = _pinn(rng, (1, 12, 1))
    x = np.linspace(-1, 1, 50).reshape(-1, 1)
    res = cupynn.levenberg_marquardt(model, x, np.sin(3 * x), iterations=60)
    assert res.loss[-1] < 1e-6 * res.loss[0]
    assert all(b <= a for a, b in zip(res.loss, res.loss[1:]))      # never increases
    y = model(x)
    assert rel_err(((y - np.sin(3 * x)) ** 2).sum(), res.loss[-1]) < 1e-10
    # deterministic
    again = _pinn(np.random.default_rng(5), (1, 12, 1))
    cupynn.set_flat(again, cupynn.get_flat(_pinn(rng, (1, 12, 1))))
    twin = _pinn(np.random.default_rng(5), (1, 12, 1))
    cupynn.set_flat(twin, cupynn.get_flat(again))
    a = cupynn.levenberg_marquardt(again, x, np.sin(3 * x), iterations=5)
    b = cupynn.levenberg_marquardt(twin, x, np.sin(3 * x), iterations=5)
    assert a.loss == b.loss and np.array_equal(cupynn.get_flat(again), cupynn.get_flat(twin))


def test_levenberg_marquardt_drives_the_seed_sum_of_squares_down_faster_than_adam(rng):
    """The seed thread's sum(abs2, m(x)) (identity 1→1000→20→1, smaller here)."""
    def seed():
        r = np.random.default_rng(0)
        return cupynn.Chain(cupynn.Dense.from_arrays(r.standard_normal((60, 1)), r.standard_normal(60)),
                            cupynn.Dense.from_arrays(r.standard_normal((20, 60)), r.standard_normal(20)),
                            cupynn.Dense.from_arrays(r.standard_normal((1, 20)), r.standard_normal(1)))
    x = np.random.default_rng(1).standard_normal((200, 1))
    lm = seed()
    start = float((lm(x) ** 2).sum())
    res = cupynn.levenberg_marquardt(lm, x, iterations=10)
    assert res.loss[0] == pytest.approx(start)
    assert res.loss[-1] < 1e-10 * start
    adam_model = seed()
    opt = cupynn.optim.Adam(adam_model.parameters(), lr=1e-3)
    for _ in range(100):
        _, grads = cupynn.value_and_grad(adam_model, x)
        opt.step(grads)
    assert float((adam_model(x) ** 2).sum()) > 1e3 * res.loss[-1]


def test_energy_natural_gradient_on_a_small_poisson_problem(rng):
    model = cupynn.MLP([2, 10, 1], "tanh", device="cpu", rng=0)
    n = 12
    g = (np.arange(n) + 0.5) / n
    xi = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    t = np.linspace(0, 1, 13)
    xb = np.concatenate([np.stack([t, 0 * t], 1), np.stack([t, 0 * t + 1], 1),
                         np.stack([0 * t, t], 1), np.stack([0 * t + 1, t], 1)])
    f = -2 * np.pi ** 2 * np.sin(np.pi * xi[:, 0]) * np.sin(np.pi * xi[:, 1])
    pde = cupynn.PDEResiduals(xi, "poisson", rhs=f, boundary=xb, boundary_values=0.0)
    res = cupynn.energy_natural_gradient(model, pde, iterations=30)
    assert res.loss[-1] < 1e-4 * res.loss[0]
    assert all(b <= a for a, b in zip(res.loss, res.loss[1:]))
    assert rel_err(float(pde.residuals(model) @ pde.residuals(model)), res.loss[-1]) < 1e-12
    fixed = cupynn.MLP([2, 10, 1], "tanh", device="cpu", rng=0)
    plain = cupynn.energy_natural_gradient(fixed, pde, iterations=5, adaptive=False)
    assert all(b <= a for a, b in zip(plain.loss, plain.loss[1:])) and plain.damping == 1e-10


def test_optimizers_refuse_bad_input_and_leave_parameters_untouched(rng):
    m32 = random_model([1, 4, 1], "tanh", "float32", rng)
    x32 = np.ones((5, 1), np.float32)
    theta32 = cupynn.get_flat(m32)
    with pytest.raises(TypeError, match="float64 model"):
        cupynn.levenberg_marquardt(m32, x32)
    with pytest.raises(ValueError, match="float64 model"):
        cupynn.levenberg_marquardt(m32, x32, np.ones((5, 1), np.float32))
    with pytest.raises(TypeError, match="float64 model"):
        cupynn.energy_natural_gradient(m32, cupynn.DataResiduals(x32))
    assert np.array_equal(cupynn.get_flat(m32), theta32)
    model = _pinn(rng, (1, 4, 1))
    theta = cupynn.get_flat(model)
    x = np.ones((5, 1))
    with pytest.raises(ValueError, match="iterations must be an integer"):
        cupynn.levenberg_marquardt(model, x, iterations=-1)
    with pytest.raises(ValueError, match="damping must be"):
        cupynn.levenberg_marquardt(model, x, damping=0.0)
    with pytest.raises(ValueError, match=r"target must have the output's shape \(5, 1\)"):
        cupynn.levenberg_marquardt(model, x, np.ones(4))
    with pytest.raises(ValueError, match="line_search must be"):
        cupynn.energy_natural_gradient(model, cupynn.DataResiduals(x), line_search=0)
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        cupynn.levenberg_marquardt(model, cupynn.DataResiduals(x, chunk_rows=0))
    assert np.array_equal(cupynn.get_flat(model), theta)


@pytest.mark.parametrize("jac", ["dense", "operator"])
def test_scipy_least_squares_bridge(rng, jac):
    pytest.importorskip("scipy")
    model = _pinn(rng, (1, 8, 1))
    x = np.linspace(-1, 1, 40).reshape(-1, 1)
    t = np.sin(2 * x)
    fun, jacobian_fn = cupynn.residual_functions(model, x, t, jac=jac)
    theta = cupynn.get_flat(model)
    r = fun(theta)
    assert r.dtype == np.float64 and rel_err(r, (model(x) - t).ravel()) < 1e-15
    J = jacobian_fn(theta)
    dense = cupynn.jacobian(model, x)
    v = rng.standard_normal(theta.size)
    assert rel_err(J @ v, dense @ v) < 1e-13
    kwargs = {"method": "trf", "tr_solver": "lsmr"} if jac == "operator" else {"method": "lm"}
    sol = cupynn.scipy_least_squares(model, x, t, jac=jac, max_nfev=200, **kwargs)
    assert np.array_equal(cupynn.get_flat(model), sol.x)
    assert 2 * sol.cost < 1e-3 * float(r @ r)
    pde = cupynn.PDEResiduals(rng.uniform(size=(20, 1)) * 0 + np.linspace(0, 1, 20)[:, None], "poisson",
                              rhs=1.0, boundary=np.array([[0.0], [1.0]]), boundary_values=0.0)
    fun, jacobian_fn = cupynn.residual_functions(model, pde, jac=jac)
    assert rel_err(jacobian_fn(cupynn.get_flat(model)) @ v, pde.jacobian(model)[1] @ v) < 1e-14


def test_levenberg_marquardt_matrix_free(rng):
    model = _pinn(rng, (1, 10, 1))
    twin = _pinn(np.random.default_rng(0), (1, 10, 1))
    cupynn.set_flat(twin, cupynn.get_flat(model))
    x = np.linspace(-1, 1, 30).reshape(-1, 1)
    t = np.cos(2 * x)
    free = cupynn.levenberg_marquardt(model, x, t, iterations=40, matrix_free=True)
    dense = cupynn.levenberg_marquardt(twin, x, t, iterations=40)
    assert free.loss[-1] < 1e-6 * free.loss[0]
    assert abs(np.log10(free.loss[-1] / dense.loss[-1])) < 3
    with pytest.raises(TypeError, match="operator"):
        class Bare:
            def residuals(self, m):
                return m(x).ravel()

            def jacobian(self, m):
                return self.residuals(m), cupynn.jacobian(m, x)
        cupynn.levenberg_marquardt(model, Bare(), matrix_free=True)
