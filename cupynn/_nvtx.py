"""NVTX ranges around kernel launches (names like ``"Dense[1].forward"``).

Which implementation records them (``CUPYNN_NVTX`` picks; read once, at the first range):

- ``auto`` (the default): CuPy's own binding ``cupy.cuda.nvtx`` when CuPy is importable,
  else the ``nvtx`` package (the ``profile`` extra), else nothing;
- ``cupy`` / ``nvtx``: only that one (nothing if it cannot be imported);
- ``none``: no ranges.

CuPy's binding comes first because Nsight Systems records it: CI checks that on every run
with Debian's nsys. The ``nvtx`` package from 0.2.12 on is dropped whole by nsys 2022.4 and
2023.4 ("NVTX binary payload extension is incompatible"), so the ``profile`` extra pins
``nvtx<0.2.12`` and :func:`nvtx_problem` says when a newer one is in use. The CPU emulation
passes ``enabled=False`` and gets a no-op.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["nvtx_range", "nvtx_backend", "nvtx_problem", "NVTX_CHOICES", "NVTX_RECORDED_BELOW"]

NVTX_CHOICES = ("auto", "cupy", "nvtx", "none")
# The first nvtx package release whose ranges nsys 2022.4 / 2023.4 drop (tried: 0.2.12,
# 0.2.13, 0.2.17 dropped; 0.2.11 recorded). Newer nsys releases were not tried.
NVTX_RECORDED_BELOW = (0, 2, 12)


def _from_package():
    import nvtx  # type: ignore[import-not-found]

    return "nvtx", nvtx.push_range, nvtx.pop_range


def _from_cupy():
    from cupy.cuda import nvtx as cnvtx

    return "cupy.cuda.nvtx", cnvtx.RangePush, cnvtx.RangePop


def _choice() -> str:
    choice = os.environ.get("CUPYNN_NVTX", "auto").strip().lower() or "auto"
    if choice not in NVTX_CHOICES:
        raise ValueError(f"CUPYNN_NVTX must be one of {', '.join(NVTX_CHOICES)}, got {choice!r}")
    return choice


def _pick():
    order = {"auto": (_from_cupy, _from_package), "cupy": (_from_cupy,),
             "nvtx": (_from_package,), "none": ()}[_choice()]
    for source in order:
        try:
            return source()
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
    return None, None, None


_BACKEND = None
_PUSH = _POP = None


def nvtx_backend() -> str | None:
    """Which NVTX implementation is in use: ``"cupy.cuda.nvtx"``, ``"nvtx"`` or None."""
    global _BACKEND, _PUSH, _POP
    if _PUSH is None and _BACKEND is None:
        _BACKEND, _PUSH, _POP = _pick()
        if _BACKEND is None:
            _BACKEND = ""
    return _BACKEND or None


def _package_version() -> tuple[int, ...] | None:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("nvtx").split(".")[:3] if p.isdigit())
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        return None


def nvtx_problem() -> str | None:
    """Why a profiler would not show cupynn's NVTX ranges, or None when they can be recorded.

    No implementation at all (``CUPYNN_NVTX=none``, or neither CuPy nor the ``nvtx`` package
    importable), or an ``nvtx`` package that the documented nsys releases drop.
    """
    backend = nvtx_backend()
    choice = _choice()
    if backend is None:
        if choice == "none":
            return "CUPYNN_NVTX=none: no NVTX ranges are emitted"
        why = {"auto": "neither CuPy nor the nvtx package can be imported",
               "cupy": "CUPYNN_NVTX=cupy, and CuPy cannot be imported",
               "nvtx": "CUPYNN_NVTX=nvtx, and the nvtx package cannot be imported"}[choice]
        return (f"no NVTX implementation: {why}; "
                "pip install \"cupynn[profile]\" (nvtx<0.2.12) or a CuPy package")
    if backend == "nvtx":
        v = _package_version()
        if v is not None and v >= NVTX_RECORDED_BELOW:
            shown = ".".join(map(str, v))
            return (f"the nvtx package {shown} is in use: Nsight Systems 2022.4 and 2023.4 drop "
                    "every range of nvtx >= 0.2.12 (newer nsys not tried); "
                    "pip install \"nvtx<0.2.12\", or CUPYNN_NVTX=cupy with CuPy installed")
    return None


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _PUSH(self.name)
        return self

    def __exit__(self, *exc):
        _POP()
        return False


_NULL = contextlib.nullcontext()


def nvtx_range(name: str, enabled: bool = True):
    """A context manager marking ``name`` on the profiler's timeline (no-op if unavailable)."""
    if not enabled or nvtx_backend() is None:
        return _NULL
    return _Range(name)
