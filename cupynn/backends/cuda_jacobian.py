"""Jacobian rows and Gramians on CUDA: ``kernels/jacobian.cu`` and the dense GEMM.

``jacobian_rows``: one launch per layer and chunk, one thread per element written (the
formulas are those of ``Backend.jacobian_rows`` in ``base.py``, the NumPy reference).
``gram_update``: ``G += J^T J`` through the dense kernels' weight-gradient GEMM
(``kernels/gemm.cuh``; ``J^T J`` is ``dW = dz^T x`` with ``dz = x = J`` and the identity
activation), then one elementwise add: a fixed order of summation, no atomics.
"""

from __future__ import annotations

import numpy as np

from .cuda_launch import THREADS, expect

__all__ = ["SOURCE", "rows_name", "kernel_names_all", "jacobian_rows", "gram_update"]

SOURCE = "jacobian.cu"
_CTYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}


def rows_name(ctype: str) -> str:
    return f"cupynn::jacobian_rows<{ctype}>"


def kernel_names_all() -> list[tuple[str, tuple[str, ...]]]:
    """Every instantiation of ``kernels/jacobian.cu``, as (source file, names)."""
    return [(SOURCE, tuple(rows_name(c) for c in _CTYPE.values()))]


def jacobian_rows(kernels, xp, dz, h, out, col: int, has_bias: bool) -> None:
    """Write one layer's columns ``[col, col + n k (+ n))`` of the rows ``out`` ``(B m, P)``."""
    dz = xp.ascontiguousarray(dz)
    h = xp.ascontiguousarray(h)
    nb, B, m, n = dz.shape
    k = h.shape[2]
    dtype = out.dtype
    expect(dz, "dz", (nb, B, m, n), dtype)
    expect(h, "h", (nb, B, k), dtype)
    expect(out, "out", (B * m, out.shape[1]), dtype)
    width = n * k + (n if has_bias else 0)
    total = B * m * width
    i32, i64 = np.int32, np.int64
    args = (dz, h, i32(nb), i64(B), i64(m), i64(n), i64(k), i32(bool(has_bias)),
            i64(out.shape[1]), i64(col), out)
    kernels.launch("jacobian.rows", SOURCE, rows_name(_CTYPE[dtype]), (-(-total // THREADS), 1, 1),
                   args)


def gram_update(backend, G, J) -> None:
    """``G += J^T J`` with the dense weight-gradient GEMM (``dW = dz^T x``, ``dz = x = J``)."""
    if J.shape[0] == 0:
        return
    _, JtJ, _ = backend.dense_backward(J, J, J, G, "identity", has_bias=False, need_dx=False)
    G += JtJ
