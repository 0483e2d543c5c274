"""Derivatives with respect to the inputs (cupynn.derivatives) against independent references.

References: central finite differences (4th order) of the plain float64 network of
tests/reference.py (no cupynn code), and ``jax.hessian`` / ``jax.grad`` of the same network
written in JAX (skipped without JAX). The parameter gradient of residual losses is checked
against finite differences of the loss along random directions, and against JAX.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
import cupynn.functional as F
from cupynn import derivatives as D
from cupynn.activations import ACTIVATIONS, get_activation
from cupynn.backends.base import taylor_blocks

from .conftest import host_params, random_model
from .reference import act_forward, net_forward, rel_err

ACTS = list(ACTIVATIONS)
KINKED = ("relu", "leaky_relu", "elu")  # f, f' or f'' jump at 0: keep FD stencils away
H = 1e-3  # finite-difference step in x
TOL = 1e-8


def _acts(model):
    return [l.activation.name for l in model.layers]


def _u_ref(model, x):
    """The model's outputs (B, m) by the independent reference network."""
    return net_forward(host_params(model), _acts(model), x)[0]


def _smooth_points(model, rng, n, d, margin=0.05):
    """n points of [-1, 1]^d whose pre-activations all stay |z| > margin (kinks are far)."""
    pts = []
    while len(pts) < n:
        x = rng.uniform(-1, 1, (4 * n, d))
        _, _, pres = net_forward(host_params(model), _acts(model), x)
        ok = np.all([np.abs(z).min(axis=1) > margin for z in pres], axis=0)
        pts.extend(x[ok])
    return np.array(pts[:n])


def _fd(model, x):
    """(u, du (B, m, d), d2 (B, m, d)) by 4th-order central differences of the reference."""
    d = x.shape[1]
    u0 = _u_ref(model, x)
    du, d2 = [], []
    for i in range(d):
        e = np.zeros(d)
        e[i] = H
        f = {k: _u_ref(model, x + k * e) for k in (-2, -1, 1, 2)}
        du.append((f[-2] - 8 * f[-1] + 8 * f[1] - f[2]) / (12 * H))
        d2.append((-f[-2] + 16 * f[-1] - 30 * u0 + 16 * f[1] - f[2]) / (12 * H * H))
    return u0, np.stack(du, -1), np.stack(d2, -1)


def _close(got, want, scale, what, tol=TOL):
    """||got - want|| <= tol * max(||want||, scale) (scale: for references that are ~0)."""
    err = np.linalg.norm(np.asarray(got) - np.asarray(want))
    ref = max(np.linalg.norm(want), scale)
    assert err <= tol * ref, f"{what}: error {err / ref:.2e} > {tol:.0e}"


# -- the activations' higher derivatives ------------------------------------------------

@pytest.mark.parametrize("name", ACTS)
def test_higher_derivatives_match_finite_differences(name, rng):
    act = get_activation(name)
    z = rng.standard_normal(400) * 2.5
    z = z[np.abs(z) > 1e-2]
    h = 1e-4

    def derivs(zz):
        return act.higher_derivatives(act.forward(zz) if act.from_output else zz, 3)

    steps = {k: derivs(z + k * h) for k in (-2, -1, 1, 2)}
    got = derivs(z)
    f = {k: act_forward(name, z + k * h) for k in (-2, -1, 1, 2)}
    fd1 = (f[-2] - 8 * f[-1] + 8 * f[1] - f[2]) / (12 * h)
    _close(got[0], fd1, 1.0, f"{name} f'", 1e-9)
    for order in (2, 3):  # f'' and f''' as differences of the order below
        lower = {k: steps[k][order - 2] for k in steps}
        fd = (lower[-2] - 8 * lower[-1] + 8 * lower[1] - lower[2]) / (12 * h)
        _close(got[order - 1], fd, 1.0, f"{name} order {order}", 1e-9)
    assert got[1].dtype == z.dtype and act.second_derivative(np.float32([0.5])).dtype == np.float32


