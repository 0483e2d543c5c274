"""pytest plugin of the mutation harness: point the kernel loader at a mutated scratch copy.

``python -m pytest -p cupynn.emulator._mutant_plugin`` with ``CUPYNN_MUTANT_KERNELS=<dir>``
makes ``cupynn._loader.KERNEL_DIR`` (hence every emulated build and -I path) that directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def pytest_configure(config):
    kernels = os.environ.get("CUPYNN_MUTANT_KERNELS")
    if kernels:
        from cupynn import _loader  # noqa: PLC0415

        _loader.KERNEL_DIR = Path(kernels)
