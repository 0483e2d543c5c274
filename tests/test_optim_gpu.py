"""The optimizers on a real GPU: the update kernel against NumPy, the device checks, and
the compiled training step (a real CUDA graph) against eager steps.

Skipped with a reason where CuPy or a GPU is not usable.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import optim

from .test_optim_emulated import KINDS, SHAPES, rel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", list(KINDS))
def test_gpu_update_matches_numpy(cp, rng, kind):
    from cupynn.backends import get_backend
    from cupynn.backends.numpy_backend import NumpyBackend

    be, ref = get_backend("cuda"), NumpyBackend()
    buffers, hyper = KINDS[kind]
    base = kind.split("-")[0]
    shapes = SHAPES + [(5,)] * 10  # two launch groups
    params = [rng.standard_normal(s) for s in shapes]
    st = be.optimizer_state(base, shapes, np.float64, buffers)
    st_r = ref.optimizer_state(base, shapes, np.float64, buffers)
    pd, ph = [cp.asarray(p) for p in params], [p.copy() for p in params]
    for _ in range(4):
        grads = [rng.standard_normal(s) for s in shapes]
        be.optimizer_step(st, hyper, pd, [cp.asarray(g) for g in grads])
        ref.optimizer_step(st_r, hyper, ph, grads)
    for a, b in zip(pd, ph):
        assert rel(a.get(), b) <= 1e-12
    assert be.optimizer_get_step(st) == 4


def test_gpu_gradients_on_the_host_are_refused(cp, rng):
    model = cupynn.MLP([2, 5, 1], "tanh", device="cuda", rng=0)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    _, grads = cupynn.value_and_grad(model, cp.asarray(rng.standard_normal((7, 2))))
    before = cupynn.get_flat(model)
    grads[-1]["bias"] = grads[-1]["bias"].get()
    with pytest.raises(cupynn.DeviceMismatchError, match="on 'cpu'"):
        opt.step(grads)
    np.testing.assert_array_equal(cupynn.get_flat(model), before)


def test_gpu_compiled_training_steps_equal_eager_steps(cp, rng):
    a = cupynn.MLP([1, 64, 16, 1], "tanh", device="cuda", rng=2)
    b = cupynn.MLP([1, 64, 16, 1], "tanh", device="cuda", rng=2)
    opt_a = optim.Adam(a.parameters(), lr=1e-2)
    opt_b = optim.Adam(b.parameters(), lr=1e-2)
    train = cupynn.compile(a, "mse", optimizer=opt_a)
    for k in range(5):
        if k == 3:
            opt_a.lr = opt_b.lr = 2e-3
        x = cp.asarray(rng.standard_normal((1000, 1)))
        t = cp.sin(3 * x)
        v_a = float(train(x, t))
        v_b, g = cupynn.value_and_grad(b, x, "mse", target=t)
        opt_b.step(g)
        assert v_a == float(v_b), k
    np.testing.assert_array_equal(cupynn.get_flat(a), cupynn.get_flat(b))
    assert opt_a.step_count == opt_b.step_count == 5


def test_gpu_flat_value_and_grad(cp, rng):
    model = cupynn.MLP([1, 16, 1], "tanh", device="cuda", rng=0)
    x = cp.linspace(-1, 1, 64).reshape(-1, 1)
    f = cupynn.flat_value_and_grad(model, x, "mse", target=cp.sin(2 * x))
    value, grad = f(cupynn.get_flat(model))
    host = cupynn.MLP([1, 16, 1], "tanh", device="cpu", rng=0)
    v2, g2 = cupynn.flat_value_and_grad(host, x.get(), "mse", target=np.sin(2 * x.get()))(
        cupynn.get_flat(host))
    assert abs(value - v2) <= 1e-12 * abs(v2) and rel(grad, g2) <= 1e-12
