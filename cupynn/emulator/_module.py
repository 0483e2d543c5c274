"""EmulatedModule: a cupy.RawModule look-alike that runs kernels on the CPU."""

from __future__ import annotations

import ctypes
import os
import re

import numpy as np

from . import _build
from ._protocol import (
    KIND_FLOAT,
    KIND_NONE,
    KIND_OTHER,
    KIND_PTR,
    KIND_SINT,
    KIND_UINT,
    ParamInfo,
    launch_config,
    launch_in_process,
    read_kernel_table,
)

MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024


def _dims(value, what: str, limits) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),)
    dims = tuple(int(v) for v in value)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {value!r}")
    dims = dims + (1,) * (3 - len(dims))
    for d, lim, axis in zip(dims, limits, "xyz"):
        if not 1 <= d <= lim:
            raise ValueError(f"{what}.{axis} = {d} is outside 1..{lim} (CUDA would refuse the "
                             "launch)")
    if what == "block" and dims[0] * dims[1] * dims[2] > 1024:
        raise ValueError(f"block {dims} has {dims[0] * dims[1] * dims[2]} threads; CUDA allows 1024")
    return dims


_KIND_NAMES = {KIND_FLOAT: "float", KIND_SINT: "signed int", KIND_UINT: "unsigned int",
               KIND_PTR: "pointer", KIND_OTHER: "struct", KIND_NONE: "void"}


def _ctype_name(kind: int, size: int) -> str:
    if kind == KIND_FLOAT:
        return {4: "float", 8: "double", 2: "half"}.get(size, f"float{size * 8}")
    if kind == KIND_SINT:
        return {1: "signed char", 2: "short", 4: "int", 8: "long long"}.get(size, f"int{size * 8}")
    if kind == KIND_UINT:
        return {1: "unsigned char/bool", 2: "unsigned short", 4: "unsigned",
                8: "unsigned long long"}.get(size, f"uint{size * 8}")
    if kind == KIND_NONE:
        return "void"
    return f"{size}-byte struct"


def _dtype_kind(dtype: np.dtype) -> int:
    if dtype.kind == "f":
        return KIND_FLOAT
    if dtype.kind == "i":
        return KIND_SINT
    if dtype.kind in "ub":
        return KIND_UINT
    return KIND_OTHER


def pack_args(kernel_name: str, params: list[ParamInfo], args) -> list:
    """Check every argument against the kernel's parameter types; return the packed list."""
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{kernel_name}: args must be a tuple, not {type(args).__name__}")
    if len(args) != len(params):
        raise TypeError(f"{kernel_name} takes {len(params)} arguments, {len(args)} given")
    packed = []
    for i, (arg, p) in enumerate(zip(args, params)):
        where = f"{kernel_name}: argument {i}"
        if p.kind == KIND_PTR:
            pointee = _ctype_name(p.pointee_kind, p.pointee_size)
            if arg is None:
                packed.append(("ptr", 0, 0))
                continue
            if not isinstance(arg, np.ndarray):
                raise TypeError(f"{where} is a {pointee}* pointer; pass a numpy array, not "
                                f"{type(arg).__name__}")
            if not arg.flags.c_contiguous:
                raise TypeError(f"{where}: the array is not C-contiguous (kernels ignore strides); "
                                "pass np.ascontiguousarray(x)")
            if p.pointee_kind != KIND_NONE:
                ok = arg.dtype.itemsize == p.pointee_size and (
                    p.pointee_kind == KIND_OTHER or _dtype_kind(arg.dtype) == p.pointee_kind
                    or {_dtype_kind(arg.dtype), p.pointee_kind} == {KIND_SINT, KIND_UINT})
                if not ok:
                    raise TypeError(f"{where} is a {pointee}* pointer but the array has dtype "
                                    f"{arg.dtype}")
            if not p.pointee_const and not arg.flags.writeable:
                raise TypeError(f"{where} is a non-const {pointee}* but the array is read-only")
            packed.append(("ptr", arg.ctypes.data, arg.nbytes))
        else:
            want = _ctype_name(p.kind, p.size)
            if isinstance(arg, np.ndarray) and arg.ndim == 0:
                arg = arg[()]
            if p.kind == KIND_OTHER:
                if isinstance(arg, (bytes, bytearray)):
                    data = bytes(arg)
                elif isinstance(arg, np.generic):
                    data = arg.tobytes()
                else:
                    raise TypeError(f"{where} is a {p.size}-byte struct; pass bytes or a numpy "
                                    "structured scalar")
                if len(data) != p.size:
                    raise TypeError(f"{where} is a {p.size}-byte struct, got {len(data)} bytes")
                packed.append(("val", data))
                continue
            if not isinstance(arg, np.generic):
                hint = {4: "np.int32" if p.kind == KIND_SINT else "np.uint32" if p.kind == KIND_UINT
                        else "np.float32", 8: "np.int64" if p.kind == KIND_SINT else "np.uint64"
                        if p.kind == KIND_UINT else "np.float64"}.get(p.size, "a numpy scalar")
                raise TypeError(f"{where} is `{want}`; pass a numpy scalar ({hint}(...)), not "
                                f"{type(arg).__name__} (CuPy would not check its size)")
            kind = _dtype_kind(arg.dtype)
            same_kind = kind == p.kind or {kind, p.kind} == {KIND_SINT, KIND_UINT}
            if arg.dtype.itemsize != p.size or not same_kind:
                raise TypeError(f"{where} is `{want}` ({p.size} bytes) but got {arg.dtype} "
                                f"({arg.dtype.itemsize} bytes)")
            packed.append(("val", arg.tobytes()))
    return packed


