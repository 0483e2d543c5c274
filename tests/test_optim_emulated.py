"""The optimizers' CUDA path on the CPU emulator: kernels/optim.cu through the real host code.

* the multi-tensor update against the NumPy backend (every kind, chunk boundaries +-1,
  parameters in two launch groups, float64 and float32), one launch per 16 arrays;
* the same under the emulator's address (+ alignment) and thread sanitizers;
* ``cupynn.compile(model, loss, optimizer=opt)`` through the GPU's host path, the CUDA
  graph replaced by the emulator's recorded launches: k compiled steps equal k eager steps
  (``value_and_grad`` + ``opt.step``) bit for bit, and the "graph" owns what it reads.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import cupynn
from cupynn import backends, optim
from cupynn.backends import cuda_backend as cb
from cupynn.backends import cuda_catalog, cuda_optim
from cupynn.backends.base import LayerSpec, NetSpec
from cupynn.backends.numpy_backend import NumpyBackend

emu = pytest.importorskip("cupynn.emulator", reason="the CPU emulator is not there")

pytestmark = pytest.mark.emulator

# chunk boundaries (512 elements per block) +-1, a scalar, and prime sizes
SHAPES = [(7, 3), (7,), (1, 511), (512,), (513,), (1,), (2, 257)]
KINDS = {  # kind -> (buffers, hyper)
    "sgd": ((), (0.05, 0.0, 0.0, 0.0, 0.0, 0.0)),
    "sgd-momentum": (("momentum_buffer",), (0.05, 0.9, 0.2, 0.0, 0.01, 0.0)),
    "sgd-nesterov": (("momentum_buffer",), (0.05, 0.9, 0.0, 0.0, 0.02, 1.0)),
    "adam": (("exp_avg", "exp_avg_sq"), (1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0)),
    "adam-l2": (("exp_avg", "exp_avg_sq"), (3e-3, 0.8, 0.99, 1e-6, 0.05, 0.0)),
    "adamw": (("exp_avg", "exp_avg_sq"), (3e-3, 0.85, 0.995, 1e-7, 0.1, 0.0)),
}
OPT_NAMES = cuda_optim.kernel_names_all()[0][1]


def _backend(module_cls=emu.EmulatedModule):
    try:
        be = cb.CudaBackend(xp=np, module_cls=module_cls)
        be.kernels.warm_up(cuda_optim.SOURCE, OPT_NAMES, workers=2, modules=1)
    except Exception as exc:  # pragma: no cover - no compiler
        pytest.skip(f"emulator unusable: {exc}")
    return be


@pytest.fixture(scope="module")
def be():
    return _backend()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny)


def run_both(be, kind, shapes, dtype, steps, rng):
    """The same updates on ``be`` and on the NumPy backend; returns both sides."""
    buffers, hyper = KINDS[kind]
    base = kind.split("-")[0]
    ref = NumpyBackend()
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    sides = []
    for backend in (be, ref):
        state = backend.optimizer_state(base, shapes, dtype, buffers)
        sides.append([state, [p.copy() for p in params]])
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        for backend, (state, ps) in zip((be, ref), sides):
            backend.optimizer_step(state, hyper, ps, [g.copy() for g in grads])
    return sides


@pytest.mark.parametrize("kind", list(KINDS))
def test_update_matches_numpy_float64(be, rng, kind):
    (st, ps), (st_r, ps_r) = run_both(be, kind, SHAPES, np.float64, 4, rng)
    be.kernels.launch_log = []
    for i, (a, b) in enumerate(zip(ps, ps_r)):
        assert rel(a, b) <= 1e-12, f"parameter {i} {a.shape}: {rel(a, b):.2e}"
    for name in st.buffers:
        for i, (a, b) in enumerate(zip(st.buffers[name], st_r.buffers[name])):
            assert rel(a, b) <= 1e-12, f"{name}[{i}]: {rel(a, b):.2e}"
    assert be.optimizer_get_step(st) == 4
    assert all((g.steps == 4).all() for g in st.impl.groups)  # every block's copy counted


@pytest.mark.parametrize("kind", ["sgd-nesterov", "adamw"])
def test_update_matches_numpy_float32(be, rng, kind):
    (st, ps), (st_r, ps_r) = run_both(be, kind, SHAPES, np.float32, 3, rng)
    for a, b in zip(ps, ps_r):
        assert a.dtype == np.float32 and rel(a, b) <= 1e-6


def test_one_launch_per_sixteen_arrays(be, rng):
    buffers, hyper = KINDS["adam"]
    for n, launches in ((16, 1), (18, 2)):
        shapes = [(3 + i % 5, 2) if i % 2 == 0 else (3 + i % 5,) for i in range(n)]
        params = [rng.standard_normal(s) for s in shapes]
        state = be.optimizer_state("adam", shapes, np.float64, buffers)
        ref = NumpyBackend()
        state_r = ref.optimizer_state("adam", shapes, np.float64, buffers)
        ps_r = [p.copy() for p in params]
        be.kernels.launch_log = []
        for _ in range(2):
            grads = [rng.standard_normal(s) for s in shapes]
            be.optimizer_step(state, hyper, params, grads)
            ref.optimizer_step(state_r, hyper, ps_r, grads)
        log = be.kernels.launch_log
        be.kernels.launch_log = None
        assert [name for _, name in log] == ["cupynn::multi_tensor_step<double>"] * (2 * launches)
        for a, b in zip(params, ps_r):
            assert rel(a, b) <= 1e-12


def test_step_count_is_set_on_every_block(be, rng):
    buffers, hyper = KINDS["adam"]
    state = be.optimizer_state("adam", SHAPES, np.float64, buffers)
    be.optimizer_set_step(state, 7)
    assert be.optimizer_get_step(state) == 7
    params = [rng.standard_normal(s) for s in SHAPES]
    be.optimizer_step(state, hyper, params, [rng.standard_normal(s) for s in SHAPES])
    assert all((g.steps == 8).all() for g in state.impl.groups)


def test_launch_checks_say_what_is_wrong(be, rng):
    buffers, hyper = KINDS["adam"]
    state = be.optimizer_state("adam", [(3, 2)], np.float64, buffers)
    with pytest.raises(cb.CudaLaunchError, match=r"gradient 0: expected shape \(3, 2\)"):
        be.optimizer_step(state, hyper, [rng.standard_normal((3, 2))], [rng.standard_normal(6)])


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_update_clean_under_sanitizer(sanitizer, rng):
    from cupynn.emulator.testing import sanitizer_available

    ok, why = sanitizer_available(sanitizer)
    if not ok:
        pytest.skip(f"sanitizer {sanitizer!r} unavailable: {why}")
    sbe = _backend(functools.partial(emu.EmulatedModule, sanitizer=sanitizer))
    shapes = SHAPES + [(5,)] * 10  # 17 arrays: two launch groups
    for kind in ("sgd-momentum", "adamw"):
        (st, ps), (_, ps_r) = run_both(sbe, kind, shapes, np.float64, 2, rng)
        for a, b in zip(ps, ps_r):
            assert rel(a, b) <= 1e-12


# -- the compiled training step, through the GPU's host path ------------------------------

SIZES, ACTS, BATCH = (1, 24, 6, 1), ("tanh", "tanh", "identity"), 37


@pytest.fixture
def emulated(be, monkeypatch):
    """The emulated CUDA backend behind device 'cpu': models built from NumPy arrays run
    the CUDA backend's host code (functional checks, launch plans, the compiled step)."""
    net = NetSpec(tuple(LayerSpec(i, o, a) for i, o, a in zip(SIZES, SIZES[1:], ACTS)),
                  np.dtype(np.float64))
    be.warm_up(sorted(cuda_catalog.kernel_names_for(net, BATCH)), workers=2, modules=2)
    monkeypatch.setitem(backends._BACKENDS, "cpu", be)
    be.kernels.poison = True
    yield be
    be.kernels.poison = False
    be.kernels.launch_log = None


