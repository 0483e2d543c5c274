"""Property-based tests (hypothesis), one group per class of the reliability promise: bad
input gets a clear error (type and message) and leaves parameters and optimizer state
bit-identical; valid input gives the float64 reference's result; nothing hangs.

Each property runs a few examples in the quick set and many more with ``--slow``.
"""

from __future__ import annotations

import json
import threading
import time
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupynn
from cupynn import functional as F

from . import reference as ref
from .conftest import activations_of, host_params, random_model

QUICK = settings(max_examples=15, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def both(**strategies):
    """The property twice: ``test_x`` with a few examples in the quick set, and ``test_x_long``
    with many more behind --slow."""
    def deco(fn):
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_long",
                                  fn.__defaults__, fn.__closure__)
        twin.__kwdefaults__ = fn.__kwdefaults__
        fn.__globals__[twin.__name__] = pytest.mark.slow(LONG(given(**strategies)(twin)))
        return QUICK(given(**strategies)(fn))
    return deco


def _model(seed, sizes=(3, 6, 2), dtype=np.float64):
    return random_model(list(sizes), "tanh", dtype, np.random.default_rng(seed))


def _snapshot(model, opt=None):
    out = [np.array(a).tobytes() for l in model._dense_layers() for a in (l.weight, l.bias)
           if a is not None]
    if opt is not None:
        out += [np.array(b).tobytes() for bufs in opt.state.values() for b in bufs]
        out.append(opt.step_count)
    return out


# -- 2. arrays: accepted exactly when they can be read exactly -------------------------------

_VARIANTS = ["plain", "matrix", "masked_none", "masked_some", "readonly", "strided", "big_endian",
             "float32", "int", "list", "torch", "torch_neg", "torch_conj_view"]


def _variant(x, kind, rng):
    """(array-like, accepted?) for the float64 batch ``x``."""
    if kind == "plain":
        return x.copy(), True
    if kind == "matrix":
        return np.asmatrix(x), True
    if kind == "masked_none":
        return np.ma.masked_array(x, mask=np.zeros(x.shape, bool)), True
    if kind == "masked_some":
        mask = np.zeros(x.shape, bool)
        mask.flat[rng.integers(x.size)] = True
        return np.ma.masked_array(x, mask=mask), False
    if kind == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y, True
    if kind == "strided":
        wide = np.empty((x.shape[0], 2 * x.shape[1]))
        wide[:, ::2] = x
        return wide[:, ::2], True
    if kind == "big_endian":
        return x.astype(">f8"), False
    if kind == "float32":
        return x.astype(np.float32), False
    if kind == "int":
        return np.rint(x).astype(np.int64), False
    if kind == "list":
        return x.tolist(), False
    torch = pytest.importorskip("torch")
    if kind == "torch":
        return torch.from_numpy(x.copy()), True
    if kind == "torch_neg":
        return torch.complex(torch.zeros(x.shape, dtype=torch.float64),
                             torch.from_numpy(-x)).conj().imag, False
    return torch.from_numpy(x.copy()).conj(), True  # a real tensor's conj() is itself


@both(seed=st.integers(0, 2**32 - 1), batch=st.integers(0, 9), kind=st.sampled_from(_VARIANTS),
       where=st.sampled_from(["x", "target"]))
def test_array_intake(seed, batch, kind, where):
    rng = np.random.default_rng(seed)
    model = _model(seed)
    before = _snapshot(model)
    x, t = rng.standard_normal((batch, 3)), rng.standard_normal((batch, 2))
    if kind in ("masked_some",) and batch == 0:
        kind = "plain"
    arr, ok = _variant(x if where == "x" else t, kind, rng)
    args = (arr, t) if where == "x" else (x, arr)
    if ok:
        v, g = cupynn.value_and_grad(model, args[0], target=args[1])
        want_v, want_g, _ = ref.value_and_grad(host_params(model), activations_of(model), x,
                                               target=t)
        assert type(v) is np.ndarray and v.dtype == np.float64
        assert ref.rel_err(v, want_v) <= 1e-12
        for got, (dW, db) in zip(g, want_g):
            assert ref.rel_err(got["weight"], dW) <= 1e-12 and ref.rel_err(got["bias"], db) <= 1e-12
    else:
        with pytest.raises((TypeError, ValueError)) as info:
            cupynn.value_and_grad(model, args[0], target=args[1])
        assert where in str(info.value)
    assert _snapshot(model) == before


