"""cupynn.torch.Module: a cupynn model inside a torch program, differentiated by autograd.

CPU tests need torch (skipped without it); the CUDA variants are ``gpu`` tests.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn.backends import get_backend

from .conftest import random_model

torch = pytest.importorskip("torch")
import cupynn.torch as ct  # noqa: E402

ACTS = ["identity", "relu", "tanh", "sigmoid", "softplus", "gelu", "elu"]
TORCH_ACTS = {
    "identity": lambda z: z, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus, "elu": torch.nn.functional.elu,
    "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
}


def _ptr(a) -> int:
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr


def _copy(a):
    return None if a is None else torch.from_dlpack(a).clone().requires_grad_(True)


def torch_replica(model):
    """The same network written in torch (copies of the parameters, on the model's device)."""
    params = [(_copy(l.weight), _copy(l.bias)) for l in model.layers]
    acts = [TORCH_ACTS[l.activation.name] for l in model.layers]

    def run(x):
        h = x
        for (W, b), act in zip(params, acts):
            h = h @ W.T if b is None else torch.addmm(b, h, W.T)
            h = act(h)
        return h

    return run, [p for pair in params for p in pair if p is not None]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act, bias, rng):
    model = random_model([3, 5, 4, 2], act, np.float64, rng, bias=bias)
    net = ct.Module(model)
    x = torch.from_numpy(rng.standard_normal((6, 3))).requires_grad_(True)
    params = tuple(net.parameters())
    assert len(params) == (6 if bias else 3)
    assert torch.autograd.gradcheck(lambda x, *p: net(x), (x, *params), eps=1e-6, atol=1e-7)


