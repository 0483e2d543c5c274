"""NVTX ranges around kernel launches (names like ``"Dense[1].forward"``).

Uses the ``nvtx`` package when installed, else CuPy's own ``cupy.cuda.nvtx``
(the GPU host has no ``nvtx`` package), else nothing.  The CPU emulation passes
``enabled=False`` and gets a no-op.
"""

from __future__ import annotations

import contextlib

__all__ = ["nvtx_range", "nvtx_backend"]


def _pick():
    try:
        import nvtx  # type: ignore[import-not-found]

        return "nvtx", nvtx.push_range, nvtx.pop_range
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pass
    try:
        from cupy.cuda import nvtx as cnvtx

        return "cupy.cuda.nvtx", cnvtx.RangePush, cnvtx.RangePop
    except Exception:  # noqa: BLE001
        return None, None, None


_BACKEND = None
_PUSH = _POP = None


def nvtx_backend() -> str | None:
    """Which NVTX implementation is in use: ``"nvtx"``, ``"cupy.cuda.nvtx"`` or None."""
    global _BACKEND, _PUSH, _POP
    if _PUSH is None and _BACKEND is None:
        _BACKEND, _PUSH, _POP = _pick()
        if _BACKEND is None:
            _BACKEND = ""
    return _BACKEND or None


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
