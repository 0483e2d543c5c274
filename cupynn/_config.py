"""What this cupynn install runs on: ``cupynn.show_config()`` and ``python -m cupynn info``.

Every probe is guarded: the report works without CuPy, without a driver and without a
GPU, and says what is missing instead of raising. Nothing here compiles or launches a kernel.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["collect", "show_config", "main"]

# Every CuPy distribution that ships the ``cupy`` module: two of them in one environment
# overwrite each other's files and break CuPy.
_CUPY_DISTRIBUTIONS = (
    "cupy",
    "cupy-cuda11x",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "cupy-rocm-5-0",
    "cupy-rocm-6-0",
)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version(encoded: int) -> str:
    """12080 -> '12.8' (the CUDA API's encoding: 1000 * major + 10 * minor)."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _cupynn_info() -> dict[str, Any]:
    import cupynn

    package_dir = Path(cupynn.__file__).resolve().parent
    return {
        "version": getattr(cupynn, "__version__", None) or _dist_version("cupynn"),
        "location": str(package_dir),
        # An installed wheel carries the kernels inside the package; a source checkout
        # (editable install, or running from the repository) has them in ../kernels.
        "install": "package" if (package_dir / "kernels").is_dir() else "source checkout",
    }


def _kernel_info() -> dict[str, Any]:
    try:
        from cupynn import _loader
    except Exception as exc:
        return {"dir": None, "error": f"cupynn._loader not importable ({_error(exc)})"}
    kernel_dir = getattr(_loader, "KERNEL_DIR", None)
    if kernel_dir is None:
        return {"dir": None, "error": "cupynn._loader has no KERNEL_DIR"}
    kernel_dir = Path(kernel_dir)
    sources = sorted(p.name for p in kernel_dir.glob("*.cu")) if kernel_dir.is_dir() else []
    info: dict[str, Any] = {
        "dir": str(kernel_dir),
        "exists": kernel_dir.is_dir(),
        "sources": sources,
    }
    if not kernel_dir.is_dir():
        info["error"] = "kernel directory does not exist"
    return info


def _fused_info() -> dict[str, Any]:
    from cupynn.backends import cuda_fused_layout as fl

    return {"enabled": fl.enabled(),
            "networks": (f"every layer <= {fl.NARROW_MAX} wide, or a first layer <= "
                         f"{fl.WIDE_MAX} wide with fan-in <= {fl.MAX_K0} and a second <= "
                         f"{fl.WIDE_N1_MAX} wide; <= {fl.MAX_LAYERS} layers, built-in losses")}


# The first CuPy whose on-disk kernel cache serves modules built with ``name_expressions``
# (every cupynn module): 14.2 stores NVRTC's mangled names with the cubin.  Before 14.0 such
# modules were never read back; 14.0 and 14.1 recover the names by demangling the cubin's
# symbols, which needs a driver >= 12.4 and misses whenever NVRTC's spelling differs from
# the name expression: there every process recompiles (20-60 s for the fused kernels).
CUPY_CACHE_MIN = (14, 2)


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _cupy_installed() -> bool:
    """Whether a ``cupy`` module is importable here (found, not imported)."""
    try:
        return importlib.util.find_spec("cupy") is not None
    except (ImportError, ValueError):
        return False


def _cache_unused_reason(cupy_version: str | None, path: Path) -> str | None:
    """Why CuPy will not reuse compiled cupynn kernels across processes, or None."""
    if os.environ.get("CUPY_CACHE_IN_MEMORY", "0") not in ("", "0"):
        return "CUPY_CACHE_IN_MEMORY is set: every process compiles its kernels again"
    if cupy_version is not None and _version_tuple(cupy_version) < CUPY_CACHE_MIN:
        need = ".".join(map(str, CUPY_CACHE_MIN))
        return (f"CuPy {cupy_version} does not read back modules built with name_expressions "
                f"(all of cupynn's; 14.0-14.1 only with a driver >= 12.4 and an exact name match): "
                f"every process recompiles; pip install 'cupy-cuda12x>={need}'")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return f"{probe} is not writable: compiled kernels cannot be saved"
    return None


def _kernel_cache_dir() -> dict[str, Any]:
    # CuPy's rule (cupy.cuda.compiler.get_cache_dir): $CUPY_CACHE_DIR, else ~/.cupy/kernel_cache.
    env = os.environ.get("CUPY_CACHE_DIR")
    path = Path(env) if env else Path("~/.cupy/kernel_cache").expanduser()
    info: dict[str, Any] = {"dir": str(path), "source": "CUPY_CACHE_DIR" if env else "default"}
    version = None
    if _cupy_installed():
        version = next((v for n in _CUPY_DISTRIBUTIONS if (v := _dist_version(n)) is not None), None)
    reason = _cache_unused_reason(version, path)
    info["used"] = reason is None
    if reason is not None:
        info["not_used"] = reason
    return info


def _cupy_info() -> dict[str, Any]:
    installed = {n: v for n in _CUPY_DISTRIBUTIONS if (v := _dist_version(n)) is not None}
    info: dict[str, Any] = {"distributions": installed}
    if len(installed) > 1:
        info["warning"] = (
            "several CuPy packages are installed ("
            + ", ".join(sorted(installed))
            + "); they overwrite each other: pip uninstall all of them, then install one"
        )
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:
        info["version"] = None
        info["error"] = f"CuPy is not importable ({_error(exc)})"
        return info
    info["version"] = cupy.__version__
    runtime = cupy.cuda.runtime

    try:
        info["cuda_runtime"] = _cuda_version(runtime.runtimeGetVersion())
    except Exception as exc:
        info["cuda_runtime"] = f"unavailable ({_error(exc)})"
    try:
        driver = runtime.driverGetVersion()
        info["cuda_driver"] = _cuda_version(driver) if driver else "none (no NVIDIA driver found)"
    except Exception as exc:
        info["cuda_driver"] = f"unavailable ({_error(exc)})"
    try:
        from cupy_backends.cuda.libs import nvrtc

        major, minor = nvrtc.getVersion()
        info["nvrtc"] = f"{major}.{minor}"
    except Exception as exc:
        info["nvrtc"] = f"unavailable ({_error(exc)})"
    info["nvrtc_path"] = _nvrtc_path()
    info["cuda_headers"] = _cuda_header_dir()

    devices: list[dict[str, Any]] = []
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        no_driver = str(info.get("cuda_driver", "")).startswith("none")
        info["devices_error"] = ("no NVIDIA driver: " if no_driver else "") + _error(exc)
        count = 0
    for index in range(count):
        try:
            props = runtime.getDeviceProperties(index)
            name = props["name"]
            devices.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "compute_capability": f"{props['major']}.{props['minor']}",
                    "arch": f"sm_{props['major']}{props['minor']}",
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                    "multiprocessors": props["multiProcessorCount"],
                }
            )
        except Exception as exc:
            devices.append({"index": index, "error": _error(exc)})
    info["devices"] = devices
    return info


