"""Helpers for tests that run kernels on the emulator."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from . import _build
from ._module import EmulatedModule

REPO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
TESTDATA = Path(__file__).resolve().parent / "testdata"


def kernels_dir() -> Path:
    """kernels/*.cu: the loader's KERNEL_DIR when it exists, else the checkout's."""
    try:
        from cupynn import _loader  # noqa: PLC0415

        return Path(_loader.KERNEL_DIR)
    except Exception:  # the loader may not exist yet, or may fail to import without CuPy
        return REPO_KERNELS


@functools.cache
def sanitizer_available(sanitizer: str) -> tuple[bool, str]:
    """(True, "") when g++ can build and run `sanitizer` ("address" / "thread") modules."""
    try:
        _build.compiler_id()
        _build.sanitizer_runtime(sanitizer)
    except Exception as exc:
        return False, str(exc)
    return True, ""


@functools.lru_cache(maxsize=64)
def _module(code: str, options: tuple, names: tuple, sanitizer: str | None) -> EmulatedModule:
    return EmulatedModule(code, options=options, name_expressions=names, sanitizer=sanitizer)


def emulated_module(source, name_expressions=(), *, options=None, sanitizer=None) -> EmulatedModule:
    """An (lru-cached) EmulatedModule for a .cu path or source text, with -I<kernels dir>."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith(".cu")
                                            and "\n" not in source):
        code = Path(source).read_text()
    else:
        code = source
    if options is None:
        options = ("-I" + str(kernels_dir()), "-std=c++17")
    return _module(code, tuple(options), tuple(name_expressions), sanitizer)


def launch_and_check(source, name_expression, grid, block, args, *, shared_mem=0, options=None,
                     sanitizer=None):
    """Build (cached), launch one kernel, return `args` (arrays updated in place).

    With sanitizer="address" / "thread" the launch runs in a helper process and a report
    raises cupynn.emulator.SanitizerError; other kernel faults raise EmulatorError.
    """
    mod = emulated_module(source, (name_expression,), options=options, sanitizer=sanitizer)
    mod.get_function(name_expression)(grid, block, tuple(args), shared_mem=shared_mem)
    return args
