"""What a captured CUDA graph reads must be owned by the graph (or by the caller).

During capture (``backend.kernels.keep_alive`` set) every buffer a launch reads or writes must be
either one of the caller's arrays (x, the parameters, a C-contiguous target) or a buffer the
backend allocated through ``_empty`` (which the capture keeps). A temporary made elsewhere
-- a contiguous copy of a strided target, say -- is freed when the capturing call returns,
and every replay would then read freed memory.  Nothing runs here: a stand-in module
records the arguments of each launch.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupynn.backends import cuda_backend as cb
from cupynn.backends.base import LayerSpec, LossSpec, NetSpec


class _RecordingModule:
    launches: list = []

    def __init__(self, code=None, options=(), name_expressions=(), **_):
        pass

    def get_function(self, name):
        def launch(grid, block, args, **_):
            _RecordingModule.launches.append((name, args))
        return launch


def _net(sizes, acts, dtype):
    return NetSpec(tuple(LayerSpec(i, o, a) for i, o, a in zip(sizes, sizes[1:], acts)),
                   np.dtype(dtype))


@pytest.mark.parametrize("what", ["grad", "value"])
@pytest.mark.parametrize("sizes,acts", [((1, 40, 5, 3), ("tanh", "identity", "identity")),
                                        ((6, 9, 3), ("gelu", "identity"))])
def test_capture_owns_every_buffer_it_reads(what, sizes, acts):
    rng = np.random.default_rng(7)
    net = _net(sizes, acts, "float64")
    params = [(rng.standard_normal((o, i)), rng.standard_normal(o)) for i, o in zip(sizes, sizes[1:])]
    x = rng.standard_normal((37, sizes[0]))
    wide = rng.standard_normal((sizes[-1], 37))
    target = wide.T  # (37, out), not C-contiguous: the backend has to copy it
    loss = LossSpec("sum_squares", target)
    be = cb.CudaBackend(xp=np, module_cls=_RecordingModule)
    for _ in range(2):  # the first call records a launch plan, the second replays it
        _RecordingModule.launches = []
        keep: list = []
        be.kernels.keep_alive = keep
        try:
            if what == "grad":
                be.network_value_and_grad(net, params, x, loss)
            else:
                be.network_value(net, params, x, loss)
        finally:
            be.kernels.keep_alive = None
        owned = {id(a) for a in keep} | {id(x)} | {id(a) for pair in params for a in pair}
        owned |= {id(d) for d in be.kernels.dummies()}
        assert _RecordingModule.launches
        for name, args in _RecordingModule.launches:
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray):
                    assert a is not target, f"{name} argument {i} is the strided target itself"
                    assert id(a) in owned, (
                        f"{name} argument {i} (shape {a.shape}) is neither the caller's nor "
                        "kept alive by the capture")


def test_strided_callable_gradient_is_owned():
    """A callable loss returning a strided dL/dy: the contiguous copy is the backend's."""
    rng = np.random.default_rng(3)
    net = _net((4, 7, 2), ("tanh", "identity"), "float64")
    params = [(rng.standard_normal((o, i)), rng.standard_normal(o)) for i, o in ((4, 7), (7, 2))]
    x = rng.standard_normal((11, 4))

    def loss(y):
        g = np.asfortranarray(2 * y)
        return float((y * y).sum()), g

    be = cb.CudaBackend(xp=np, module_cls=_RecordingModule)
    _RecordingModule.launches = []
    keep: list = []
    be.kernels.keep_alive = keep
    be.network_value_and_grad(net, params, x, LossSpec("callable", None, loss))
    be.kernels.keep_alive = None
    owned = {id(a) for a in keep} | {id(x)} | {id(a) for pair in params for a in pair}
    owned |= {id(d) for d in be.kernels.dummies()}
    for name, args in _RecordingModule.launches:
        for a in args:
            if isinstance(a, np.ndarray):
                assert id(a) in owned, name


def test_callable_loss_gradient_of_wrong_dtype_is_refused():
    rng = np.random.default_rng(4)
    net = _net((3, 2), ("identity",), "float64")
    params = [(rng.standard_normal((2, 3)), rng.standard_normal(2))]
    be = cb.CudaBackend(xp=np, module_cls=_RecordingModule)
    bad = LossSpec("callable", None, lambda y: (0.0, np.ones(y.shape, np.float32)))
    with pytest.raises(TypeError, match="dtype float32"):
        be.network_value_and_grad(net, params, rng.standard_normal((5, 3)), bad)