def _twin_models(rng):
    layers = [(rng.standard_normal((o, i)) / np.sqrt(i), rng.standard_normal(o))
              for i, o in zip(SIZES, SIZES[1:])]

    def make():
        return cupynn.Chain(*[cupynn.Dense.from_arrays(W, b, a) for (W, b), a in zip(layers, ACTS)])

    return make(), make()


def _flat(model):
    return [a for l in model.layers for a in (l.weight, l.bias)]


@pytest.mark.parametrize("name,kwargs,per_call_target", [
    ("Adam", dict(lr=1e-2, weight_decay=0.01), True),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), False),
])
def test_compiled_steps_equal_eager_steps_bit_for_bit(emulated, rng, name, kwargs,
                                                      per_call_target):
    be = emulated
    a, b = _twin_models(rng)
    opt_a = getattr(optim, name)(a.parameters(), **kwargs)
    opt_b = getattr(optim, name)(b.parameters(), **kwargs)
    fixed = None if per_call_target else rng.standard_normal((BATCH, 1))
    step = cupynn.compile(a, "mse", target=fixed, optimizer=opt_a)
    for k in range(4):
        if k == 2:  # a schedule: the next replay must see it
            opt_a.lr = opt_b.lr = kwargs["lr"] / 4
        x = rng.standard_normal((BATCH, 1))
        t = rng.standard_normal((BATCH, 1)) if per_call_target else fixed
        be.kernels.launch_log = []
        v_a = step(x, t) if per_call_target else step(x)
        n_compiled = len(be.kernels.launch_log)
        v_b, g = cupynn.value_and_grad(b, x, "mse", target=t)
        opt_b.step(g)
        assert v_a.tobytes() == v_b.tobytes(), f"step {k}: {float(v_a)} != {float(v_b)}"
        for i, (p, q) in enumerate(zip(_flat(a), _flat(b))):
            assert p.tobytes() == q.tobytes(), f"step {k}: parameter {i} differs"
        # one update launch in the step; the eager call launched the same kernels
        names = [n for _, n in be.kernels.launch_log]
        assert names[:n_compiled].count("cupynn::multi_tensor_step<double>") == 1
        assert names[:n_compiled] == names[n_compiled:]
    assert len(step._graphs) == 1 and opt_a.step_count == opt_b.step_count == 4
    for key in opt_a.state:
        for p, q in zip(opt_a.state[key], opt_b.state[key]):
            assert p.tobytes() == q.tobytes()
    before = [p.copy() for p in _flat(a)]
    step.forward(x, t)  # the loss alone: no update
    for p, q in zip(_flat(a), before):
        np.testing.assert_array_equal(p, q)


