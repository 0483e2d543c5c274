"""Our kernels under the emulator's address and thread modes (compute-sanitizer's memcheck
and racecheck on the CPU): the small cases of ``case_sanitizer_subset``, which reach every
kernel kind and math path, must run without a report and match the NumPy backend.

The address mode also checks alignment (a misaligned 16-byte shared-memory read faults on
the GPU and passes silently on x86).  .ci/gpu runs the same cases under compute-sanitizer.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from cupynn.backends import cuda_backend as cb

from .test_kernels_emulated import case_sanitizer_subset, dry_call, kernels_used

emu = pytest.importorskip("cupynn.emulator", reason="the CPU emulator is not there")
from cupynn.emulator.testing import sanitizer_available  # noqa: E402

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_kernels_clean_under_sanitizer(sanitizer, monkeypatch):
    ok, why = sanitizer_available(sanitizer)
    if not ok:
        pytest.skip(f"sanitizer {sanitizer!r} unavailable: {why}")
    names = kernels_used(lambda dry: dry_call(case_sanitizer_subset, be=dry, xp=np,
                                              rng=np.random.default_rng(0),
                                              monkeypatch=pytest.MonkeyPatch()))
    assert len(names) >= 10, names
    be = cb.CudaBackend(xp=np, module_cls=functools.partial(emu.EmulatedModule,
                                                            sanitizer=sanitizer))
    be.warm_up(names, workers=2, modules=2)
    be.kernels.poison = True
    be.fused.enabled = False  # the per-layer kernels; tests/test_fused.py sanitizes the fused ones
    case_sanitizer_subset(be, np, np.random.default_rng(11), monkeypatch)
