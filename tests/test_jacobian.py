"""Parameter Jacobians (cupynn.jacobian): against central finite differences, against
jax.jacrev (skipped without JAX), and the products, Gramians and solves built on them."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import functional as F

from .conftest import random_model
from .reference import rel_err

ACTS = ["tanh", "silu", "identity"]


def _model(rng, sizes=(3, 7, 5, 2), acts=None, bias=True):
    acts = acts or [ACTS[i % 3] for i in range(len(sizes) - 1)]
    return random_model(list(sizes), acts, "float64", rng, bias=bias)


def _fd_jacobian(model, x, h=1e-6):
    """Central differences of model(x).ravel() w.r.t. the flat parameters."""
    theta = cupynn.get_flat(model)
    cols = []
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        cupynn.set_flat(model, theta + e)
        yp = np.asarray(model(x)).ravel()
        cupynn.set_flat(model, theta - e)
        ym = np.asarray(model(x)).ravel()
        cols.append((yp - ym) / (2 * h))
    cupynn.set_flat(model, theta)
    return np.stack(cols, axis=1)


def _jax_jacobian(model, x):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    layers = model.layers
    acts = {"tanh": jnp.tanh, "identity": lambda z: z, "silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}

    def f(theta):
        h, off = jnp.asarray(x), 0
        for layer in layers:
            n, k = layer.out_features, layer.in_features
            W = theta[off:off + n * k].reshape(n, k)
            off += n * k
            z = h @ W.T
            if layer.bias is not None:
                z = z + theta[off:off + n]
                off += n
            h = acts[layer.activation.name](z)
        return h.reshape(-1)

    return np.asarray(jax.jacrev(f)(jnp.asarray(cupynn.get_flat(model))))


def test_jacobian_matches_central_differences(rng):
    model = _model(rng)
    x = rng.standard_normal((6, 3))
    J = cupynn.jacobian(model, x)
    assert J.shape == (12, cupynn.num_parameters(model))
    # central differences have error O(h^2 f''') + O(eps / h): about 1e-10 relative at h = 1e-6
    assert rel_err(J, _fd_jacobian(model, x)) < 1e-8


@pytest.mark.parametrize("bias", [True, False])
def test_jacobian_matches_jax_jacrev(rng, bias):
    model = _model(rng, (4, 9, 6, 3), bias=bias)
    x = rng.standard_normal((11, 4))
    assert rel_err(cupynn.jacobian(model, x), _jax_jacobian(model, x)) < 1e-10


def test_jacobian_row_layout_and_chunks(rng):
    model = _model(rng)
    x = rng.standard_normal((10, 3))
    J = cupynn.jacobian(model, x)
    # row b*m + o is the gradient of output o of sample b: the VJP with a one-hot cotangent
    for b, o in ((0, 0), (3, 1), (9, 1)):
        g = np.zeros((10, 2))
        g[b, o] = 1.0
        grads, _ = F.vjp(model, x, g, wrt_input=False)
        flat = np.concatenate([a.ravel() for item in grads for a in (item["weight"], item["bias"])])
        assert rel_err(J[b * 2 + o], flat) < 1e-13
    for rows in (1, 3, 10, 50):
        assert rel_err(cupynn.jacobian(model, x, chunk_rows=rows), J) < 1e-14
        got = np.concatenate([Jc.copy() for _, _, Jc in cupynn.iter_jacobian(model, x, chunk_rows=rows)])
        assert rel_err(got, J) < 1e-14


def test_jacobian_batch_zero_one_single_sample_and_strided_x(rng):
    model = _model(rng)
    P = cupynn.num_parameters(model)
    x = rng.standard_normal((5, 3))
    J = cupynn.jacobian(model, x)
    assert cupynn.jacobian(model, x[:0]).shape == (0, P)
    assert rel_err(cupynn.jacobian(model, x[2:3]), J[4:6]) < 1e-14
    assert rel_err(cupynn.jacobian(model, x[2]), J[4:6]) < 1e-14        # one sample, (in,)
    xf = np.asfortranarray(x)
    xs = np.zeros((10, 6))
    xs[::2, ::2] = x
    for strided in (xf, xs[::2, ::2], x.T.copy().T):
        assert rel_err(cupynn.jacobian(model, strided), J) < 1e-14
    assert cupynn.gramian(model, x[:0]).shape == (P, P)
    assert not cupynn.gramian(model, x[:0]).any()
    assert cupynn.kernel_matrix(model, x[:0]).shape == (0, 0)


def test_jacobian_float32(rng):
    model = random_model([2, 8, 1], "tanh", "float32", rng)
    x = rng.standard_normal((7, 2)).astype(np.float32)
    J = cupynn.jacobian(model, x)
    assert J.dtype == np.float32
    m64 = random_model([2, 8, 1], "tanh", "float64", np.random.default_rng(0))
    cupynn.set_flat(m64, cupynn.get_flat(model))
    assert rel_err(J, cupynn.jacobian(m64, x.astype(np.float64))) < 1e-5


def test_jvp_and_products_match_the_jacobian(rng):
    model = _model(rng)
    x = rng.standard_normal((8, 3))
    J = cupynn.jacobian(model, x)
    P = J.shape[1]
    v = rng.standard_normal(P)
    y, ydot = cupynn.jvp(model, x, v)
    assert rel_err(y, model(x)) < 1e-14
    assert rel_err(ydot.ravel(), J @ v) < 1e-13
    assert rel_err(cupynn.jacobian_vector(model, x, v), J @ v) < 1e-13
    u = rng.standard_normal(16)
    assert rel_err(cupynn.jacobian_transpose_vector(model, x, u), J.T @ u) < 1e-13
    assert rel_err(cupynn.jacobian_transpose_vector(model, x, u.reshape(8, 2)), J.T @ u) < 1e-13
    # the direction as a parameter structure
    theta = cupynn.get_flat(model)
    cupynn.set_flat(model, v)
    structured = [{"weight": p["weight"].copy(), "bias": p["bias"].copy()} for p in model.parameters()]
    cupynn.set_flat(model, theta)
    assert rel_err(cupynn.jvp(model, x, structured)[1].ravel(), J @ v) < 1e-13
    op = cupynn.jacobian_operator(model, x)
    assert rel_err(op @ v, J @ v) < 1e-13 and rel_err(op.T @ u, J.T @ u) < 1e-13


def test_jvp_input_direction_matches_central_differences(rng):
    model = _model(rng)
    x = rng.standard_normal((5, 3))
    xd = rng.standard_normal((5, 3))
    v = rng.standard_normal(cupynn.num_parameters(model))
    _, only_x = cupynn.jvp(model, x, None, x_dot=xd)
    h = 1e-6
    fd = (model(x + h * xd) - model(x - h * xd)) / (2 * h)
    assert rel_err(only_x, fd) < 1e-8
    _, both = cupynn.jvp(model, x, v, x_dot=xd)
    assert rel_err(both, only_x + cupynn.jvp(model, x, v)[1]) < 1e-13


def test_gramian_and_kernel_matrix(rng):
    model = _model(rng)
    x = rng.standard_normal((9, 3))
    J = cupynn.jacobian(model, x)
    for rows in (None, 1, 4):
        assert rel_err(cupynn.gramian(model, x, chunk_rows=rows), J.T @ J) < 1e-14
    assert rel_err(cupynn.kernel_matrix(model, x), J @ J.T) < 1e-14
    nobias = _model(rng, (2, 6, 1), bias=False)
    xb = rng.standard_normal((4, 2))
    Jb = cupynn.jacobian(nobias, xb)
    assert rel_err(cupynn.kernel_matrix(nobias, xb), Jb @ Jb.T) < 1e-14


def test_gramian_respects_max_bytes(rng):
    model = _model(rng)
    x = rng.standard_normal((40, 3))
    P = cupynn.num_parameters(model)
    one_sample = 2 * P * 8
    G = cupynn.gramian(model, x, max_bytes=3 * one_sample)     # chunks of 3 samples
    assert rel_err(G, cupynn.gramian(model, x)) < 1e-14
    chunks = [J.shape for _, _, J in cupynn.iter_jacobian(model, x, max_bytes=3 * one_sample)]
    assert max(s[0] for s in chunks) == 6 and len(chunks) == 14
    with pytest.raises(ValueError, match="max_bytes"):
        cupynn.gramian(model, x, max_bytes=one_sample - 1)
    with pytest.raises(MemoryError, match="max_bytes"):
        cupynn.jacobian(model, x, max_bytes=40 * one_sample - 1)


@pytest.mark.parametrize("method", ["cholesky", "kernel", "cg", "lsmr", "auto"])
def test_damped_solve(rng, method):
    for R, P in ((40, 12), (12, 40)):
        J, r = rng.standard_normal((R, P)), rng.standard_normal(R)
        lam = 0.3
        want = np.linalg.solve(J.T @ J + lam * np.eye(P), J.T @ r)
        got = cupynn.damped_solve(J, r, lam, method=method)
        assert rel_err(got, want) < 1e-9
    from scipy.sparse.linalg import aslinearoperator

    if method in ("cg", "lsmr", "auto"):
        got = cupynn.damped_solve(aslinearoperator(J), r, lam, method=method)
        assert rel_err(got, want) < 1e-9


def test_bad_input_is_refused_clearly(rng):
    model = _model(rng)
    x = rng.standard_normal((4, 3))
    P = cupynn.num_parameters(model)
    theta = cupynn.get_flat(model)
    with pytest.raises(ValueError, match=rf"v must be a vector of length {P}"):
        cupynn.jvp(model, x, np.ones(P + 1))
    with pytest.raises(ValueError, match=rf"v must be a vector of length {P}"):
        cupynn.jacobian_vector(model, x, np.ones(P - 1))
    with pytest.raises(ValueError, match="u must have length 8"):
        cupynn.jacobian_transpose_vector(model, x, np.ones(7))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
            cupynn.jacobian(model, x, chunk_rows=bad)
        with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
            cupynn.gramian(model, x, chunk_rows=bad)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 3\)"):
        cupynn.jacobian(model, np.ones((4, 2)))
    with pytest.raises(TypeError, match="float64"):
        cupynn.jacobian(model, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="x_dot must have x's shape"):
        cupynn.jvp(model, x, None, x_dot=np.ones((4, 2)))
    with pytest.raises(ValueError, match="needs a direction"):
        cupynn.jvp(model, x, None)
    with pytest.raises(ValueError, match="method must be one of"):
        cupynn.damped_solve(np.ones((3, 2)), np.ones(3), 1.0, method="qr")
    with pytest.raises(ValueError, match="r must be a vector of length 3"):
        cupynn.damped_solve(np.ones((3, 2)), np.ones(4), 1.0)
    with pytest.raises(ValueError, match="damping must be"):
        cupynn.damped_solve(np.ones((3, 2)), np.ones(3), -1.0)
    assert np.array_equal(cupynn.get_flat(model), theta)


def test_functional_ops_check_their_arguments(rng):
    dz, h = rng.standard_normal((1, 3, 1, 4)), rng.standard_normal((1, 3, 5))
    out = np.full((3, 30), np.nan)
    F.jacobian_rows(dz, h, out, col=2)
    assert rel_err(out[:, 2:22].reshape(3, 4, 5), dz[0, :, 0, :, None] * h[0, :, None, :]) < 1e-15
    assert rel_err(out[:, 22:26], dz[0, :, 0]) < 1e-15
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 26:]).all()
    out = np.full((3, 30), np.nan)
    F.jacobian_rows(dz, h, out, col=10, has_bias=False)
    assert np.isnan(out[:, :10]).all() and not np.isnan(out[:, 10:30]).any()
    with pytest.raises(ValueError, match=r"out must have 3 rows \(B \* m\) and at least 26 columns"):
        F.jacobian_rows(dz, h, np.empty((3, 25)), col=2)
    with pytest.raises(ValueError, match="h must have shape"):
        F.jacobian_rows(dz, h[:, :2], out)
    with pytest.raises(ValueError, match="C-contiguous"):
        F.jacobian_rows(dz, h, np.empty((30, 3)).T)
    with pytest.raises(ValueError, match="col must be a non-negative integer"):
        F.jacobian_rows(dz, h, out, col=-1)
    G = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"G must have shape \(5, 5\)"):
        F.gram_update(G, np.ones((2, 5)))
