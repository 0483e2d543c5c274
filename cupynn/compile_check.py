"""Compile every CUDA kernel instantiation through NVRTC, without a GPU or a driver.

    python -m cupynn.compile_check [--arch sm_80 --arch sm_90] [--jobs N] [--json FILE]
    python -m cupynn.compile_check --sample 14     # a quick check: 14 instantiations per source

For each (source file, name expressions) of ``cupynn.backends.cuda_catalog.all_instantiations()`` and
each architecture, the same source text, name expressions and options
(``cupynn._loader.nvrtc_options(arch)``: the loader's plus what CuPy appends, -ftz=true
included, i.e. what NVRTC receives when cupy.RawModule compiles them on a GPU) are
compiled by NVRTC to SASS (cubin) with ``--ptxas-options=-v``; ptxas' report gives every
kernel's registers, static shared memory, stack frame and spill bytes.  The check fails
(exit status 1) when a compilation fails, when a requested kernel is missing from the
report, or when a *hot* kernel spills.  Hot kernels: ``cuda_catalog.hot_kernels()`` (a set of
name expressions) when the loader defines it, otherwise every kernel.

NVRTC comes from pip's nvidia-cuda-nvrtc-cu12 (or any CUDA toolkit) through
``cupy_backends.cuda.libs.nvrtc``; no driver is needed.  Programs run in parallel on every
usable core (``--jobs``), each printing a progress line.  Each kernel's result is cached by
the hash of what it was compiled from (the source and every header, NVRTC's version, the
architecture and options, the name expression) under the emulator cache directory
($CUPYNN_EMU_CACHE or ~/.cache/cupynn-emu): an unchanged kernel is never compiled twice,
whichever run (the full check, a single --source, another checkout) compiled it first.
--no-cache recompiles.

``--sample N`` checks at most N instantiations per source file (:func:`sample_instantiations`:
every kernel kind, i.e. template and dtype, once before any kind twice, hot ones first), for a
check in seconds rather than minutes (the Docker image's CI build uses it).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ._threads import usable_cores

DEFAULT_ARCHS = ("sm_80", "sm_90")
SASS_ARCHS = ("sm_90",)  # compiled to SASS (ptxas report, spill check); others to PTX only
CHUNK = 16  # name expressions per NVRTC program (NVRTC time grows faster than linearly)


class NvrtcUnavailable(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# Loading NVRTC
# ---------------------------------------------------------------------------------------
def _preload_pip_nvrtc() -> list[str]:
    """dlopen libnvrtc from pip's nvidia-cuda-nvrtc-cu1x wheel (global symbols), if present."""
    import ctypes

    loaded = []
    for entry in sys.path:
        for lib in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*nvrtc*", "lib",
                                                 "libnvrtc.so*")) +
                          sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib",
                                                        "libnvrtc.so*")))):
            if "builtins" in lib or "alt" in lib:
                continue
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                loaded.append(lib)
            except OSError:
                pass
    return loaded


