"""Bad input, damaged files, threads: a regression test for every reproducer of the
reliability report (crashes and hangs, arrays whose meaning is not their buffer, results
the code never checked, failed calls that changed state, threads, files, numbers in
arguments; the Dask ones are in tests/test_reliability_dask.py), each checking the error
type and message, and that a failed call left the model and the optimizer bit-identical.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

import cupynn
from cupynn import functional as F

from . import reference as ref
from .conftest import TOL, activations_of, host_params, random_model


def _snapshot(model, opt=None):
    arrays = [np.array(a) for l in model._dense_layers() for a in (l.weight, l.bias) if a is not None]
    if opt is not None:
        arrays += [np.array(b) for bufs in opt.state.values() for b in bufs]
        arrays.append(np.array(opt.step_count))
    return arrays


def _same(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


@pytest.fixture
def model(rng):
    return random_model([3, 7, 2], "tanh", np.float64, rng)


# -- 1. crash and hang --------------------------------------------------------------------

def test_read_only_memmap_in_torch_module_is_refused_not_a_segfault(tmp_path, rng):
    torch = pytest.importorskip("torch")
    import cupynn.torch  # noqa: F401

    path = tmp_path / "w.npy"
    np.save(path, rng.standard_normal((4, 3)))
    W = np.load(path, mmap_mode="r")
    layer = cupynn.Dense.from_arrays(W, None, copy=False)  # inference on a read-only map: fine
    np.testing.assert_array_equal(layer(np.ones((2, 3))), np.ones((2, 3)) @ np.asarray(W).T)
    with pytest.raises(ValueError, match=r"layer 0 weight is a read-only array .*copy=True"):
        cupynn.torch.Module(layer)
    plain = rng.standard_normal((4, 3))
    plain.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cupynn.torch.Module(cupynn.Dense.from_arrays(plain, None, copy=False))
    assert torch.is_tensor(torch.ones(1))


def test_dask_connect_to_a_silent_socket_raises_within_the_timeout():
    cdask = pytest.importorskip("cupynn.dask")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        port = server.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.* within 2 s"):
            cdask.connect(f"tcp://127.0.0.1:{port}", timeout=2)
        assert time.monotonic() - t0 < 2 + 2.5
    finally:
        server.close()


# -- 2. arrays whose meaning is not their buffer -----------------------------------------------

def test_torch_negative_bit_is_refused_everywhere(model, rng):
    torch = pytest.importorskip("torch")

    def neg(a):
        z = torch.complex(torch.zeros(a.shape, dtype=torch.float64), torch.from_numpy(-a))
        t = z.conj().imag  # the value is a, the memory holds -a: the negative bit is set
        assert t.is_neg()
        return t

    x = rng.standard_normal((5, 3))
    msg = r"negative bit set .*resolve_neg\(\)"
    with pytest.raises(TypeError, match="x .*" + msg):
        cupynn.value_and_grad(model, neg(x))
    with pytest.raises(TypeError, match="target .*" + msg):
        cupynn.value_and_grad(model, x, target=neg(rng.standard_normal((5, 2))))
    with pytest.raises(TypeError, match="dL/dy .*" + msg):
        cupynn.value_and_grad(model, x, lambda y: (float((y ** 2).sum()), neg(2 * y)))
    with pytest.raises(TypeError, match="g .*" + msg):
        F.vjp(model, x, neg(rng.standard_normal((5, 2))))
    with pytest.raises(TypeError, match=msg):
        cupynn.input_derivatives(model, neg(x))
    before = _snapshot(model)
    params = [{"weight": neg(np.array(p["weight"])), "bias": p["bias"]} for p in model.parameters()]
    with pytest.raises(TypeError, match="weight .*" + msg):
        model.load_parameters(params)
    _same(before, _snapshot(model))


def test_torch_module_reads_negated_views_by_value(rng):
    torch = pytest.importorskip("torch")
    import cupynn.torch

    model = random_model([3, 5, 1], "tanh", np.float64, rng)
    net = cupynn.torch.Module(model)
    x = torch.from_numpy(rng.standard_normal((6, 3)))
    xn = torch.complex(torch.zeros_like(x), x).conj().imag  # value -x, negative bit set
    assert xn.is_neg()
    y = net(xn)
    want, _, _ = ref.net_forward(host_params(model), activations_of(model), -x.numpy())
    assert ref.rel_err(y.detach().numpy(), want) < 1e-12
    (-y).sum().backward()  # torch may hand a negated view to the backward
    # d(-sum y)/dW_0 in float64 from the reference's pre-activations
    (W0, b0), (W1, b1) = host_params(model)
    _, _, (z0, z1) = ref.net_forward(host_params(model), activations_of(model), -x.numpy())
    dz1 = -np.ones((6, 1)) * ref.act_derivative_of_z("tanh", z1)
    dz0 = (dz1 @ W1) * ref.act_derivative_of_z("tanh", z0)
    assert ref.rel_err(net.layers[0].weight.grad.numpy(), dz0.T @ -x.numpy()) < 1e-12


def test_masked_arrays_are_refused_when_masked_and_read_when_not(model, rng):
    x = rng.standard_normal((40_000, 3))  # the chunked path
    xm = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
    xm.mask[7, 1] = True
    with pytest.raises(ValueError, match=r"x is a masked array with 1 masked element"):
        cupynn.value_and_grad(model, xm)
    with pytest.raises(ValueError, match="masked"):
        model(xm)
    clean = np.ma.masked_array(x)  # nothing masked: the data, exactly
    v1, g1 = cupynn.value_and_grad(model, clean)
    v2, g2 = cupynn.value_and_grad(model, x)
    assert v1.tobytes() == v2.tobytes() and type(v1) is np.ndarray
    before = _snapshot(model)
    params = [{"weight": np.ma.masked_array(np.array(p["weight"]), mask=True), "bias": p["bias"]}
              for p in model.parameters()]
    with pytest.raises(ValueError, match="masked"):
        model.load_parameters(params)
    _same(before, _snapshot(model))
    opt = cupynn.optim.Adam(model.parameters())
    before = _snapshot(model, opt)
    bad = [{"weight": np.ma.masked_array(g["weight"], mask=True), "bias": g["bias"]} for g in g1]
    with pytest.raises(ValueError, match="gradient of layer 0 weight is a masked array"):
        opt.step(bad)
    _same(before, _snapshot(model, opt))


def test_np_matrix_is_read_as_its_array(model, rng):
    x = rng.standard_normal((5, 3))
    y = model(np.asmatrix(x))
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, model(x))
    v, g = cupynn.value_and_grad(model, np.asmatrix(x), target=np.asmatrix(np.ones((5, 2))))
    v2, g2 = cupynn.value_and_grad(model, x, target=np.ones((5, 2)))
    assert v.tobytes() == v2.tobytes()
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 3\)"):
        model(np.asmatrix(np.ones(3)).T)  # a (3, 1) matrix is not one sample


# -- 3. results the code never checked ------------------------------------------------

@pytest.mark.parametrize("value, exc, msg", [
    (None, TypeError, "value NoneType"),
    ("3", TypeError, "must be a real number"),
    (True, TypeError, "a bool"),
    (1j, TypeError, "complex value"),
    (np.ones(3), ValueError, r"value of shape \(3,\)"),
    (np.ones((1, 1)), ValueError, r"value of shape \(1, 1\)"),
])
def test_loss_callable_value_is_checked(model, rng, value, exc, msg):
    x = rng.standard_normal((5, 3))
    with pytest.raises(exc, match="the loss callable .*" + msg):
        cupynn.value_and_grad(model, x, lambda y: (value, 2 * y))
    with pytest.raises(exc, match="the loss callable .*" + msg):
        cupynn.value_and_grad(model, rng.standard_normal((40_000, 3)), lambda y: (value, 2 * y))


def test_residual_value_is_checked(rng):
    model = random_model([2, 6, 1], "tanh", np.float64, rng)
    x = rng.standard_normal((5, 2))
    for value, exc in [(None, TypeError), (np.ones(3), ValueError), (1j, TypeError)]:
        with pytest.raises(exc, match="the residual function"):
            cupynn.residual_value_and_grad(model, x, lambda u, du, lap, *, v=value: (v, None, None, None))


def test_out_is_checked_before_anything_is_written(model, rng):
    x = rng.standard_normal((5, 3))
    v, g = cupynn.value_and_grad(model, x)
    sentinel = v.copy()
    with pytest.raises(TypeError, match="out= value has dtype float32"):
        cupynn.value_and_grad(model, x, out=(np.zeros((), np.float32), g))
    with pytest.raises(ValueError, match=r"out= gradient of layer 0 weight must have the result's "
                                         r"shape \(7, 3\), got \(8, 3\)"):
        cupynn.value_and_grad(model, x, out=(v, [{"weight": np.zeros((8, 3)), "bias": g[0]["bias"]},
                                                 g[1]]))
    assert v.tobytes() == sentinel.tobytes()  # the value was not written before the error
    before = _snapshot(model)
    with pytest.raises(ValueError, match="shares memory with Dense"):
        cupynn.value_and_grad(model, x, out=(v, model.parameters()))
    _same(before, _snapshot(model))
    ro = np.zeros(())
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cupynn.value_and_grad(model, x, out=(ro, g))
    with pytest.raises(ValueError, match="shares memory with out="):
        cupynn.value_and_grad(model, x, out=(v, [g[0], {"weight": g[0]["weight"].reshape(-1)[:14].reshape(2, 7),
                                                        "bias": g[1]["bias"]}]))


@pytest.mark.parametrize("fn", [F.loss_forward, F.loss_backward])
def test_functional_losses_check_their_arguments(fn, rng):
    y = rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match="loss must be one of"):
        fn(y, "nope")
    with pytest.raises(TypeError, match="loss must be the name of a built-in loss"):
        fn(y, None)
    with pytest.raises(TypeError, match="target has dtype float32"):
        fn(y, "mse", y.astype(np.float32))
    with pytest.raises(ValueError, match=r"never broadcast"):
        fn(y, "mse", np.ones(2))
    with pytest.raises(ValueError, match=r"never broadcast"):
        fn(y, "mse", np.ones((1, 2)))
    with pytest.raises(TypeError, match="y must be"):
        fn(y.tolist(), "mse")
    t = rng.standard_normal((4, 2))
    want = float(np.sum((y - t) ** 2)) / 8 if fn is F.loss_forward else 2 * (y - t) / 8
    assert ref.rel_err(fn(y, "mse", t), want) < 1e-15


def test_value_and_grad_target_has_one_rule(model, rng):
    x1 = rng.standard_normal(3)
    v, g = cupynn.value_and_grad(model, x1, target=np.ones(2))  # one sample: (out,)
    with pytest.raises(ValueError, match=r"target must have the output's shape \(2,\)"):
        cupynn.value_and_grad(model, x1, target=np.ones((1, 2)))
    x = rng.standard_normal((1, 3))
    with pytest.raises(ValueError, match=r"target must have the output's shape \(1, 2\)"):
        cupynn.value_and_grad(model, x, target=np.ones(2))
    step = cupynn.compile(model)  # the compiled step applies the same rule
    with pytest.raises(ValueError, match=r"output's shape \(1, 2\)"):
        step.forward(x, np.ones(2))


# -- 4. a failed call that changed state ------------------------------------------------

def test_optimizer_step_with_a_read_only_parameter_changes_nothing(model, rng):
    opt = cupynn.optim.Adam(model.parameters(), lr=0.1)
    _, g = cupynn.value_and_grad(model, rng.standard_normal((5, 3)))
    opt.step(g)
    model.layers[1].bias.flags.writeable = False
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="the parameter layer 1 bias is read-only"):
        opt.step(g)
    _same(before, _snapshot(model, opt))


def test_optimizer_step_is_atomic_under_an_injected_failure(model, rng, monkeypatch):
    from cupynn.backends import numpy_optim

    opt = cupynn.optim.Adam(model.parameters(), lr=0.1)
    _, g = cupynn.value_and_grad(model, rng.standard_normal((5, 3)))
    opt.step(g)
    real = numpy_optim._adam

    def half_then_fail(state, impl, hyper, params, grads, t, *, decoupled):
        real(state, impl, hyper, params[:1], grads[:1], t, decoupled=decoupled)  # writes layer 0
        raise MemoryError("injected after the checks")

    monkeypatch.setattr(numpy_optim, "_adam", half_then_fail)
    before = _snapshot(model, opt)
    with pytest.raises(MemoryError, match="injected"):
        opt.step(g)
    _same(before, _snapshot(model, opt))


def test_set_flat_checks_every_array_before_writing(model, rng):
    theta = rng.standard_normal(cupynn.num_parameters(model))
    model.layers[1].weight.flags.writeable = False
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Dense\[1\] \(7 => 2\) weight is read-only"):
        cupynn.set_flat(model, theta)
    _same(before, _snapshot(model))


def test_flat_value_and_grad_checks_x_before_writing_theta(model, rng):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 3\)"):
        cupynn.flat_value_and_grad(model, rng.standard_normal((5, 4)))
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        cupynn.flat_value_and_grad(model, [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="target must have"):
        cupynn.flat_value_and_grad(model, rng.standard_normal((5, 3)), "mse", target=np.ones(5))
    _same(before, _snapshot(model))

    def failing_loss(y):
        raise RuntimeError("injected after the checks")

    f = cupynn.flat_value_and_grad(model, rng.standard_normal((5, 3)), failing_loss)
    with pytest.raises(RuntimeError, match="injected"):
        f(rng.standard_normal(cupynn.num_parameters(model)))
    _same(before, _snapshot(model))


def test_compile_on_the_cpu_checks_like_on_cuda(model, rng):
    opt = cupynn.optim.SGD(model.parameters(), lr=0.1)
    step = cupynn.compile(model, "mse", optimizer=opt)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    step(x, t)
    model.load_parameters([{k: np.array(v) if v is not None else None for k, v in p.items()}
                           for p in model.parameters()])
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="rebound to new arrays"):
        step(x, t)
    with pytest.raises(RuntimeError, match="rebound to new arrays"):
        step.forward(x, t)
    _same(before, _snapshot(model))
    step = cupynn.compile(model, "mse")
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        step.forward(x.tolist(), t)
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        step.forward(1.0, t)
    with pytest.raises(TypeError, match="target has dtype float32"):
        step.forward(x, t.astype(np.float32))
    value = step.forward(x, t)
    want, _, _ = ref.value_and_grad(host_params(model), activations_of(model), x, "mse", t)
    assert ref.rel_err(value, want) < TOL[np.dtype(np.float64)]


def test_a_layer_used_twice_is_refused_by_optimizers_and_flat_vectors(rng):
    a = cupynn.Dense.from_arrays(rng.standard_normal((3, 3)), rng.standard_normal(3), "tanh")
    model = cupynn.Chain(a, a)
    x = rng.standard_normal((4, 3))
    v, g = cupynn.value_and_grad(model, x)  # computing is fine: a gradient per position
    W, b = a.weight, a.bias
    want_v, want_g, _ = ref.value_and_grad([(W, b), (W, b)], ["tanh", "tanh"], x)
    assert ref.rel_err(v, want_v) < 1e-12
    assert ref.rel_err(g[1]["weight"], want_g[1][0]) < 1e-12
    with pytest.raises(ValueError, match="layer 0 weight and layer 1 weight are the same memory"):
        cupynn.optim.SGD(model.parameters())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="same memory"):
        cupynn.set_flat(model, np.zeros(cupynn.num_parameters(model)))
    _same(before, _snapshot(model))
    pytest.importorskip("torch")
    from cupynn.torch import Module

    with pytest.raises(ValueError, match="layer 0 weight and layer 1 weight are the same memory"):
        Module(model)


# -- 5. threads -------------------------------------------------------------------------

def _blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_many_threads_same_and_different_models_are_bit_identical(rng):
    from cupynn import _threads

    original = _blas_threads()
    models = [random_model([3, 48, 48, 2], "tanh", np.float64, rng) for _ in range(3)]
    xs = [rng.standard_normal((6_000, 3)) for _ in range(3)]  # chunked: the lanes and the BLAS limit
    serial = [cupynn.value_and_grad(m, x) for m, x in zip(models, xs)]
    errors, results = [], {}

    def work(k, i):
        try:
            for r in range(3):
                results[(k, i, r)] = cupynn.value_and_grad(models[i], xs[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, k % 3)) for k in range(9)]
    threads += [threading.Thread(target=work, args=(k, 0)) for k in range(9, 12)]  # same model
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
        assert not t.is_alive(), "a thread hung"
    assert not errors, errors
    for (k, i, r), (v, g) in results.items():
        sv, sg = serial[i]
        assert v.tobytes() == sv.tobytes(), (k, i, r)
        for a, b in zip(g, sg):
            assert a["weight"].tobytes() == b["weight"].tobytes()
            assert a["bias"].tobytes() == b["bias"].tobytes()
    assert _threads.blas_holders() == 0
    assert _blas_threads() == original  # no call left BLAS at one thread


# -- 6. files ---------------------------------------------------------------------------

def _saved(tmp_path, model, name="m.npz", **kw):
    path = tmp_path / name
    model.save(path, **kw)
    return path


def _rewrite(src, dst, drop=(), replace=None):
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    arrays.update(replace or {})
    np.savez(dst, **arrays)


def _meta_of(path):
    import json

    with np.load(path) as data:
        return json.loads(str(data["meta"]))


def test_load_of_a_text_file_never_mentions_pickle(tmp_path):
    p = tmp_path / "notes.npz"
    p.write_text("just some text\n")
    with pytest.raises(cupynn.FileFormatError, match="not an .npz archive") as info:
        cupynn.load(p)
    assert "pickle" not in str(info.value)
    assert info.value.path == str(p) and info.value.member is None


def test_load_refuses_an_object_member_without_unpickling(tmp_path, model):
    path = _saved(tmp_path, model)
    _rewrite(path, tmp_path / "obj.npz", replace={"layers.0.bias": np.array([object()] * 7)})
    with pytest.raises(cupynn.FileFormatError, match=r"\[layers.0.bias\]: cannot be read \(it holds "
                                                      r"pickled Python objects, which cupynn never "
                                                      r"loads\)") as info:
        cupynn.load(tmp_path / "obj.npz")
    assert "allow_pickle" not in str(info.value)


def test_a_deleted_bias_is_a_damaged_file(tmp_path, model):
    path = _saved(tmp_path, model)
    _rewrite(path, tmp_path / "nobias.npz", drop=("layers.1.bias",))
    with pytest.raises(cupynn.FileFormatError, match=r"\[layers.1.bias\]: is missing"):
        cupynn.load(tmp_path / "nobias.npz")


@pytest.mark.parametrize("kind, msg", [("Dense", "kind 'Dense' is one layer, but the file lists 2"),
                                       ("Conv2d", "kind must be 'Dense' or 'Chain', got 'Conv2d'")])
def test_a_wrong_kind_is_refused(tmp_path, model, kind, msg):
    import json

    path = _saved(tmp_path, model)
    meta = _meta_of(path)
    meta["kind"] = kind
    _rewrite(path, tmp_path / "k.npz", replace={"meta": np.array(json.dumps(meta))})
    with pytest.raises(cupynn.FileFormatError, match=r"\[meta\]: " + msg):
        cupynn.load(tmp_path / "k.npz")


def test_truncated_flipped_empty_and_foreign_files(tmp_path, model):
    path = _saved(tmp_path, model)
    raw = path.read_bytes()
    cases = {"empty.npz": b"", "trunc.npz": raw[: len(raw) // 2], "half.npz": raw[:40],
             "foreign.npz": b"\x89PNG\r\n\x1a\n" + raw[8:]}
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0x10
    cases["flip.npz"] = bytes(flipped)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(cupynn.FileFormatError, match=name) as info:
            cupynn.load(tmp_path / name)
        assert "pickle" not in str(info.value)


def test_load_prefers_the_file_to_a_directory_of_the_same_stem(tmp_path, model):
    model.save(tmp_path / "m")
    (tmp_path / "m").mkdir()
    loaded = cupynn.load(tmp_path / "m", device="cpu")
    _same(_snapshot(model), _snapshot(loaded))


def test_version_absent_is_version_one_and_a_newer_version_is_refused(tmp_path, model):
    import json

    path = _saved(tmp_path, model)
    meta = _meta_of(path)
    v1 = {k: meta[k] for k in ("format", "kind", "precision", "activations")}
    _rewrite(path, tmp_path / "v1.npz", replace={"meta": np.array(json.dumps(v1))})
    _same(_snapshot(model), _snapshot(cupynn.load(tmp_path / "v1.npz", device="cpu")))
    meta["version"] = 99
    _rewrite(path, tmp_path / "v99.npz", replace={"meta": np.array(json.dumps(meta))})
    with pytest.raises(cupynn.FileFormatError, match="format version 99 was written by a newer"):
        cupynn.load(tmp_path / "v99.npz")
    _rewrite(path, tmp_path / "extra.npz", replace={"layers.5.weight": np.ones((2, 2))})
    with pytest.raises(cupynn.FileFormatError, match=r"\[layers.5.weight\]: is not part"):
        cupynn.load(tmp_path / "extra.npz")


def test_save_is_atomic(tmp_path, model, monkeypatch, rng):
    path = _saved(tmp_path, model)
    old = path.read_bytes()
    other = random_model([3, 7, 2], "tanh", np.float64, rng)

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half of a file")
        raise KeyboardInterrupt("injected mid-save")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]  # no temporary file left behind
    other.save(path)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # as a plain open() makes it
    _same(_snapshot(other), _snapshot(cupynn.load(path, device="cpu")))


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_optimizer_state_files_and_dicts_are_validated(tmp_path, model, rng):
    opt = cupynn.optim.Adam(model.parameters())
    _, g = cupynn.value_and_grad(model, rng.standard_normal((4, 3)))
    opt.step(g)
    path = _saved(tmp_path, model, optimizer=opt)
    sd = cupynn.optim.load_state(path)
    opt2 = cupynn.optim.Adam(model.parameters())
    before = _snapshot(model, opt2)
    for change, exc, msg in [({"dtype": None}, TypeError, "dtype must be 'float32' or 'float64'"),
                             ({"step": float("inf")}, ValueError, "step count must be a non-negative"),
                             ({"step": -1}, ValueError, "step count must be a non-negative integer"),
                             ({"step": 2.5}, ValueError, "step count must be a non-negative integer"),
                             ({"step": True}, ValueError, "step count must be a non-negative")]:
        with pytest.raises(exc, match=msg):
            opt2.load_state_dict({**sd, **change})
    with pytest.raises(ValueError, match=r"lacks \['hyper'\]"):
        opt2.load_state_dict({k: v for k, v in sd.items() if k != "hyper"})
    _same(before, _snapshot(model, opt2))
    _rewrite(path, tmp_path / "o.npz", drop=("optimizer.exp_avg.1",))
    with pytest.raises(cupynn.FileFormatError, match=r"\[optimizer.exp_avg.1\]: is missing"):
        cupynn.optim.load_state(tmp_path / "o.npz")
    _rewrite(path, tmp_path / "o2.npz", replace={"optimizer.exp_avg.0": np.ones((2, 2))})
    with pytest.raises(cupynn.FileFormatError, match=r"\[optimizer.exp_avg.0\]: must be a float64"):
        cupynn.optim.load_state(tmp_path / "o2.npz")
    opt2.load_state_dict(sd)
    _same(_snapshot(model, opt), _snapshot(model, opt2))


# -- 8. numbers in arguments ------------------------------------------------------------------

@pytest.mark.parametrize("batch, exc", [(-5, ValueError), (2.7, TypeError), ("100", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_execution_path_batch_is_an_integer(model, batch, exc):
    with pytest.raises(exc, match="batch"):
        cupynn.execution_path(model, batch)
    assert cupynn.execution_path(model, np.int64(10)) == "numpy"


def test_numbers_in_arguments(model, rng):
    x = rng.standard_normal((4, 3))
    for order in (True, 2.0, "2", 3):
        with pytest.raises((TypeError, ValueError), match="order must be 1"):
            cupynn.input_derivatives(model, x, order=order)
    opt = cupynn.optim.SGD(model.parameters(), lr=0.1)
    _, g = cupynn.value_and_grad(model, x)
    before = _snapshot(model)
    for bad in (True, "0.1", float("nan"), -1.0):
        opt.lr = bad
        with pytest.raises(ValueError, match="lr must be a finite number"):
            opt.step(g)
    _same(before, _snapshot(model))
    m1 = random_model([2, 6, 1], "tanh", np.float64, rng)
    x2 = rng.standard_normal((5, 2))
    for k, exc in [("2", TypeError), (float("nan"), ValueError), (True, TypeError), (1j, TypeError)]:
        with pytest.raises(exc, match="k \\(the wave number\\)"):
            cupynn.residual_value_and_grad(m1, x2, "helmholtz", k=k)


def test_messages_never_suggest_an_impossible_dtype(model):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError) as info:
        model(torch.ones((2, 3), dtype=torch.bool))
    assert "dtype='bool'" not in str(info.value) and "float64" in str(info.value)
    with pytest.raises(TypeError) as info:
        model(np.ones((2, 3), dtype=bool))
    assert "dtype='bool'" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, ">f8", np.int64, np.complex128])
def test_set_flat_refuses_other_float_types(model, dtype):
    before = _snapshot(model)
    theta = np.ones(cupynn.num_parameters(model)).astype(dtype)
    with pytest.raises(TypeError, match="theta must be a NumPy float vector of dtype float32 or "
                                        "float64"):
        cupynn.set_flat(model, theta)
    _same(before, _snapshot(model))


def test_set_flat_refuses_values_beyond_float32(rng):
    model = random_model([3, 4, 1], "tanh", np.float32, rng)
    before = _snapshot(model)
    theta = rng.standard_normal(cupynn.num_parameters(model))
    theta[5] = 1e300
    with pytest.raises(ValueError, match=r"theta\[5\] = 1e\+300 is out of the float32 model's range"):
        cupynn.set_flat(model, theta)
    _same(before, _snapshot(model))
    theta[5] = np.inf  # an infinity asked for is written as asked
    cupynn.set_flat(model, theta)
    assert np.isinf(model.layers[0].weight.reshape(-1)[5])


def test_a_loss_that_rebinds_the_model_does_not_change_the_running_call(model, rng):
    x = rng.standard_normal((5, 3))
    want_v, want_g, _ = ref.value_and_grad(host_params(model), activations_of(model), x)
    fresh = [{k: None if v is None else np.zeros_like(v) for k, v in p.items()}
             for p in model.parameters()]

    def loss(y):
        model.load_parameters(fresh)  # the documented choice: the call holds the old arrays
        return float((y ** 2).sum()), 2 * y

    v, g = cupynn.value_and_grad(model, x, loss)
    assert ref.rel_err(v, want_v) < 1e-12
    assert ref.rel_err(g[0]["weight"], want_g[0][0]) < 1e-12
    assert not model.layers[0].weight.any()  # the rebinding itself happened


def test_save_writes_format_version_2_through_cupynn_save(tmp_path, model):
    cupynn.save(model, tmp_path / "m")
    meta = _meta_of(tmp_path / "m.npz")
    assert meta["version"] == cupynn.io.FORMAT_VERSION == 2 and meta["dtype"] == "float64"
    assert meta["layers"] == [{"in": 3, "out": 7, "activation": "tanh", "bias": True},
                              {"in": 7, "out": 2, "activation": "tanh", "bias": True}]
    _same(_snapshot(model), _snapshot(cupynn.load(tmp_path / "m", device="cpu")))
