"""docs/autodiff.md: every Python block runs as written, each in a fresh namespace (blocks
that import JAX or torch are skipped where those are not installed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "autodiff.md"


def _blocks() -> list[tuple[str, str]]:
    """(section title, code) of every ```python block of the page."""
    out, title = [], ""
    for part in re.split(r"(^## .*$)", PAGE.read_text(), flags=re.M):
        if part.startswith("## "):
            title = part[3:].strip()
            continue
        out += [(title, code) for code in re.findall(r"```python\n(.*?)```", part, flags=re.S)]
    return out


def test_one_block_for_each_of_the_six_points():
    titles = [t for t, _ in _blocks()]
    assert [t.split(".")[0] for t in titles] == ["1", "2", "3", "4", "5", "6"], titles


@pytest.mark.parametrize("title,code", _blocks(), ids=[t.split(".")[0] for t, _ in _blocks()])
def test_block_runs(title, code):
    for lib in ("jax", "torch", "scipy"):
        if re.search(rf"^\s*import .*\b{lib}\b|^\s*from {lib}\b", code, flags=re.M) and \
                importlib.util.find_spec(lib) is None:
            pytest.skip(f"{lib} is not installed")
    jax = None
    if importlib.util.find_spec("jax") is not None:
        import jax
        old = jax.config.jax_enable_x64
    try:
        exec(compile(code, f"docs/autodiff.md ({title})", "exec"), {"__name__": "__docs__"})
    finally:
        if jax is not None:
            jax.config.update("jax_enable_x64", old)
