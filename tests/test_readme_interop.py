"""The PyTorch and JAX examples of docs/interop.md run as written (skipped without torch / JAX)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "interop.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_page_has_one_example_each():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "import cupynn.torch" in blocks[0] and "import cupynn.jax" in blocks[1]


def test_torch_example_runs():
    pytest.importorskip("torch")
    ns: dict = {}
    exec(compile(_blocks()[0], "docs/interop.md (PyTorch)", "exec"), ns)
    assert np.isfinite(ns["loss"].item())
    # Adam's steps landed in the cupynn model (shared memory)
    first = ns["net"][0].layers[0].weight
    assert first.data_ptr() == ns["model"].layers[0].weight.__array_interface__["data"][0]


def test_jax_example_runs():
    jax = pytest.importorskip("jax")
    old = jax.config.jax_enable_x64
    try:
        ns: dict = {}
        exec(compile(_blocks()[1], "docs/interop.md (JAX)", "exec"), ns)
        assert np.isfinite(float(ns["value"]))
        assert ns["grads"][0]["weight"].shape == (1000, 1)
    finally:
        jax.config.update("jax_enable_x64", old)