@pytest.mark.parametrize("name", ACTS)
def test_higher_derivatives_propagate_nan(name):
    act = get_activation(name)
    v = np.array([np.nan, 0.5, -0.5])
    d = act.higher_derivatives(v, 3)
    for order, a in enumerate(d, 1):
        if name == "identity":
            assert np.isfinite(a).all()
        else:
            assert np.isnan(a[0]) and np.isfinite(a[1:]).all(), (name, order, a)
    assert np.array_equal(act.third_derivative(v[1:]), d[2][1:])


def test_relu_second_derivative_is_zero():
    for name in ("relu", "leaky_relu", "identity"):
        act = get_activation(name)
        v = np.linspace(-2, 2, 9)
        assert not np.any(act.second_derivative(act.forward(v)))


# -- the elementwise step: reverse against finite differences ------------------------------

@pytest.mark.parametrize("second", ["none", "laplacian", "diagonal"])
@pytest.mark.parametrize("name", ACTS)
def test_taylor_step_reverse_matches_finite_differences(name, second, rng):
    d = 3 if second != "none" else 2
    nb = taylor_blocks(d, second)
    z = rng.standard_normal((nb, 6, 5))
    z[0] += np.sign(z[0]) * 0.05  # the kinks at 0 stay out of the stencil
    b = rng.standard_normal(5)
    G = rng.standard_normal(z.shape)
    out = F.taylor_activation_forward(z, b, name, d=d, second=second)
    gz = F.taylor_activation_backward(G, z, out[0], b, name, d=d, second=second)
    V, vb = rng.standard_normal(z.shape), rng.standard_normal(5)
    h = 1e-5

    def f(t):
        return float((G * F.taylor_activation_forward(z + t * V, b + t * vb, name, d=d,
                                                      second=second)).sum())

    fd = (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h)
    an = float((gz * V).sum() + (gz[0].sum(0) * vb).sum())
    assert abs(fd - an) <= 1e-8 * max(1.0, abs(fd)), (fd, an)


# -- u, du, lap against finite differences and JAX ---------------------------------------

def _model(rng, d, name, *, m=1, last=None):
    return random_model([d, 8, 6, m], [name, name, last or "identity"], "float64", rng)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("name", ACTS)
def test_input_derivatives_match_finite_differences(name, d, rng):
    model = _model(rng, d, name)
    x = _smooth_points(model, rng, 7, d) if name in KINKED else rng.uniform(-1, 1, (7, d))
    u, du, lap = cupynn.input_derivatives(model, x)
    _, _, d2 = cupynn.input_derivatives(model, x, diag=True)
    u1, du1 = cupynn.input_derivatives(model, x, order=1)
    fu, fdu, fd2 = _fd(model, x)
    scale = np.linalg.norm(fu)
    _close(u, fu[:, 0], 0.0, "u", 1e-14)
    _close(du, fdu[:, 0], scale, "du")
    _close(lap, fd2[:, 0].sum(-1), scale, "lap")
    _close(d2, fd2[:, 0], scale, "d2")
    assert np.array_equal(u1, u) and np.array_equal(du1, du)
    assert u.shape == (7,) and du.shape == (7, d) and lap.shape == (7,) and d2.shape == (7, d)
    if name in ("relu", "leaky_relu", "identity"):
        assert not np.any(lap)  # piecewise linear: the Laplacian is 0 where it exists


def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


def _jax_u(jax, model):
    import jax.numpy as jnp

    fns = {"identity": lambda z: z, "relu": jax.nn.relu, "tanh": jnp.tanh,
           "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.01), "sigmoid": jax.nn.sigmoid,
           "softplus": jax.nn.softplus, "silu": jax.nn.silu, "elu": jax.nn.elu,
           "gelu": lambda z: jax.nn.gelu(z, approximate=True),
           "gelu_erf": lambda z: jax.nn.gelu(z, approximate=False)}
    acts = [fns[a] for a in _acts(model)]

    def u(params, x):
        h = x
        for (W, b), f in zip(params, acts):
            h = f(h @ W.T + b)
        return h

    return u, [(jnp.asarray(W), jnp.asarray(b)) for W, b in host_params(model)]


