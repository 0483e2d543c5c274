"""Shared helpers for the tests: random models and the reference comparison."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import cupynn

TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def random_model(sizes, activations, dtype, rng, *, bias=True, device="cpu", scale=1.0):
    """A Chain with fresh random parameters (never zeros), built from host arrays."""
    if isinstance(activations, str):
        activations = [activations] * (len(sizes) - 1)
    layers = []
    for (n_in, n_out), act in zip(zip(sizes, sizes[1:]), activations):
        W = (rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)).astype(dtype)
        b = rng.standard_normal(n_out).astype(dtype) if bias else None
        layers.append(cupynn.Dense.from_arrays(W, b, act))
    return cupynn.Chain(*layers).to(device)


def host_params(model):
    to_host = cupynn.backends.get_backend(model.device).to_host
    return [(to_host(l.weight), None if l.bias is None else to_host(l.bias)) for l in model.layers]


def activations_of(model):
    return [l.activation.name for l in model.layers]


@pytest.fixture
def rng(request):
    # a fresh, reproducible stream per test (seeded from the test's name)
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
