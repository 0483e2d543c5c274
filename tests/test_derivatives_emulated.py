"""The CUDA path of cupynn.derivatives on the CPU emulator, against the NumPy path.

``CudaBackend(xp=numpy, module_cls=EmulatedModule)`` runs kernels/derivatives.cu (and the
dense kernels for the stacked GEMMs) through the real host code. The elementwise step is
compared for every activation and second-order mode; the whole computation
(``input_derivatives``, ``residual_value_and_grad``) by putting the emulated backend in
the NumPy backend's place for the duration of a test (its arrays are NumPy arrays).
Outputs are poisoned with NaN before the kernels run. Sizes are tiny: the emulator is slow.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import backends
from cupynn.activations import ACTIVATIONS
from cupynn.backends import cuda_backend as cb
from cupynn.backends import cuda_catalog, cuda_taylor
from cupynn.backends.base import taylor_blocks
from cupynn.backends.cuda_launch import CudaLaunchError
from cupynn.backends.numpy_backend import NumpyBackend

from .conftest import random_model
from .reference import rel_err

pytestmark = pytest.mark.emulator

REF = NumpyBackend()
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def _close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN positions differ"
    assert rel_err(got[~nan], want[~nan]) <= TOL[np.dtype(dtype)], what


def _pipeline(rng):
    """Every public call the tests below make, on whatever backend serves NumPy arrays."""
    model = random_model([2, 9, 7, 1], ["tanh", "silu", "identity"], "float64", rng)
    multi = random_model([3, 5, 2], ["gelu", "sigmoid"], "float64", rng)
    x = rng.uniform(-1, 1, (13, 2))
    f = rng.standard_normal(13)
    xs = np.asfortranarray(rng.uniform(-1, 1, (5, 3)))

    def res(u, du, d2):
        return (u * u).sum() + (du * d2).sum(), 2 * u, d2.copy(), du.copy()

    return [
        cupynn.input_derivatives(model, x),
        cupynn.input_derivatives(model, x[:1]),
        cupynn.input_derivatives(model, x[:0]),
        cupynn.residual_value_and_grad(model, x, "poisson", rhs=f),
        cupynn.residual_value_and_grad(model, x, "helmholtz", rhs=f, k=1.5),
        cupynn.input_derivatives(multi, xs, diag=True),
        cupynn.residual_value_and_grad(multi, xs, res, diag=True),
    ]


@pytest.fixture(scope="module")
def be():
    emu = pytest.importorskip("cupynn.emulator")
    try:
        backend = cb.CudaBackend(xp=np, module_cls=emu.EmulatedModule)
    except Exception as exc:  # pragma: no cover - no compiler
        pytest.skip(f"emulator unusable: {exc}")
    # The kernels the tests need, found on a backend that launches nothing, built up front
    # into a few modules (one g++ each) instead of one module per kernel.
    dry = cb.CudaBackend(xp=np, module_cls=cuda_catalog.NameCollector)
    dry.kernels.launch_log = []
    saved = backends._BACKENDS["cpu"]
    backends._BACKENDS["cpu"] = dry
    try:
        with np.errstate(all="ignore"):
            _pipeline(np.random.default_rng(0))
    finally:
        backends._BACKENDS["cpu"] = saved
    dense = sorted({n for _, n in dry.kernels.launch_log if n.startswith("cupynn::dense")}
                   | {n for _, n in dry.kernels.launch_log if n.startswith("cupynn::reduce")})
    backend.kernels.warm_up(cuda_taylor.SOURCE, [n for _, names in cuda_taylor.kernel_names_all()
                                                 for n in names], workers=2, modules=1)
    backend.kernels.warm_up("dense.cu", dense, workers=2, modules=min(2, len(dense)))
    backend.kernels.poison = True
    return backend


@pytest.mark.parametrize("second", ["none", "laplacian", "diagonal"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_taylor_step_every_activation(be, rng, second, dtype):
    for name in ACTIVATIONS:
        for d in (1, 3):
            nb = taylor_blocks(d, second)
            z = rng.standard_normal((nb, 7, 5)).astype(dtype)
            z[0, 3, 2] = np.nan  # a NaN pre-activation: NaN where NumPy has it
            b = rng.standard_normal(5).astype(dtype) if d == 1 else None
            g = rng.standard_normal(z.shape).astype(dtype)
            out = be.taylor_activation_forward(z, b, name, d=d, second=second)
            want = REF.taylor_activation_forward(z, b, name, d=d, second=second)
            _close(out, want, dtype, f"{name} d={d} forward")
            gz = be.taylor_activation_backward(g, z, want[0], b, name, d=d, second=second)
            _close(gz, REF.taylor_activation_backward(g, z, want[0], b, name, d=d, second=second),
                   dtype, f"{name} d={d} backward")


def test_taylor_step_tile_edges_and_empty(be, rng):
    for B, N in ((1, 1), (257, 1), (3, 86), (0, 4)):  # 256-thread blocks: +-1 around one block
        z = rng.standard_normal((4, B, N))
        b = rng.standard_normal(N)
        out = be.taylor_activation_forward(z, b, "gelu_erf", d=2, second="laplacian")
        want = REF.taylor_activation_forward(z, b, "gelu_erf", d=2, second="laplacian")
        _close(out, want, "float64", f"forward {B}x{N}")
        g = rng.standard_normal(z.shape)
        _close(be.taylor_activation_backward(g, z, want[0], b, "gelu_erf", d=2, second="laplacian"),
               REF.taylor_activation_backward(g, z, want[0], b, "gelu_erf", d=2, second="laplacian"),
               "float64", f"backward {B}x{N}")


def test_taylor_step_checks_its_arguments(be, rng):
    z = rng.standard_normal((4, 3, 5))
    with pytest.raises(CudaLaunchError, match=r"b: expected shape \(5,\), got \(4,\)"):
        be.taylor_activation_forward(z, np.zeros(4), "tanh", d=2, second="laplacian")
    with pytest.raises(CudaLaunchError, match=r"z: expected shape \(5, 3, 5\)"):
        be.taylor_activation_forward(z, None, "tanh", d=2, second="diagonal")
    with pytest.raises(CudaLaunchError, match="y: expected dtype float64, got float32"):
        be.taylor_activation_backward(z, z, z[0].astype(np.float32), None, "tanh", d=2,
                                      second="laplacian")


def test_whole_computation_matches_numpy(be, monkeypatch):
    want = _pipeline(np.random.default_rng(1))
    be.kernels.launch_log = []
    monkeypatch.setitem(backends._BACKENDS, "cpu", be)
    try:
        got = _pipeline(np.random.default_rng(1))
        launched = {n for _, n in be.kernels.launch_log}
    finally:
        be.kernels.launch_log = None
    assert {"cupynn::taylor_forward<double>", "cupynn::taylor_backward<double>"} <= launched
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w[1], (list, dict)):  # (value, grads)
            _close(g[0], w[0], "float64", f"call {i} value")
            gl = g[1] if isinstance(g[1], list) else [g[1]]
            wl = w[1] if isinstance(w[1], list) else [w[1]]
            for l, (a, b) in enumerate(zip(gl, wl)):
                _close(a["weight"], b["weight"], "float64", f"call {i} dW[{l}]")
                _close(a["bias"], b["bias"], "float64", f"call {i} db[{l}]")
        else:
            for a, b in zip(g, w):
                _close(a, b, "float64", f"call {i}")


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_taylor_step_clean_under_sanitizer(sanitizer, rng):
    """The Taylor kernels under the emulator's address / thread modes (memcheck / racecheck)."""
    import functools

    emu = pytest.importorskip("cupynn.emulator")
    from cupynn.emulator.testing import sanitizer_available

    ok, why = sanitizer_available(sanitizer)
    if not ok:
        pytest.skip(f"sanitizer {sanitizer!r} unavailable: {why}")
    sbe = cb.CudaBackend(xp=np, module_cls=functools.partial(emu.EmulatedModule, sanitizer=sanitizer))
    sbe.kernels.poison = True
    for B, N, second in ((257, 3, "laplacian"), (3, 86, "diagonal")):
        z = rng.standard_normal((taylor_blocks(2, second), B, N))
        b = rng.standard_normal(N)
        out = sbe.taylor_activation_forward(z, b, "tanh", d=2, second=second)
        want = REF.taylor_activation_forward(z, b, "tanh", d=2, second=second)
        _close(out, want, "float64", f"forward {B}x{N}")
        g = rng.standard_normal(z.shape)
        _close(sbe.taylor_activation_backward(g, z, want[0], b, "tanh", d=2, second=second),
               REF.taylor_activation_backward(g, z, want[0], b, "tanh", d=2, second=second),
               "float64", f"backward {B}x{N}")