@pytest.mark.parametrize("d", [1, 2, 3])
def test_input_derivatives_match_jax_hessian(d, rng):
    """Every activation, one after the other in a deep network (one JAX compilation per d)."""
    jax = _jax()
    import jax.numpy as jnp

    model = random_model([d] + [6] * len(ACTS) + [2], ACTS + ["identity"], "float64", rng)
    x = rng.uniform(-1, 1, (6, d))
    u, du, lap = cupynn.input_derivatives(model, x)
    _, _, d2 = cupynn.input_derivatives(model, x, diag=True)
    f, params = _jax_u(jax, model)
    J, H = jax.jit(lambda p, xx: (jax.vmap(jax.jacobian(lambda y: f(p, y)))(xx),    # (B, m, d)
                                  jax.vmap(jax.hessian(lambda y: f(p, y)))(xx)))(params, x)
    scale = float(jnp.linalg.norm(f(params, x)))
    assert u.shape == (6, 2) and du.shape == (6, 2, d) and lap.shape == (6, 2)
    _close(u, f(params, x), 0.0, "u", 1e-14)
    _close(du, J, scale, "du")
    _close(lap, jnp.trace(H, axis1=2, axis2=3), scale, "lap")
    _close(d2, jnp.diagonal(H, axis1=2, axis2=3), scale, "d2")


# -- the parameter gradient of residual losses ---------------------------------------------

def _flat(grads):
    return np.concatenate([np.ravel(a) for g in grads for a in (g["weight"], g["bias"])
                           if a is not None])


def _directional_fd(model, loss_of_model, rng, eps=1e-4):
    """(direction v, d loss(theta + t v)/dt at 0) by a 4th-order central difference."""
    params = model.parameters()
    v = [{k: rng.standard_normal(p[k].shape) for k in ("weight", "bias")} for p in params]

    def at(t):
        moved = [{k: p[k] + t * dv[k] for k in ("weight", "bias")} for p, dv in zip(params, v)]
        m = random_model([l.in_features for l in model.layers] + [model.layers[-1].out_features],
                         _acts(model), "float64", rng)
        m.load_parameters(moved)
        return float(loss_of_model(m))

    fd = (at(-2 * eps) - 8 * at(-eps) + 8 * at(eps) - at(2 * eps)) / (12 * eps)
    return _flat([{"weight": dv["weight"], "bias": dv["bias"]} for dv in v]), fd


@pytest.mark.parametrize("name", ACTS)
def test_poisson_gradient_matches_finite_differences(name, rng):
    model = _model(rng, 2, name)
    x = _smooth_points(model, rng, 40, 2) if name in KINKED else rng.uniform(-1, 1, (40, 2))
    f = rng.standard_normal(40)
    value, grads = cupynn.residual_value_and_grad(model, x, "poisson", rhs=f)

    def loss(m):
        _, _, lap = cupynn.input_derivatives(m, x)
        return np.mean((lap - f) ** 2)

    assert abs(float(value) - loss(model)) <= 1e-14 * abs(loss(model))
    assert value.shape == () and value.dtype == np.float64
    for _ in range(2):
        v, fd = _directional_fd(model, loss, rng)
        an = float(_flat(grads) @ v)
        assert abs(an - fd) <= 1e-7 * max(abs(fd), 1e-3 * np.linalg.norm(v)), (an, fd)


def _user_residual(f):
    """mean((lap - f)^2 + |du|^2/2 + u^3): every partial is used."""
    def res(u, du, lap, x):
        n = u.shape[0]
        r = lap - f
        value = (np.sum(r * r) + 0.5 * np.sum(du * du) + np.sum(u ** 3) + np.sum(x)) / n
        return value, 3 * u * u / n, du / n, 2 * r / n
    return res


def test_callable_residual_gradient_matches_finite_differences(rng):
    model = _model(rng, 3, "gelu")
    x = rng.uniform(-1, 1, (30, 3))
    f = rng.standard_normal(30)
    res = _user_residual(f)
    value, grads = cupynn.residual_value_and_grad(model, x, res)

    def loss(m):
        return res(*cupynn.input_derivatives(m, x), x)[0]

    assert abs(float(value) - loss(model)) <= 1e-14 * abs(loss(model))
    v, fd = _directional_fd(model, loss, rng)
    assert abs(float(_flat(grads) @ v) - fd) <= 1e-7 * abs(fd)