def _nvrtc_path() -> str | None:
    """Which libnvrtc CuPy would load (site-packages wheel, conda or system CUDA)."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return str(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:
        return None


def _cuda_header_dir() -> str | None:
    """The CUDA runtime headers CuPy hands NVRTC (needed from CUDA 12.2 on)."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            return str(found)
    except Exception:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return str(Path(root) / "include")
    return None


def _nvtx_info() -> dict[str, Any]:
    """Where cupynn's NVTX ranges go: the ``nvtx`` package, CuPy's binding, or nowhere."""
    try:
        from cupynn._nvtx import nvtx_backend

        backend = nvtx_backend()
    except Exception as exc:  # cupynn._nvtx missing or broken: probe like it would
        backend = None
        for module in ("nvtx", "cupy.cuda.nvtx"):
            try:
                importlib.import_module(module)
                backend = module
                break
            except Exception:
                continue
        if backend is None:
            return {"backend": "none", "error": f"cupynn._nvtx: {_error(exc)}"}
    try:
        from cupynn._nvtx import nvtx_problem

        problem = nvtx_problem()
    except Exception:  # noqa: BLE001 - the backend line above says what is known
        problem = None
    extra = {"error": problem} if problem else {}
    if backend == "nvtx":
        return {"backend": f"nvtx package {_dist_version('nvtx') or ''}".rstrip(), **extra}
    if backend == "cupy.cuda.nvtx":
        return {"backend": "CuPy's binding (cupy.cuda.nvtx)", **extra}
    return {"backend": "none (install cupynn[profile], or CuPy, for NVTX ranges)", **extra}