class EmulatedFunction:
    """One kernel of an EmulatedModule: f(grid, block, args, shared_mem=0)."""

    def __init__(self, module: EmulatedModule, name: str, params: list[ParamInfo]):
        self.module = module
        self.name = name
        self.params = params
        self.max_dynamic_shared_size_bytes = DEFAULT_MAX_DYNAMIC_SHARED

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False, *,
                 blocks=None):
        """Launch; ``blocks=(first, count)`` runs only those linear blocks (count -1: to the end),
        e.g. the last blocks of a launch over sparse arrays (cupynn.emulator.sparse_array)."""
        grid3 = _dims(grid, "grid", MAX_GRID)
        if blocks is not None:
            first, count = (int(v) for v in blocks)
            total = grid3[0] * grid3[1] * grid3[2]
            if not 0 <= first < total or count < -1:
                raise ValueError(f"{self.name}: blocks=({first}, {count}) is outside the grid's "
                                 f"{total} blocks (first in 0..{total - 1}, count >= -1)")
            blocks = (first, count)
        block3 = _dims(block, "block", MAX_BLOCK)
        shared_mem = int(shared_mem)
        if shared_mem < 0 or shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(
                f"{self.name}: shared_mem={shared_mem} exceeds max_dynamic_shared_size_bytes="
                f"{self.max_dynamic_shared_size_bytes} (raise that attribute first, as on CUDA)")
        packed = pack_args(self.name, self.params, args)
        self.module._launch(self.name, grid3, block3, shared_mem, packed, args, launch_config(blocks))

    def __repr__(self) -> str:
        return f"<EmulatedFunction {self.name}>"


_MXCSR_FTZ_DAZ = 0x8040  # flush-to-zero (bit 15) and denormals-are-zero (bit 6)
_FLOAT_KERNEL = re.compile(r"<\s*float\b")


class EmulatedModule:
    """Same constructor keywords as cupy.RawModule; kernels run on the CPU.

    sanitizer=None runs in this process (unless $CUPYNN_EMU_SANITIZER names one); "address" (ASan, the counterpart of
    compute-sanitizer memcheck) and "thread" (TSan, the counterpart of racecheck) run each
    launch in a helper process with the sanitizer runtime preloaded, and raise
    SanitizerError with the report when it finds something.
    """

    def __init__(self, code: str | None = None, options=(), name_expressions=(),
                 sanitizer: str | None = None, *, path: str | None = None, **_ignored):
        if code is None:
            if path is None:
                raise TypeError("EmulatedModule needs code= (the .cu text) or path=")
            with open(path) as f:
                code = f.read()
        self.code = code
        self.options = tuple(options or ())
        self.name_expressions = tuple(name_expressions or ())
        if sanitizer is None:  # e.g. CUPYNN_EMU_SANITIZER=address pytest tests/...
            sanitizer = os.environ.get("CUPYNN_EMU_SANITIZER", "").strip() or None
        if sanitizer in ("none", "off"):
            sanitizer = None
        self.sanitizer = sanitizer
        self.so_path, self._names = _build.build_module(code, self.options, self.name_expressions,
                                                        sanitizer)
        # -ftz=true (CuPy appends it to every compilation): float32 kernels run with subnormal
        # results and inputs flushed to zero, as on the GPU (float64 ones keep them).
        self.ftz = _build.parse_options(self.options).ftz
        self._lib = None
        self._fpmode = None
        if sanitizer is None:
            self._lib = ctypes.CDLL(str(self.so_path))
            self._table = read_kernel_table(self._lib)
            fpmode = getattr(self._lib, "cupynn_emu_fpmode", None)
            if fpmode is not None:
                fpmode.restype = ctypes.c_longlong
                fpmode.argtypes = [ctypes.c_int, ctypes.c_uint]
                self._fpmode = fpmode
        else:
            from ._remote import get_worker

            self._table = get_worker(sanitizer).load(str(self.so_path))
        self._functions: dict[str, EmulatedFunction] = {}

    def get_function(self, name_expression: str) -> EmulatedFunction:
        fn = self._functions.get(name_expression)
        if fn is None:
            entry = self._table.get(name_expression)
            if entry is None:
                raise KeyError(f"{name_expression!r} is not one of this module's kernels "
                               f"{sorted(self._table)} (add it to name_expressions)")
            fn = EmulatedFunction(self, name_expression, entry[1])
            self._functions[name_expression] = fn
        return fn

    def flushes(self, name_expression: str) -> bool:
        """True when launches of this kernel flush float32 subnormals (a float32 kernel --
        first template argument ``float`` -- of a module built with -ftz=true, in process)."""
        return bool(self.ftz and self._fpmode is not None and _FLOAT_KERNEL.search(name_expression))

    def _launch(self, name, grid, block, shared_mem, packed, args, config) -> None:
        if self.sanitizer is None:
            if self.flushes(name):
                old = self._fpmode(0, 0)
                if old >= 0:
                    self._fpmode(1, (old | _MXCSR_FTZ_DAZ) & 0xFFFFFFFF)
                    try:
                        launch_in_process(self._lib, self._table[name][0], grid, block, shared_mem,
                                          packed, config)
                    finally:
                        self._fpmode(1, old)
                    return
            launch_in_process(self._lib, self._table[name][0], grid, block, shared_mem, packed, config)
            return
        from ._remote import get_worker

        get_worker(self.sanitizer).launch(str(self.so_path), name, grid, block, shared_mem, packed,
                                          args, config)

    def __repr__(self) -> str:
        return f"<EmulatedModule {self.so_path.name} sanitizer={self.sanitizer} kernels={self._names}>"
