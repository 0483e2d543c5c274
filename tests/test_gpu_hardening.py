"""The CUDA path's host code and kernels, hardened without a GPU: stream hand-over to
CuPy, concurrent calls, float32 flush-to-zero semantics, CuPy's real NVRTC options,
persistent fused blocks and the shared-memory bank model of the per-layer GEMM."""

from __future__ import annotations

import types

import pytest


# -- torch streams handed to CuPy ------------------------------------------------------------
class _FakeCupy:
    """Stand-in for the ``cupy`` module: records which stream constructor was used."""

    def __init__(self, has_from_external: bool):
        calls = self.calls = []

        class Stream:
            pass

        if has_from_external:
            def from_external(obj):
                if not hasattr(obj, "__cuda_stream__"):  # what CuPy 14 does
                    raise TypeError("the object does not implement __cuda_stream__")
                calls.append(("from_external", obj))
                return "from_external"
            Stream.from_external = staticmethod(from_external)

        def external(ptr, device_id):
            calls.append(("ExternalStream", ptr, device_id))
            return "external"

        self.cuda = types.SimpleNamespace(Stream=Stream, ExternalStream=external)


class _OldTorchStream:  # torch 2.1-2.9: no __cuda_stream__
    cuda_stream = 0x1234
    device_index = 1


class _NewTorchStream(_OldTorchStream):  # torch >= 2.10
    def __cuda_stream__(self):
        return (0, self.cuda_stream)


@pytest.mark.parametrize("has_from_external", [True, False])
def test_torch_stream_without_the_protocol_uses_external_stream(has_from_external):
    pytest.importorskip("torch")
    import cupynn.torch as ct

    cp = _FakeCupy(has_from_external)
    assert ct._cupy_stream(_OldTorchStream(), cp) == "external"
    assert cp.calls == [("ExternalStream", 0x1234, 1)]


def test_torch_stream_with_the_protocol_uses_from_external():
    pytest.importorskip("torch")
    import cupynn.torch as ct

    cp = _FakeCupy(True)
    s = _NewTorchStream()
    assert ct._cupy_stream(s, cp) == "from_external"
    assert cp.calls == [("from_external", s)]
    cp = _FakeCupy(False)  # CuPy < 14: ExternalStream even for a new torch
    assert ct._cupy_stream(s, cp) == "external"


# -- CuPy's kernel cache ----------------------------------------------------------------------
def test_info_says_when_the_kernel_cache_is_not_used(monkeypatch, tmp_path, capsys):
    from cupynn import _config

    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    versions = {"cupy-cuda12x": "14.1.1"}
    monkeypatch.setattr(_config, "_dist_version", lambda name: versions.get(name))
    monkeypatch.setattr(_config.importlib.util, "find_spec", lambda name: object())
    cache = _config.collect()["kernel_cache"]
    assert cache["used"] is False and "14.1.1" in cache["not_used"] and ">=14.2" in cache["not_used"]
    _config.show_config()
    assert "NOT USED" in capsys.readouterr().out
    versions["cupy-cuda12x"] = "14.2.0"
    assert _config.collect()["kernel_cache"]["used"] is True
    versions["cupy-cuda12x"] = "15.0.0rc1"
    assert _config.collect()["kernel_cache"]["used"] is True
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    cache = _config.collect()["kernel_cache"]
    assert cache["used"] is False and "CUPY_CACHE_IN_MEMORY" in cache["not_used"]


def test_cuda_extras_require_the_cupy_whose_cache_works():
    import re
    from pathlib import Path

    from cupynn import _config

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    pins = re.findall(r'"cupy-cuda1\dx>=([\d.]+)"', text)
    assert pins and all(_config._version_tuple(v) >= _config.CUPY_CACHE_MIN for v in pins)
