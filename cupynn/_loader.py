"""Kernel loader: compiles kernels/*.cu through CuPy's RawModule (NVRTC).

One module per (device, source file, set of instantiations), compiled on first
use and cached; the backend asks for exactly the instantiations a network needs,
so a run compiles only what it uses.  Which instantiations exist is the backend's
business (``cupynn.backends.cuda_catalog``); the loader only compiles and caches.

The module class is injectable: ``cupy.RawModule`` on a GPU, the emulator's
``EmulatedModule`` on the CPU (same constructor keywords).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path

__all__ = ["KERNEL_DIR", "compile_options", "load_module", "have_mma"]


def _kernel_dir() -> Path:
    installed = Path(__file__).resolve().parent / "kernels"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "kernels"


KERNEL_DIR: Path = _kernel_dir()

_CACHE: dict = {}
_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}


@functools.cache
def have_mma() -> bool:
    """True when kernels/mma.cuh (the tensor-core wrappers) is present."""
    return (KERNEL_DIR / "mma.cuh").is_file()


def compile_options(arch: str | None = None) -> tuple[str, ...]:
    """NVRTC options used for every module (``arch`` like ``"sm_90"``; None: CuPy picks)."""
    # -default-device: unannotated functions are device code, which is what makes the
    # generic lambdas of with_activation (kernels/activations.cuh) legal under NVRTC.
    opts = ["-std=c++17", "-default-device", f"-I{KERNEL_DIR}"]
    if arch:
        opts.append(f"-arch={arch}")
    return tuple(opts)


@functools.cache
def _sources_digest() -> str:
    """A hash of every kernel source and header.

    CuPy's on-disk kernel cache keys on the code string only, not on the headers it
    includes; prefixing this digest makes a header change recompile."""
    h = hashlib.sha256()
    for f in sorted(KERNEL_DIR.glob("*.cu*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _device_key(module_cls) -> object:
    try:
        import cupy

        if module_cls is cupy.RawModule:
            return ("cuda", cupy.cuda.Device().id)
    except Exception:  # noqa: BLE001 - no CuPy: not a GPU module
        pass
    return ("module", id(module_cls))


def load_module(source_file: str, name_expressions, *, module_cls=None, arch: str | None = None):
    """The compiled module of ``kernels/<source_file>`` with these instantiations.

    Returns an object with ``.get_function(name_expression)``.  Cached per device,
    module class, source file and (unordered) instantiation set.
    """
    if module_cls is None:
        import cupy

        module_cls = cupy.RawModule
    names = tuple(sorted(set(name_expressions)))
    key = (_device_key(module_cls), module_cls, source_file, names, arch)
    mod = _CACHE.get(key)
    if mod is not None:
        return mod
    # One lock per module: different modules compile in parallel (NVRTC releases the GIL).
    with _LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        mod = _CACHE.get(key)
        if mod is None:
            code = f"// cupynn kernel sources {_sources_digest()}\n" + (
                KERNEL_DIR / source_file).read_text()
            mod = module_cls(code=code, options=compile_options(arch), name_expressions=names)
            _CACHE[key] = mod
    return mod