def test_gradients_come_from_one_cupynn_call_and_match_it(rng, monkeypatch):
    model = random_model([4, 9, 3], "tanh", np.float64, rng)
    net = ct.Module(model)
    xn = rng.standard_normal((10, 4))
    x = torch.from_numpy(xn.copy()).requires_grad_(True)
    kinds = []
    backend = get_backend("cpu")
    real = backend.network_value_and_grad
    monkeypatch.setattr(backend, "network_value_and_grad",
                        lambda net, p, x, loss, **k: kinds.append(loss.kind) or real(net, p, x, loss, **k))
    loss = (net(x) ** 2).sum()
    loss.backward()
    assert kinds == ["dot"]  # one backward call of the backend, the VJP loss fused
    value, grads, dx = cupynn.value_and_grad(model, xn, "sum_squares", wrt_input=True)
    assert abs(loss.item() - float(value)) <= 1e-12 * abs(float(value))
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-12, atol=1e-14)
    for h, g in zip(net.layers, grads):
        np.testing.assert_allclose(h.weight.grad.numpy(), g["weight"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(h.bias.grad.numpy(), g["bias"], rtol=1e-12, atol=1e-14)


def test_parameters_share_memory_with_the_model_both_ways(rng):
    model = random_model([2, 3, 1], "relu", np.float64, rng)
    net = ct.Module(model)
    names = [n for n, _ in net.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    for h, l in zip(net.layers, model.layers):
        assert h.weight.data_ptr() == _ptr(l.weight) and h.bias.data_ptr() == _ptr(l.bias)
        assert isinstance(h.weight, torch.nn.Parameter) and h.weight.requires_grad
    model.layers[0].weight[1, 0] = 42.0  # cupynn writes, torch reads
    assert net.layers[0].weight[1, 0].item() == 42.0
    with torch.no_grad():  # torch writes, cupynn computes with it
        net.layers[1].bias.fill_(-3.5)
    assert model.layers[1].bias[0] == -3.5
    x = rng.standard_normal((4, 2))
    np.testing.assert_array_equal(net(torch.from_numpy(x)).detach().numpy(), model(x))
    state = {k: torch.zeros_like(v) + 0.25 for k, v in net.state_dict().items()}
    net.load_state_dict(state)  # in place: still shared
    assert np.all(model.layers[0].weight == 0.25)


def test_composes_with_torch_losses_optimizers_and_modules(rng):
    """pre -> cupynn -> post trained by Adam equals the same network written in torch."""
    torch.manual_seed(0)
    model = random_model([4, 8, 3], "tanh", np.float64, rng)
    pre = torch.nn.Linear(5, 4, dtype=torch.float64)
    post = torch.nn.Linear(3, 2, dtype=torch.float64)
    net = torch.nn.Sequential(pre, ct.Module(model), torch.nn.Softplus(), post)
    inner, inner_params = torch_replica(model)
    pre2, post2 = (torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.Linear(3, 2, dtype=torch.float64))
    pre2.load_state_dict(pre.state_dict())
    post2.load_state_dict(post.state_dict())
    ref = lambda x: post2(torch.nn.functional.softplus(inner(pre2(x))))  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    opt2 = torch.optim.Adam([*pre2.parameters(), *inner_params, *post2.parameters()], lr=1e-2)
    x = torch.from_numpy(rng.standard_normal((16, 5)))
    t = torch.from_numpy(rng.standard_normal((16, 2)))
    for _ in range(4):
        for o, f in ((opt, net), (opt2, ref)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(f(x), t)
            loss.backward()
            o.step()
    for got, want in zip(net.parameters(), [*pre2.parameters(), *inner_params, *post2.parameters()]):
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-11, atol=1e-13)
    # Adam's in-place steps are the cupynn model's new weights
    np.testing.assert_array_equal(model.layers[0].weight, net[1].layers[0].weight.detach().numpy())


def test_double_backward_is_refused(rng):
    net = ct.Module(random_model([2, 4, 1], "tanh", np.float64, rng))
    x = torch.from_numpy(rng.standard_normal((3, 2))).requires_grad_(True)
    (gx,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)  # first order still works
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.pow(2).sum().backward()


def test_only_needed_gradients_and_frozen_parameters(rng):
    model = random_model([3, 4, 2], "relu", np.float64, rng)
    net = ct.Module(model)
    net.layers[0].weight.requires_grad_(False)
    x = torch.from_numpy(rng.standard_normal((5, 3)))  # no grad for x
    (net(x) ** 2).sum().backward()
    assert net.layers[0].weight.grad is None and x.grad is None
    _, grads = cupynn.value_and_grad(model, x.numpy(), "sum_squares")
    np.testing.assert_allclose(net.layers[1].weight.grad.numpy(), grads[1]["weight"], rtol=1e-12)


def test_single_dense_one_sample_and_empty_batch(rng):
    layer = cupynn.Dense.from_arrays(rng.standard_normal((3, 2)), rng.standard_normal(3), "sigmoid")
    net = ct.Module(layer)
    x = torch.from_numpy(rng.standard_normal(2)).requires_grad_(True)
    assert net(x).shape == (3,)
    assert torch.autograd.gradcheck(lambda x, *p: net(x), (x, *net.parameters()))
    empty = torch.zeros((0, 2), dtype=torch.float64, requires_grad=True)
    y = net(empty)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert empty.grad.shape == (0, 2) and torch.all(net.layers[0].weight.grad == 0)


def test_float32_and_module_dtype_moves(rng):
    model = random_model([3, 6, 2], "tanh", np.float32, rng)
    net = ct.Module(model)
    x = torch.from_numpy(rng.standard_normal((8, 3)).astype(np.float32))
    run, params = torch_replica(model)
    np.testing.assert_allclose(net(x).detach().numpy(), run(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"x \(torch.Tensor\) has dtype float64.*x\.to\(torch\.float32\)"):
        net(x.double())
    net.double()  # torch re-allocates the Parameters: the module follows them
    assert net.model.dtype == np.float64 and net.layers[0].weight.data_ptr() == _ptr(net.model.layers[0].weight)
    xd = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, *p: net(x), (xd, *net.parameters()))


def test_replacing_the_wrapped_models_arrays_is_refused(rng):
    model = random_model([2, 3, 1], "relu", np.float64, rng)
    net = ct.Module(model)
    model.load_parameters([{"weight": l.weight * 2, "bias": l.bias} for l in model.layers])
    with pytest.raises(RuntimeError, match="no longer share memory.*load_state_dict"):
        net(torch.ones((1, 2), dtype=torch.float64))
    with pytest.raises(TypeError, match="wraps a cupynn Dense or Chain"):
        ct.Module(torch.nn.Linear(2, 2))


def test_in_place_update_between_forward_and_backward_is_caught(rng):
    net = ct.Module(random_model([2, 3, 1], "tanh", np.float64, rng))
    loss = net(torch.ones((4, 2), dtype=torch.float64)).sum()
    with torch.no_grad():
        net.layers[0].weight.add_(1.0)  # backward would use the new weights: torch refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- CUDA --------------------------------------------------------------------------

def _cuda_or_skip():
    if not cupynn.cuda_available():
        pytest.skip("cupynn's CUDA backend is not usable here")
    if not torch.cuda.is_available():
        pytest.skip("this torch build sees no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["identity", "relu", "tanh", "gelu"])
def test_cuda_module_matches_torch(act, rng):
    _cuda_or_skip()
    import cupy

    model = random_model([5, 33, 17, 3], act, np.float64, rng, device="cuda")
    net = ct.Module(model)
    assert net.layers[0].weight.is_cuda
    assert net.layers[0].weight.data_ptr() == model.layers[0].weight.data.ptr
    run, params = torch_replica(model)
    x = torch.from_numpy(rng.standard_normal((257, 5))).cuda().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(257, 3, dtype=torch.float64, device="cuda")
    y = net(x)
    assert y.is_cuda and isinstance(net.model.layers[0].weight, cupy.ndarray)
    (y * g).sum().backward()
    y2 = run(x2)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-11, atol=1e-12)
    for got, want in zip(net.parameters(), params):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-11, atol=1e-12)
    # on a side stream too: cupynn runs on torch's current stream
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y3 = net(x.detach())
    s.synchronize()
    torch.testing.assert_close(y3, y.detach(), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_gradcheck_and_device_errors(rng):
    _cuda_or_skip()
    net = ct.Module(random_model([3, 4, 2], "tanh", np.float64, rng, device="cuda"))
    x = torch.randn(5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: net(x), (x, *net.parameters()))
    with pytest.raises(cupynn.DeviceMismatchError, match=r"on 'cpu' but the model is on 'cuda'.*x\.cuda\(\)"):
        net(x.detach().cpu())
    cpu_net = ct.Module(random_model([3, 4, 2], "tanh", np.float64, rng))
    cpu_net.cuda()  # torch moves the Parameters: the module now runs cupynn's CUDA kernels
    assert cpu_net.model.device == "cuda"
    assert torch.autograd.gradcheck(lambda x, *p: cpu_net(x), (x, *cpu_net.parameters()))


def test_print_says_what_the_model_is():
    model = cupynn.MLP([1, 1000, 20, 1], "tanh", device="cpu", rng=0)
    text = repr(torch.nn.Sequential(cupynn.torch.Module(model), torch.nn.Tanh()))
    for line in ("(0): Dense(1 => 1000, tanh)", "(1): Dense(1000 => 20, tanh)", "(2): Dense(20 => 1)",
                 "float64, cpu"):
        assert line in text, text
    assert "Module()" not in text and " x " not in text
    one = cupynn.torch.Module(cupynn.Dense(3, 2, "relu", bias=False, dtype="float32", device="cpu", rng=0))
    assert "Dense(3 => 2, relu, bias=false)" in repr(one) and "float32, cpu" in repr(one)
