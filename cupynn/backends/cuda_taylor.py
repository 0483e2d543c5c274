"""The forward Laplacian's elementwise step on CUDA: ``kernels/derivatives.cu``.

Two kernels per dtype (``taylor_forward``, ``taylor_backward``; the activation is a
runtime argument), one launch per layer and direction, one thread per element of a
``(B, N)`` block (it walks the ``nb`` blocks of the stack). The formulas are those of
``numpy_taylor`` (the reference); the GEMMs around this step are the dense kernels.
"""

from __future__ import annotations

import numpy as np

from .base import taylor_blocks
from .cuda_launch import THREADS, expect

__all__ = ["SOURCE", "MODES", "forward_name", "backward_name", "kernel_names_all",
           "forward", "backward"]

SOURCE = "derivatives.cu"
MODES = {"none": 0, "laplacian": 1, "diagonal": 2}  # kernels/derivatives.cu `mode`
_CTYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}


def forward_name(ctype: str) -> str:
    return f"cupynn::taylor_forward<{ctype}>"


def backward_name(ctype: str) -> str:
    return f"cupynn::taylor_backward<{ctype}>"


def kernel_names_all() -> list[tuple[str, tuple[str, ...]]]:
    """Every instantiation of ``kernels/derivatives.cu``, as (source file, names)."""
    names = []
    for ctype in _CTYPE.values():
        names += [forward_name(ctype), backward_name(ctype)]
    return [(SOURCE, tuple(names))]


def _grid(B: int, N: int) -> tuple[int, int, int]:
    return (-(-(B * N) // THREADS), 1, 1)


def forward(kernels, z, b, act: int, d: int, second: str):
    """``out (nb, B, N)`` from the GEMM output ``z`` and the bias ``b`` (or None)."""
    nb, B, N = z.shape
    dtype = z.dtype
    expect(z, "z", (taylor_blocks(d, second), B, N), dtype)
    if b is not None:
        expect(b, "b", (N,), dtype)
    out = kernels.empty(z.shape, dtype)
    i32, i64 = np.int32, np.int64
    args = (z, b if b is not None else kernels.none(dtype), i32(b is not None), i32(act), i32(d),
            i32(MODES[second]), i64(B), i64(N), out)
    kernels.launch("taylor.forward", SOURCE, forward_name(_CTYPE[dtype]), _grid(B, N), args)
    return out


def backward(kernels, g, z, y, b, act: int, d: int, second: str):
    """``dloss/dz (nb, B, N)`` from ``g = dloss/dout``, the forward's ``z`` and ``y = out[0]``."""
    nb, B, N = z.shape
    dtype = z.dtype
    expect(z, "z", (taylor_blocks(d, second), B, N), dtype)
    expect(g, "g", (nb, B, N), dtype)
    expect(y, "y", (B, N), dtype)
    if b is not None:
        expect(b, "b", (N,), dtype)
    gz = kernels.empty(z.shape, dtype)
    i32, i64 = np.int32, np.int64
    args = (g, z, y, b if b is not None else kernels.none(dtype), i32(b is not None), i32(act),
            i32(d), i32(MODES[second]), i64(B), i64(N), gz)
    kernels.launch("taylor.backward", SOURCE, backward_name(_CTYPE[dtype]), _grid(B, N), args)
    return gz
