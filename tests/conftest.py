"""Shared helpers for the tests: random models and the reference comparison.

Tests marked ``slow`` (the sanitizer runs, the wheel install, the full benchmark smoke
run, NVRTC compilations) are skipped unless pytest runs with ``--slow`` (or
``CUPYNN_SLOW_TESTS=1``); CI (``.ci/run``) passes it. The README's test command leaves
them out so that it finishes in a few minutes.
"""

from __future__ import annotations

import os
import re
import zlib

import numpy as np
import pytest

import cupynn

TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (sanitizers, wheel install, NVRTC, the "
                          "full benchmark smoke run); CI does")
    parser.addoption("--emu-schedules", choices=("one", "all"), default=None,
                     help="emulator tests: under one non-default schedule each (the default), or "
                          "under every schedule of cupynn.emulator.SCHEDULES (the default with --slow)")


def _all_schedules(config) -> bool:
    choice = config.getoption("--emu-schedules")
    if choice is not None:
        return choice == "all"
    return bool(config.getoption("--slow") or os.environ.get("CUPYNN_SLOW_TESTS") == "1")


def pytest_generate_tests(metafunc):
    # Every emulator test runs under the adversarial fiber/block schedules of the emulator:
    # all of them with --slow (a parameter), one per test otherwise (the emu_schedule fixture).
    if "emu_schedule" in metafunc.fixturenames and _all_schedules(metafunc.config) \
            and metafunc.definition.get_closest_marker("emulator") is not None:
        from cupynn.emulator import SCHEDULES

        metafunc.parametrize("emu_schedule", SCHEDULES, indirect=True, ids=lambda s: f"sched={s}")


@pytest.fixture(autouse=True)
def emu_schedule(request):
    """The emulator schedule this test runs under (emulator tests only; see --emu-schedules)."""
    if request.node.get_closest_marker("emulator") is None:
        yield None
        return
    try:
        from cupynn.emulator import SCHEDULES, schedule
    except Exception:  # no emulator: nothing to set
        yield None
        return
    spec = getattr(request, "param", None) or os.environ.get("CUPYNN_EMU_SCHEDULE") or None
    if spec is None:  # the quick set: one non-default schedule, chosen by the test's id
        others = [s for s in SCHEDULES if s != "default"]
        spec = others[zlib.crc32(request.node.nodeid.encode()) % len(others)]
    with schedule(spec):
        yield spec


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("CUPYNN_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: `python -m pytest --slow` runs it (CI does)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


_EMULATOR_BUILT: list = []


def _say(request, line: str) -> None:
    """Print a line now, past pytest's output capture (a progress note in a fixture)."""
    if request is None:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def emulated_cuda_backend(request=None):
    """A CudaBackend running on the CPU emulator, every kernel instantiation built.

    The instantiations of each kernel source go into two modules (two g++ at a time,
    about half a minute on two cores when nothing is cached), the same two for every
    test module and every run: the loader caches the modules in the process and the
    emulator caches the builds on disk by the hash of the sources (``CUPYNN_EMU_CACHE``),
    so an unchanged kernel is built once. Building them all also checks that every
    instantiation compiles under the emulator's dialect."""
    import time

    from cupynn.backends import cuda_catalog
    from cupynn.backends.cuda_backend import CudaBackend
    from cupynn.emulator import EmulatedModule

    backend = CudaBackend(xp=np, module_cls=EmulatedModule)
    catalog = cuda_catalog.all_instantiations()
    first = not _EMULATOR_BUILT
    if first:
        _say(request, f"(emulator: {sum(len(n) for _, n in catalog)} kernel instantiations, "
                      "2 modules, g++ -- half a minute the first time, cached by source hash)")
    t0 = time.perf_counter()
    for source, names in catalog:
        backend.kernels.warm_up(source, names, workers=2, modules=2)
    if first:
        _EMULATOR_BUILT.append(True)
        _say(request, f"(emulator: kernels ready in {time.perf_counter() - t0:.0f} s)")
    return backend


def random_model(sizes, activations, dtype, rng, *, bias=True, device="cpu", scale=1.0):
    """A Chain with fresh random parameters (never zeros), built from host arrays."""
    if isinstance(activations, str):
        activations = [activations] * (len(sizes) - 1)
    layers = []
    for (n_in, n_out), act in zip(zip(sizes, sizes[1:]), activations):
        W = (rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)).astype(dtype)
        b = rng.standard_normal(n_out).astype(dtype) if bias else None
        layers.append(cupynn.Dense.from_arrays(W, b, act))
    return cupynn.Chain(*layers).to(device)


def host_params(model):
    to_host = cupynn.backends.get_backend(model.device).to_host
    return [(to_host(l.weight), None if l.bias is None else to_host(l.bias)) for l in model.layers]


def activations_of(model):
    return [l.activation.name for l in model.layers]


def gpu_reason() -> str | None:
    """Why the ``gpu`` tests cannot run here (None: CuPy and a GPU are usable)."""
    try:
        from cupynn._devices import cuda_available, cuda_unavailable_reason
    except Exception:  # pragma: no cover
        cuda_available = None
    try:
        import cupy
    except Exception as exc:
        return f"CuPy is not importable ({exc})"
    if cuda_available is not None and not cuda_available():
        return f"no usable GPU: {cuda_unavailable_reason()}"
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable GPU: {exc}"
    return None


@pytest.fixture(scope="module")
def cp():
    """CuPy, for the ``gpu`` tests (skipped with the reason where no GPU is usable);
    ``CUPYNN_TEST_NO_POOL=1`` turns CuPy's memory pool off (compute-sanitizer needs that to
    see small overruns)."""
    reason = gpu_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    if os.environ.get("CUPYNN_TEST_NO_POOL") == "1":
        cupy.cuda.set_allocator(None)
    return cupy


@pytest.fixture
def rng(request):
    # a fresh, reproducible stream per test (seeded from the test's name; the same under every
    # emulator schedule, so that the schedules see the same inputs)
    nodeid = re.sub(r"sched=[^-\]]*-?", "", request.node.nodeid).replace("[]", "")
    return np.random.default_rng(zlib.crc32(nodeid.encode()))
