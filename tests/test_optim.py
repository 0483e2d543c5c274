"""cupynn.optim on the CPU: torch.optim's update rules, checks that change nothing, state.

The side-by-side runs feed cupynn and torch.optim the same fresh random gradients for 50
steps (float64) and compare the parameters and every state array by relative norm.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import optim

from .conftest import random_model

CONFIGS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1)),
]
TORCH_STATE = {"momentum_buffer": "momentum_buffer", "exp_avg": "exp_avg",
               "exp_avg_sq": "exp_avg_sq"}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny)


def flat_arrays(model):
    return [a for l in model.layers for a in (l.weight, l.bias) if a is not None]


def grads_like(model, rng, dtype=np.float64):
    return [{"weight": rng.standard_normal(l.weight.shape).astype(dtype),
             "bias": None if l.bias is None else rng.standard_normal(l.bias.shape).astype(dtype)}
            for l in model.layers]


def flat_grads(grads):
    return [a for g in grads for a in (g["weight"], g["bias"]) if a is not None]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_matches_torch_optim_for_50_steps(name, kwargs, rng):
    torch = pytest.importorskip("torch", reason="the side-by-side check needs PyTorch (CPU)")
    model = cupynn.Chain(
        cupynn.Dense.from_arrays(rng.standard_normal((13, 3)), rng.standard_normal(13), "tanh"),
        cupynn.Dense.from_arrays(rng.standard_normal((7, 13)), None, "relu"),
        cupynn.Dense.from_arrays(rng.standard_normal((2, 7)), rng.standard_normal(2)),
    )
    mine = flat_arrays(model)
    theirs = [torch.tensor(a.copy(), dtype=torch.float64, requires_grad=True) for a in mine]
    opt = getattr(optim, name)(model.parameters(), **kwargs)
    topt = getattr(torch.optim, name)(theirs, **kwargs, foreach=False)
    for step in range(50):
        if step == 30:  # a schedule: both see the new learning rate from here on
            opt.lr = kwargs["lr"] / 3
            for group in topt.param_groups:
                group["lr"] = kwargs["lr"] / 3
        grads = grads_like(model, rng)
        opt.step(grads)
        for t, g in zip(theirs, flat_grads(grads)):
            t.grad = torch.from_numpy(g.copy())
        topt.step()
    assert opt.step_count == 50
    for i, (a, t) in enumerate(zip(mine, theirs)):
        err = rel(a, t.detach().numpy())
        assert err <= 1e-12, f"parameter {i}: relative error {err:.2e}"
        for key, arrays in opt.state.items():
            err = rel(arrays[i], topt.state[t][TORCH_STATE[key]].numpy())
            assert err <= 1e-12, f"{key}[{i}]: relative error {err:.2e}"


def test_a_dense_layer_is_its_own_structure(rng):
    layer = cupynn.Dense.from_arrays(rng.standard_normal((4, 3)), rng.standard_normal(4))
    W0 = layer.weight.copy()
    opt = optim.SGD(layer.parameters(), lr=0.5)
    g = {"weight": rng.standard_normal((4, 3)), "bias": rng.standard_normal(4)}
    opt.step(g)
    np.testing.assert_array_equal(layer.weight, W0 - 0.5 * g["weight"])
    with pytest.raises(TypeError, match="dict"):
        opt.step([g])


def _bad_grads(model, rng):
    """(description, grads, exception, message) cases; each breaks only the LAST array."""
    def good():
        return grads_like(model, rng)

    cases = []
    g = good()
    g[-1]["bias"] = g[-1]["bias"][:-1]
    cases.append(("shape", g, ValueError, r"has shape \(1,\)"))
    g = good()
    g[-1]["bias"] = g[-1]["bias"].astype(np.float32)
    cases.append(("dtype", g, TypeError, "float32"))
    g = good()
    g[-1]["bias"] = list(g[-1]["bias"])
    cases.append(("not an array", g, TypeError, "NumPy array"))
    g = good()
    g[-1]["weight"] = np.asfortranarray(g[-1]["weight"])
    cases.append(("layout", g, ValueError, "C-contiguous"))
    g = good()
    g[-1]["bias"] = None
    cases.append(("missing bias", g, ValueError, "lack 'bias'"))
    g = good()
    g[1]["bias"] = rng.standard_normal(model.layers[1].out_features)
    cases.append(("extra bias", g, ValueError, "only"))
    cases.append(("one layer short", good()[:-1], ValueError, "2 layers"))
    cases.append(("a dict for a chain", good()[0], TypeError, "list"))
    g = good()
    g[-1]["weight"] = g[-1]["weight"][None]
    cases.append(("ndim", g, ValueError, "2-D"))
    g = good()
    g[-1]["bias"] = _OnTheGpu(g[-1]["bias"])
    cases.append(("device", g, cupynn.DeviceMismatchError, "on 'cuda'"))
    return cases


class _OnTheGpu:
    """Looks like a CuPy array to cupynn's device check (no GPU needed)."""

    __module__ = "cupy._core.core"

    def __init__(self, a):
        self.shape, self.dtype, self.ndim, self.flags = a.shape, a.dtype, a.ndim, a.flags


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_bad_gradients_raise_and_change_nothing(name, rng):
    model = cupynn.Chain(
        cupynn.Dense.from_arrays(rng.standard_normal((5, 3)), rng.standard_normal(5), "tanh"),
        cupynn.Dense.from_arrays(rng.standard_normal((4, 5)), None, "relu"),
        cupynn.Dense.from_arrays(rng.standard_normal((2, 4)), rng.standard_normal(2)),
    )
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    opt = getattr(optim, name)(model.parameters(), lr=0.1, **kwargs)
    opt.step(grads_like(model, rng))  # nonzero state, step 1
    before = [a.copy() for a in flat_arrays(model)]
    state_before = {k: [a.copy() for a in v] for k, v in opt.state.items()}
    for what, grads, exc, msg in _bad_grads(model, rng):
        with pytest.raises(exc, match=msg):
            opt.step(grads)
        for a, b in zip(flat_arrays(model), before):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: a parameter changed")
        for k, v in opt.state.items():
            for a, b in zip(v, state_before[k]):
                np.testing.assert_array_equal(a, b, err_msg=f"{what}: state {k} changed")
        assert opt.step_count == 1, what


