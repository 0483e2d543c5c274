"""A compiled training step whose capture fails after its first, real, update leaves the
parameters and the optimizer as they were: the CUDA host path on the CPU emulator, with a
failure injected after every check (in the capture)."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import backends, optim
from cupynn.backends import cuda_catalog
from cupynn.backends.base import LayerSpec, NetSpec

emu = pytest.importorskip("cupynn.emulator", reason="the CPU emulator is not there")

from .test_optim_emulated import ACTS, BATCH, SIZES, _backend, _flat, _twin_models  # noqa: E402

pytestmark = pytest.mark.emulator


@pytest.fixture
def emulated(monkeypatch):
    be = _backend()
    net = NetSpec(tuple(LayerSpec(i, o, a) for i, o, a in zip(SIZES, SIZES[1:], ACTS)),
                  np.dtype(np.float64))
    be.warm_up(sorted(cuda_catalog.kernel_names_for(net, BATCH)), workers=2, modules=2)
    monkeypatch.setitem(backends._BACKENDS, "cpu", be)
    yield be


def _state(model, opt):
    return ([p.tobytes() for p in _flat(model)]
            + [b.tobytes() for bufs in opt.state.values() for b in bufs] + [opt.step_count])


def test_a_failed_capture_undoes_the_first_step(emulated, rng, monkeypatch):
    from cupynn.backends import cuda_launch

    a, b = _twin_models(rng)
    opt_a, opt_b = optim.Adam(a.parameters(), lr=1e-2), optim.Adam(b.parameters(), lr=1e-2)
    x, t = rng.standard_normal((BATCH, 1)), rng.standard_normal((BATCH, 1))
    _, g = cupynn.value_and_grad(a, x, "mse", target=t)
    opt_a.step(g)  # a state that is not zero
    _, g = cupynn.value_and_grad(b, x, "mse", target=t)
    opt_b.step(g)
    step = cupynn.compile(a, "mse", optimizer=opt_a)
    before = _state(a, opt_a)

    def fail(self):
        raise RuntimeError("injected: the capture failed")

    with monkeypatch.context() as mp:
        mp.setattr(cuda_launch.EmulatedStream, "begin_capture", fail)
        with pytest.raises(RuntimeError, match="injected"):
            step(x, t)
    assert _state(a, opt_a) == before
    v_a = step(x, t)  # and the step works afterwards, as an eager step does
    v_b, g = cupynn.value_and_grad(b, x, "mse", target=t)
    opt_b.step(g)
    assert v_a.tobytes() == v_b.tobytes() and _state(a, opt_a) == _state(b, opt_b)
