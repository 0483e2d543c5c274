"""Which networks the fused kernel (``kernels/fused.cu``) takes, and how it runs them.

Pure functions of shapes, dtypes and device limits -- the same on a GPU, on the CPU emulator
and in the kernel catalog.  :func:`fused_layout` answers, for one network, batch and call
kind, either a reason why the fused path does not apply or a :class:`FusedLayout`: the batch
rows per block and per tile, the shared-memory layout of one block, the configuration table
the kernel reads, the partial-gradient stride, the kernel names.

Two classes of networks are fused (at most :data:`MAX_LAYERS` layers, built-in losses):

* *narrow*: every layer at most :data:`NARROW_MAX` wide (hidden and output); the tile's input
  ``x`` and every ``W`` are staged in shared memory, so the fan-in is bounded by what fits;
* *wide first layer*: layer 0 has fan-in at most :data:`MAX_K0` and width in
  ``[WIDE_MIN, WIDE_MAX]`` (the seed's 1 -> 1000), the layers after it are narrow.  Layer 0 is
  recomputed from ``x`` inside the products that read it and never stored.

Everything else, and a callable loss (it runs on the host between forward and backward),
keeps the per-layer path of ``cuda_backend``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from .. import _loader
from ..activations import get_activation
from .base import NetSpec

__all__ = ["SOURCE", "FusedLayout", "fused_layout", "fused_kernel_names", "kernel_name",
           "reduce_name", "smem_limit_for_arch", "MODE_FORWARD", "MODE_VALUE", "MODE_GRAD"]

SOURCE = "fused.cu"
THREADS = 256
WARPS = THREADS // 32
MAX_LAYERS = 8          # kernels/fused.cu fz::MAX_LAYERS
MAX_K0 = 4              # fz::MAX_K0
FMW, FNW = 4, 3         # fz::FMW, fz::FNW (wide forward warp tile: 64 x 24)
WIDE_STAGE = (FMW * 16 + FNW * 8) * (16 * WARPS + 4)  # wide forward: h0 of 64 rows and
#                                      W1 of 24 columns, x 128 units (ST, STW)
WIDE_SPLITK = 4 * FMW * FNW * 4 * 32      # its four split-K slots
WIDE_PW = WARPS * 32 * (20 + 28)          # wide backward: 32 x 16 (+4) and 32 x 24 (+4) per warp
NARROW_MAX = 256
WIDE_MAX = 4096
WIDE_MIN = 257          # a fan-in <= MAX_K0 first layer this wide is recomputed, not stored
# The wide class's second layer: up to one 24-column pass (FNW n8 tiles).  Wider, the wide
# forward re-reads W1 from L2 at every 16-row step and recomputes h0 once per 24-column pass
# (N1 / 24 times), and the backward keeps a 24-column W1 slice per warp: a cliff the static
# counts put below the per-layer path, so such networks take the per-layer path (execution_path
# says why) until a GPU run says otherwise (bench/RESULTS.md).
WIDE_N1_MAX = FNW * 8
TILE_ROWS = (128, 64, 32, 16)
SUPER_TILES = (8, 4, 2, 1)  # wide: dz1 of this many tiles is collected before its backward
SUPER_PREFER = 256          # wide: super-tiles of up to this many rows come before taller tiles
# Slices a batch is split into: a fixed number (an H100 SXM / H200's SM count), not the
# device's.  fused_mlp runs min(slices, SM count) persistent blocks that walk the slices in a
# fixed order, and fused_reduce sums the slices' partials in slice order, so the summation
# order -- hence the bits -- does not depend on the SM count (a 108-SM A100 or a 114-SM H100
# PCIe gets the same bits as a 132-SM H100 SXM of the same architecture).  What it cannot
# promise: the same bits across architectures -- the tensor cores' internal accumulation
# differs (sm_80: chains of DMMA.8x8x4; sm_90: DMMA.16x8x16), so the guarantee is "same card
# type (architecture), same inputs: same bits, for any SM count".
FUSED_BLOCKS = 132
# Finer slices for a large batch: FUSED_BLOCKS * SLICE_SPLIT slices (each at least a 128-row
# tile; the partials of all of them within SLICE_WORKSPACE bytes, else fewer).  With 132
# slices a 114-SM card still needs two slice times (18 blocks walk two); with 528, five
# quarter-slices: ~1.25x a 132-SM card's time instead of 2x.  It multiplies the partials and
# the reduction's reads by SLICE_SPLIT on every card, so it stays at 1 until a GPU run weighs
# the two (bench/RESULTS.md); the kernel and the tests take any value.
SLICE_SPLIT = 1
SLICE_WORKSPACE = 64 << 20
# Every block keeps a partial of every parameter (FUSED_BLOCKS x P workspace, all of it read
# by the reduction): beyond this many parameters the per-layer path's reductions are cheaper.
MAX_PARAMS = 1 << 18
STATIC_SMEM = 4096      # bytes of static shared memory the kernel declares (cfg, pointers), rounded up
CFG_DTYPE = np.int64

MODE_FORWARD, MODE_VALUE, MODE_GRAD = 0, 1, 2
# configuration table (fz::H_* and fz::F_*)
(H_L, H_WIDE, H_BT, H_R, H_RPB, H_P, H_SMEM, H_MODE, H_HAS_T, H_NEED_DX, H_XS, H_XS_LD, H_DL,
 H_DL_LD, H_SCR, H_DZ1, H_DZ1_LD, H_XR, H_DXW, H_K0, H_NOUT, H_VSLOT, H_S, H_S_LD) = range(24)
HEADER = 24
(F_K, F_N, F_ACT, F_HAS_B, F_Y, F_Y_LD, F_Z, F_W, F_W_LD, F_DW, F_DB) = range(11)
LAYER_WORDS = 16
CFG_WORDS = HEADER + LAYER_WORDS * MAX_LAYERS

_MATH = {"strict": 0, "tf32": 2, "3xtf32": 3}  # cuda_select.MATH_*
_CTYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}

_ENABLED_ENV = os.environ.get("CUPYNN_FUSED", "1")


def enabled() -> bool:
    """The fused path unless CUPYNN_FUSED=0 (a debugging switch: per-layer kernels only)."""
    return _ENABLED_ENV != "0" and _have_source()


@functools.cache
def _have_source() -> bool:
    return (_loader.KERNEL_DIR / SOURCE).is_file()


def smem_limit_for_arch(arch: str | None) -> int:
    """Opt-in shared memory per block of an architecture (the emulator's stand-in for the
    device attribute): sm_90 227 KiB, sm_80 163 KiB, others 99 KiB."""
    cc = int(arch.split("_")[1]) if arch else 80
    if cc >= 90:
        return 232448
    if cc in (80, 87):
        return 166912
    return 101376


def pad16(n: int) -> int:
    return -(-n // 16) * 16


def _ld(n: int) -> int:
    """Row stride of a shared buffer of width n: 16-padded, + 4 (conflict-free fragment reads)."""
    return pad16(n) + 4


def kernel_name(ctype: str, math: int) -> str:
    return f"cupynn::fused_mlp<{ctype}, {math}>"


def reduce_name(ctype: str) -> str:
    return f"cupynn::fused_reduce<{ctype}>"


def fused_kernel_names(have_mma: bool | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """Every instantiation of kernels/fused.cu the backend can request (the catalog's): float64
    on DMMA, float32 in each precision mode, and the two reductions."""
    if have_mma is None:
        have_mma = _loader.have_mma()
    names = [kernel_name("float", 0), reduce_name("double"), reduce_name("float")]
    if have_mma:
        names += [kernel_name("double", 1), kernel_name("float", 2), kernel_name("float", 3)]
    return [(SOURCE, tuple(names))]


def math_for(dtype: np.dtype, precision: str, f64_mma: bool) -> int | None:
    """The fused kernel's math mode, or None where there is none (float64 without DMMA)."""
    if not _loader.have_mma():
        return None if np.dtype(dtype) == np.float64 else 0
    if np.dtype(dtype) == np.float64:
        return 1 if f64_mma else None
    return _MATH[precision]


@dataclass(frozen=True)
class FusedLayout:
    """How one (network, batch, call kind) runs on the fused kernel."""

    wide: bool
    tile_rows: int          # BT
    super_rows: int         # R (wide: dz1 rows collected before the first layer's backward)
    rows_per_block: int     # rows of one slice
    grid: int               # slices (<= FUSED_BLOCKS); fused_mlp launches min(grid, SMs) blocks
    partial_stride: int     # P: elements of one block's partial slice (value slot last)
    param_offsets: tuple    # ((dW offset, db offset or -1), ...) per layer, in the slice
    smem_bytes: int         # dynamic shared memory per block
    cfg: tuple              # the configuration table (CFG_WORDS int64)
    math: int
    kernel: str
    reduce: str

    @property
    def value_slot(self) -> int:
        return self.partial_stride - 1


class _Alloc:
    """Offsets (in elements) of shared-memory buffers, 32-byte aligned."""

    def __init__(self, itemsize: int):
        self.align = max(1, 32 // itemsize)
        self.size = 0

    def take(self, n: int) -> int:
        off = -(-self.size // self.align) * self.align
        self.size = off + n
        return off


def _classify(net: NetSpec) -> tuple[bool, str | None]:
    """(wide, reason it cannot be fused or None)."""
    layers = net.layers
    L = len(layers)
    if L > MAX_LAYERS:
        return False, f"{L} layers (the fused kernel takes at most {MAX_LAYERS})"
    first = layers[0]
    wide = (L >= 2 and first.in_features <= MAX_K0 and WIDE_MIN <= first.out_features <= WIDE_MAX)
    if wide and layers[1].out_features > WIDE_N1_MAX:
        return wide, (f"a wide first layer ({first.out_features} units, fan-in {first.in_features}) "
                      f"feeding a {layers[1].out_features}-wide layer: past {WIDE_N1_MAX} columns "
                      f"the fused kernel re-reads W1 from L2 every 16 rows and recomputes the first "
                      f"layer once per {WIDE_N1_MAX}-column pass, slower than the per-layer path")
    for l, s in enumerate(layers):
        if l == 0 and wide:
            continue
        if s.out_features > NARROW_MAX:
            what = "output" if l == L - 1 else "hidden"
            return wide, (f"layer {l} is {s.out_features} wide ({what}); the fused kernel keeps "
                          f"layers up to {NARROW_MAX} wide on chip"
                          + (f", or a first layer up to {WIDE_MAX} wide with fan-in <= {MAX_K0}"
                             if l == 0 else ""))
    return wide, None


def _layout_smem(net: NetSpec, BT: int, R: int, wide: bool, mode: int, need_dx: bool):
    """(cfg per-layer buffer fields, header fields, total elements) for tile BT, super-tile R."""
    layers = net.layers
    L = len(layers)
    grad = mode == MODE_GRAD
    a = _Alloc(np.dtype(net.dtype).itemsize)
    head = {}
    per = [dict(y=-1, y_ld=0, z=-1, w=-1, w_ld=0) for _ in layers]
    K0 = layers[0].in_features
    # S: the raw dz_l W_l of the narrow backward (width K_l; l >= 1, wide: l >= 2)
    s_ld = max((_ld(s.in_features) for s in layers[2 if wide else 1:]), default=0) if grad else 0
    head[H_S_LD] = s_ld
    if wide:
        head[H_XR] = a.take(R * MAX_K0)
        head[H_XS], head[H_XS_LD] = -1, 0
        # one scratch region: the forward's h0 stage and split-K slots, the backward's per-warp
        # tiles, and S (never in use at the same time)
        head[H_SCR] = a.take(max(WIDE_STAGE, WIDE_SPLITK, WIDE_PW if grad else 0, BT * s_ld))
        head[H_S] = head[H_SCR] if s_ld else -1
        if grad:
            head[H_DZ1_LD] = _ld(layers[1].out_features)
            head[H_DZ1] = a.take(R * head[H_DZ1_LD])
        else:
            head[H_DZ1], head[H_DZ1_LD] = -1, 0
        head[H_DXW] = a.take(WARPS * R * MAX_K0) if (grad and need_dx) else -1
    else:
        head[H_XS_LD] = _ld(K0)
        head[H_XS] = a.take(BT * head[H_XS_LD])
        head[H_XR], head[H_SCR], head[H_DZ1], head[H_DZ1_LD], head[H_DXW] = -1, -1, -1, 0, -1
        head[H_S] = a.take(BT * s_ld) if s_ld else -1
    for l, s in enumerate(layers):
        if not (wide and l <= 1):  # W0 and W1 of a wide network are read from global memory
            per[l]["w_ld"] = _ld(s.in_features)
            per[l]["w"] = a.take(pad16(s.out_features) * per[l]["w_ld"])
        if l < L - 1 and not (wide and l == 0):
            ld = _ld(s.out_features)
            per[l]["y_ld"] = ld
            per[l]["y"] = a.take(BT * ld)
            if grad and not get_activation(s.activation).from_output:
                per[l]["z"] = a.take(BT * ld)
    # DL: the last layer's raw product, then (gradient) its dz
    head[H_DL_LD] = _ld(layers[-1].out_features)
    head[H_DL] = a.take(BT * head[H_DL_LD])
    return per, head, a.size


def fused_layout(net: NetSpec, batch: int, *, mode: int, need_dx: bool = False,
                 has_target: bool = False, loss: str = "sum_squares", smem_limit: int,
                 f64_mma: bool = True):
    """A :class:`FusedLayout`, or a string saying why ``net`` at ``batch`` is not fused."""
    return _fused_layout(net, int(batch), int(mode), bool(need_dx), bool(has_target), loss,
                         int(smem_limit), bool(f64_mma), WIDE_MIN, FUSED_BLOCKS, SLICE_SPLIT,
                         SLICE_WORKSPACE)


def _slices(batch: int, blocks: int, split: int, workspace: int, partial_bytes: int) -> int:
    """How many fixed slices the batch is cut into (a function of the batch and the network
    only, never of the card: the bits depend on it)."""
    k = max(1, split)
    while k > 1 and (batch < blocks * k * TILE_ROWS[0] or blocks * k * partial_bytes > workspace):
        k //= 2
    return blocks * k


@functools.lru_cache(maxsize=256)
def _fused_layout(net, batch, mode, need_dx, has_target, loss, smem_limit, f64_mma, wide_min,
                  blocks, split=1, workspace=SLICE_WORKSPACE):
    if not enabled():
        return "the fused path is switched off (CUPYNN_FUSED=0)"
    if mode != MODE_FORWARD and loss not in ("sum_squares", "mse"):
        if loss == "callable":
            return "a callable loss runs on the host between the forward and backward passes"
        return f"the {loss!r} loss has no fused epilogue"
    if batch <= 0:
        return "an empty batch launches nothing"
    if any(s.in_features <= 0 or s.out_features <= 0 for s in net.layers):
        return "a layer of width 0"
    wide, reason = _classify(net)
    if reason:
        return reason
    math = math_for(net.dtype, net.precision, f64_mma)
    if math is None:
        return "float64 without DMMA (CUPYNN_F64_MMA=0) has no fused kernel"
    layers = net.layers
    n_params = sum(s.out_features * (s.in_features + int(s.bias)) for s in layers)
    if mode == MODE_GRAD and n_params > MAX_PARAMS:
        return (f"{n_params:,} parameters: every block would keep a partial gradient of each "
                f"(the fused path takes up to {MAX_PARAMS:,})")
    dtype = np.dtype(net.dtype)
    itemsize = dtype.itemsize
    slices = _slices(batch, blocks, split, workspace,
                     0 if mode == MODE_FORWARD else (n_params + 1) * itemsize)
    rpb = max(16, pad16(-(-batch // slices)))
    grid = -(-batch // rpb)
    budget = smem_limit - STATIC_SMEM
    grad = mode == MODE_GRAD
    # Candidate (tile rows BT, super-tile rows R), the first that fits wins.  Tiles no taller
    # than the block's rows.  A wide network collects dz1 of several tiles (its dW1 slice
    # goes to the partials once per R rows): tiles of at least 64 rows first (the wide
    # forward's warps work on 64 rows at a time), then R up to SUPER_PREFER, then taller tiles.
    cands = []
    for BT in TILE_ROWS:
        if BT > rpb and BT != TILE_ROWS[-1]:
            continue
        for s in (SUPER_TILES if (wide and grad and not need_dx) else (1,)):
            R = BT * s
            if s > 1 and R >= rpb + BT:  # no more rows collected than the block has
                continue
            cands.append((BT, R))
    if wide and grad:
        cands.sort(key=lambda c: (c[0] < FMW * 16, -min(c[1], SUPER_PREFER), -c[0]))
    choice = None
    for BT, R in cands:
        per, head, elems = _layout_smem(net, BT, R, wide, mode, need_dx)
        if elems * itemsize <= budget:
            choice = (BT, R, per, head, elems)
            break
    if choice is None:
        per, head, elems = _layout_smem(net, TILE_ROWS[-1], TILE_ROWS[-1], wide, mode, need_dx)
        return (f"one block needs {elems * itemsize + STATIC_SMEM} bytes of shared memory at "
                f"{TILE_ROWS[-1]} rows per tile; this device allows {smem_limit}")
    BT, R, per, head, elems = choice
    # partial slice: [dW_0 | db_0 | dW_1 | db_1 | ... | loss]
    offsets = []
    P = 0
    for s in layers:
        dw = P
        P += s.out_features * s.in_features
        db = -1
        if s.bias:
            db = P
            P += s.out_features
        offsets.append((dw, db))
    P += 1
    if mode != MODE_GRAD:
        P = 1
        offsets = [(0, -1)] * len(layers)
    cfg = [0] * CFG_WORDS
    cfg[H_L], cfg[H_WIDE], cfg[H_BT], cfg[H_R], cfg[H_RPB] = len(layers), int(wide), BT, R, rpb
    cfg[H_P], cfg[H_SMEM], cfg[H_MODE] = P, elems, mode
    cfg[H_HAS_T], cfg[H_NEED_DX], cfg[H_K0] = int(has_target), int(need_dx and grad), layers[0].in_features
    cfg[H_NOUT], cfg[H_VSLOT] = layers[-1].out_features, P - 1
    for k, v in head.items():
        cfg[k] = v
    for l, s in enumerate(layers):
        base = HEADER + l * LAYER_WORDS
        f = per[l]
        cfg[base + F_K], cfg[base + F_N] = s.in_features, s.out_features
        cfg[base + F_ACT], cfg[base + F_HAS_B] = get_activation(s.activation).id, int(s.bias)
        cfg[base + F_Y], cfg[base + F_Y_LD], cfg[base + F_Z] = f["y"], f["y_ld"], f["z"]
        cfg[base + F_W], cfg[base + F_W_LD] = f["w"], f["w_ld"]
        cfg[base + F_DW], cfg[base + F_DB] = offsets[l]
    ctype = _CTYPE[dtype]
    return FusedLayout(wide=wide, tile_rows=BT, super_rows=R, rows_per_block=rpb, grid=grid,
                       partial_stride=P, param_offsets=tuple(offsets),
                       smem_bytes=elems * itemsize, cfg=tuple(cfg), math=math,
                       kernel=kernel_name(ctype, math), reduce=reduce_name(ctype))