def collect() -> dict[str, Any]:
    """Everything :func:`show_config` prints, as a JSON-serialisable dict."""
    report: dict[str, Any] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
    }
    for key, probe in (
        ("cupynn", _cupynn_info),
        ("kernels", _kernel_info),
        ("kernel_cache", _kernel_cache_dir),
        ("fused", _fused_info),
        ("cupy", _cupy_info),
        ("nvtx", _nvtx_info),
    ):
        try:
            report[key] = probe()
        except Exception as exc:  # a probe must never take the whole report down
            report[key] = {"error": _error(exc)}
    try:
        import numpy

        report["numpy"] = numpy.__version__
    except Exception as exc:
        report["numpy"] = f"not importable ({_error(exc)})"
    try:
        from . import _threads

        report["cpu_threads"] = _threads.thread_control()
    except Exception as exc:
        report["cpu_threads"] = f"unknown ({_error(exc)})"
    return report


def _fused_row(info: dict[str, Any]) -> str:
    if "error" in info:
        return info["error"]
    if not info.get("enabled"):
        return "off (CUPYNN_FUSED=0, or kernels/fused.cu missing): every network runs per layer"
    return (f"on for {info.get('networks')} (cupynn.execution_path(model, batch) says which; "
            "the launch log shows fused.step / fused.reduce)")


def _bracket(text: str | None) -> str:
    return f" [{text}]" if text else ""


def _format(report: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        return "-" if v is None else str(v)

    cupynn_info = report.get("cupynn", {})
    kernels = report.get("kernels", {})
    cache = report.get("kernel_cache", {})
    cupy_info = report.get("cupy", {})
    nvtx_info = report.get("nvtx", {})
    rows: list[tuple[str, str]] = [
        (
            "cupynn",
            f"{value(cupynn_info.get('version'))} ({value(cupynn_info.get('install'))}: "
            f"{value(cupynn_info.get('location'))})"
            if "error" not in cupynn_info
            else cupynn_info["error"],
        ),
        ("python", value(report.get("python"))),
        ("platform", value(report.get("platform"))),
        ("numpy", value(report.get("numpy"))),
        ("CPU threads", value(report.get("cpu_threads"))),
    ]
    if cupy_info.get("version") is None:
        rows.append(("cupy", value(cupy_info.get("error", "not installed"))))
    else:
        dists = ", ".join(f"{k} {v}" for k, v in cupy_info.get("distributions", {}).items())
        rows += [
            ("cupy", f"{cupy_info['version']}" + (f" ({dists})" if dists else "")),
            ("CUDA runtime", value(cupy_info.get("cuda_runtime"))),
            ("CUDA driver", value(cupy_info.get("cuda_driver"))),
            ("NVRTC", value(cupy_info.get("nvrtc"))),
            ("NVRTC library", value(cupy_info.get("nvrtc_path"))),
            ("CUDA headers", value(cupy_info.get("cuda_headers") or "not found")),
        ]
        devices = cupy_info.get("devices", [])
        if not devices:
            reason = cupy_info.get("devices_error", "CuPy sees no CUDA device")
            rows.append(("GPU", f"none ({reason})"))
        for d in devices:
            label = f"GPU {d['index']}"
            if "error" in d:
                rows.append((label, d["error"]))
            else:
                rows.append(
                    (
                        label,
                        f"{d['name']}, compute capability {d['compute_capability']} "
                        f"({d['arch']}), {d['memory_gib']} GiB, {d['multiprocessors']} SMs",
                    )
                )
    if "warning" in cupy_info:
        rows.append(("WARNING", cupy_info["warning"]))
    kernel_text = value(kernels.get("dir"))
    if kernels.get("sources"):
        kernel_text += f" ({len(kernels['sources'])} .cu files)"
    if "error" in kernels:
        kernel_text += f" [{kernels['error']}]"
    rows += [
        ("kernels", kernel_text),
        ("kernel cache", f"{value(cache.get('dir'))} ({value(cache.get('source'))})"
         + (f" NOT USED: {cache['not_used']}" if cache.get("not_used") else "")),
        ("fused path", _fused_row(report.get("fused", {}))),
        ("NVTX", value(nvtx_info.get("backend")) + _bracket(nvtx_info.get("error"))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} : {v}" for k, v in rows)


def show_config(file=None) -> None:
    """Print versions, GPU, kernel and cache locations, and the NVTX backend.

    Works on any machine: without CuPy or without a GPU the report says so.

    >>> import cupynn
    >>> cupynn.show_config()  # doctest: +SKIP
    """
    print(_format(collect()), file=file if file is not None else sys.stdout)


def main(argv: list[str] | None = None) -> int:
    """``python -m cupynn info [--json]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cupynn info",
        description="Show cupynn's configuration: versions, GPU, kernel and cache locations.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(collect(), indent=2, sort_keys=True))
    else:
        show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())