# -- 3. results: loss values and out= -------------------------------------------------------

_VALUES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.complex_numbers(allow_nan=False, max_magnitude=10),
    st.floats(allow_nan=True), st.integers(-10**6, 10**6),
    st.builds(lambda n: np.ones(n), st.integers(0, 3)),
    st.builds(lambda s: np.ones(s), st.lists(st.integers(1, 2), min_size=2, max_size=2).map(tuple)),
    st.builds(np.float32, st.floats(-1e3, 1e3)), st.builds(lambda v: np.array(v), st.floats(-1, 1)),
    st.builds(lambda v: np.array(v, dtype=complex), st.floats(-1, 1)),
)


def _is_real_scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, float)):
        return True
    return getattr(v, "shape", None) == () and getattr(v, "dtype", np.dtype("O")).kind in "fiu"


@both(seed=st.integers(0, 2**32 - 1), value=_VALUES, big=st.booleans())
def test_loss_value_is_checked(seed, value, big):
    rng = np.random.default_rng(seed)
    model = _model(seed)
    x = rng.standard_normal((30_000 if big else 5, 3))
    loss = lambda y: (value, 2 * y)  # noqa: E731
    if _is_real_scalar(value):
        v, _ = cupynn.value_and_grad(model, x, loss)
        assert v.shape == () and v.dtype == np.float64
        np.testing.assert_equal(float(v), float(value))
    else:
        with pytest.raises((TypeError, ValueError), match="the loss callable returned"):
            cupynn.value_and_grad(model, x, loss)


@both(seed=st.integers(0, 2**32 - 1), which=st.integers(0, 4),
       change=st.sampled_from(["dtype", "bigger", "smaller", "readonly", "param", "x", "list"]))
def test_out_is_checked_before_writing(seed, which, change):
    rng = np.random.default_rng(seed)
    model = _model(seed)
    x = rng.standard_normal((4, 3))
    v, g = cupynn.value_and_grad(model, x)
    arrays = [v, g[0]["weight"], g[0]["bias"], g[1]["weight"], g[1]["bias"]]
    a = arrays[which]
    if change == "dtype":
        bad = a.astype(np.float32)
    elif change == "bigger":
        bad = np.zeros(a.shape + (2,))
    elif change == "smaller":
        bad = np.zeros(a.shape[1:]) if a.ndim else np.zeros(1)
    elif change == "readonly":
        bad = a.copy()
        bad.flags.writeable = False
    elif change == "param":
        p = [model.layers[0].weight, model.layers[0].bias, model.layers[1].weight, model.layers[1].bias]
        # the parameter itself, or for the value a 0-d view of one
        bad = p[which - 1] if which else model.layers[1].bias[:1].reshape(())
    elif change == "x":
        bad = x[:, :1].reshape(-1)[:1].reshape(()) if which == 0 else np.zeros(a.shape)
        if which:
            bad = x.reshape(-1)[: a.size].reshape(a.shape) if a.size <= x.size else bad
    else:
        bad = a.tolist()
    outs = list(arrays)
    outs[which] = bad
    out = (outs[0], [{"weight": outs[1], "bias": outs[2]}, {"weight": outs[3], "bias": outs[4]}])
    kept = [np.array(o).tobytes() for o in arrays]
    before = _snapshot(model)
    xs = x.tobytes()
    shares = change in ("param", "x") and np.may_share_memory(bad, model.layers[1].bias) or (
        change == "x" and np.may_share_memory(bad, x)) or change == "param"
    if change in ("x",) and not shares:
        cupynn.value_and_grad(model, x, out=out)  # a fresh array of the right kind: accepted
        return
    with pytest.raises((TypeError, ValueError), match="out= "):
        cupynn.value_and_grad(model, x, out=out)
    assert [np.array(o).tobytes() for o in arrays] == kept
    assert _snapshot(model) == before and x.tobytes() == xs


@both(seed=st.integers(0, 2**32 - 1), loss=st.sampled_from(["mse", "sum_squares", "MSE", None, 3]),
       tshape=st.sampled_from(["same", "row", "col", "flat", "none", "f32"]))
