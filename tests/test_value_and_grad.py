"""Models on the NumPy backend against the independent reference and finite differences."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupynn
from cupynn.activations import ACTIVATIONS
from cupynn.backends.numpy_backend import _chunk_rows

from . import reference as ref
from .conftest import TOL, activations_of, host_params, random_model

DTYPES = [np.float64, np.float32]


@pytest.fixture(scope="module", autouse=True, params=["direct", "chunked"])
def numpy_path(request):
    """Every test here runs twice on the NumPy backend: as it chooses (a small call takes the
    direct path, a large one the chunked path), and with the chunked path forced for all
    but the empty batch."""
    from cupynn.backends import numpy_backend as nb

    with pytest.MonkeyPatch.context() as mp:
        if request.param == "chunked":
            mp.setattr(nb, "_SMALL_WORK", 1)  # batch 0 stays direct
        yield request.param


def check_against_reference(model, x, loss="sum_squares", target=None, wrt_input=False):
    dtype = model.dtype
    tol = TOL[dtype]
    params, acts = host_params(model), activations_of(model)
    out = cupynn.value_and_grad(model, x, loss, target=target, wrt_input=wrt_input)
    value, grads = out[0], out[1]
    rv, rgrads, rdx = ref.value_and_grad(params, acts, x, loss, target)
    assert value.dtype == dtype and value.shape == ()
    assert ref.rel_err(value, rv) <= tol, (float(value), rv)
    for i, (g, (rdW, rdb)) in enumerate(zip(grads, rgrads)):
        # A layer's [dW | db] is judged as one array: a one-element db that is a sum
        # with cancellation is ill-conditioned on its own, not wrong.
        assert g["weight"].dtype == dtype and g["weight"].shape == params[i][0].shape
        if rdb is None:
            assert g["bias"] is None
            assert ref.rel_err(g["weight"], rdW) <= tol, f"dW of layer {i}"
        else:
            got = np.concatenate([np.ravel(g["weight"]), np.ravel(g["bias"])])
            want = np.concatenate([rdW.ravel(), rdb.ravel()])
            assert ref.rel_err(got, want) <= tol, f"[dW | db] of layer {i}"
    if wrt_input:
        assert out[2].shape == x.shape and out[2].dtype == dtype
        assert ref.rel_err(out[2], rdx) <= tol
    y = model(x)
    assert y.dtype == dtype
    assert ref.rel_err(y, ref.net_forward(params, acts, x)[0]) <= tol
    return out


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_activation_matches_reference(act, dtype, rng):
    model = random_model([7, 33, 20, 3], act, dtype, rng)
    x = rng.standard_normal((101, 7)).astype(dtype)
    check_against_reference(model, x, wrt_input=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1, 1, 1], [1, 1000, 20, 1], [33, 7, 1025], [1025, 1],
                                   [5, 1023, 7]])
@pytest.mark.parametrize("batch", [0, 1, 7, 1000])
def test_odd_sizes(sizes, batch, dtype, rng):
    model = random_model(sizes, "tanh", dtype, rng)
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    check_against_reference(model, x, wrt_input=True)


@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
def test_chunk_boundaries(act, rng):
    sizes = [3, 900, 5]
    model = random_model(sizes, act, np.float64, rng)
    rows = _chunk_rows(model_spec(model))
    for batch in (rows - 1, rows, rows + 1, 2 * rows + 1):
        x = rng.standard_normal((batch, 3))
        for wrt_input in (False, True):
            check_against_reference(model, x, wrt_input=wrt_input)


def model_spec(model):
    from cupynn.functional import _model_parts

    return _model_parts(model)[1]


@pytest.mark.parametrize("loss", ["sum_squares", "mse"])
@pytest.mark.parametrize("with_target", [False, True])
def test_losses_and_targets(loss, with_target, rng):
    model = random_model([4, 16, 2], "silu", np.float64, rng)
    x = rng.standard_normal((50, 4))
    target = rng.standard_normal((50, 2)) if with_target else None
    check_against_reference(model, x, loss, target)


def test_callable_loss(rng):
    model = random_model([3, 10, 2], "softplus", np.float64, rng)
    x = rng.standard_normal((40, 3))
    weights = rng.standard_normal((40, 2))

    def weighted(y):  # L = sum(w * y**3)
        return (weights * y**3).sum(), 3 * weights * y**2

    value, grads = cupynn.value_and_grad(model, x, weighted)
    # finite differences along a random direction in parameter space
    check_directional_derivative(model, x, weighted, grads, rng)
    assert ref.rel_err(value, (weights * model(x) ** 3).sum()) < 1e-13


def loss_value(model, x, loss):
    return float(cupynn.value_and_grad(model, x, loss)[0])


def check_directional_derivative(model, x, loss, grads, rng, h=1e-6):
    params = host_params(model)
    direction = [(rng.standard_normal(W.shape), None if b is None else rng.standard_normal(b.shape))
                 for W, b in params]

    def shifted(t):
        return [{"weight": W + t * dW, "bias": None if b is None else b + t * db}
                for (W, b), (dW, db) in zip(params, direction)]

    original = model.parameters()
    model.load_parameters(shifted(h))
    plus = loss_value(model, x, loss)
    model.load_parameters(shifted(-h))
    minus = loss_value(model, x, loss)
    model.load_parameters(original)
    fd = (plus - minus) / (2 * h)
    analytic = sum(float(np.sum(g["weight"] * dW)) + (0.0 if db is None else float(np.sum(g["bias"] * db)))
                   for g, (dW, db) in zip(grads, direction))
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (fd, analytic)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_finite_differences(act, rng):
    model = random_model([3, 17, 5, 2], act, np.float64, rng)
    x = rng.standard_normal((23, 3))
    _, grads = cupynn.value_and_grad(model, x, "mse")
    check_directional_derivative(model, x, "mse", grads, rng)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=5),
    batch=st.integers(0, 70),
    act=st.sampled_from(list(ACTIVATIONS)),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_shapes(sizes, batch, act, dtype, bias, seed):
    rng = np.random.default_rng(seed)
    model = random_model(sizes, act, dtype, rng, bias=bias)
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    check_against_reference(model, x, wrt_input=bool(seed % 2))


def test_seed_example_from_the_thread():
    """The thread's model, translated: Chain(Dense(W1, b1), Dense(W2, b2), Dense(W3, b3))."""
    rng = np.random.default_rng(1)
    W1, b1 = rng.standard_normal((1000, 1)), rng.standard_normal(1000)
    W2, b2 = rng.standard_normal((20, 1000)), rng.standard_normal(20)
    W3, b3 = rng.standard_normal((1, 20)), rng.standard_normal(1)
    m2 = cupynn.Chain(cupynn.Dense.from_arrays(W1, b1), cupynn.Dense.from_arrays(W2, b2),
                      cupynn.Dense.from_arrays(W3, b3))
    x2 = np.linspace(-1, 1, 10000).reshape(-1, 1)  # the thread's x2 = collect(ra'), batch first
    value, grads = check_against_reference(m2, x2)
    assert float(value) == pytest.approx(float((m2(x2) ** 2).sum()), rel=1e-12)
    assert [g["weight"].shape for g in grads] == [(1000, 1), (20, 1000), (1, 20)]