def test_diagonal_residual_gradient_matches_finite_differences(rng):
    model = _model(rng, 2, "softplus", m=2)
    x = rng.uniform(-1, 1, (25, 2))
    a = np.array([1.0, 3.0])  # anisotropic diffusion: sum_i a_i d2u/dx_i^2 = 0 per output

    def res(u, du, d2):
        r = (d2 * a).sum(-1)  # (B, m)
        return np.sum(r * r), None, None, 2 * r[..., None] * a

    value, grads = cupynn.residual_value_and_grad(model, x, res, diag=True)

    def loss(m):
        return res(*cupynn.input_derivatives(m, x, diag=True))[0]

    v, fd = _directional_fd(model, loss, rng)
    assert abs(float(_flat(grads) @ v) - fd) <= 1e-7 * abs(fd)


def test_residual_gradients_match_jax(rng):
    jax = _jax()
    import jax.numpy as jnp

    model = random_model([2, 8, 6, 5, 1], ["tanh", "gelu_erf", "sigmoid", "identity"], "float64",
                         rng)
    x = rng.uniform(-1, 1, (33, 2))
    f = rng.standard_normal(33)
    u, params = _jax_u(jax, model)

    def lap_of(p):
        return jax.vmap(lambda xx: jnp.trace(jax.hessian(lambda y: u(p, y)[0])(xx)))(x)

    def poisson(p):
        return jnp.mean((lap_of(p) - f) ** 2)

    def helmholtz(p):
        return jnp.mean((lap_of(p) + 4.0 * u(p, x)[:, 0] - f) ** 2)

    def mixed(p):
        du = jax.vmap(jax.grad(lambda y: u(p, y)[0]))(x)
        uu = u(p, x)[:, 0]
        r = lap_of(p) - f
        return (jnp.sum(r * r) + 0.5 * jnp.sum(du * du) + jnp.sum(uu ** 3) + np.sum(x)) / 33

    ours = (cupynn.residual_value_and_grad(model, x, "poisson", rhs=f),
            cupynn.residual_value_and_grad(model, x, "helmholtz", rhs=f, k=-2.0),
            cupynn.residual_value_and_grad(model, x, _user_residual(f)))
    theirs = jax.jit(lambda p: [jax.value_and_grad(fn)(p) for fn in (poisson, helmholtz, mixed)])(
        params)
    for (value, grads), (jv, jg), what in zip(ours, theirs, ("poisson", "helmholtz", "mixed")):
        assert abs(float(value) - float(jv)) <= 1e-12 * abs(float(jv)), what
        want = np.concatenate([np.ravel(np.asarray(a)) for pair in jg for a in pair])
        assert rel_err(_flat(grads), want) <= TOL, what


# -- chunks, layouts, batch 0 and 1, NaN -------------------------------------------------

def test_chunks_agree_with_one_chunk(rng, monkeypatch):
    model = _model(rng, 2, "tanh")
    x = rng.uniform(-1, 1, (300, 2))
    f = rng.standard_normal(300)
    res = _user_residual(f)
    one = [cupynn.input_derivatives(model, x), cupynn.residual_value_and_grad(model, x, "poisson", rhs=f),
           cupynn.residual_value_and_grad(model, x, res)]
    monkeypatch.setitem(D._CHUNK_BYTES, "cpu", 1)  # 64-row chunks: 5 of them
    assert len(D._chunks(300, D._chunk_rows(D._net_of(model), 4))) == 5
    many = [cupynn.input_derivatives(model, x), cupynn.residual_value_and_grad(model, x, "poisson", rhs=f),
            cupynn.residual_value_and_grad(model, x, res)]
    for a, b in zip(one[0], many[0]):
        assert rel_err(b, a) <= 1e-15
    for (v1, g1), (v2, g2) in zip(one[1:], many[1:]):
        assert abs(float(v1) - float(v2)) <= 1e-14 * abs(float(v1))
        assert rel_err(_flat(g2), _flat(g1)) <= 1e-13


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_input(rng, layout):
    model = _model(rng, 3, "silu")
    x = rng.uniform(-1, 1, (11, 3))
    if layout == "transposed":
        xs = np.asfortranarray(x)
    else:
        big = rng.uniform(-1, 1, (22, 7))
        big[::2, 2:5] = x
        xs = big[::2, 2:5]
    assert not xs.flags.c_contiguous and np.array_equal(xs, x)
    for a, b in zip(cupynn.input_derivatives(model, xs), cupynn.input_derivatives(model, x)):
        assert np.array_equal(a, b)
    v1, g1 = cupynn.residual_value_and_grad(model, xs, "poisson")
    v2, g2 = cupynn.residual_value_and_grad(model, x, "poisson")
    assert float(v1) == float(v2) and np.array_equal(_flat(g1), _flat(g2))


