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

__all__ = ["KERNEL_DIR", "CUPY_APPENDED_OPTIONS", "compile_options", "nvrtc_options", "load_module",
           "have_mma"]


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


# What CuPy (14.x, its cuda.compiler module) appends to our options before NVRTC sees them, after
# them: -ftz=true (float32 subnormal results and inputs are flushed to zero; CuPy adds it last,
# so no option of ours can undo it), then -arch=sm_XY and --device-as-default-execution-space.
# tests/test_gpu_hardening.py records what CuPy really passes and checks it against this.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """The options NVRTC really receives when CuPy compiles one of our modules for ``arch``
    (``"sm_90"``): :func:`compile_options` plus what CuPy appends.  The compile check,
    ``sass_stats`` and the emulator use these, so they see the build that runs (float32
    flush-to-zero included)."""
    return (compile_options() + CUPY_APPENDED_OPTIONS
            + (f"-arch={arch}", "--device-as-default-execution-space"))


def module_options(module_cls, arch: str | None = None) -> tuple[str, ...]:
    """What :func:`load_module` hands ``module_cls``: :func:`compile_options` to
    ``cupy.RawModule`` (CuPy appends the rest itself), :func:`nvrtc_options` to any other
    module class (the emulator), which must see the semantics CuPy's build has."""
    try:
        import cupy

        if module_cls is cupy.RawModule:
            return compile_options(arch)
    except Exception:  # noqa: BLE001 - no CuPy: not a GPU module
        pass
    return nvrtc_options(arch or "sm_80")


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
            mod = module_cls(code=code, options=module_options(module_cls, arch),
                             name_expressions=names)
            _CACHE[key] = mod
    return mod