def test_functional_losses(seed, loss, tshape):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((4, 3))
    t = {"same": rng.standard_normal((4, 3)), "row": np.ones((1, 3)), "col": np.ones((4, 1)),
         "flat": np.ones(12), "none": None, "f32": rng.standard_normal((4, 3)).astype(np.float32)}[tshape]
    ok = loss in ("mse", "sum_squares") and tshape in ("same", "none")
    for fn in (F.loss_forward, F.loss_backward):
        if not ok:
            with pytest.raises((TypeError, ValueError)):
                fn(y, loss, t)
            continue
        r = y if t is None else y - t
        scale = 1 / y.size if loss == "mse" else 1.0
        want = np.sum(r * r) * scale if fn is F.loss_forward else 2 * r * scale
        assert ref.rel_err(fn(y, loss, t), want) <= 1e-15


# -- 4. a failed call changes nothing ---------------------------------------------------------

@both(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["sgd", "adam", "adamw"]),
       which=st.integers(0, 3),
       fault=st.sampled_from(["shape", "dtype", "none", "masked", "readonly_param", "list",
                              "torch_neg", "alias", "lr", "inject"]))
def test_optimizer_step_is_all_or_nothing(seed, kind, which, fault):
    rng = np.random.default_rng(seed)
    model = _model(seed)
    make = {"sgd": lambda p: cupynn.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: cupynn.optim.Adam(p, lr=0.1),
            "adamw": lambda p: cupynn.optim.AdamW(p, lr=0.1)}[kind]
    opt = make(model.parameters())
    _, g = cupynn.value_and_grad(model, rng.standard_normal((5, 3)))
    opt.step(g)
    _, g = cupynn.value_and_grad(model, rng.standard_normal((5, 3)))
    flat = [g[0]["weight"], g[0]["bias"], g[1]["weight"], g[1]["bias"]]
    params = [model.layers[0].weight, model.layers[0].bias, model.layers[1].weight,
              model.layers[1].bias]
    a = flat[which]
    if fault == "shape":
        flat[which] = np.zeros(a.shape + (1,))
    elif fault == "dtype":
        flat[which] = a.astype(np.float32)
    elif fault == "none":
        flat[which] = None
    elif fault == "masked":
        flat[which] = np.ma.masked_array(a, mask=np.ones(a.shape, bool))
    elif fault == "readonly_param":
        params[which].flags.writeable = False
    elif fault == "list":
        flat[which] = a.tolist()
    elif fault == "torch_neg":
        torch = pytest.importorskip("torch")
        flat[which] = torch.complex(torch.zeros(a.shape, dtype=torch.float64),
                                    torch.from_numpy(-a)).conj().imag
    elif fault == "alias":
        flat[which] = params[(which + 1) % 4].reshape(-1)[: a.size].reshape(a.shape) \
            if params[(which + 1) % 4].size >= a.size else params[which]
    elif fault == "lr":
        opt.lr = [True, float("nan"), -1.0, "0.1"][which]
    else:
        from cupynn.backends import numpy_optim

        real = numpy_optim._sgd if kind == "sgd" else numpy_optim._adam

        def half(state, impl, hyper, ps, gs, t, **kw):
            real(state, impl, hyper, ps[: which + 1], gs[: which + 1], t, **kw)
            raise MemoryError("injected after the checks")

    grads = [{"weight": flat[0], "bias": flat[1]}, {"weight": flat[2], "bias": flat[3]}]
    before = _snapshot(model, opt)
    with pytest.MonkeyPatch.context() as mp:
        if fault == "inject":
            mp.setattr(numpy_optim, "_sgd" if kind == "sgd" else "_adam", half)
        with pytest.raises((TypeError, ValueError, MemoryError)):
            opt.step(grads)
    assert _snapshot(model, opt) == before


@both(seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["f8", "f4", "f2", "g", ">f8", "i8", "c16"]),
       extra=st.sampled_from([0, 0, 0, 1, -1]), big=st.sampled_from([None, 1e300, -1e39, np.inf]),
       model_dtype=st.sampled_from([np.float32, np.float64]))
def test_set_flat(seed, dtype, extra, big, model_dtype):
    rng = np.random.default_rng(seed)
    model = _model(seed, dtype=model_dtype)
    n = cupynn.num_parameters(model)
    theta = rng.standard_normal(n + extra)
    if big is not None and theta.size:
        theta[rng.integers(theta.size)] = big
    theta = theta.astype(dtype)
    before = _snapshot(model)
    overflow = (big is not None and np.isfinite(big) and model_dtype == np.float32
                and np.isfinite(theta).all())
    ok = dtype in ("f8", "f4") and extra == 0 and not overflow
    if not ok:
        with pytest.raises((TypeError, ValueError), match="theta"):
            cupynn.set_flat(model, theta)
        assert _snapshot(model) == before
    else:
        cupynn.set_flat(model, theta)
        np.testing.assert_array_equal(cupynn.get_flat(model), theta.astype(model_dtype))