def load_nvrtc():
    """The cupy_backends NVRTC binding, working; raises NvrtcUnavailable with the reason."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as exc:
        raise NvrtcUnavailable(f"cannot import cupy_backends.cuda.libs.nvrtc ({exc}); "
                               "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12") from exc
    try:
        nvrtc.getVersion()
        return nvrtc
    except Exception as first:
        # CuPy finds pip's wheel through cuda-pathfinder; older CuPy may need it preloaded.
        if _preload_pip_nvrtc():
            try:
                nvrtc.getVersion()
                return nvrtc
            except Exception:
                pass
        raise NvrtcUnavailable(f"NVRTC cannot be loaded ({first}); pip install "
                               "nvidia-cuda-nvrtc-cu12 (or set CUDA_PATH)") from first


# ---------------------------------------------------------------------------------------
# ptxas report
# ---------------------------------------------------------------------------------------
@dataclass
class KernelStats:
    source: str
    name: str          # name expression
    arch: str
    lowered: str = ""
    registers: int = -1
    smem: int = -1     # static shared memory bytes
    stack: int = -1    # stack frame bytes
    spill_stores: int = -1
    spill_loads: int = -1
    hot: bool = True
    problem: str = ""


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """mangled name -> {registers, smem, stack, spill_stores, spill_loads} from ptxas -v."""
    out: dict[str, dict] = {}
    entry = None
    props_for = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry = m.group(1)
            out.setdefault(entry, {})
            props_for = None
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and props_for is not None:
            d = out.setdefault(props_for, {})
            d["stack"], d["spill_stores"], d["spill_loads"] = map(int, m.groups())
            props_for = None
            continue
        m = _USED.search(line)
        if m and entry is not None:
            d = out[entry]
            d["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            d["smem"] = int(s.group(1)) if s else 0
    return out


# ---------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------
def ptx_only_options(options: tuple[str, ...]) -> tuple[str, ...]:
    """The same options with -arch=sm_XY turned into -arch=compute_XY (NVRTC then stops at PTX)."""
    return tuple(re.sub(r"^(-arch=|--gpu-architecture=)sm_", r"\1compute_", o) for o in options)


def compile_chunk(source_name: str, code: str, names: tuple[str, ...], arch: str,
                  options: tuple[str, ...], sass: bool = True) -> dict:
    """One NVRTC program: returns {"ok", "log", "lowered": {name: mangled}, "cubin_size"}
    (and "ptx", the PTX bytes, when ``sass`` is False)."""
    nvrtc = load_nvrtc()
    prog = nvrtc.createProgram(code, source_name, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        if not sass:
            try:
                nvrtc.compileProgram(prog, list(ptx_only_options(options)))
            except Exception as exc:
                return {"ok": False, "log": f"{exc}\n{nvrtc.getProgramLog(prog)}", "lowered": {},
                        "cubin_size": 0, "sass": False}
            lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
            ptx = nvrtc.getPTX(prog)
            ptx = ptx.encode() if isinstance(ptx, str) else ptx
            missing = [n for n, m in lowered.items() if m.encode() not in ptx]
            return {"ok": not missing, "log": nvrtc.getProgramLog(prog) + (
                f"\nkernels missing from the PTX: {missing}" if missing else ""),
                "lowered": lowered, "cubin_size": 0, "sass": False, "ptx": ptx}
        opts = list(options) + ["--ptxas-options=-v"]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            return {"ok": False, "log": f"{exc}\n{nvrtc.getProgramLog(prog)}", "lowered": {},
                    "cubin_size": 0}
        log = nvrtc.getProgramLog(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        cubin = nvrtc.getCUBIN(prog)
        missing = [n for n, m in lowered.items() if m.encode() not in cubin]
        if missing:
            return {"ok": False, "log": log + f"\nkernels missing from the cubin: {missing}",
                    "lowered": lowered, "cubin_size": len(cubin)}
        return {"ok": True, "log": log, "lowered": lowered, "cubin_size": len(cubin)}
    finally:
        nvrtc.destroyProgram(prog)


def _hot_predicate(catalog):
    hot = getattr(catalog, "hot_kernels", None)
    if callable(hot):
        names = set(hot())
        return lambda n: n in names
    return lambda n: True


def _options_digest(options: tuple[str, ...]) -> str:
    """The options with every -I directory replaced by the hash of its headers (so that
    the same kernels in another checkout or an installed package hit the same cache)."""
    h = hashlib.sha256()
    for opt in options:
        if opt.startswith("-I") and os.path.isdir(opt[2:]):
            h.update(b"-I")
            for p in sorted(Path(opt[2:]).glob("*.cu*")):
                h.update(p.name.encode() + b"\0" + p.read_bytes())
        else:
            h.update(opt.encode())
        h.update(b"\0")
    return h.hexdigest()


class _ResultCache:
    """One JSON file per (kernel, arch, what it was compiled from) under ``root``."""

    def __init__(self, root: Path | None, nvrtc_version: str):
        self.root = root
        self.version = nvrtc_version
        self._opt_digests: dict = {}

    def key(self, source: str, code: str, name: str, arch: str, options, sass: bool) -> str:
        opts = tuple(options)
        od = self._opt_digests.get(opts)
        if od is None:
            od = self._opt_digests[opts] = _options_digest(opts)
        h = hashlib.sha256()
        for part in ("v2", self.version, Path(source).name, code, od, arch, str(sass), name):
            h.update(part.encode() + b"\0")
        return h.hexdigest()[:32]

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        try:
            return json.loads((self.root / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{key}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.root / f"{key}.json")


def sample_instantiations(instantiations, n: int, is_hot=lambda name: True):
    """At most ``n`` name expressions of each source of ``instantiations`` (a list of
    (source, names)), spread over the kernel kinds: a kind is a template with its first
    template argument (the dtype), e.g. ``cupynn::dense_forward<float``. Round r takes the
    r-th name of every kind, kinds ordered by template then dtype, and within a kind the hot
    names come first; the picks keep their original order.

    >>> sample_instantiations([("k.cu", ("f<double, 1>", "f<double, 2>", "f<float, 1>"))], 2)
    [('k.cu', ('f<double, 1>', 'f<float, 1>'))]
    """
    if n < 1:
        raise ValueError(f"a sample needs at least 1 instantiation per source, got {n}")
    out = []
    for source, names in instantiations:
        names = tuple(dict.fromkeys(names))
        kinds: dict[tuple[str, str], list[str]] = {}
        for name in names:
            template, _, arguments = name.partition("<")
            kinds.setdefault((template, arguments.split(",")[0].strip(" >")), []).append(name)
        templates = list(dict.fromkeys(t for t, _ in kinds))
        dtypes = list(dict.fromkeys(d for _, d in kinds))
        order = sorted(kinds, key=lambda k: (templates.index(k[0]), dtypes.index(k[1])))
        queues = [sorted(kinds[k], key=lambda name: not is_hot(name)) for k in order]
        picked: set[str] = set()
        for r in range(max(map(len, queues), default=0)):
            for q in queues:
                if r < len(q) and len(picked) < n:
                    picked.add(q[r])
        out.append((source, tuple(name for name in names if name in picked)))
    return out


def run_check(instantiations, options_for_arch, archs=DEFAULT_ARCHS, *, read_source,
              is_hot=lambda n: True, jobs=None, sass_archs=SASS_ARCHS, progress=True,
              log=print, cache_dir: Path | None = None,
              nvrtc_version: str = "") -> tuple[list[KernelStats], list[str]]:
    """Compile everything not cached in ``cache_dir``; return (stats rows, failure messages)."""
    cache = _ResultCache(cache_dir, nvrtc_version)
    tasks = []
    cached: list[tuple[str, str, str, bool, dict]] = []  # (source, name, arch, sass, entry)
    keys: dict = {}
    for source, names in instantiations:
        code = read_source(source)
        names = tuple(dict.fromkeys(names))
        for arch in archs:
            options = tuple(options_for_arch(arch))
            sass = arch in sass_archs
            todo = []
            for n in names:
                k = keys[(source, n, arch)] = cache.key(source, code, n, arch, options, sass)
                entry = cache.get(k)
                if entry is None:
                    todo.append(n)
                else:
                    cached.append((source, n, arch, sass, entry))
            for i in range(0, len(todo), CHUNK):
                tasks.append((source, code, tuple(todo[i:i + CHUNK]), arch, options, sass))
    tasks.sort(key=lambda t: not t[5])  # the slower SASS programs first
    jobs = jobs or min(len(tasks), usable_cores()) or 1
    rows: list[KernelStats] = []
    failures: list[str] = []
    t0 = time.perf_counter()
    results: list = [None] * len(tasks)
    if progress and cache_dir is not None:
        log(f"  {len(cached)} kernel results cached (by source hash); compiling "
            f"{sum(len(t[2]) for t in tasks)} in {len(tasks)} NVRTC programs on {jobs} "
            f"process{'es' if jobs != 1 else ''}")

    def entries(t, res) -> dict:
        """name -> {"lowered", "stats"} of one successful program."""
        stats = parse_ptxas_log(res["log"]) if t[5] else {}
        return {n: {"lowered": res["lowered"][n], "stats": stats.get(res["lowered"][n])}
                for n in t[2]}

    def done(i, res, started):
        results[i] = res
        k = sum(r is not None for r in results)
        t = tasks[i]
        if res["ok"]:  # cached as soon as compiled: an interrupted run keeps its progress
            for n, entry in entries(t, res).items():
                if not t[5] or (entry["stats"] and "registers" in entry["stats"]):
                    cache.put(keys[(t[0], n, t[3])], entry)
        if progress:
            log(f"  [{k}/{len(tasks)}] {t[0]} {t[3]}{'' if t[5] else ' (ptx)'}: {len(t[2])} "
                f"kernels from {t[2][0]!r} {'ok' if res['ok'] else 'FAILED'} "
                f"({time.perf_counter() - started:.1f} s elapsed)")

    if not tasks:
        pass
    elif jobs == 1:
        for i, t in enumerate(tasks):
            done(i, compile_chunk(*t), t0)
    else:
        # fresh interpreters, not forks: a caller may have threads running (JAX's, BLAS's,
        # cupynn's lanes), and a fork of a threaded process can deadlock in the child
        with cf.ProcessPoolExecutor(max_workers=jobs,
                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(compile_chunk, *t): i for i, t in enumerate(tasks)}
            for fut in cf.as_completed(futures):
                done(futures[fut], fut.result(), t0)
    log(f"compiled {sum(len(t[2]) for t in tasks)} kernel instantiations in {len(tasks)} NVRTC "
        f"programs ({jobs} jobs) in {time.perf_counter() - t0:.1f} s"
        + (f"; {len(cached)} more from the cache" if cached else ""))

    def add_row(source, n, arch, sass, entry):
        """A row from one kernel's compile result ({"lowered", "stats"}: the ptxas report)."""
        if not sass:
            rows.append(KernelStats(source, n, arch + " (ptx)", entry["lowered"], hot=is_hot(n)))
            return
        row = KernelStats(source, n, arch, entry["lowered"], hot=is_hot(n))
        d = entry.get("stats")
        if not d or "registers" not in d:
            row.problem = "no ptxas resource report"
        else:
            row.registers = d["registers"]
            row.smem = d.get("smem", 0)
            row.stack = d.get("stack", 0)
            row.spill_stores = d.get("spill_stores", 0)
            row.spill_loads = d.get("spill_loads", 0)
            if row.hot and (row.spill_stores > 0 or row.spill_loads > 0):
                row.problem = "hot kernel spills registers"
        if row.problem:
            failures.append(f"{source} [{arch}] {n}: {row.problem}")
        rows.append(row)

    for t, res in zip(tasks, results):
        source, _code, names, arch, options, sass = t
        if not res["ok"]:
            failures.append(f"{source} [{arch}] {len(names)} kernels starting with {names[0]!r}: "
                            f"NVRTC failed with options {list(options)}:\n{res['log']}")
            continue
        for n, entry in entries(t, res).items():
            add_row(source, n, arch, sass, entry)
    for source, n, arch, sass, entry in cached:
        add_row(source, n, arch, sass, entry)
    return rows, failures