def test_compiled_step_graph_owns_what_it_reads(emulated, rng):
    a, _ = _twin_models(rng)
    opt = optim.Adam(a.parameters(), lr=1e-2)
    step = cupynn.compile(a, "mse", optimizer=opt)
    x, t = rng.standard_normal((BATCH, 1)), rng.standard_normal((BATCH, 1))
    step(x, t)
    (xs, ts, graph, _out, keep, _stream), = step._graphs.values()
    owned = {id(o) for o in keep} | {id(xs), id(ts)} | {id(p) for p in _flat(a)}
    owned |= {id(d) for d in emulated.kernels.dummies()}
    impl = opt._state.impl
    owned |= {id(impl.hyper)} | {id(o) for g in impl.groups for o in (g.layout, g.steps, *g.flat)}
    assert graph.launches
    for _rng, name, _fn, _grid, args in graph.launches:
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                assert id(arg) in owned, f"{name} argument {i} {arg.shape} is not owned"


def test_compiled_step_refuses_rebound_parameters(emulated, rng):
    a, b = _twin_models(rng)
    opt = optim.Adam(a.parameters(), lr=1e-2)
    step = cupynn.compile(a, "mse", optimizer=opt)
    x = rng.standard_normal((BATCH, 1))
    step(x)
    a.load_parameters(b.parameters())
    with pytest.raises(RuntimeError, match="rebound"):
        step(x)
