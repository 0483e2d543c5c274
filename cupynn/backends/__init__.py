"""Backends: NumPy (always) and CUDA through CuPy (when a GPU is usable).

``get_backend("cpu")`` / ``get_backend("cuda")`` return one shared instance
each; the CUDA backend is built on first use, so importing cupynn never
imports CuPy.
"""

from __future__ import annotations

from .._devices import array_device, cuda_available, cuda_unavailable_reason
from .base import Backend, LayerSpec, LossSpec, NetSpec
from .numpy_backend import NumpyBackend

__all__ = ["Backend", "LayerSpec", "LossSpec", "NetSpec", "get_backend", "backend_of"]

_BACKENDS: dict[str, Backend] = {"cpu": NumpyBackend()}


def get_backend(device: str) -> Backend:
    """The backend for ``"cpu"`` or ``"cuda"``."""
    if device == "cpu":
        return _BACKENDS["cpu"]
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if "cuda" not in _BACKENDS:
        if not cuda_available():
            raise RuntimeError(f"device='cuda' is not usable here: {cuda_unavailable_reason()}")
        import cupy

        from .cuda_backend import CudaBackend

        _BACKENDS["cuda"] = CudaBackend(xp=cupy, module_cls=cupy.RawModule)
    return _BACKENDS["cuda"]


def backend_of(array) -> Backend | None:
    """The backend that owns ``array`` (a NumPy or CuPy array), or None."""
    device = array_device(array)
    return None if device is None else get_backend(device)
