"""Compile kernel sources with g++ into emulated modules, cached by content hash."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMU_HEADER = HERE / "cuda_emu.h"
EMU_RUNTIME = HERE / "cuda_emu_runtime.cpp"
FORMAT_VERSION = "3"  # bump when the generated code changes meaning

SANITIZERS = (None, "address", "thread")


class EmulatorBuildError(RuntimeError):
    """g++ rejected the kernel source (the message holds the compiler output)."""


def cache_dir() -> Path:
    root = os.environ.get("CUPYNN_EMU_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "cupynn-emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cxx() -> str:
    return os.environ.get("CXX", "g++")


@functools.cache
def compiler_id() -> str:
    try:
        out = subprocess.run([cxx(), "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmulatorBuildError(f"the emulator needs a C++17 compiler ({cxx()}): {exc}") from exc
    return out.stdout.splitlines()[0] if out.stdout else cxx()


@functools.cache
def sanitizer_runtime(sanitizer: str) -> str:
    """Path of libasan.so / libtsan.so of the compiler (what LD_PRELOAD must load first).

    The address mode also links UBSan's alignment check, so it needs libubsan.so too."""
    if sanitizer == "address":
        _compiler_lib("libubsan.so", sanitizer)
    return _compiler_lib({"address": "libasan.so", "thread": "libtsan.so"}[sanitizer], sanitizer)


def _compiler_lib(lib: str, sanitizer: str) -> str:
    out = subprocess.run([cxx(), f"-print-file-name={lib}"], capture_output=True, text=True)
    path = out.stdout.strip()
    if out.returncode != 0 or not path or not os.path.isabs(path) or not os.path.exists(path):
        raise EmulatorBuildError(f"{cxx()} has no {lib} (needed for sanitizer={sanitizer!r})")
    return os.path.realpath(path)


@dataclass
class ParsedOptions:
    include_dirs: list[str] = field(default_factory=list)
    defines: list[str] = field(default_factory=list)
    arch: int = 800
    ftz: bool = False  # -ftz=true (CuPy appends it): float32 kernels flush subnormals to zero


def parse_options(options) -> ParsedOptions:
    """Keep what matters on the CPU from NVRTC options: -I, -D and the architecture."""
    parsed = ParsedOptions()
    opts = list(options or ())
    i = 0
    while i < len(opts):
        opt = str(opts[i])
        nxt = str(opts[i + 1]) if i + 1 < len(opts) else None
        for short, long_, target in (
            ("-I", "--include-path", parsed.include_dirs),
            ("-D", "--define-macro", parsed.defines),
        ):
            if opt == short or opt == long_:
                if nxt is not None:
                    target.append(nxt)
                    i += 1
                break
            if opt.startswith(long_ + "="):
                target.append(opt[len(long_) + 1 :])
                break
            if opt.startswith(short) and not opt.startswith("--"):
                target.append(opt[len(short) :])
                break
        else:
            m = re.match(r"^(?:-arch|--gpu-architecture)(?:=|$)(?:sm|compute)?_?(\d+)", opt)
            if m is None and opt in ("-arch", "--gpu-architecture") and nxt:
                m = re.match(r"^(?:sm|compute)_(\d+)", nxt)
                i += 1
            if m:
                parsed.arch = int(m.group(1)) * 10
            f = re.match(r"^--?ftz(?:=(true|false))?$", opt)
            if f:
                parsed.ftz = f.group(1) != "false"  # the last one wins, as in NVRTC
        i += 1
    parsed.include_dirs = [os.path.abspath(d) for d in parsed.include_dirs]
    return parsed


_EXTERN_C_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                              r"void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def extern_c_kernels(code: str) -> list[str]:
    return _EXTERN_C_KERNEL.findall(code)


def _dir_digest(h, directory: str) -> None:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for name in names:
        if name.endswith((".cuh", ".h", ".hpp", ".cu", ".inc")):
            p = os.path.join(directory, name)
            if os.path.isfile(p):
                h.update(name.encode())
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())


def _find_source_file(code: str, include_dirs: list[str]) -> str | None:
    """The .cu file in an include dir whose text is `code` (for error messages and #includes)."""
    data = code.encode()
    for d in include_dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if name.endswith(".cu"):
                p = os.path.join(d, name)
                try:
                    if os.path.getsize(p) == len(data) and Path(p).read_bytes() == data:
                        return p
                except OSError:
                    pass
    return None


def _opt_flags(sanitizer: str | None) -> list[str]:
    opt = os.environ.get("CUPYNN_EMU_OPT")
    if opt:
        return shlex.split(opt)
    if sanitizer:
        return ["-O1", "-g"]
    return ["-O1"]


_COMMON = ["-std=c++17", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
# Kernel code: an implicit narrowing conversion (i64 -> int index arithmetic, double -> float)
# is a compile error, so a 32-bit offset that truncates a 64-bit one cannot slip in.
# $CUPYNN_EMU_WARN replaces these flags.
_WARN = shlex.split(os.environ.get("CUPYNN_EMU_WARN", "-Wconversion -Werror=conversion"))


def _sanitize_flags(sanitizer: str | None, runtime: bool) -> list[str]:
    if sanitizer == "address":
        # + UBSan's alignment check: a misaligned vector access faults on the GPU but works on
        # x86, so without it the emulator would hide that class of bug.
        return ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment",
                "-fno-omit-frame-pointer", "-DCUPYNN_EMU_ASAN"]
    if sanitizer == "thread":
        # The runtime (scheduler bookkeeping) is not instrumented; kernels are.
        return ["-DCUPYNN_EMU_TSAN"] if runtime else ["-fsanitize=thread"]
    return []


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulatorBuildError(
            f"{what} failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n{proc.stderr}{proc.stdout}"
        )