def test_batch_zero_and_one(rng):
    model = _model(rng, 2, "tanh")
    u, du, lap = cupynn.input_derivatives(model, np.empty((0, 2)))
    assert u.shape == (0,) and du.shape == (0, 2) and lap.shape == (0,)
    value, grads = cupynn.residual_value_and_grad(model, np.empty((0, 2)), "poisson")
    assert float(value) == 0.0 and not np.any(_flat(grads))
    seen = []

    def res(u, du, lap):
        seen.append((u.shape, du.shape, lap.shape))
        return 0.0, None, None, None

    value, grads = cupynn.residual_value_and_grad(model, np.empty((0, 2)), res)
    assert float(value) == 0.0 and seen == [((0,), (0, 2), (0,))] and not np.any(_flat(grads))
    x = rng.uniform(-1, 1, (1, 2))
    u, du, lap = cupynn.input_derivatives(model, x)
    fu, fdu, fd2 = _fd(model, x)
    _close(du, fdu[:, 0], 1.0, "du")
    _close(lap, fd2[:, 0].sum(-1), 1.0, "lap")
    v, g = cupynn.residual_value_and_grad(model, x, "poisson", rhs=np.array([0.5]))
    assert abs(float(v) - (lap[0] - 0.5) ** 2) <= 1e-14


def test_nan_inputs_propagate(rng):
    model = _model(rng, 2, "tanh")
    x = rng.uniform(-1, 1, (5, 2))
    clean = cupynn.input_derivatives(model, x)
    x[2, 1] = np.nan
    got = cupynn.input_derivatives(model, x)
    for a, b in zip(got, clean):
        assert np.isnan(a[2]).all()
        rows = [0, 1, 3, 4]
        assert np.array_equal(a[rows], b[rows])
    value, grads = cupynn.residual_value_and_grad(model, x, "poisson")
    assert np.isnan(float(value)) and np.isnan(_flat(grads)).any()
    relu = _model(rng, 2, "relu")
    u, du, lap = cupynn.input_derivatives(relu, x)
    assert np.isnan(u[2]) and np.isnan(du[2]).all() and np.isnan(lap[2])


def test_float32_model(rng):
    model = random_model([2, 8, 1], ["tanh", "identity"], "float32", rng)
    x = rng.uniform(-1, 1, (9, 2)).astype(np.float32)
    u, du, lap = cupynn.input_derivatives(model, x)
    assert u.dtype == du.dtype == lap.dtype == np.float32
    fu, fdu, fd2 = _fd(model, x.astype(np.float64))
    _close(lap, fd2[:, 0].sum(-1), 1.0, "lap", 1e-5)
    value, grads = cupynn.residual_value_and_grad(model, x, "poisson")
    assert value.dtype == np.float32 and grads[0]["weight"].dtype == np.float32


def test_single_dense_layer(rng):
    layer = cupynn.Dense.from_arrays(rng.standard_normal((1, 2)), rng.standard_normal(1), "tanh")
    x = rng.uniform(-1, 1, (4, 2))
    u, du, lap = cupynn.input_derivatives(layer, x)
    W = layer.weight[0]
    t = np.tanh(x @ W + layer.bias[0])
    _close(lap, -2 * t * (1 - t * t) * (W @ W), 0.0, "lap", 1e-14)
    value, grads = cupynn.residual_value_and_grad(layer, x, "poisson")
    assert grads["weight"].shape == (1, 2)


