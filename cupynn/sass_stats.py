"""What a kernel's K-step loop executes, read from its SASS, without a GPU.

    python -m cupynn.sass_stats 'cupynn::dense_forward<double, 0, 2, 1>' [NAME ...]
        [--arch sm_90] [--activation identity] [--json FILE] [--dump DIR] [--all-loops]

The loader's source and options go through NVRTC to PTX, the CUDA toolkit's ``ptxas``
turns that into a cubin and ``nvdisasm`` into SASS.  For each kernel it prints the
registers and spill bytes, and the instruction mix of its *K-step loop*: the innermost
loop around the first matrix instruction (DMMA / HMMA, or the FMA path's 16- and 8-byte
shared-memory fragment reads).  That is the code every K-step of every block runs, so
its count of integer, load and branch instructions against its DMMA / FFMA is what
decides whether a kernel can be compute-bound (issue slots per K-step against the
multiply's).

``--activation NAME`` compiles with ``-DCUPYNN_ONLY_ACTIVATION=<id>``, which makes every
runtime activation switch (``with_activation``) keep that one case: the loop is then the
path a network of that activation executes, without the other nine bodies.  Static
counts of both branches of a uniform ``if`` (e.g. a loader's recompute path) remain.

Tools (no GPU or driver needed): ``ptxas`` from $CUPYNN_PTXAS, PATH, /usr/local/cuda/bin
or pip's nvidia-cuda-nvcc; ``nvdisasm`` from $CUPYNN_NVDISASM, PATH, or pip's
nvidia-cuda-nvdisasm wheel (the ``compile-check`` extra installs it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

__all__ = ["find_tool", "kernel_sass", "loop_body", "mma_loops", "op_counts", "loop_stats",
           "main"]

KEY_OPS = ("LDG", "LDS", "STS", "BAR", "BRX", "BRA", "DMMA", "HMMA", "DFMA", "FFMA", "IMAD",
           "LEA", "IADD3", "ISETP", "MUFU")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
# the instruction that marks a K-step: tensor-core mma, else the FMA path's fragment reads
_ANCHOR = re.compile(r"\b(DMMA|HMMA)\b|\bLDS\.(128|64)\b")


def find_tool(name: str) -> str | None:
    """Path of a CUDA tool: $CUPYNN_<NAME>, PATH, /usr/local/cuda/bin, pip's nvidia wheels."""
    env = os.environ.get(f"CUPYNN_{name.upper()}")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    candidates = [f"/usr/local/cuda/bin/{name}"]
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "bin", name)))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def kernel_sass(name: str, *, arch: str = "sm_90", defines: tuple[str, ...] = (),
                source: str = "dense.cu", dump: Path | None = None) -> tuple[int, int, list[str]]:
    """(registers, spill bytes stored + loaded, SASS lines) of one name expression."""
    from . import _loader
    from .compile_check import compile_chunk

    ptxas, nvdisasm = find_tool("ptxas"), find_tool("nvdisasm")
    if not ptxas or not nvdisasm:
        missing = [t for t, p in (("ptxas", ptxas), ("nvdisasm", nvdisasm)) if not p]
        raise FileNotFoundError(f"{' and '.join(missing)} not found (see python -m "
                                "cupynn.sass_stats --help for where they come from)")
    options = tuple(_loader.nvrtc_options(arch)) + tuple(f"-D{d}" for d in defines)
    res = compile_chunk(source, (_loader.KERNEL_DIR / source).read_text(), (name,), arch, options,
                        sass=False)
    if not res["ok"]:
        raise RuntimeError(f"NVRTC failed for {name}:\n{res['log']}")
    ptx = res["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_bytes(ptx)
        report = subprocess.run([ptxas, f"-arch={arch}", "-v", str(ptx_path), "-o", str(cubin)],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        (dump / f"{safe}.sass").write_text(sass)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = sum(int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                          report).groups())
    return regs, spill, sass.splitlines()


def op_counts(lines) -> Counter:
    """Instructions by opcode (without modifiers or predicate)."""
    c: Counter = Counter()
    for line in lines:
        m = _INSTR.match(line)
        if m:
            c[m.group(1)] += 1
    return c


def loop_body(lines: list[str]) -> tuple[int, int] | None:
    """(first, last) line of the innermost loop -- a label and a later branch back to it --
    around the first K-step instruction, or None."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    anchor = next((i for i, line in enumerate(lines) if _INSTR.match(line) and _ANCHOR.search(line)),
                  None)
    if anchor is None:
        return None
    best = None
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), len(lines)) < anchor < i:
            span = (labels[m.group(1)], i)
            if best is None or span[1] - span[0] < best[1] - best[0]:
                best = span
    return best


def mma_loops(lines: list[str]) -> list[tuple[int, int]]:
    """Every innermost loop (the smallest label-to-branch-back span) around a matrix
    instruction (DMMA / HMMA; an FMA kernel: FFMA / DFMA): each product loop of a multi-phase
    kernel, the loops nested in it counted once."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    spans = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), len(lines)) < i:
            spans.append((labels[m.group(1)], i))
    mma = re.compile(r"\b(DMMA|HMMA)\b")
    anchors = [i for i, line in enumerate(lines) if _INSTR.match(line) and mma.search(line)]
    if not anchors:  # an FMA kernel: the loops of its FFMA / DFMA
        fma = re.compile(r"\b(FFMA|DFMA)\b")
        anchors = [i for i, line in enumerate(lines) if _INSTR.match(line) and fma.search(line)]
    out = set()
    for a in anchors:
        inner = [sp for sp in spans if sp[0] < a < sp[1]]
        if inner:
            out.add(min(inner, key=lambda sp: sp[1] - sp[0]))
    return sorted(out)


def loop_stats(name: str, **kw) -> dict:
    regs, spill, lines = kernel_sass(name, **kw)
    span = loop_body(lines)
    body = op_counts(lines[span[0]:span[1] + 1]) if span else Counter()
    loops = []
    for a, b in mma_loops(lines):
        c = op_counts(lines[a:b + 1])
        loops.append({"instructions": sum(c.values()), "mix": {k: c[k] for k in KEY_OPS if c[k]}})
    return {"kernel": name, "registers": regs, "spill_bytes": spill,
            "instructions": sum(op_counts(lines).values()),
            "loop_instructions": sum(body.values()) if span else None,
            "loop": {k: body[k] for k in KEY_OPS if body[k]}, "all_loops": loops}


def main(argv=None) -> int:
    from .activations import get_activation

    p = argparse.ArgumentParser(prog="python -m cupynn.sass_stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", metavar="NAME", help="name expressions, as the loader's")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--activation", default=None,
                   help="keep only this case of every runtime activation switch")
    p.add_argument("--source", default=None,
                   help="kernels/ file of the names (default: dense.cu; fused_* names: fused.cu)")
    p.add_argument("--all-loops", action="store_true",
                   help="also list every innermost loop with a matrix instruction (each product "
                        "loop of a multi-phase kernel such as fused_mlp)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--dump", metavar="DIR", help="write each kernel's SASS there")
    args = p.parse_args(argv)
    defines = ()
    if args.activation:
        defines = (f"CUPYNN_ONLY_ACTIVATION={get_activation(args.activation).id}",)
    rows = []
    for name in args.names:
        source = args.source or ("fused.cu" if "fused_" in name else "dense.cu")
        r = loop_stats(name, arch=args.arch, defines=defines, source=source,
                       dump=Path(args.dump) if args.dump else None)
        rows.append(r)
        mix = " ".join(f"{k} {v}" for k, v in r["loop"].items())
        print(f"{name}: {r['registers']} registers, {r['spill_bytes']} spill bytes, "
              f"{r['instructions']} instructions; K-step loop {r['loop_instructions']}: {mix}")
        if args.all_loops:
            for i, lp in enumerate(r["all_loops"]):
                mix = " ".join(f"{k} {v}" for k, v in lp["mix"].items())
                print(f"    loop {i}: {lp['instructions']} instructions: {mix}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
