"""Implementation adapters, in table order. Each imports its library only when used."""

from __future__ import annotations

from .base import Implementation, Problem, Runner, Skip
from .cupynn_impl import CUPYNN, CUPYNN_GRAPH
from .cupynn_torch_impl import CUPYNN_TORCH
from .jax_impl import JAX
from .naive import CUPY, NUMPY
from .torch_impl import TORCH, TORCH_COMPILE, TORCH_COMPILE_RO

IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (CUPYNN, CUPYNN_GRAPH, NUMPY, CUPY, TORCH, CUPYNN_TORCH, TORCH_COMPILE,
                 TORCH_COMPILE_RO, JAX)
}

__all__ = ["IMPLEMENTATIONS", "Implementation", "Problem", "Runner", "Skip", "select"]


def select(spec: str | None) -> list[Implementation]:
    """Parse ``--peers``: None/"default" (everything but torch.compile), "all", or a
    comma-separated list of names (cupynn, cupynn-graph, numpy, cupy, torch,
    cupynn-torch, torch-compile, torch-compile-ro, jax), or "none" (with --kernels: only the breakdown)."""
    if spec == "none":
        return []
    if spec in (None, "", "default"):
        return [i for i in IMPLEMENTATIONS.values() if not i.on_request_only]
    if spec == "all":
        return list(IMPLEMENTATIONS.values())
    names = [n.strip() for n in spec.replace(" ", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(IMPLEMENTATIONS)}")
    return [IMPLEMENTATIONS[n] for n in IMPLEMENTATIONS if n in names]