def _atomic_build(target: Path, build) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def runtime_object(sanitizer: str | None) -> Path:
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, compiler_id(), str(sanitizer), " ".join(_opt_flags(sanitizer))):
        h.update(part.encode() + b"\0")
    h.update(EMU_HEADER.read_bytes())
    h.update(EMU_RUNTIME.read_bytes())
    target = cache_dir() / f"runtime-{sanitizer or 'plain'}-{h.hexdigest()[:20]}.o"

    def build(tmp: str) -> None:
        cmd = [cxx(), *_COMMON, "-O2", *(["-g"] if sanitizer else []),
               *_sanitize_flags(sanitizer, runtime=True), "-c", str(EMU_RUNTIME), "-o", tmp]
        _run(cmd, "compiling the emulator runtime")

    return _atomic_build(target, build)


# The floating-point mode of the launching thread (the emulator's worker threads are created
# per launch and inherit it): x86 MXCSR, whose FTZ (bit 15) and DAZ (bit 6) bits are what
# CUDA's -ftz=true does to float32 arithmetic.  -1 where there is no MXCSR.
_FPMODE_SHIM = (
    "\n#if defined(__x86_64__) || defined(__i386__)\n#include <xmmintrin.h>\n#endif\n"
    'extern "C" __attribute__((visibility("default")))\n'
    "long long cupynn_emu_fpmode(int set, unsigned value) {\n"
    "#if defined(__x86_64__) || defined(__i386__)\n"
    "    const unsigned old = _mm_getcsr();\n"
    "    if (set) _mm_setcsr(value);\n"
    "    return (long long)old;\n"
    "#else\n"
    "    (void)set; (void)value;\n"
    "    return -1;\n"
    "#endif\n"
    "}\n"
)


def build_module(code: str, options, name_expressions, sanitizer: str | None):
    """Compile `code` into a shared library; return (path to .so, list of kernel names)."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer must be one of {SANITIZERS}, not {sanitizer!r}")
    parsed = parse_options(options)
    names = list(name_expressions or ()) or extern_c_kernels(code)
    if not names:
        raise ValueError("no name_expressions given and no extern \"C\" __global__ kernel found")

    h = hashlib.sha256()
    for part in (FORMAT_VERSION, compiler_id(), str(sanitizer), " ".join(_opt_flags(sanitizer)),
                 " ".join(_WARN), str(parsed.arch), f"ftz={parsed.ftz}", *parsed.defines, *parsed.include_dirs,
                 "\0names", *names):
        h.update(part.encode() + b"\0")
    h.update(code.encode())
    h.update(EMU_HEADER.read_bytes())
    h.update(EMU_RUNTIME.read_bytes())
    for d in parsed.include_dirs:
        _dir_digest(h, d)
    key = h.hexdigest()[:24]
    build_dir = cache_dir() / key
    target = build_dir / f"module-{sanitizer or 'plain'}.so"
    if target.exists():
        return target, names

    rt = runtime_object(sanitizer)
    build_dir.mkdir(parents=True, exist_ok=True)
    source = _find_source_file(code, parsed.include_dirs)
    if source is None:
        source = str(build_dir / "kernel.cu")
        Path(source).write_text(code)
    table = ",\n".join(f"    ::cupynn_emu::describe<&{n}>({_c_string(n)})" for n in names)
    tu = (
        "// generated by cupynn.emulator: the kernel source, one launch shim per name expression\n"
        f'#include "{source}"\n\n'
        "static const ::cupynn_emu::KernelDesc cupynn_emu_table_[] = {\n"
        f"{table}\n}};\n\n"
        'extern "C" __attribute__((visibility("default")))\n'
        "const ::cupynn_emu::KernelDesc* cupynn_emu_kernels(int* n) {\n"
        f"    *n = {len(names)};\n"
        "    return cupynn_emu_table_;\n"
        "}\n"
        + _FPMODE_SHIM
    )
    tu_path = build_dir / f"module-{sanitizer or 'plain'}.cpp"
    tu_path.write_text(tu)

    def build(tmp: str) -> None:
        cmd = [cxx(), *_COMMON, *_opt_flags(sanitizer), *_sanitize_flags(sanitizer, runtime=False),
               *_WARN, "-shared", "-DCUPYNN_EMULATE=1", f"-D__CUDA_ARCH__={parsed.arch}",
               "-include", str(EMU_HEADER)]
        cmd += [f"-D{d}" for d in parsed.defines]
        cmd += [f"-I{d}" for d in parsed.include_dirs]
        cmd += [str(tu_path), str(rt), "-o", tmp]
        _run(cmd, "compiling the kernels for the emulator")

    return _atomic_build(target, build), names


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