# -- clear errors -------------------------------------------------------------------------

def test_errors_name_what_was_expected(rng):
    model = _model(rng, 2, "tanh")
    multi = _model(rng, 2, "tanh", m=3)
    x = rng.uniform(-1, 1, (6, 2))
    with pytest.raises(ValueError, match="needs a model with one output.*has 3"):
        cupynn.residual_value_and_grad(multi, x, "poisson")
    big = random_model([D.MAX_INPUT_DIM + 1, 4, 1], "tanh", "float64", rng)
    with pytest.raises(ValueError, match=f"at most {D.MAX_INPUT_DIM} inputs.*has {D.MAX_INPUT_DIM + 1}"):
        cupynn.input_derivatives(big, rng.uniform(size=(2, D.MAX_INPUT_DIM + 1)))
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 2\), got \(6, 3\)"):
        cupynn.input_derivatives(model, rng.uniform(size=(6, 3)))
    with pytest.raises(ValueError, match="must be 2-D"):  # input_derivatives takes one point
        cupynn.residual_value_and_grad(model, np.zeros(2), "poisson")
    with pytest.raises(TypeError, match="float32 but the model is float64"):
        cupynn.input_derivatives(model, x.astype(np.float32))
    with pytest.raises(ValueError, match="order must be 1"):
        cupynn.input_derivatives(model, x, order=3)
    with pytest.raises(ValueError, match=r"rhs must have shape \(6,\)"):
        cupynn.residual_value_and_grad(model, x, "poisson", rhs=np.zeros(5))
    with pytest.raises(ValueError, match="unknown residual 'poison'"):
        cupynn.residual_value_and_grad(model, x, "poison")
    with pytest.raises(ValueError, match="needs the wave number"):
        cupynn.residual_value_and_grad(model, x, "helmholtz")
    with pytest.raises(TypeError, match="must return \\(value, dL/du, dL/d\\(du\\), dL/d\\(lap\\)\\)"
                                        ".*got a tuple of 2"):
        cupynn.residual_value_and_grad(model, x, lambda u, du, lap: (0.0, lap))
    with pytest.raises(ValueError, match=r"dL/d\(lap\) must be None or a numpy array of shape "
                                         r"\(6,\).*got ndarray \(6, 1\)"):
        cupynn.residual_value_and_grad(model, x, lambda u, du, lap: (0.0, None, None, lap[:, None]))
    with pytest.raises(ValueError, match=r"dL/d\(du\) must be None or a numpy array of shape \(6, 2\)"):
        cupynn.residual_value_and_grad(model, x, lambda u, du, lap: (0.0, None, du.T, None))
    with pytest.raises(TypeError, match="dL/du of dtype float32; the model is float64"):
        cupynn.residual_value_and_grad(model, x, lambda u, du, lap: (0.0, u.astype(np.float32),
                                                                     None, None))
    with pytest.raises(ValueError, match="value must be a scalar"):
        cupynn.residual_value_and_grad(model, x, lambda u, du, lap: (u, None, None, None))
    with pytest.raises(ValueError, match="rhs= and k= are for the built-in residuals"):
        cupynn.residual_value_and_grad(model, x, lambda u, du, lap: None, rhs=np.zeros(6))
    with pytest.raises(ValueError, match=r"z must be a stack of shape \(4, batch, width\)"):
        F.taylor_activation_forward(np.zeros((3, 2, 2)), None, "tanh", d=2)


def test_dlpack_input_is_read_in_place(rng):
    torch = pytest.importorskip("torch")
    model = _model(rng, 2, "tanh")
    x = rng.uniform(-1, 1, (7, 2))
    f = rng.standard_normal(7)
    for a, b in zip(cupynn.input_derivatives(model, torch.from_numpy(x)),
                    cupynn.input_derivatives(model, x)):
        assert np.array_equal(a, b)
    v1, g1 = cupynn.residual_value_and_grad(model, torch.from_numpy(x), "poisson",
                                            rhs=torch.from_numpy(f))
    v2, g2 = cupynn.residual_value_and_grad(model, x, "poisson", rhs=f)
    assert float(v1) == float(v2) and np.array_equal(_flat(g1), _flat(g2))
    with pytest.raises(TypeError, match="float32"):
        cupynn.input_derivatives(model, torch.from_numpy(x.astype(np.float32)))