# -- 5. threads ---------------------------------------------------------------------------

def _threaded(models, xs, n_threads, repeats):
    serial = [cupynn.value_and_grad(m, x) for m, x in zip(models, xs)]
    results, errors = [], []

    def work(i):
        try:
            for _ in range(repeats):
                results.append((i, cupynn.value_and_grad(models[i], xs[i])))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k % len(models),)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a thread hung"
    assert not errors, errors
    for i, (v, g) in results:
        sv, sg = serial[i]
        assert v.tobytes() == sv.tobytes()
        for a, b in zip(g, sg):
            assert a["weight"].tobytes() == b["weight"].tobytes()


@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n_models=st.integers(1, 3), n_threads=st.integers(2, 6))
def test_threads_bit_identical(seed, n_models, n_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    original = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
    rng = np.random.default_rng(seed)
    models = [random_model([2, 40, 40, 1], "tanh", np.float64, rng) for _ in range(n_models)]
    xs = [rng.standard_normal((int(rng.integers(2000, 5000)), 2)) for _ in range(n_models)]
    _threaded(models, xs, n_threads, 2)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == original


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_models=st.integers(1, 4), n_threads=st.integers(2, 16))
def test_threads_bit_identical_long(seed, n_models, n_threads):
    rng = np.random.default_rng(seed)
    models = [random_model([3, 64, 64, 2], "tanh", np.float64, rng) for _ in range(n_models)]
    xs = [rng.standard_normal((int(rng.integers(3000, 20000)), 3)) for _ in range(n_models)]
    _threaded(models, xs, n_threads, 3)


# -- 6. files -----------------------------------------------------------------------------

@both(seed=st.integers(0, 2**32 - 1), op=st.sampled_from(["truncate", "flip", "zero", "append"]),
       where=st.floats(0, 1), with_opt=st.booleans())
def test_damaged_files(tmp_path_factory, seed, op, where, with_opt):
    rng = np.random.default_rng(seed)
    model = _model(seed)
    opt = cupynn.optim.Adam(model.parameters()) if with_opt else None
    path = tmp_path_factory.mktemp("f") / "m.npz"
    model.save(path, optimizer=opt)
    raw = bytearray(path.read_bytes())
    i = min(int(where * len(raw)), len(raw) - 1)
    if op == "truncate":
        raw = raw[:i]
    elif op == "flip":
        raw[i] ^= 1 << int(rng.integers(8))
    elif op == "zero":
        raw[i:i + 16] = bytes(len(raw[i:i + 16]))
    else:
        raw += b"\x00garbage"
    path.write_bytes(bytes(raw))
    for read in ([cupynn.load] + ([cupynn.optim.load_state] if with_opt else [])):
        try:
            got = read(path)
        except cupynn.FileFormatError as exc:
            assert str(path) in str(exc) and "pickle" not in str(exc).replace("pickled Python", "")
            continue
        if read is cupynn.load:  # what loads is exactly what was saved
            assert _snapshot(got) == _snapshot(model)
        else:
            sd = opt.state_dict()
            assert all(np.array_equal(a, b) for k in sd["state"] for a, b in zip(got["state"][k],
                                                                                sd["state"][k]))


@both(seed=st.integers(0, 2**32 - 1), key=st.sampled_from(["kind", "dtype", "precision", "layers",
                                                             "version", "format", "activations"]),
       value=st.one_of(st.none(), st.integers(-2, 5), st.text(max_size=6),
                       st.sampled_from(["Dense", "Chain", "Conv2d", "float32", "tf32", []])))
def test_altered_meta(tmp_path_factory, seed, key, value):
    model = _model(seed)
    path = tmp_path_factory.mktemp("m") / "m.npz"
    model.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    original = meta.get(key)
    meta[key] = value
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    try:
        got = cupynn.load(path, device="cpu")
    except cupynn.FileFormatError as exc:
        # the meta, or the member that disagrees with it
        assert exc.member == "meta" or exc.member.startswith("layers.")
        assert f"[{exc.member}]" in str(exc) and str(path) in str(exc)
        return
    # accepted only where the change does not change the model
    assert value == original or key in ("activations",) or (key == "version" and value in (1, 2))
    assert _snapshot(got) == _snapshot(model)


