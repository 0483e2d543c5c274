"""Pieces shared by the in-process emulator and the sanitizer helper process.

Only the standard library here: the helper process imports this file directly.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import struct
from typing import NamedTuple

KIND_NONE, KIND_PTR, KIND_SINT, KIND_UINT, KIND_FLOAT, KIND_OTHER = range(6)


class ParamInfo(NamedTuple):
    kind: int
    size: int
    pointee_kind: int
    pointee_size: int
    pointee_const: int


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the emulator (deadlock, bad warp collective, __trap...)."""


class SanitizerError(EmulatorError):
    """AddressSanitizer or ThreadSanitizer reported an error; .report holds its text."""

    def __init__(self, message: str, report: str = ""):
        super().__init__(message)
        self.report = report


class _KernelDesc(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("run", ctypes.c_void_p), ("nparams", ctypes.c_int),
                ("params", ctypes.c_void_p)]


class _ParamInfoC(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("size", ctypes.c_int), ("pointee_kind", ctypes.c_int),
                ("pointee_size", ctypes.c_int), ("pointee_const", ctypes.c_int)]


def read_kernel_table(lib) -> dict:
    """name expression -> (address of its KernelDesc, [ParamInfo])."""
    fn = lib.cupynn_emu_kernels
    fn.restype = ctypes.POINTER(_KernelDesc)
    fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
    n = ctypes.c_int()
    table = fn(ctypes.byref(n))
    out = {}
    for i in range(n.value):
        desc = table[i]
        params = ctypes.cast(desc.params, ctypes.POINTER(_ParamInfoC))
        infos = [ParamInfo(params[j].kind, params[j].size, params[j].pointee_kind,
                           params[j].pointee_size, params[j].pointee_const)
                 for j in range(desc.nparams)]
        out[desc.name.decode()] = (ctypes.addressof(desc), infos)
    return out


SCHEDULE_KINDS = {"default": 0, "reversed": 1, "rotated": 2, "random": 3}


def parse_schedule(spec) -> tuple[int, int]:
    """"default" | "reversed" | "rotated[:seed]" | "random[:seed]" -> (kind, seed)."""
    if spec is None:
        return 0, 0
    if isinstance(spec, tuple):
        return spec
    name, _, seed = str(spec).strip().partition(":")
    name = name or "default"
    if name not in SCHEDULE_KINDS:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULE_KINDS)} (optionally ':<seed>'), "
                         f"not {spec!r}")
    try:
        seed_v = int(seed) if seed else 0
    except ValueError:
        raise ValueError(f"schedule {spec!r}: the seed after ':' must be an integer") from None
    return SCHEDULE_KINDS[name], seed_v & 0x7FFFFFFFFFFFFFFF


# The process-wide launch configuration (cupynn.emulator.schedule / set_schedule change it):
# fiber/block order and whether array arguments get guarded copies.
_STATE = {"schedule": parse_schedule(os.environ.get("CUPYNN_EMU_SCHEDULE") or None),
          "guard": os.environ.get("CUPYNN_EMU_GUARD", "1") != "0"}


def launch_config(blocks=None, schedule=None, guard=None) -> tuple:
    """(schedule kind, seed, first block, number of blocks or -1, guard) for one launch."""
    kind, seed = parse_schedule(schedule) if schedule is not None else _STATE["schedule"]
    first, count = (0, -1) if blocks is None else blocks
    g = _STATE["guard"] if guard is None else guard
    return (kind, seed, int(first), int(count), 1 if g else 0)


def launch_in_process(lib, desc_addr: int, grid, block, shared_mem: int, packed, config=None) -> None:
    """packed: list of ("ptr", address, nbytes) or ("val", bytes); config: launch_config()."""
    n = len(packed)
    keep = []
    argv = (ctypes.c_void_p * max(n, 1))()
    nbytes = (ctypes.c_longlong * max(n, 1))()
    for i, item in enumerate(packed):
        if item[0] == "ptr":
            buf = ctypes.c_void_p(item[1])
            nbytes[i] = item[2]
        else:
            buf = ctypes.create_string_buffer(item[1], max(len(item[1]), 1))
            nbytes[i] = -1
        keep.append(buf)
        argv[i] = ctypes.addressof(buf)
    err = ctypes.create_string_buffer(4096)
    launch = lib.cupynn_emu_launch
    launch.restype = ctypes.c_int
    launch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                       ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_void_p]
    g = (ctypes.c_uint * 3)(*grid)
    b = (ctypes.c_uint * 3)(*block)
    cfg = (ctypes.c_longlong * 5)(*(config if config is not None else launch_config()))
    rc = launch(desc_addr, g, b, shared_mem, argv, nbytes, n, err, len(err), cfg)
    if rc != 0:
        raise EmulatorError(err.value.decode(errors="replace"))


def send_msg(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def recv_msg(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the emulator helper process closed its pipe")
    (n,) = struct.unpack("<Q", header)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("the emulator helper process closed its pipe")
    return pickle.loads(data)
