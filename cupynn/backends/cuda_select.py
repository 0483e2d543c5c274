"""Which kernel runs a GEMM of the CUDA backend: tile, math mode and batch splits.

The selection tables and the rules over them, and the name expression of every kernel
instantiation (``kernels/dense.cu``).  Everything here is a pure function of shapes,
dtypes and precision modes, so the same choices are made on a GPU, on the CPU emulator
and by the kernel catalog (``cuda_catalog``) that lists what the compile check builds.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .. import _loader

__all__ = ["SOURCE", "REDUCE_JOBS", "FORWARD_ACTIVATIONS", "ACT_RUNTIME", "forward_act",
           "MATH_FMA", "MATH_DMMA", "MATH_TF32", "MATH_3XTF32", "TILES",
           "CHAIN_TILE", "CHAIN_BN", "RECOMPUTE_MAX_FANIN", "CTYPE", "maths_for", "pick_math",
           "pick_tile", "splits", "f64_mma_enabled"]

SOURCE = "dense.cu"
REDUCE_JOBS = 4  # kernels/dense.cu REDUCE_JOBS

MATH_FMA, MATH_DMMA, MATH_TF32, MATH_3XTF32 = 0, 1, 2, 3
# tile id -> (BM, BN), as TileShape<TILE> in kernels/gemm.cuh
TILES = {0: (256, 1), 1: (128, 8), 2: (128, 32), 3: (64, 64), 4: (128, 128)}
CHAIN_TILE = 5  # kernels/dense.cu CHAIN_TILE (64 x 64, used by the chain kernel only)
CHAIN_BN = 64
RECOMPUTE_MAX_FANIN = 4  # kernels/dense.cu CHAIN_MAX_K0
# dense_forward's activation template argument: the activations listed here get an
# instantiation of their own (identity and relu: every public benchmark workload's, see
# cuda_catalog.PUBLIC_WORKLOADS); every other one runs the ACT_RUNTIME instantiation, whose
# epilogue calls act_forward_runtime (kernels/activations.cuh: every formula out of line,
# behind one switch) per element; the GEMM main loop does not depend on the activation.
# 3 forward instantiations per (dtype, tile, math) instead of 10, and a third of the
# compile time.
FORWARD_ACTIVATIONS = (0, 1)
ACT_RUNTIME = -2  # kernels/activations.cuh ACT_RUNTIME
CTYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}
_PRECISION_MATH = {"strict": MATH_FMA, "tf32": MATH_TF32, "3xtf32": MATH_3XTF32}
# Split-batch reductions aim at this many blocks (a fixed number, not the device's
# SM count, so the summation order -- hence the bits -- is the same on every card of one
# architecture; across architectures the tensor cores' own accumulation differs).
TARGET_BLOCKS = 528
MIN_ROWS_PER_SPLIT = 64
# Big tiles only when there are enough of them to fill the card twice.
BIG_TILE_MIN_BLOCKS = 264

_F64_MMA_ENV = os.environ.get("CUPYNN_F64_MMA", "1")


def f64_mma_enabled() -> bool:
    """float64 on DMMA unless CUPYNN_F64_MMA=0 (a debugging switch: plain FMA kernels)."""
    return _F64_MMA_ENV != "0" and _loader.have_mma()


@functools.lru_cache(maxsize=4096)
def maths_for(dtype: np.dtype, tile: int) -> tuple[int, ...]:
    """Math modes a (dtype, tile) pair can be compiled with."""
    if tile == 0 or not _loader.have_mma():
        return (MATH_FMA,)
    if np.dtype(dtype) == np.float64:
        return (MATH_FMA, MATH_DMMA)
    return (MATH_FMA, MATH_TF32, MATH_3XTF32)


def pick_math(dtype: np.dtype, precision: str, tile: int) -> int:
    """The math mode for a GEMM: DMMA for float64, the precision mode for float32."""
    return _pick_math(np.dtype(dtype), precision, tile, f64_mma_enabled())


@functools.lru_cache(maxsize=4096)
def _pick_math(dtype: np.dtype, precision: str, tile: int, f64_mma: bool) -> int:
    if tile == 0 or not _loader.have_mma():
        return MATH_FMA
    if dtype == np.float64:
        return MATH_DMMA if f64_mma else MATH_FMA
    try:
        return _PRECISION_MATH[precision]
    except KeyError:
        raise ValueError(
            f"precision must be one of {tuple(_PRECISION_MATH)}, got {precision!r}"
        ) from None


def pick_tile(rows: int, cols: int) -> int:
    """The tile for a GEMM with a rows x cols output: narrow tiles for skinny shapes."""
    if cols <= 1:
        return 0
    if cols <= 8:
        return 1
    if cols <= 32:
        return 2
    if cols >= 128 and rows >= 128 and -(-rows // 128) * -(-cols // 128) >= BIG_TILE_MIN_BLOCKS:
        return 4
    return 3


def splits(rows_total: int, tiles: int) -> tuple[int, int]:
    """(number of batch splits, rows per split) for a reduction over the batch."""
    want = max(1, -(-TARGET_BLOCKS // max(tiles, 1)))
    cap = max(1, rows_total // MIN_ROWS_PER_SPLIT)
    s = max(1, min(want, cap, 65535))
    rows = -(-rows_total // s)
    return -(-rows_total // rows), rows


def plan_settings() -> tuple:
    """Every module-level setting the choices above depend on (part of a launch plan's key)."""
    return (f64_mma_enabled(), BIG_TILE_MIN_BLOCKS, MIN_ROWS_PER_SPLIT, TARGET_BLOCKS)


# -- kernel name expressions ----------------------------------------------------------

def forward_act(act: int) -> int:
    """dense_forward's activation template argument for activation id ``act``."""
    return act if act in FORWARD_ACTIVATIONS else ACT_RUNTIME


@functools.lru_cache(maxsize=4096)
def fwd_name(ctype, act, tile, math):
    """The dense_forward instantiation that runs activation id ``act``."""
    return f"cupynn::dense_forward<{ctype}, {forward_act(act)}, {tile}, {math}>"


@functools.lru_cache(maxsize=4096)
def dx_name(ctype, tile, math):
    return f"cupynn::dense_backward_dx<{ctype}, {tile}, {math}>"


@functools.lru_cache(maxsize=4096)
def dw_name(ctype, tile, math, dz_rows):
    return f"cupynn::dense_backward_dw<{ctype}, {tile}, {math}, {dz_rows}>"


@functools.lru_cache(maxsize=4096)
def chain_name(ctype, math):
    return f"cupynn::dense_backward_chain<{ctype}, {math}>"


@functools.lru_cache(maxsize=4096)
def reduce_name(ctype):
    return f"cupynn::reduce_partials<{ctype}>"


@functools.lru_cache(maxsize=4096)
def reduce_multi_name(ctype):
    return f"cupynn::reduce_partials_multi<{ctype}>"


@functools.lru_cache(maxsize=4096)
def loss_name(ctype):
    return f"cupynn::loss_reduce<{ctype}>"


def kernel_names_all() -> list[tuple[str, tuple[str, ...]]]:
    """Every instantiation the tables above can select, as (source file, names)."""
    names: list[str] = []
    for dtype, ctype in CTYPE.items():
        for tile in TILES:
            for math in maths_for(dtype, tile):
                for act in (*FORWARD_ACTIVATIONS, ACT_RUNTIME):
                    names.append(fwd_name(ctype, act, tile, math))
                names.append(dx_name(ctype, tile, math))
                names.append(dw_name(ctype, tile, math, 0))
                names.append(dw_name(ctype, tile, math, 1))
        for math in maths_for(dtype, CHAIN_TILE):
            names.append(chain_name(ctype, math))
        names.append(reduce_name(ctype))
        names.append(reduce_multi_name(ctype))
        names.append(loss_name(ctype))
    return [(SOURCE, tuple(names))]
