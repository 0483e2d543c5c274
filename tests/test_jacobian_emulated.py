"""The CUDA path of cupynn.jacobian / cupynn.second_order on the CPU emulator, against NumPy.

``CudaBackend(xp=numpy, module_cls=EmulatedModule)`` runs kernels/jacobian.cu (the Jacobian
rows), the dense kernels (the forward, and the Gramian through the weight-gradient GEMM) and
kernels/derivatives.cu (the PDE rows) through the real host code, in the NumPy backend's
place for the duration of a test. Outputs are poisoned with NaN before the kernels run.
Sizes are tiny: the emulator is slow.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import backends
from cupynn import functional as F
from cupynn.backends import cuda_backend as cb
from cupynn.backends import cuda_catalog, cuda_jacobian, cuda_taylor

from .conftest import random_model
from .reference import rel_err

pytestmark = pytest.mark.emulator


def _pipeline(rng, optimizers=True):
    """Every call the comparison makes, on whatever backend serves NumPy arrays (the
    optimizers launch no kernel the other calls do not: the dry run leaves them out)."""
    model = random_model([2, 9, 7, 2], ["tanh", "silu", "identity"], "float64", rng)
    pinn = random_model([2, 6, 5, 1], ["tanh", "tanh", "identity"], "float64", rng)
    nobias = random_model([3, 4, 1], ["gelu", "identity"], "float64", rng, bias=False)
    x = rng.uniform(-1, 1, (13, 2))
    xf = np.asfortranarray(rng.uniform(-1, 1, (5, 3)))
    xi, xb = rng.uniform(size=(11, 2)), rng.uniform(size=(4, 2))
    pde = cupynn.PDEResiduals(xi, "helmholtz", k=1.5, rhs=rng.standard_normal(11), boundary=xb,
                              boundary_values=rng.standard_normal(4), chunk_rows=4)
    dz, h = rng.standard_normal((3, 4, 2, 5)), rng.standard_normal((3, 4, 6))
    rows = np.full((8, 40), 7.0)
    F.jacobian_rows(dz, h, rows, col=3)
    rest = [
        cupynn.jacobian(model, x),
        cupynn.jacobian(model, x[:1]),
        cupynn.jacobian(model, x[:0]),
        cupynn.jacobian(nobias, xf),
        cupynn.gramian(model, x, chunk_rows=5),
        cupynn.gramian(pinn, x),
        *pde.jacobian(pinn),
        rows,
    ]
    fit = random_model([1, 6, 1], ["tanh", "identity"], "float64", rng)
    xs = np.linspace(-1, 1, 9).reshape(-1, 1)
    if optimizers:
        lm = cupynn.levenberg_marquardt(fit, xs, np.sin(2 * xs), iterations=3)
        eng = cupynn.energy_natural_gradient(pinn, pde, iterations=2)
        fits = [np.array(lm.loss), cupynn.get_flat(fit), np.array(eng.loss), cupynn.get_flat(pinn)]
    else:  # the kernels the optimizers launch: the same shapes' forward, Jacobian, PDE rows
        fits = [fit(xs), cupynn.jacobian(fit, xs), pinn(xi), pinn(xb), *pde.jacobian(pinn)]
    return rest + fits


@pytest.fixture(scope="module")
def be():
    emu = pytest.importorskip("cupynn.emulator")
    try:
        backend = cb.CudaBackend(xp=np, module_cls=emu.EmulatedModule)
    except Exception as exc:  # pragma: no cover - no compiler
        pytest.skip(f"emulator unusable: {exc}")
    dry = cb.CudaBackend(xp=np, module_cls=cuda_catalog.NameCollector)
    dry.kernels.launch_log = []
    saved = backends._BACKENDS["cpu"]
    backends._BACKENDS["cpu"] = dry
    try:
        with np.errstate(all="ignore"):
            _pipeline(np.random.default_rng(0), optimizers=False)
    finally:
        backends._BACKENDS["cpu"] = saved
    dense = sorted({n for _, n in dry.kernels.launch_log
                    if n.startswith("cupynn::dense") or n.startswith("cupynn::reduce")})
    backend.kernels.warm_up(cuda_jacobian.SOURCE, [n for _, ns in cuda_jacobian.kernel_names_all()
                                                   for n in ns], workers=2, modules=1)
    backend.kernels.warm_up(cuda_taylor.SOURCE, [n for _, ns in cuda_taylor.kernel_names_all()
                                                 for n in ns], workers=2, modules=1)
    backend.kernels.warm_up("dense.cu", dense, workers=2, modules=min(2, len(dense)))
    backend.kernels.poison = True
    return backend


def test_jacobian_rows_kernel_matches_numpy(be, rng):
    ref = backends.get_backend("cpu")
    for nb, B, m, n, k, has_b in ((1, 5, 1, 3, 4, True), (4, 3, 2, 5, 2, False), (1, 1, 3, 1, 1, True),
                                  (2, 0, 1, 3, 2, True)):
        dz, h = rng.standard_normal((nb, B, m, n)), rng.standard_normal((nb, B, k))
        width = n * k + (n if has_b else 0)
        got = np.full((B * m, width + 5), np.nan)
        want = got.copy()
        be.jacobian_rows(dz, h, got, 2, has_b)
        ref.jacobian_rows(dz, h, want, 2, has_b)
        assert np.array_equal(np.isnan(got), np.isnan(want))   # nothing outside the columns
        ok = ~np.isnan(want)
        assert rel_err(got[ok], want[ok]) < 1e-14


def test_whole_computation_matches_numpy(be, monkeypatch):
    want = _pipeline(np.random.default_rng(1))
    be.kernels.launch_log = []
    monkeypatch.setitem(backends._BACKENDS, "cpu", be)
    try:
        got = _pipeline(np.random.default_rng(1))
        launched = {n for _, n in be.kernels.launch_log}
    finally:
        be.kernels.launch_log = None
    assert "cupynn::jacobian_rows<double>" in launched
    assert any(n.startswith("cupynn::dense") for n in launched)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        assert not np.isnan(g).any(), i
        # the optimizers' results (the last 4) go through ill-conditioned solves, which
        # amplify the kernels' last-bit differences from NumPy's BLAS
        assert rel_err(g, w) < (1e-8 if i >= len(want) - 4 else 1e-12), i


# -- the kernel alone (no backend: cheap enough for the mutation harness's selections) --------

def _rows_function(sanitizer=None):
    from cupynn.emulator.testing import emulated_module, kernels_dir, sanitizer_available

    if sanitizer:
        ok, why = sanitizer_available(sanitizer)
        if not ok:
            pytest.skip(f"{sanitizer} sanitizer unavailable: {why}")
    name = cuda_jacobian.rows_name("double")
    return emulated_module(kernels_dir() / cuda_jacobian.SOURCE, (name,),
                           sanitizer=sanitizer).get_function(name)


def _rows_args(dz, h, has_b, ld, col, out):
    nb, B, m, n = dz.shape
    i32, i64 = np.int32, np.int64
    return (dz, h, i32(nb), i64(B), i64(m), i64(n), i64(h.shape[2]), i32(has_b), i64(ld), i64(col), out)


@pytest.mark.parametrize("sanitizer", [None, "address"])
def test_jacobian_rows_kernel_exact_block_order_and_edges(rng, sanitizer):
    """Every column of the written block (the last outer-product column, every bias column)
    and nothing outside it; the stack-block sum runs s = 0, 1, ... (one element whose sum in
    any other order differs: 1 + 1e17 - 1e17 is 0 in order, 1 reversed).  Under ASan too: a
    thread past the last row reads NaN from the guard canaries of the default mode and writes
    that NaN, bit for bit the canary, past `out` -- a write the canary check cannot see."""
    f = _rows_function(sanitizer)
    nb, B, m, n, k = 3, 3, 2, 3, 4
    dz, h = rng.standard_normal((nb, B, m, n)), rng.standard_normal((nb, B, k))
    dz[:, 1, 0, 2] = 1.0
    h[:, 1, 3] = (1.0, 1e17, -1e17)  # row 2's last outer-product column: 1 + 1e17 - 1e17
    for has_b in (1, 0):
        width = n * k + n * has_b
        col, ld = 2, n * k + n * has_b + 5
        out = np.full((B * m, ld), np.nan)
        f((-(-B * m * width // 256),), (256,), _rows_args(dz, h, has_b, ld, col, out))
        assert np.isnan(out[:, :col]).all()  # nothing before the block
        assert np.isnan(out[:, col + width:]).all()  # nothing past the block
        ref = np.einsum("sboi,sbj->boij", dz, h).reshape(B * m, n * k)
        got = out[:, col:col + n * k]
        ok = np.ones_like(got, bool)
        ok[2, 2 * k + 3] = False
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-13, atol=1e-13)
        assert got[2, 2 * k + 3] == 0.0  # in order s = 0, 1, 2
        if has_b:
            np.testing.assert_array_equal(out[:, col + n * k:col + width], dz[0].reshape(B * m, n))


def test_jacobian_rows_sparse_mode_past_2_31():
    """R x ld = 2^31 + 800 output elements: the last two blocks run on lazily mapped arrays
    and must write the last rows (a 32-bit output offset wraps below `out`)."""
    emu = pytest.importorskip("cupynn.emulator")
    nb, m, n, k, has_b = 1, 1, 2, 3, 1
    width = n * k + n
    ld, col = width, 0
    B = (1 << 28) + 100
    assert B * m * ld > 2**31
    dz = emu.sparse_array((nb, B, m, n), np.float64)
    h = emu.sparse_array((nb, B, k), np.float64)
    out = emu.sparse_array((B * m, ld), np.float64)
    rng = np.random.default_rng(11)
    last = 128  # rows of the last two 256-thread blocks (at most)
    dz[:, -last:] = rng.standard_normal((nb, last, m, n))
    h[:, -last:] = rng.standard_normal((nb, last, k))
    out[-last - 64:] = np.nan
    total = B * m * width
    nblocks = -(-total // 256)
    f = _rows_function()
    f((nblocks,), (256,), _rows_args(dz, h, has_b, ld, col, out), blocks=(nblocks - 2, 2))
    rows = total - (nblocks - 2) * 256  # elements the last two blocks own
    assert rows % width == 0
    rows //= width
    want_w = (dz[0, -rows:, 0, :, None] * h[0, -rows:, None, :]).reshape(rows, n * k)
    np.testing.assert_array_equal(out[-rows:, :n * k], want_w)
    np.testing.assert_array_equal(out[-rows:, n * k:], dz[0, -rows:, 0, :])
    assert np.isnan(out[-rows - 1]).all()  # the block before the range did not run
