"""cupynn.show_config() / `python -m cupynn info`: must work without CuPy and without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cupynn import _config

ROOT = Path(__file__).resolve().parents[1]

# Runs cupynn._config.main with CuPy, its CUDA bindings and nvtx made unimportable.
_WITHOUT_CUPY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"cupy", "cupy_backends", "cuda", "nvtx"}:
            raise ImportError(f"{name} blocked by the test")
sys.meta_path.insert(0, Block())
from cupynn._config import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args, **env):
    full_env = {**os.environ, **env}
    full_env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def test_show_config_prints_every_section(capsys):
    _config.show_config()
    out = capsys.readouterr().out
    for key in ("cupynn", "python", "numpy", "CPU threads", "cupy", "kernels", "kernel cache", "NVTX"):
        assert any(line.startswith(f"{key} ") for line in out.splitlines()), (key, out)


def test_report_is_json_serialisable_and_names_the_kernel_dir():
    from cupynn import _loader

    report = _config.collect()
    json.dumps(report)
    assert Path(report["kernels"]["dir"]) == Path(_loader.KERNEL_DIR)
    assert report["kernels"]["sources"] == sorted(p.name for p in Path(_loader.KERNEL_DIR).glob("*.cu"))


def test_kernel_cache_follows_cupy_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    cache = _config.collect()["kernel_cache"]
    assert (cache["dir"], cache["source"]) == (str(tmp_path), "CUPY_CACHE_DIR")
    monkeypatch.delenv("CUPY_CACHE_DIR")
    default = _config.collect()["kernel_cache"]
    assert (default["dir"], default["source"]) == (str(Path("~/.cupy/kernel_cache").expanduser()), "default")


def test_info_without_cupy():
    report = json.loads(_run(["-c", _WITHOUT_CUPY, "--json"]))
    assert report["cupy"]["version"] is None
    assert "not importable" in report["cupy"]["error"]
    assert report["nvtx"]["backend"].startswith("none")
    assert report["kernels"]["dir"] and report["kernels"]["exists"]
    text = _run(["-c", _WITHOUT_CUPY])
    assert "CuPy is not importable" in text and "kernel cache" in text


def test_info_without_a_gpu():
    if not _cupy_importable():
        pytest.skip("CuPy not importable: covered by test_info_without_cupy")
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this runs the no-GPU path on a GPU host too.
    report = json.loads(_run(["-m", "cupynn", "info", "--json"], CUDA_VISIBLE_DEVICES=""))
    assert report["cupy"]["version"]
    assert report["cupy"]["devices"] == []
    text = _run(["-m", "cupynn", "info"], CUDA_VISIBLE_DEVICES="")
    assert "GPU" in text and "none" in text


def test_cli_info_help_and_json():
    assert "--json" in _run(["-m", "cupynn", "info", "--help"])
    json.loads(_run(["-m", "cupynn", "info", "--json"]))


def test_duplicate_cupy_packages_are_reported(monkeypatch):
    versions = {"cupy-cuda12x": "14.2.0", "cupy-cuda13x": "14.2.0"}
    monkeypatch.setattr(_config, "_dist_version", lambda name: versions.get(name))
    info = _config._cupy_info()
    assert "cupy-cuda12x, cupy-cuda13x" in info["warning"]


@pytest.mark.gpu
def test_info_names_the_gpu_and_its_architecture():
    import cupynn

    if not cupynn.cuda_available():
        from cupynn._devices import cuda_unavailable_reason

        pytest.skip(f"no usable GPU: {cuda_unavailable_reason()}")
    report = _config.collect()
    devices = report["cupy"]["devices"]
    assert devices and devices[0]["arch"].startswith("sm_")
    assert report["cupy"]["nvrtc"][0].isdigit()
    assert report["cupy"]["cuda_driver"][0].isdigit()
