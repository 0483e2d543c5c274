"""cupynn.torch.Module as a torch user expects it: the backward keeps the forward's work,
torch.func transforms and torch.compile (supported or refused with a message), converters
to and from torch.nn.Sequential, and the advice after model.load_parameters.
Skipped without torch."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import functional as F

from .conftest import random_model
from .reference import rel_err

torch = pytest.importorskip("torch")
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap  # noqa: E402

import cupynn.torch as ct  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng()


def _pair(rng, sizes=(3, 17, 9, 2), acts=("tanh", "silu", "identity")):
    """A cupynn Module and the same network in plain torch (to_sequential: copies)."""
    model = random_model(list(sizes), list(acts), "float64", rng)
    return ct.Module(model), ct.to_sequential(model), model


def _grads(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("batch", [1, 33, 4000])
def test_backward_does_not_run_the_forward_again(rng, batch, monkeypatch):
    net, ref, model = _pair(rng, (2, 300, 20, 1), ("tanh", "tanh", "identity"))
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, 2))).requires_grad_(True)
    calls = []
    backend = cupynn.backends.get_backend("cpu")
    for name in ("network_forward", "network_value_and_grad"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    loss = (net(x) ** 3).sum()
    forward_calls = list(calls)
    loss.backward()
    xr = x.detach().clone().requires_grad_(True)
    (ref(xr) ** 3).sum().backward()
    assert rel_err(_grads(net.parameters()).numpy(), _grads(ref.parameters()).numpy()) <= 1e-12
    assert rel_err(x.grad.numpy(), xr.grad.numpy()) <= 1e-12
    if batch == 4000:  # large enough to keep: the backward ran no forward and no full gradient
        assert calls == forward_calls
        assert "network_value_and_grad" not in calls and "network_forward" not in calls


def test_forward_saved_matches_vjp_for_every_layout(rng):
    for sizes, acts in [((1, 1000, 20, 1), "identity"), ((5, 200, 130, 3), "gelu"),
                        ((40, 7, 150, 1), "softplus"), ((150, 20, 3), "tanh")]:
        model = random_model(list(sizes), acts, "float64", rng)
        for batch in (1, 7, 1025):
            x = rng.standard_normal((batch, sizes[0]))
            g = rng.standard_normal((batch, sizes[-1]))
            y, saved = F.forward_saved(model, x)
            assert np.array_equal(y, model(x))
            for wrt in (False, True):
                g1, dx1 = F.vjp_saved(model, saved, g, wrt_input=wrt)
                g2, dx2 = F.vjp(model, x, g, wrt_input=wrt)
                for a, b in zip(g1, g2):
                    assert rel_err(a["weight"], b["weight"]) <= 1e-12
                    assert rel_err(a["bias"], b["bias"]) <= 1e-12
                if wrt:
                    assert rel_err(dx1, dx2) <= 1e-12
    with pytest.raises(TypeError, match="forward_saved returned"):
        F.vjp_saved(model, (1, 2), g)


def test_retain_graph_backs_up_twice(rng):
    net, ref, _ = _pair(rng)
    x = torch.from_numpy(rng.standard_normal((2000, 3)))
    loss = (net(x) ** 2).sum()
    loss.backward(retain_graph=True)
    first = _grads(net.parameters()).clone()
    loss.backward()
    assert rel_err(_grads(net.parameters()).numpy(), 2 * first.numpy()) <= 1e-14


def test_torch_func_grad_vjp_and_functional_call(rng):
    net, ref, _ = _pair(rng)
    x = torch.from_numpy(rng.standard_normal((50, 3)))
    p = {k: v.detach().clone() for k, v in net.named_parameters()}
    ref_params = dict(zip([k for k, _ in ref.named_parameters()], p.values()))

    def loss(params, xx):
        return (functional_call(net, params, (xx,)) ** 2).sum()

    def loss_ref(params, xx):
        return (functional_call(ref, params, (xx,)) ** 2).sum()

    g = grad(loss)(p, x)
    g_ref = grad(loss_ref)(ref_params, x)
    for (k, a), b in zip(g.items(), g_ref.values()):
        assert rel_err(a.numpy(), b.numpy()) <= 1e-12, k
    gx = grad(loss, argnums=1)(p, x)
    assert rel_err(gx.numpy(), grad(loss_ref, argnums=1)(ref_params, x).numpy()) <= 1e-12
    y, pull = vjp(lambda xx: net(xx), x)
    ct_ = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
    y_r, pull_r = vjp(lambda xx: ref(xx), x)
    assert rel_err(pull(ct_)[0].detach().numpy(), pull_r(ct_)[0].detach().numpy()) <= 1e-12
    # functional_call with other tensors left the module on its own Parameters' memory
    assert net.model.layers[0].weight.ctypes.data == net.layers[0].weight.data_ptr()


def test_torch_func_vmap_and_jacrev(rng):
    net, ref, _ = _pair(rng)
    x = torch.from_numpy(rng.standard_normal((6, 3)))
    ys = vmap(net)(x)                                  # per-sample calls folded into one batch
    assert rel_err(ys.detach().numpy(), ref(x).detach().numpy()) <= 1e-13
    xs = torch.from_numpy(rng.standard_normal((4, 5, 3)))
    assert rel_err(vmap(net)(xs).detach().numpy(), ref(xs).detach().numpy()) <= 1e-13
    J = jacrev(net)(x[0])                               # (2, 3)
    J_ref = jacrev(ref)(x[0])
    assert J.shape == (2, 3) and rel_err(J.detach().numpy(), J_ref.detach().numpy()) <= 1e-12
    per_sample = vmap(jacrev(net))(x)                   # (6, 2, 3)
    assert rel_err(per_sample.detach().numpy(), vmap(jacrev(ref))(x).detach().numpy()) <= 1e-12
    p = {k: v.detach() for k, v in net.named_parameters()}
    Jp = jacrev(lambda params: functional_call(net, params, (x,)))(p)
    Jp_ref = jacrev(lambda params: functional_call(ref, params, (x,)))(
        dict(zip([k for k, _ in ref.named_parameters()], p.values())))
    for a, b in zip(Jp.values(), Jp_ref.values()):
        assert rel_err(a.detach().numpy(), b.detach().numpy()) <= 1e-12


def test_torch_func_refusals_name_the_alternative(rng):
    net, _, _ = _pair(rng)
    x = torch.from_numpy(rng.standard_normal((4, 3)))
    with pytest.raises(RuntimeError, match="no forward-mode derivative.*jacrev.*input_hessian"):
        jvp(net, (x,), (torch.ones_like(x),))
    p = {k: v.detach() for k, v in net.named_parameters()}
    batched = {k: torch.stack([v, v]) for k, v in p.items()}
    with pytest.raises(RuntimeError, match="vmap over cupynn.torch.Module's parameters.*ensemble"):
        vmap(lambda pp: functional_call(net, pp, (x,)))(batched)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        xg = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((net(xg) ** 2).sum(), xg, create_graph=True)
        gx.sum().backward()


def test_torch_compile_runs_the_module(rng):
    net, ref, _ = _pair(rng)
    head = torch.nn.Linear(4, 3, dtype=torch.float64)
    seq = torch.nn.Sequential(head, net)
    compiled = torch.compile(seq)
    x = torch.from_numpy(rng.standard_normal((16, 4)))
    try:
        out = compiled(x)
    except Exception as e:  # noqa: BLE001 - a torch without a working compiler toolchain
        if "cupynn" in str(e) or "DLDeviceType" in str(e):
            raise
        pytest.skip(f"torch.compile itself does not work here: {type(e).__name__}")
    assert rel_err(out.detach().numpy(), seq(x).detach().numpy()) <= 1e-13
    (out ** 2).sum().backward()
    g_compiled = _grads(seq.parameters()).clone()
    for q in seq.parameters():
        q.grad = None
    (seq(x) ** 2).sum().backward()
    assert rel_err(g_compiled.numpy(), _grads(seq.parameters()).numpy()) <= 1e-12


def test_sequential_converters_round_trip_and_load_a_state_dict(rng):
    seq = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(12, 7), torch.nn.Softplus(), torch.nn.Linear(7, 2),
                              torch.nn.Tanh(), torch.nn.Linear(2, 1)).double()
    trained = {k: 0.5 * torch.randn_like(v) for k, v in seq.state_dict().items()}  # "an existing state_dict"
    seq.load_state_dict(trained)
    model = ct.from_sequential(seq)
    assert [l.activation.name for l in model.layers] == ["gelu", "softplus", "tanh", "identity"]
    x = rng.standard_normal((9, 3))
    assert rel_err(model(x), seq(torch.from_numpy(x)).detach().numpy()) <= 1e-13
    back = ct.to_sequential(model)
    assert list(back.state_dict()) == list(seq.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, trained[k])
    net = ct.Module(model)
    assert rel_err(net(torch.from_numpy(x)).detach().numpy(), model(x)) <= 1e-15
    f32 = ct.from_sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    assert f32.dtype == np.float32 and f32.layers[0].activation.name == "relu"
    nobias = ct.to_sequential(cupynn.Dense(2, 3, "sigmoid", bias=False, device="cpu", rng=0))
    assert nobias[0].bias is None and isinstance(nobias[1], torch.nn.Sigmoid)


def test_sequential_converter_errors():
    with pytest.raises(TypeError, match="module 1 of the Sequential .*Softmax.*no cupynn equivalent"):
        ct.from_sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Softmax(dim=1)))
    with pytest.raises(TypeError, match="module 2 of the Sequential is Tanh, where a Linear"):
        ct.from_sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Tanh()))
    with pytest.raises(TypeError, match="GELU with approximate"):
        ct.from_sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LeakyReLU(0.2)))
    with pytest.raises(TypeError, match="takes a torch.nn.Sequential"):
        ct.from_sequential(torch.nn.Linear(2, 3))
    with pytest.raises(TypeError, match="takes a cupynn Dense or Chain"):
        ct.to_sequential(torch.nn.Linear(2, 3))


def test_advice_after_load_parameters_recovers(rng):
    model = random_model([2, 5, 1], "tanh", "float64", rng)
    net = ct.Module(model)
    model.load_parameters(random_model([2, 5, 1], "tanh", "float64", rng).parameters())
    x = torch.from_numpy(rng.standard_normal((3, 2)))
    with pytest.raises(RuntimeError, match=r"wrap the model again, net = cupynn\.torch\.Module\(model\)"):
        net(x)
    net.load_state_dict(net.state_dict())     # what the old advice said: it does not recover
    with pytest.raises(RuntimeError, match="no longer share memory"):
        net(x)
    net = ct.Module(model)                    # what the advice says now: it does
    assert rel_err(net(x).detach().numpy(), model(x.numpy())) <= 1e-15
