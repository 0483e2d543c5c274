"""Which devices are usable here, decided once and cached."""

from __future__ import annotations

import functools

__all__ = ["cuda_available", "cuda_unavailable_reason", "resolve_device", "array_device"]


@functools.lru_cache(maxsize=1)
def _probe_cuda() -> str | None:
    """None when CuPy imports and sees at least one GPU, else the reason why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return f"CuPy is not importable ({exc.__class__.__name__}: {exc}); install cupynn[cuda12] or cupynn[cuda13]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy found no usable CUDA driver/GPU ({exc.__class__.__name__}: {exc})"
    if count < 1:
        return "CuPy sees no CUDA device"
    return None


def cuda_available() -> bool:
    """True when the CUDA backend can run here (CuPy imports and a GPU is visible).

    ``device="auto"`` picks ``"cuda"`` exactly when this is true;
    :func:`cuda_unavailable_reason` says why not.

    >>> import cupynn
    >>> isinstance(cupynn.cuda_available(), bool)
    True
    """
    return _probe_cuda() is None


def cuda_unavailable_reason() -> str:
    """Why :func:`cuda_available` is false ('' when it is true)."""
    return _probe_cuda() or ""


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is usable, else ``"cpu"``; check the name."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device in ("cpu", "cuda"):
        return device
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def array_device(array) -> str | None:
    """'cpu' for a NumPy array, 'cuda' for a CuPy array, None for anything else."""
    module = type(array).__module__
    if module.startswith("numpy"):
        return "cpu"
    if module.startswith("cupy"):
        return "cuda"
    return None