# -- 7. Dask: a chunk that is not what it claims ---------------------------------------------

@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    import logging

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=":0", silence_logs=logging.CRITICAL)
    client = distributed.Client(cluster, timeout=60)
    yield client
    client.close()
    cluster.close(timeout=30)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), lose=st.integers(0, 2), rows=st.integers(40, 120),
       chunk=st.integers(10, 50))
def test_dask_chunks_must_match_their_declaration(dask_client, seed, lose, rows, chunk):
    da = pytest.importorskip("dask.array")
    import cupynn.dask as cdask

    rng = np.random.default_rng(seed)
    model = _model(seed, sizes=(3, 5, 1))
    X = da.from_array(rng.standard_normal((rows, 3)), chunks=(chunk, 3))
    if lose == 0:
        v, _ = cdask.value_and_grad(model, X, "mse", timeout=60)
        want, _ = cupynn.value_and_grad(model, X.compute(), "mse")
        assert ref.rel_err(v, want) <= 1e-12
        return
    bad = X.map_blocks(lambda b: b[: max(b.shape[0] - lose, 0)], dtype=X.dtype, chunks=X.chunks)
    t0 = time.monotonic()
    with pytest.raises(cdask.ChunkError, match="rows but X.chunks declares"):
        cdask.value_and_grad(model, bad, "mse", timeout=60)
    assert time.monotonic() - t0 < 60


# -- 8. numbers in arguments ----------------------------------------------------------------

_NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=4), st.builds(np.int64, st.integers(-5, 100)),
                     st.builds(np.float64, st.floats(-5, 5)), st.complex_numbers(max_magnitude=3))


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@both(seed=st.integers(0, 2**32 - 1), v=_NUMBERS)
def test_numbers(seed, v):
    model = _model(seed)
    x = np.random.default_rng(seed).standard_normal((4, 3))
    if _is_int(v) and v >= 0:
        assert cupynn.execution_path(model, v) == "numpy"
    else:
        with pytest.raises((TypeError, ValueError), match="batch"):
            cupynn.execution_path(model, v)
    if _is_int(v) and v in (1, 2):
        assert len(cupynn.input_derivatives(model, x, order=v)) == v + 1
    else:
        with pytest.raises((TypeError, ValueError), match="order"):
            cupynn.input_derivatives(model, x, order=v)
    opt = cupynn.optim.SGD(model.parameters(), lr=0.1)
    _, g = cupynn.value_and_grad(model, x)
    before = _snapshot(model, opt)
    opt.lr = v
    if _is_real(v) and np.isfinite(float(v)) and v >= 0:
        opt.step(g)
    else:
        with pytest.raises(ValueError, match="lr must be"):
            opt.step(g)
        assert _snapshot(model, opt) == before
    m1 = _model(seed, sizes=(2, 4, 1))
    x2 = np.random.default_rng(seed).standard_normal((3, 2))
    if _is_real(v) and np.isfinite(float(v)) and abs(float(v)) <= np.sqrt(np.finfo(np.float64).max):
        with np.errstate(over="ignore", invalid="ignore"):  # a huge k may overflow the loss itself
            value, _ = cupynn.residual_value_and_grad(m1, x2, "helmholtz", k=v)
        assert value.shape == () and value.dtype == np.float64
    else:
        with pytest.raises((TypeError, ValueError), match="wave number"):
            cupynn.residual_value_and_grad(m1, x2, "helmholtz", k=v)


# -- 1. no crash: read-only parameters never reach torch ------------------------------------

@both(seed=st.integers(0, 2**32 - 1), flags=st.lists(st.booleans(), min_size=4, max_size=4))
def test_torch_module_refuses_read_only_parameters(seed, flags):
    pytest.importorskip("torch")
    import cupynn.torch

    model = _model(seed)
    arrays = [model.layers[0].weight, model.layers[0].bias, model.layers[1].weight,
              model.layers[1].bias]
    for a, w in zip(arrays, flags):
        a.flags.writeable = w
    if all(flags):
        net = cupynn.torch.Module(model)
        assert len(list(net.parameters())) == 4
    else:
        with pytest.raises(ValueError, match="read-only"):
            cupynn.torch.Module(model)
