"""The README's PyTorch and JAX examples run as written (skipped without torch / JAX)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## PyTorch and JAX"):]
    section = section[:section.index("\n## ", 4)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_one_example_each():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "import cupynn.torch" in blocks[0] and "import cupynn.jax" in blocks[1]


def test_torch_example_runs():
    pytest.importorskip("torch")
    ns: dict = {}
    exec(compile(_blocks()[0], "README.md (PyTorch)", "exec"), ns)
    assert np.isfinite(ns["loss"].item())
    # Adam's steps landed in the cupynn model (shared memory)
    first = ns["net"][0].layers[0].weight
    assert first.data_ptr() == ns["model"].layers[0].weight.__array_interface__["data"][0]


def test_jax_example_runs():
    jax = pytest.importorskip("jax")
    old = jax.config.jax_enable_x64
    try:
        ns: dict = {}
        exec(compile(_blocks()[1], "README.md (JAX)", "exec"), ns)
        assert np.isfinite(float(ns["value"]))
        assert ns["grads"][0]["weight"].shape == (1000, 1)
    finally:
        jax.config.update("jax_enable_x64", old)
