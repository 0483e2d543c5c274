"""Losses and PDE residuals differentiated by JAX or PyTorch (cupynn.jax.loss / .residual,
cupynn.torch.loss / .residual) against the hand-written protocol and finite differences.

Each library's tests skip cleanly when it is not installed; float64 JAX tests enable x64
for the duration of one test.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn

from .conftest import gpu_reason, random_model
from .reference import rel_err


def _flat(grads):
    return np.concatenate([a.ravel() for g in grads for a in (g["weight"], g["bias"]) if a is not None])


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture
def jx():
    jax = pytest.importorskip("jax")
    import cupynn.jax  # noqa: F401

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def th():
    torch = pytest.importorskip("torch")
    import cupynn.torch  # noqa: F401

    return torch


def _loss_pairs(jax, torch):
    """(library loss, hand-written (value, dL/dy)) pairs, several coupling the whole batch."""
    out = []
    w = None

    def quad(y):                                 # a quadrature-weighted integral of y**3
        return (y ** 3 * w[:, None]).sum()

    def hand_quad(y):
        return (y ** 3 * w[:, None]).sum(), 3 * y ** 2 * w[:, None]

    def hand_lse(y):                             # log-sum-exp over every output
        m = y.max()
        e = np.exp(y - m)
        return m + np.log(e.sum()), e / e.sum()

    def hand_energy(y):                          # sum_{b} (y_{b+1} - y_b)^2: neighbours couple
        dy = np.diff(y, axis=0)
        g = np.zeros_like(y)
        g[1:] += 2 * dy
        g[:-1] -= 2 * dy
        return (dy ** 2).sum(), g

    if jax is not None:
        jnp = jax.numpy
        out += [(cupynn.jax.loss(lambda y: jnp.sum(y ** 3 * jnp.asarray(w)[:, None])), hand_quad),
                (cupynn.jax.loss(lambda y: jax.nn.logsumexp(y)), hand_lse),
                (cupynn.jax.loss(lambda y: jnp.sum(jnp.diff(y, axis=0) ** 2)), hand_energy)]
    if torch is not None:
        out += [(cupynn.torch.loss(lambda y: (y ** 3 * torch.from_numpy(w)[:, None]).sum()), hand_quad),
                (cupynn.torch.loss(lambda y: torch.logsumexp(y.reshape(-1), 0)), hand_lse),
                (cupynn.torch.loss(lambda y: (torch.diff(y, dim=0) ** 2).sum()), hand_energy)]

    def set_w(weights):
        nonlocal w
        w = weights

    return out, set_w, quad


@pytest.mark.parametrize("lib", ["jax", "torch"])
@pytest.mark.parametrize("batch", [1, 7, 1025])
def test_loss_matches_the_hand_written_protocol(lib, batch, rng, request):
    jax = request.getfixturevalue("jx") if lib == "jax" else None
    torch = request.getfixturevalue("th") if lib == "torch" else None
    model = random_model([2, 33, 3], ["tanh", "identity"], "float64", rng)
    x = rng.uniform(-1, 1, (batch, 2))
    pairs, set_w, _ = _loss_pairs(jax, torch)
    set_w(rng.uniform(0.5, 1.5, batch))
    for auto, hand in pairs:
        v1, g1, dx1 = cupynn.value_and_grad(model, x, auto, wrt_input=True)
        v2, g2, dx2 = cupynn.value_and_grad(model, x, hand, wrt_input=True)
        assert v1.shape == () and v1.dtype == np.float64
        assert abs(float(v1) - float(v2)) <= 1e-12 * abs(float(v2))
        assert rel_err(_flat(g1), _flat(g2)) <= 1e-12
        assert rel_err(dx1, dx2) <= 1e-12


@pytest.mark.parametrize("lib", ["jax", "torch"])
def test_loss_gradient_matches_finite_differences(lib, rng, request):
    jax = request.getfixturevalue("jx") if lib == "jax" else None
    torch = request.getfixturevalue("th") if lib == "torch" else None
    model = random_model([1, 16, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (50, 1))
    pairs, set_w, _ = _loss_pairs(jax, torch)
    set_w(rng.uniform(0.5, 1.5, 50))
    auto = pairs[1][0]  # log-sum-exp over the batch
    f = cupynn.flat_value_and_grad(model, x, auto)
    theta = cupynn.get_flat(model)
    _, g = f(theta)
    for _ in range(3):
        v = rng.standard_normal(theta.size)
        h = 1e-5
        fd = (f(theta + h * v)[0] - f(theta - h * v)[0]) / (2 * h)
        assert abs(fd - g @ v) <= 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("lib", ["jax", "torch"])
def test_loss_of_one_sample_and_float32(lib, rng, request):
    request.getfixturevalue("jx" if lib == "jax" else "th")
    mod = cupynn.jax if lib == "jax" else cupynn.torch
    if lib == "jax":
        jnp = pytest.importorskip("jax.numpy")
        auto = mod.loss(lambda y: jnp.sum(jnp.sin(y)))
    else:
        import torch
        auto = mod.loss(lambda y: torch.sin(y).sum())
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        model = random_model([3, 8, 2], "tanh", dtype, rng)
        x = rng.uniform(-1, 1, 3).astype(dtype)
        v1, g1 = cupynn.value_and_grad(model, x, auto)                       # one sample, 1-D
        v2, g2 = cupynn.value_and_grad(model, x, lambda y: (np.sin(y).sum(), np.cos(y)))
        assert v1.dtype == np.dtype(dtype) and g1[0]["weight"].dtype == np.dtype(dtype)
        assert abs(float(v1) - float(v2)) <= tol * max(1.0, abs(float(v2)))
        assert rel_err(_flat(g1), _flat(g2)) <= tol


def test_jax_hands_over_y_and_dL_dy_without_a_copy_on_the_cpu(jx, rng):
    """The library sees y's own buffer; dL/dy comes back as a view of the library's array."""
    import cupynn.jax as cj
    from cupynn._autodiff import aligned_host

    y = aligned_host(rng.standard_normal((1000, 1)))
    assert cj._to_jax(y).unsafe_buffer_pointer() == y.ctypes.data
    seen = {}

    def f(y):
        return jx.numpy.sum(y ** 2)

    auto = cj.loss(f, jit=False)
    original = auto._value_and_grad

    def spy(y_in):
        value, g = original(y_in)
        seen["g_ptr"] = g.unsafe_buffer_pointer()
        return value, g

    auto._value_and_grad = spy
    value, g = auto(y)
    assert g.ctypes.data == seen["g_ptr"]                        # dL/dy: no copy back
    assert rel_err(g, 2 * y) <= 1e-15
    # the network's output is aligned, so value_and_grad's y reaches JAX in place too
    model = cupynn.MLP([1, 64, 1], "tanh", device="cpu", rng=0)
    assert model(rng.standard_normal((5000, 1))).ctypes.data % 64 == 0
    pointers = []
    real = cj._to_jax

    def spy_to_jax(a):
        out = real(a)
        pointers.append((a.ctypes.data, out.unsafe_buffer_pointer()))
        return out

    cj._to_jax = spy_to_jax
    try:
        cupynn.value_and_grad(model, rng.standard_normal((5000, 1)), cj.loss(f))
    finally:
        cj._to_jax = real
    assert len(pointers) == 1 and pointers[0][0] == pointers[0][1]


def test_torch_hands_over_y_and_dL_dy_without_a_copy_on_the_cpu(th, rng):
    import cupynn.torch as ct

    model = random_model([2, 16, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (300, 2))
    y_ref = model(x)
    seen = {}

    def f(y):
        seen["y_ptr"] = y.data_ptr()
        return (y ** 2).sum()

    auto = ct.loss(f)
    y = model(x)
    value, g = auto(y)
    assert seen["y_ptr"] == y.ctypes.data
    assert rel_err(g, 2 * y_ref) <= 1e-15
    # dL/dy is torch's gradient buffer, read in place
    t = th.ones(4, 1, dtype=th.float64)
    from cupynn._autodiff import from_library
    assert from_library(t, np.ones((4, 1)), "g").ctypes.data == t.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("lib", ["jax", "torch"])
def test_cuda_pointers_are_shared(lib, request):
    reason = gpu_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    y = cupy.random.standard_normal((1000, 1))
    if lib == "torch":
        torch = request.getfixturevalue("th")
        if not torch.cuda.is_available():
            pytest.skip("this torch has no CUDA")
        seen = {}

        def f(yt):
            seen["ptr"] = yt.data_ptr()
            return (yt ** 2).sum()

        value, g = cupynn.torch.loss(f)(y)
        assert seen["ptr"] == y.data.ptr
    else:
        jax = request.getfixturevalue("jx")
        try:
            jax.devices("gpu")
        except RuntimeError:
            pytest.skip("this JAX has no GPU backend")
        import cupynn.jax as cj

        assert cj._to_jax(y).unsafe_buffer_pointer() == y.data.ptr
        value, g = cj.loss(lambda yy: jax.numpy.sum(yy ** 2))(y)
    assert isinstance(g, cupy.ndarray)
    assert float(cupy.linalg.norm(g - 2 * y) / cupy.linalg.norm(2 * y)) <= 1e-15
    from cupynn._autodiff import from_library
    back = from_library(g, y, "g")
    assert back.data.ptr == g.data.ptr


# -- residuals --------------------------------------------------------------------------

def _hand_residual(f):
    def res(u, du, lap, x):
        r = lap + np.sin(x[:, 0]) * u + (du ** 2).sum(1) - f
        w = 2 * r / r.size
        return (r * r).mean(), w * np.sin(x[:, 0]), 2 * du * w[:, None], w
    return res


@pytest.mark.parametrize("lib", ["jax", "torch"])
@pytest.mark.parametrize("diag", [False, True])
def test_residual_matches_the_hand_written_protocol(lib, diag, rng, request):
    request.getfixturevalue("jx" if lib == "jax" else "th")
    model = random_model([2, 17, 9, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (129, 2))
    f = rng.standard_normal(129)
    if lib == "jax":
        import jax.numpy as jnp
        fj = jnp.asarray(f)

        def r(u, du, lap, x):
            sec = lap.sum(1) if diag else lap
            return jnp.mean((sec + jnp.sin(x[:, 0]) * u + (du ** 2).sum(1) - fj) ** 2)
        auto = cupynn.jax.residual(r)
    else:
        import torch
        ft = torch.from_numpy(f)

        def r(u, du, lap, x):
            sec = lap.sum(1) if diag else lap
            return ((sec + torch.sin(x[:, 0]) * u + (du ** 2).sum(1) - ft) ** 2).mean()
        auto = cupynn.torch.residual(r)
    hand = _hand_residual(f)
    if diag:
        base = hand

        def hand(u, du, d2, x):
            v, gu, gdu, glap = base(u, du, d2.sum(1), x)
            return v, gu, gdu, np.repeat(glap[:, None], d2.shape[1], 1)
    v1, g1 = cupynn.residual_value_and_grad(model, x, auto, diag=diag)
    v2, g2 = cupynn.residual_value_and_grad(model, x, hand, diag=diag)
    assert abs(float(v1) - float(v2)) <= 1e-12 * abs(float(v2))
    assert rel_err(_flat(g1), _flat(g2)) <= 1e-12


@pytest.mark.parametrize("lib", ["jax", "torch"])
def test_residual_gradient_matches_finite_differences(lib, rng, request):
    request.getfixturevalue("jx" if lib == "jax" else "th")
    model = random_model([2, 12, 1], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (40, 2))
    if lib == "jax":
        import jax.numpy as jnp
        auto = cupynn.jax.residual(lambda u, du, lap: jnp.mean((lap - u ** 2) ** 2) + jnp.sum(du) ** 2)
    else:
        auto = cupynn.torch.residual(lambda u, du, lap: ((lap - u ** 2) ** 2).mean() + du.sum() ** 2)
    f = cupynn.flat_value_and_grad(model, x, auto)   # a residual through the flat interface
    theta = cupynn.get_flat(model)
    _, g = f(theta)
    for _ in range(3):
        v = rng.standard_normal(theta.size)
        h = 1e-5
        fd = (f(theta + h * v)[0] - f(theta - h * v)[0]) / (2 * h)
        assert abs(fd - g @ v) <= 1e-7 * max(1.0, abs(fd))


# -- errors -----------------------------------------------------------------------------

def test_a_numpy_scalar_loss_names_both_ways_out(rng):
    model = random_model([2, 4, 1], "tanh", "float64", rng)
    with pytest.raises(TypeError, match=r"cupynn\.jax\.loss\(f\).*cupynn\.torch\.loss\(f\).*"
                                        r"return the gradient too"):
        cupynn.value_and_grad(model, rng.uniform(size=(3, 2)), lambda y: float((y ** 2).sum()))
    with pytest.raises(TypeError, match=r"cupynn\.jax\.residual\(r\).*cupynn\.torch\.residual\(r\)"):
        cupynn.residual_value_and_grad(model, rng.uniform(size=(3, 2)), lambda u, du, lap: (lap ** 2).sum())


def test_library_errors_are_clear(jx, th, rng):
    model = random_model([2, 4, 1], "tanh", "float64", rng)
    x = rng.uniform(size=(3, 2))
    with pytest.raises(ValueError, match="must return a scalar.*shape \\(3, 1\\)"):
        cupynn.value_and_grad(model, x, cupynn.jax.loss(lambda y: y ** 2))
    with pytest.raises(ValueError, match="must return a scalar.*shape \\(3, 1\\)"):
        cupynn.value_and_grad(model, x, cupynn.torch.loss(lambda y: y ** 2))
    with pytest.raises(TypeError, match="must return a torch scalar"):
        cupynn.value_and_grad(model, x, cupynn.torch.loss(lambda y: 1.0))
    with pytest.raises(TypeError, match="takes a function"):
        cupynn.jax.loss("mse")
    with pytest.raises(TypeError, match="takes a function"):
        cupynn.torch.residual(3)
    jx.config.update("jax_enable_x64", False)
    with pytest.raises(TypeError, match="jax_enable_x64"):
        cupynn.value_and_grad(model, x, cupynn.jax.loss(lambda y: (y ** 2).sum()))


def test_a_plain_jax_callable_is_recognised(jx, rng):
    """No wrapper: it returned a JAX scalar, so JAX is the library (no guess involved)."""
    jnp = jx.numpy
    model = random_model([2, 9, 3], "tanh", "float64", rng)
    x = rng.uniform(-1, 1, (40, 2))
    v1, g1 = cupynn.value_and_grad(model, x, lambda y: jnp.sum(jnp.cos(y)))
    v2, g2 = cupynn.value_and_grad(model, x, lambda y: (np.cos(y).sum(), -np.sin(y)))
    assert abs(float(v1) - float(v2)) <= 1e-12 * abs(float(v2))
    assert rel_err(_flat(g1), _flat(g2)) <= 1e-12
    v3, g3 = cupynn.value_and_grad(model, x[0], lambda y: jnp.sum(jnp.cos(y)))   # one sample
    v4, g4 = cupynn.value_and_grad(model, x[0], lambda y: (np.cos(y).sum(), -np.sin(y)))
    assert rel_err(_flat(g3), _flat(g4)) <= 1e-12