def format_table(rows: list[KernelStats]) -> str:
    head = ("kernel", "arch", "regs", "smem", "stack", "spill st/ld", "")
    def num(v):
        return "-" if v < 0 else str(v)

    body = [(f"{r.source}:{r.name}", r.arch, num(r.registers), num(r.smem), num(r.stack),
             f"{num(r.spill_stores)}/{num(r.spill_loads)}", ("FAIL: " + r.problem) if r.problem else
             ("" if r.hot else "(cold)")) for r in sorted(rows, key=lambda r: (r.source, r.name,
                                                                             r.arch))]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 6 else c
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cupynn.compile_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="sm_XY (repeatable; default sm_80 sm_90)")
    ap.add_argument("--sass", action="append", help="archs compiled to SASS with the ptxas "
                    "report and spill check (repeatable; default sm_90; 'all' for every --arch)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="parallel NVRTC processes (default: the usable cores)")
    ap.add_argument("--json", help="write the table as JSON to this file")
    ap.add_argument("--no-cache", action="store_true", help="recompile even if cached")
    ap.add_argument("--source", help="check this .cu file instead of the loader's list "
                    "(with --name, repeatable; options: the loader's)")
    ap.add_argument("--name", action="append", default=[], help="name expression for --source")
    ap.add_argument("--option", action="append", default=[], help="extra NVRTC option")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    ap.add_argument("--sample", type=int, metavar="N", help="only N instantiations per source, "
                    "every kernel kind (template and dtype) once before any twice, hot ones first")
    args = ap.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)
    sass_archs = tuple(args.sass or SASS_ARCHS)
    if "all" in sass_archs:
        sass_archs = archs

    try:
        nvrtc = load_nvrtc()
    except NvrtcUnavailable as exc:
        print(f"compile check: {exc}", file=sys.stderr)
        return 1
    from cupynn import _loader

    if args.source:
        src = Path(args.source).resolve()
        instantiations = [(str(src), tuple(args.name))]

        def read_source(s):
            return Path(s).read_text()

        def is_hot(n):
            return True
    else:
        from .backends import cuda_catalog

        instantiations = [(s, tuple(n)) for s, n in cuda_catalog.all_instantiations()]

        def read_source(s):
            return (Path(_loader.KERNEL_DIR) / s).read_text()
        is_hot = _hot_predicate(cuda_catalog)
    if args.sample is not None:
        if args.sample < 1:
            ap.error(f"--sample needs N >= 1, got {args.sample}")
        instantiations = sample_instantiations(instantiations, args.sample, is_hot)

    def options_for_arch(arch):
        return tuple(_loader.nvrtc_options(arch)) + tuple(args.option)

    version = ".".join(map(str, nvrtc.getVersion()))
    cache_dir = None
    if not args.no_cache:
        root = os.environ.get("CUPYNN_EMU_CACHE") or os.path.join(Path.home(), ".cache",
                                                                  "cupynn-emu")
        cache_dir = Path(root) / "compile-check"
    print(f"NVRTC {version}; archs {', '.join(archs)} (SASS + ptxas report: "
          f"{', '.join(a for a in archs if a in sass_archs) or 'none'}); options "
          f"{list(options_for_arch(archs[0]))} + --ptxas-options=-v", flush=True)
    rows, failures = run_check(instantiations, options_for_arch, archs,
                               read_source=read_source, is_hot=is_hot, jobs=args.jobs,
                               sass_archs=sass_archs, progress=not args.quiet,
                               log=lambda m: print(m, flush=True), cache_dir=cache_dir,
                               nvrtc_version=version)
    if not args.quiet:
        print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    n_kernels = len({(r.source, r.name) for r in rows})
    worst = max(rows, key=lambda r: r.registers, default=None)
    print(f"{n_kernels} kernels x {len(archs)} archs; max registers "
          f"{worst.registers if worst else '-'} ({worst.name if worst else '-'}, "
          f"{worst.arch if worst else '-'})")
    if failures:
        print(f"\nFAILED: {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print("compile check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
