"""`python -m cupynn selfcheck`: the GPU-vs-NumPy check the Docker image runs first."""

from __future__ import annotations

import numpy as np
import pytest

import cupynn
from cupynn import _selfcheck


def test_cpu_plumbing_passes(capsys):
    assert _selfcheck.main(["--device", "cpu", "--batch", "33", "--sizes", "3", "7", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "self-check passed" in out


def test_no_gpu_exits_2_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(cupynn, "cuda_available", lambda: False)
    assert _selfcheck.main([]) == 2
    assert "no usable GPU" in capsys.readouterr().out


def test_relative_error_catches_nan_and_wrong_shapes():
    reference = np.array([1.0, 2.0, 3.0])
    assert _selfcheck._relative_error(reference, reference) == 0.0
    assert _selfcheck._relative_error(reference * (1 + 1e-9), reference) == pytest.approx(1e-9)
    assert not _selfcheck._relative_error(np.array([1.0, np.nan, 3.0]), reference) <= 1.0
    assert _selfcheck._relative_error(reference[:2], reference) == float("inf")


def test_failed_comparison_fails(monkeypatch):
    result = _selfcheck.run_check(device="cpu", batch=7, sizes=(2, 5, 1))
    assert result.passed
    result.grad_error = float("nan")
    assert not result.passed


def test_sample_covers_every_template_and_dtype():
    from cupynn.backends import cuda_catalog

    for _, names in cuda_catalog.all_instantiations():
        sample = _selfcheck.sample_instantiations(names)
        assert set(sample) <= set(names)
        keys = {(n.split("<")[0], n.split("<")[1].split(",")[0].rstrip(">")) for n in names}
        assert len(sample) == len(keys)


@pytest.mark.slow  # NVRTC: CI's compile check covers every instantiation
def test_sampled_kernels_compile_with_nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC not usable here ({exc}); pip install cupynn[compile-check]")
    assert _selfcheck.compile_kernels(("sm_90",), sample=True, verbose=False) == []


@pytest.mark.gpu
def test_selfcheck_passes_on_the_gpu(capsys):
    if not cupynn.cuda_available():
        from cupynn._devices import cuda_unavailable_reason

        pytest.skip(f"no usable GPU: {cuda_unavailable_reason()}")
    assert _selfcheck.main(["--batch", "1025"]) == 0, capsys.readouterr().out