def test_public_names_have_runnable_examples():
    import doctest

    from cupynn import activations, derivatives, functional

    for fn in (cupynn.input_derivatives, cupynn.residual_value_and_grad,
               F.taylor_activation_forward, F.taylor_activation_backward,
               get_activation("tanh").higher_derivatives):
        assert fn.__doc__ and ">>>" in fn.__doc__, fn
    for mod in (derivatives, activations):
        failed, attempted = doctest.testmod(mod)
        assert attempted > 0 and failed == 0, mod.__name__
    for name in ("taylor_activation_forward", "taylor_activation_backward"):
        finder = doctest.DocTestFinder()
        for test in finder.find(getattr(functional, name), name):
            assert doctest.DocTestRunner().run(test).failed == 0, name


def test_host_constants_match_the_kernel_source():
    import re

    from cupynn import _loader
    from cupynn.backends import cuda_catalog, cuda_launch, cuda_taylor

    src = (_loader.KERNEL_DIR / cuda_taylor.SOURCE).read_text()
    assert int(re.search(r"TAYLOR_THREADS = (\d+)", src).group(1)) == cuda_launch.THREADS
    for second, mode in cuda_taylor.MODES.items():  # the kernel's comment lists mode -> blocks
        blocks = re.search(rf"mode {mode} \(.*?nb = ([^\n]+)", src).group(1).strip()
        assert blocks == {0: "1 + d", 1: "2 + d", 2: "1 + 2 d"}[mode], (second, blocks)
        assert taylor_blocks(3, second) == eval(blocks.replace("2 d", "2 * d"), {"d": 3})
    names = {n for _, ns in cuda_taylor.kernel_names_all() for n in ns}
    assert len(names) == 4
    assert names <= {n for _, ns in cuda_catalog.all_instantiations() for n in ns}
    assert names <= cuda_catalog.hot_kernels()


def test_second_derivatives_of_a_piecewise_linear_network_warn(rng):
    """A relu network has Δu = 0 wherever it exists: a Poisson loss of it has no gradient
    signal (value 1.0, every gradient 0 for f = 1), so asking for it warns; smooth and
    purely linear networks, and first derivatives, do not."""
    import warnings

    x = rng.uniform(-1, 1, (64, 2))
    relu = cupynn.MLP([2, 32, 32, 1], "relu", device="cpu", rng=0)
    with pytest.warns(UserWarning, match="piecewise linear.*smooth activation"):
        value, grads = cupynn.residual_value_and_grad(relu, x, "poisson", rhs=1.0)
    assert float(value) == 1.0 and not _flat(grads).any()  # what the warning is about
    with pytest.warns(UserWarning, match="piecewise linear"):
        cupynn.input_derivatives(relu, x)
    with pytest.warns(UserWarning, match="piecewise linear"):
        cupynn.input_derivatives(cupynn.MLP([2, 8, 1], "leaky_relu", device="cpu", rng=0), x, diag=True)
    with pytest.warns(UserWarning, match="returns dL/d\\(lap\\)"):
        cupynn.residual_value_and_grad(relu, x, lambda u, du, lap: (float((lap ** 2).sum()), None, None,
                                                                     2 * lap))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cupynn.input_derivatives(relu, x, order=1)                       # first derivatives: fine
        cupynn.residual_value_and_grad(relu, x, lambda u, du, lap: (float((du ** 2).sum()), None, 2 * du, None))
        cupynn.input_derivatives(cupynn.MLP([2, 8, 1], "identity", device="cpu", rng=0), x)  # Δu = 0 exactly
        smooth = cupynn.MLP([2, 32, 32, 1], device="cpu", rng=0)         # the default: tanh
        assert [layer.activation.name for layer in smooth.layers] == ["tanh", "tanh", "identity"]
        value, grads = cupynn.residual_value_and_grad(smooth, x, "poisson", rhs=1.0)
        assert np.abs(_flat(grads)).max() > 0