def test_invalid_hyperparameters_are_refused_before_any_change(rng):
    model = random_model([3, 4, 1], "tanh", np.float64, rng)
    with pytest.raises(ValueError, match="lr"):
        optim.Adam(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(model.parameters(), lr=0.1, nesterov=True)
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = [a.copy() for a in flat_arrays(model)]
    opt.momentum = 0.9  # no buffer was made for momentum 0
    with pytest.raises(ValueError, match="momentum buffer"):
        opt.step(grads_like(model, rng))
    opt.momentum, opt.lr = 0.0, float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step(grads_like(model, rng))
    for a, b in zip(flat_arrays(model), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="model.parameters"):
        optim.Adam(42)
    with pytest.raises(ValueError, match="at least one"):
        optim.Adam([])


def test_nonfinite_gradients_follow_the_formula(rng):
    model = random_model([3, 4, 1], "tanh", np.float64, rng)
    W = model.layers[0].weight
    sgd = optim.SGD(model.parameters(), lr=0.1)
    grads = grads_like(model, rng)
    grads[0]["weight"][1, 2] = np.nan
    grads[0]["weight"][0, 0] = np.inf
    w_before = W.copy()
    sgd.step(grads)
    assert np.isnan(W[1, 2]) and W[0, 0] == -np.inf
    mask = np.ones(W.shape, bool)
    mask[1, 2] = mask[0, 0] = False
    np.testing.assert_array_equal(W[mask], (w_before - 0.1 * grads[0]["weight"])[mask])

    model = random_model([3, 4, 1], "tanh", np.float64, rng)
    adam = optim.Adam(model.parameters(), lr=0.1)
    grads = grads_like(model, rng)
    grads[1]["bias"][0] = np.nan
    adam.step(grads)
    assert np.isnan(model.layers[1].bias[0])
    assert np.isnan(adam.state["exp_avg"][3][0]) and np.isnan(adam.state["exp_avg_sq"][3][0])
    assert np.isfinite(model.layers[0].weight).all()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_state_dict_round_trip_and_npz(name, rng, tmp_path):
    kwargs = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {"weight_decay": 0.01}
    a = random_model([2, 6, 3, 1], "tanh", np.float64, rng)
    opt_a = getattr(optim, name)(a.parameters(), lr=0.05, **kwargs)
    for _ in range(5):
        opt_a.step(grads_like(a, rng))
    path = tmp_path / "ckpt.npz"
    a.save(path, optimizer=opt_a)
    b = cupynn.load(path, device="cpu")
    opt_b = getattr(optim, name)(b.parameters(), lr=1.0, **kwargs)  # lr comes from the file
    opt_b.load_state_dict(optim.load_state(path))
    assert opt_b.step_count == 5 and opt_b.lr == 0.05
    c = random_model([2, 6, 3, 1], "tanh", np.float64, rng)
    c.load_parameters(a.parameters())
    opt_c = getattr(optim, name)(c.parameters(), lr=1.0, **kwargs)
    opt_c.load_state_dict(opt_a.state_dict())
    for _ in range(3):
        g = grads_like(a, rng)
        for opt in (opt_a, opt_b, opt_c):
            opt.step(g)
    for x, y, z in zip(flat_arrays(a), flat_arrays(b), flat_arrays(c)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert opt_a.step_count == opt_b.step_count == 8


def test_load_state_dict_checks_everything_first(rng, tmp_path):
    a = random_model([2, 5, 1], "tanh", np.float64, rng)
    opt = optim.Adam(a.parameters(), lr=0.01)
    opt.step(grads_like(a, rng))
    good = opt.state_dict()
    snapshot = {k: [x.copy() for x in v] for k, v in opt.state.items()}

    def broken(edit):
        sd = opt.state_dict()
        edit(sd)
        return sd

    cases = [
        (broken(lambda sd: sd.update(kind="sgd")), ValueError, "'sgd'"),
        (broken(lambda sd: sd.update(dtype="float32")), TypeError, "float32"),
        (broken(lambda sd: sd["state"]["exp_avg_sq"].__setitem__(
            -1, sd["state"]["exp_avg_sq"][-1].astype(np.float32))), ValueError, "exp_avg_sq"),
        (broken(lambda sd: sd["hyper"].update(lr=-3.0)), ValueError, "lr"),
        (broken(lambda sd: sd.update(step=-1)), ValueError, "step"),
        ({"format": "x"}, ValueError, "not a cupynn optimizer"),
    ]
    for sd, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            opt.load_state_dict(sd)
        assert opt.step_count == 1 and opt.lr == 0.01
        for k, v in opt.state.items():
            for x, y in zip(v, snapshot[k]):
                np.testing.assert_array_equal(x, y)
    other = random_model([2, 4, 1], "tanh", np.float64, rng)
    with pytest.raises(ValueError, match="shapes"):
        optim.Adam(other.parameters()).load_state_dict(good)
    a.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="no optimizer state"):
        optim.load_state(tmp_path / "m.npz")


def test_load_state_finds_the_suffix_save_appended(tmp_path, rng):
    model = random_model([2, 3, 1], "tanh", np.float64, rng)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    opt.step(grads_like(model, rng, np.float64))
    model.save(tmp_path / "ckpt", optimizer=opt)  # writes ckpt.npz
    assert (tmp_path / "ckpt.npz").exists() and not (tmp_path / "ckpt").exists()
    state = optim.load_state(tmp_path / "ckpt")
    assert state["step"] == opt.state_dict()["step"]
    for k, v in opt.state.items():
        for x, y in zip(v, state["state"][k]):
            np.testing.assert_array_equal(x, y)


def test_float32_parameters_keep_float32_state(rng):
    model = random_model([3, 5, 1], "tanh", np.float32, rng)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    opt.step(grads_like(model, rng, np.float32))
    assert all(a.dtype == np.float32 for v in opt.state.values() for a in v)
    assert all(a.dtype == np.float32 for a in flat_arrays(model))
    with pytest.raises(TypeError, match="float64"):
        opt.step(grads_like(model, rng, np.float64))


def test_training_reduces_the_loss(rng):
    model = cupynn.MLP([1, 32, 32, 1], "tanh", device="cpu", rng=3)
    x = np.linspace(-1, 1, 128).reshape(-1, 1)
    y = np.sin(3 * x)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        value, grads = cupynn.value_and_grad(model, x, "mse", target=y)
        first = float(value) if first is None else first
        opt.step(grads)
    assert float(value) < 0.05 * first


def test_compiled_cpu_step_is_value_and_grad_then_step(rng):
    a = random_model([2, 6, 1], "tanh", np.float64, rng)
    b = random_model([2, 6, 1], "tanh", np.float64, rng)
    b.load_parameters(a.parameters())
    opt_a, opt_b = optim.SGD(a.parameters(), lr=0.1, momentum=0.5), None
    opt_b = optim.SGD(b.parameters(), lr=0.1, momentum=0.5)
    step = cupynn.compile(a, "mse", optimizer=opt_a)
    for _ in range(3):
        x, t = rng.standard_normal((9, 2)), rng.standard_normal((9, 1))
        v = step(x, t)
        w, g = cupynn.value_and_grad(b, x, "mse", target=t)
        opt_b.step(g)
        assert float(v) == float(w)
    for x, y in zip(flat_arrays(a), flat_arrays(b)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="does not hold this model"):
        cupynn.compile(b, "mse", optimizer=opt_a)


def test_public_names_have_runnable_examples():
    import doctest

    from cupynn import flat, graph

    for fn in (optim.SGD, optim.Adam, optim.AdamW, optim.load_state, cupynn.get_flat,
               cupynn.set_flat, cupynn.flat_value_and_grad, cupynn.compile):
        assert fn.__doc__ and ">>>" in fn.__doc__, fn
    for mod in (optim, flat, graph):
        failed, attempted = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert attempted > 0 and failed == 0, mod.__name__


def test_host_constants_match_the_kernel_source():
    import re

    from cupynn import _loader
    from cupynn.backends import cuda_catalog, cuda_optim

    src = (_loader.KERNEL_DIR / cuda_optim.SOURCE).read_text()
    const = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+) = (\d+)", src)}
    assert const["OPT_SLOTS"] == cuda_optim.SLOTS
    assert const["OPT_THREADS"] * const["OPT_PER_THREAD"] == cuda_optim.CHUNK
    assert {k: const[f"OPT_{k.upper()}"] for k in cuda_optim.KINDS} == cuda_optim.KINDS
    # the compile check builds every instantiation, and they count as hot (no spills)
    listed = dict(cuda_catalog.all_instantiations())[cuda_optim.SOURCE]
    assert set(listed) == {"cupynn::multi_tensor_step<double>", "cupynn::multi_tensor_step<float>"}
    assert set(listed) <= cuda_catalog.hot_kernels()


def test_warm_up_sends_the_update_kernels_to_optim_cu():
    """``backend.warm_up(hot_kernels())`` (what .ci/gpu runs) compiles each name from its file."""
    from cupynn.backends import cuda_backend as cb
    from cupynn.backends import cuda_catalog

    seen = []

    class Recorder(cuda_catalog.NameCollector):
        def __init__(self, code=None, options=(), name_expressions=(), **kw):
            super().__init__(code, options, name_expressions, **kw)
            seen.append(("multi_tensor_step(" in code, tuple(name_expressions)))

    be = cb.CudaBackend(xp=np, module_cls=Recorder)
    hot = cuda_catalog.hot_kernels()
    assert be.warm_up(sorted(hot), workers=1) == len(hot)
    assert any(f for f, _ in seen) and not all(f for f, _ in seen)
    for from_optim_cu, names in seen:
        assert all(("multi_tensor_step" in n) == from_optim_cu for n in names), names