def test_one_sample_is_a_1d_input(rng):
    model = random_model([4, 6, 3], "tanh", np.float64, rng)
    x = rng.standard_normal(4)
    y = model(x)
    assert y.shape == (3,)
    np.testing.assert_allclose(y, model(x.reshape(1, 4))[0], rtol=1e-15)
    v, g, dx = cupynn.value_and_grad(model, x, wrt_input=True)
    v2, g2, dx2 = cupynn.value_and_grad(model, x.reshape(1, 4), wrt_input=True)
    assert dx.shape == (4,) and float(v) == float(v2)
    np.testing.assert_array_equal(dx, dx2[0])


def test_batch_zero_gives_empty_output_and_zero_gradients(rng):
    model = random_model([5, 8, 2], "relu", np.float64, rng)
    x = np.empty((0, 5))
    assert model(x).shape == (0, 2)
    for loss in ("sum_squares", "mse"):
        v, grads, dx = cupynn.value_and_grad(model, x, loss, wrt_input=True)
        assert float(v) == 0.0 and dx.shape == (0, 5)
        for g in grads:
            assert not np.any(g["weight"]) and not np.any(g["bias"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0, by design
def test_nan_and_inf_propagate_as_the_reference(rng):
    for act in ("relu", "tanh", "gelu", "identity"):
        model = random_model([3, 9, 2], act, np.float64, rng)
        x = rng.standard_normal((6, 3))
        x[1, 0] = np.nan
        x[4, 2] = np.inf
        y = model(x)
        ry = ref.net_forward(host_params(model), activations_of(model), x)[0]
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ry))
        finite = np.isfinite(ry)
        np.testing.assert_allclose(y[finite], ry[finite], rtol=1e-12)
        assert np.isnan(y[1]).all()
        v, _ = cupynn.value_and_grad(model, x)
        assert np.isnan(v)


@pytest.mark.parametrize("layout", ["transposed", "strided", "fortran"])
def test_non_contiguous_inputs(layout, rng):
    model = random_model([5, 30, 3], "elu", np.float64, rng)
    base = rng.standard_normal((64, 10))
    x = {"transposed": np.ascontiguousarray(base[:, :5].T).T,  # a transposed view
         "strided": base[::2, ::2],
         "fortran": np.asfortranarray(base[:, :5])}[layout]
    assert not x.flags.c_contiguous
    check_against_reference(model, x, wrt_input=True)


def test_gradients_are_deterministic(rng):
    model = random_model([2, 700, 9, 1], "tanh", np.float64, rng)
    x = rng.standard_normal((3000, 2))
    a = cupynn.value_and_grad(model, x)
    b = cupynn.value_and_grad(model, x)
    assert float(a[0]) == float(b[0])
    for ga, gb in zip(a[1], b[1]):
        np.testing.assert_array_equal(ga["weight"], gb["weight"])
        np.testing.assert_array_equal(ga["bias"], gb["bias"])


def test_small_calls_take_the_direct_path_large_ones_the_chunked(numpy_path, monkeypatch, rng):
    from cupynn.backends import numpy_backend as nb

    calls = []
    for name in ("_direct_forward", "_direct_value_and_grad"):
        real = getattr(nb, name)
        monkeypatch.setattr(nb, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    model = random_model([24, 8, 2], "tanh", np.float32, rng)
    x = rng.standard_normal((200, 24)).astype(np.float32)
    check_against_reference(model, x)
    # the gradient, its forward pass, then model(x)
    direct = ["_direct_value_and_grad", "_direct_forward", "_direct_forward"]
    assert calls == (direct if numpy_path == "direct" else [])
    calls.clear()
    big = random_model([1, 1000, 20, 1], "identity", np.float64, rng)  # 2.1e4 MACs a row
    check_against_reference(big, rng.standard_normal((64, 1)))  # 1.3e6 MACs: chunked
    assert calls == []
