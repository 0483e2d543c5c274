"""Mutation harness: plant plausible GPU bugs in the kernels, one at a time, and check that
the emulated tests catch each of them under every schedule.

Each mutant edits one kernel file of a scratch copy of ``kernels/`` (never the real tree),
then runs the few tests that cover it (``pytest -x`` with the kernel loader pointed at the
copy, see _mutant_plugin.py) once per schedule.  A mutant is *killed* when the tests fail
(a wrong result, an emulator error, a build error, a crash); the kill is *deterministic* when
it is killed under every schedule.  The bug classes are those the emulator has to see:
barriers and ``__syncwarp``, tile edges, overlapping shared buffers, uninitialised
accumulators, shuffle lanes, activation-derivative branches, fragment layouts and PTX
operands, cp.async, 32-bit offsets, reduction order, dropped bias columns.

    python -m cupynn.emulator.mutate                 # every mutant, two schedules
    python -m cupynn.emulator.mutate --only D2 M2    # a few
    python -m cupynn.emulator.mutate --list
    python -m cupynn.emulator.mutate --if-changed    # only when kernels/ differs from the
                                                     # recorded hash (what .ci/run does)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).resolve().parent / "mutation_record.json"
DEFAULT_SCHEDULES = ("default", "random:1")
TARGET = 0.95

CAP = "tests/test_emulator_capabilities.py"
MMA = "tests/test_emulator_mma.py"
KE = "tests/test_kernels_emulated.py"
FUSED = "tests/test_fused.py"
OPT = "tests/test_optim_emulated.py"
DER = "tests/test_derivatives_emulated.py"
JAC = "tests/test_jacobian_emulated.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``find`` (which must occur exactly once) by ``replace``."""

    id: str
    file: str
    bug: str  # the bug class
    find: str
    replace: str
    tests: tuple  # pytest arguments: files and -k expressions
    why: str = ""


def _m(id_, file, bug, find, replace, tests, why=""):
    return Mutant(id_, file, bug, find, replace, tuple(tests), why)


MUTANTS: tuple[Mutant, ...] = (
    # ---- dense.cu -----------------------------------------------------------------------
    _m("D1", "dense.cu", "barrier removed",
       "    red[threadIdx.x] = v;\n    __syncthreads();\n", "    red[threadIdx.x] = v;\n",
       [CAP, "--slow", "-k", "loss_reduce"],
       "block_sum reads red[] before the other threads wrote it (reversed order hides it: TSan)"),
    _m("D2", "dense.cu", "reduction order",
       "for (i64 z = 0; z < S; ++z) acc += p[z * total + e];",
       "for (i64 z = S - 1; z >= 0; --z) acc += p[z * total + e];",
       [CAP, "-k", "split_reduction"], "split partials summed last to first"),
    _m("D3", "dense.cu", "reduction order",
       "if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];",
       "if ((int)threadIdx.x < s) red[threadIdx.x] += red[2 * s - 1 - threadIdx.x];",
       [CAP, "-k", "loss_reduce"], "the block tree pairs mirrored elements"),
    _m("D4", "dense.cu", "32-bit offset",
       "const i64 K1 = K + hb, total = N * K1;",
       "const i64 K1 = K + hb, total = (int)(N * K1);",
       [CAP, "-k", "sparse_mode_runs"], "the reduction's element count in 32 bits"),
    _m("D5", "dense.cu", "32-bit offset",
       "                const i64 o = m * N + n;\n",
       "                const i64 o = (int)(m * N + n);\n",
       [CAP, "-k", "sparse_mode_forward"], "the forward's output offset in 32 bits"),
    _m("D6", "dense.cu", "tile-edge off-by-one",
       "if (m < M && k < K) dx[m * K + k] = v;", "if (m <= M && k < K) dx[m * K + k] = v;",
       [KE, "-k", "network_input_gradient or layer_tile_boundaries"], "dx writes one row past M"),
    _m("D7", "dense.cu", "uninitialised accumulator",
       "    for (int q = 0; q < PAIRS; ++q) pacc[q] = T(0);\n", "",
       [KE, "-k", "seed_shape or sanitizer_subset or split_batch"], "the chain's dW0 accumulators"),
    _m("D8", "dense.cu", "barrier removed (chain multi-chunk)",
       "                pacc[q] = a;\n            }\n        }\n        __syncthreads();\n",
       "                pacc[q] = a;\n            }\n        }\n",
       [KE, "-k", "seed_shape or sanitizer_subset or split_batch"],
       "the next 64-row chunk overwrites sm.dz while other threads still read it"),
    _m("D9", "dense.cu", "tile-edge off-by-one (chain)",
       "xs[rr][j] = (m < ke && j < K1)", "xs[rr][j] = (m <= ke && j < K1)",
       [KE, "-k", "seed_shape or sanitizer_subset or split_batch"], "stages one x row past the split"),
    _m("D10", "dense.cu", "overlapping shared buffers",
       "        T dz[BM][BN + 1];\n    } sm;\n    __shared__ T xs[BM][CHAIN_MAX_K0 + 1];",
       "        T dz[BM][BN + 1];\n        T xs[BM][CHAIN_MAX_K0 + 1];\n    } sm;\n"
       "    auto& xs = sm.xs;",
       [KE, "-k", "seed_shape or sanitizer_subset or split_batch"], "xs shares storage with dz"),
    # ---- gemm.cuh -----------------------------------------------------------------------
    _m("G1", "gemm.cuh", "barrier removed",
       "            stash(la, lb, sm, stage ^ 1, st);\n            __syncthreads();\n",
       "            stash(la, lb, sm, stage ^ 1, st);\n",
       [KE, "-k", "layer_tile_boundaries"], "the next stage is read before it is stored"),
    _m("G2", "gemm.cuh", "barrier removed",
       "        stash(la, lb, sm, 0, st);\n        __syncthreads();\n",
       "        stash(la, lb, sm, 0, st);\n",
       [KE, "-k", "layer_tile_boundaries"], "the first stage is read before it is stored"),
    _m("G3", "gemm.cuh", "overlapping shared buffers",
       "            stash(la, lb, sm, stage ^ 1, st);", "            stash(la, lb, sm, stage, st);",
       [KE, "-k", "layer_tile_boundaries"], "the double buffer collapses to one stage"),
    _m("G4", "gemm.cuh", "uninitialised accumulator",
       "for (int i = 0; i < NACC; ++i) acc[i] = T(0);", "for (int i = 1; i < NACC; ++i) acc[i] = T(0);",
       [KE, "-k", "layer_tile_boundaries"], "the first accumulator keeps stack garbage"),
    _m("G5", "gemm.cuh", "fragment layout",
       "for (int i = 0; i < MI; ++i) a[i] = sm.a[stage][kk + t][wr + i * 8 + ga];",
       "for (int i = 0; i < MI; ++i) a[i] = sm.a[stage][kk + (g & 3)][wr + i * 8 + t + skew_a(kk)];",
       [KE, "-k", "layer_tile_boundaries and float64"],
       "DMMA A fragment with g and t swapped (the row skew kept: rows kk..kk+3 share it)"),
    _m("G6", "gemm.cuh", "tile-edge off-by-one",
       "const i64 n = rem <= 0 ? 0 : (rem + d - 1) / d;", "const i64 n = rem <= 0 ? 0 : (rem + d) / d;",
       [KE, "-k", "layer_tile_boundaries"], "one element past a tile edge counts as in bounds"),
    # ---- mma.cuh / ptx.cuh --------------------------------------------------------------
    _m("M1", "mma.cuh", "fragment layout",
       "mma_tf32_a_row(int lane, int i) { return (lane >> 2) + 8 * (i & 1); }",
       "mma_tf32_a_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }",
       [MMA], "tf32 A rows from the wrong register"),
    _m("M2", "mma.cuh", "PTX operand order",
       "(CUPYNN_IN(d, a), CUPYNN_IN(d, b), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1]))",
       "(CUPYNN_IN(d, b), CUPYNN_IN(d, a), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1]))",
       [MMA], "m8n8k4: A and B swapped in the asm operand list (compiles under NVRTC)"),
    _m("M3", "mma.cuh", "PTX operand order",
       "(CUPYNN_IN(r, a[0]), CUPYNN_IN(r, a[1]), CUPYNN_IN(r, a[2]), CUPYNN_IN(r, a[3]),",
       "(CUPYNN_IN(r, a[0]), CUPYNN_IN(r, a[2]), CUPYNN_IN(r, a[1]), CUPYNN_IN(r, a[3]),",
       [MMA], "m16n8k8 tf32: a1 and a2 swapped"),
    _m("M4", "mma.cuh", "PTX text",
       "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};",
       "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %12};",
       [MMA], "tf32 C operand %13 never read, %12 twice"),
    _m("M5", "mma.cuh", "fragment layout",
       "mma_m8n8k4_f64(out, a[r + 2 * q], b[q], acc);", "mma_m8n8k4_f64(out, a[2 * r + q], b[q], acc);",
       [MMA], "sm_80 m16n8 composition picks the wrong A register"),
    _m("M6", "mma.cuh", "precision (tf32 split)",
       "lo = f32_to_tf32(x - __uint_as_float(hi));", "lo = f32_to_tf32(x) - hi;",
       [MMA], "3xtf32's low part lost"),
    _m("P1", "ptx.cuh", "PTX constraint",
       '#define CUPYNN_OUT(c, x) ::cupynn_emu::ptx_out(#c[0], x)',
       "#define CUPYNN_OUT(c, x) ::cupynn_emu::ptx_out('r', x)",
       [MMA], "every output constraint read as \"r\""),
    # ---- cp_async.cuh -------------------------------------------------------------------
    # (Not "src-size always cp-size" in cp_async.cuh: fused.cu passes a valid dummy source for
    # the padding, whose products meet zeros or are never stored -- an equivalent mutant.)
    _m("C1", "fused.cu", "cp.async out-of-bounds source",
       "cp_async_elem(dst, ok ? src : w1, ok);", "cp_async_elem(dst, src, true);",
       [FUSED, "-k", "tile_boundaries and float64"], "the W1 slice copied from past the rows / the array"),
    _m("C2", "cp_async.cuh", "cp.async wait",
       'CUPYNN_PTX_MEM("cp.async.wait_all;\\n", (), ());', 'CUPYNN_PTX_MEM("cp.async.wait_group 0;\\n", (), ());',
       [CAP, "-k", "cp_async", FUSED, "-k", "tile_boundaries and float64"],
       "wait_group 0 without the commit that wait_all implies"),
    _m("C3", "cp_async.cuh", "cp.async group count",
       'CUPYNN_PTX_MEM("cp.async.wait_group %0;\\n", (), (CUPYNN_IN(n, N)));',
       'CUPYNN_PTX_MEM("cp.async.wait_group %0;\\n", (), (CUPYNN_IN(n, N + 1)));',
       [CAP, "-k", "cp_async"], "wait_group N + 1: one group too many left in flight"),
    # ---- fused.cu -----------------------------------------------------------------------
    _m("F1", "fused.cu", "cp.async wait removed",
       "                cp_async_wait_all();\n                __syncthreads();\n",
       "                __syncthreads();\n",
       [FUSED, "-k", "tile_boundaries and float64"], "the W1 slice is read before it lands"),
    _m("F2", "fused.cu", "barrier removed",
       "                cp_async_wait_all();\n                __syncthreads();\n",
       "                cp_async_wait_all();\n",
       [FUSED, "-k", "tile_boundaries and float64"], "other threads' h0 and copies not published"),
    _m("F3", "fused.cu", "__syncwarp removed",
       "                __syncwarp();\n                warp_mma<T, MATH, 2, FNW>",
       "                warp_mma<T, MATH, 2, FNW>",
       [FUSED, "-k", "tile_boundaries and float64"], "pw read by the mma before the other lanes wrote it"),
    _m("F4", "fused.cu", "__syncwarp removed",
       "            store_frags(acc, 0, 0, mt, 2, pw, PW_LD);\n            __syncwarp();\n",
       "            store_frags(acc, 0, 0, mt, 2, pw, PW_LD);\n",
       [FUSED, "-k", "tile_boundaries and float64"], "pw read before the other lanes stored it"),
    _m("F5", "fused.cu", "wrong shuffle lane",
       "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);",
       "for (int o = 16; o > 0; o >>= 1) v += __shfl_sync(0xffffffffu, v, o);",
       [FUSED, "-k", "losses or tile_boundaries"], "warp_sum reads lane o instead of lane ^ o"),
    _m("F6", "fused.cu", "reduction order",
       "for (i64 b = 0; b < G; ++b) s += partials[b * P + e];",
       "for (i64 b = G - 1; b >= 0; --b) s += partials[b * P + e];",
       [CAP, "-k", "fused_reduce"], "block partials summed last to first"),
    # ---- jacobian.cu ---------------------------------------------------------------------
    _m("J1", "jacobian.cu", "32-bit offset",
       "out[r * ld + col + c] = v;", "out[(int)(r * ld + col + c)] = v;",
       [JAC, "-k", "sparse_mode"], "the output offset in 32 bits (R * ld passes 2^31)"),
    _m("J2", "jacobian.cu", "tile-edge off-by-one",
       "if (c < n * k) {", "if (c <= n * k) {",
       [JAC, "-k", "exact_block"], "the first bias column taken as an outer-product column"),
    _m("J3", "jacobian.cu", "tile-edge off-by-one",
       "if (e >= R * W) return;", "if (e > R * W) return;",
       [JAC, "-k", "exact_block"], "one thread past the last row writes (and reads dz, h) past the arrays"),
    _m("J4", "jacobian.cu", "reduction order",
       "for (int s = 0; s < nb; ++s) v = m_fma(dz[s * dz_block + dz0], h[s * h_block + h0], v);",
       "for (int s = nb - 1; s >= 0; --s) v = m_fma(dz[s * dz_block + dz0], h[s * h_block + h0], v);",
       [JAC, "-k", "exact_block"], "the stack blocks summed last to first"),
    _m("J5", "jacobian.cu", "bias column dropped",
       "const i64 W = n * k + (has_b ? n : 0);", "const i64 W = n * k;",
       [JAC, "-k", "exact_block"], "the bias columns never written"),
    # ---- optim.cu / derivatives.cu / activations.cuh ---------------------------------------
    _m("O1", "optim.cu", "barrier removed",
       "    __syncthreads();  // corr is written", "    // corr is written",
       [OPT, "-k", "matches_numpy_float64"], "steps[b] overwritten before every thread read it"),
    _m("O2", "optim.cu", "tile-edge off-by-one",
       "        if (i >= n) break;\n        const T pi = p[i];",
       "        if (i > n) break;\n        const T pi = p[i];",
       [OPT, "-k", "matches_numpy_float64"], "SGD updates one element past each parameter"),
    _m("T1", "derivatives.cu", "tile-edge off-by-one",
       "    T sq = T(0);\n    for (int i = 1; i <= d; ++i) {",
       "    T sq = T(0);\n    for (int i = 1; i < d; ++i) {",
       [DER, "-k", "every_activation"], "the last input direction is skipped"),
    _m("A1", "activations.cuh", "activation-derivative branch",
       "        return v > T(0) ? T(1) : T(0.01);", "        return v < T(0) ? T(1) : T(0.01);",
       [KE, "-k", "layer_every_activation and leaky"], "leaky_relu' branches swapped"),
    _m("A2", "activations.cuh", "activation-derivative branch",
       "        d2 = v > T(0) ? T(0) : e;", "        d2 = v > T(0) ? e : T(0);",
       [DER, "-k", "every_activation"], "elu'' branches swapped"),
)


def kernels_digest(kernels: Path | None = None) -> str:
    """A hash of the kernel sources and of this mutant list (what the record is keyed on)."""
    kernels = kernels or REPO / "kernels"
    h = hashlib.sha256()
    for p in sorted(kernels.glob("*.cu*")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(repr([dataclasses.astuple(m) for m in MUTANTS]).encode())
    return h.hexdigest()[:16]


def apply(mutant: Mutant, kernels: Path) -> None:
    """Apply `mutant` to the kernel copy in `kernels` (its find text must occur exactly once)."""
    path = kernels / mutant.file
    text = path.read_text()
    n = text.count(mutant.find)
    if n != 1:
        raise ValueError(f"mutant {mutant.id}: its text occurs {n} times in {mutant.file} "
                         "(the kernel changed: update the mutant in cupynn/emulator/mutate.py)")
    path.write_text(text.replace(mutant.find, mutant.replace))


@dataclasses.dataclass
class Result:
    mutant: Mutant
    outcome: dict  # schedule -> "killed" | "survived" | "error: ..."
    seconds: float
    detail: str = ""

    @property
    def killed(self) -> bool:
        return bool(self.outcome) and all(v == "killed" for v in self.outcome.values())

    @property
    def deterministic(self) -> bool:
        return len(set(self.outcome.values())) == 1


def _pytest(args, env, timeout) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "cupynn.emulator._mutant_plugin",
           "-p", "no:cacheprovider", "--emu-schedules", "one", *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", "timeout (a hang counts as caught)"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    if proc.returncode == 0:
        return "survived", tail
    if proc.returncode in (2, 3, 4, 5):  # interrupted / internal / usage / nothing collected
        return f"error: pytest exit {proc.returncode}", tail
    return "killed", tail  # 1: a test failed; < 0: the process crashed


def run_mutant(mutant: Mutant, schedules=DEFAULT_SCHEDULES, *, timeout=900, cache=None) -> Result:
    """Apply `mutant` to a scratch copy of kernels/ and run its tests under each schedule."""
    t0 = time.perf_counter()
    outcome, detail = {}, ""
    with tempfile.TemporaryDirectory(prefix=f"cupynn-mutant-{mutant.id}-") as tmp:
        kernels = Path(tmp) / "kernels"
        shutil.copytree(REPO / "kernels", kernels)
        apply(mutant, kernels)
        env = dict(os.environ, CUPYNN_MUTANT_KERNELS=str(kernels), PYTHONDONTWRITEBYTECODE="1")
        if cache:
            env["CUPYNN_EMU_CACHE"] = str(cache)
        for sched in schedules:
            env["CUPYNN_EMU_SCHEDULE"] = sched
            outcome[sched], tail = _pytest(list(mutant.tests), env, timeout)
            detail = detail or tail
    return Result(mutant, outcome, time.perf_counter() - t0, detail)


def baseline(mutants, schedules=DEFAULT_SCHEDULES, *, timeout=900, cache=None, out=sys.stdout) -> dict:
    """Each distinct test selection on the unmutated kernels: {tests: "survived" | ...}.
    A selection that fails here would count its mutants as killed for nothing."""
    seen = {}
    with tempfile.TemporaryDirectory(prefix="cupynn-baseline-") as tmp:
        kernels = Path(tmp) / "kernels"  # one copy: its builds are shared by every selection
        shutil.copytree(REPO / "kernels", kernels)
        env = dict(os.environ, CUPYNN_MUTANT_KERNELS=str(kernels), PYTHONDONTWRITEBYTECODE="1")
        if cache:
            env["CUPYNN_EMU_CACHE"] = str(cache)
        for m in mutants:
            if m.tests in seen:
                continue
            results = set()
            for sched in schedules:
                env["CUPYNN_EMU_SCHEDULE"] = sched
                results.add(_pytest(list(m.tests), env, timeout)[0])
            seen[m.tests] = "survived" if results == {"survived"} else "fails: " + ", ".join(sorted(results))
            print(f"baseline {' '.join(m.tests)}: "
                  f"{'passes' if seen[m.tests] == 'survived' else seen[m.tests]}", file=out, flush=True)
    return seen


def run(mutants=MUTANTS, schedules=DEFAULT_SCHEDULES, *, timeout=900, out=sys.stdout,
        check_baseline=True) -> list[Result]:
    """Run every mutant; print one line each and a summary; return the results."""
    results = []
    with tempfile.TemporaryDirectory(prefix="cupynn-mutation-cache-") as cache:
        base = baseline(mutants, schedules, timeout=timeout, cache=cache, out=out) if check_baseline else {}
        for m in mutants:
            if base.get(m.tests, "survived") != "survived":
                r = Result(m, {s: "error: the unmutated kernels fail these tests" for s in schedules}, 0.0)
                results.append(r)
                print(f"{m.id:4} ERROR (baseline fails)", file=out, flush=True)
                continue
            try:
                r = run_mutant(m, schedules, timeout=timeout, cache=cache)
            except ValueError as exc:  # the kernel text changed under the mutant
                r = Result(m, {s: f"error: {exc}" for s in schedules}, 0.0)
            results.append(r)
            marks = " ".join(f"{s}={v.split(':')[0]}" for s, v in r.outcome.items())
            print(f"{m.id:4} {m.file:16} {m.bug:36} {'KILLED' if r.killed else 'SURVIVED':8} "
                  f"{'det' if r.deterministic else 'NONDET':6} {r.seconds:6.0f}s  {marks}", file=out, flush=True)
    return results


def summary(results) -> dict:
    n = len(results)
    killed = sum(r.killed for r in results)
    return {"mutants": n, "killed": killed, "score": killed / n if n else 0.0,
            "nondeterministic": [r.mutant.id for r in results if not r.deterministic],
            "survived": [r.mutant.id for r in results if not r.killed],
            "seconds": round(sum(r.seconds for r in results)),
            "files": sorted({r.mutant.file for r in results}),
            "classes": sorted({r.mutant.bug for r in results})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cupynn.emulator.mutate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--schedules", nargs="*", default=list(DEFAULT_SCHEDULES),
                    help=f"emulator schedules to run each mutant under (default: {' '.join(DEFAULT_SCHEDULES)})")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies")
    ap.add_argument("--if-changed", action="store_true",
                    help="run only when kernels/ (or the mutant list) differs from the recorded hash")
    ap.add_argument("--record", action="store_true", help=f"write the result to {RECORD.name}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running each test selection on the unmutated kernels first")
    args = ap.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:4} {m.file:16} {m.bug:36} {m.why}")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(REPO / "kernels", Path(tmp) / "k")
            for m in mutants:
                k = Path(tmp) / m.id
                shutil.copytree(Path(tmp) / "k", k)
                apply(m, k)
        print(f"{len(mutants)} mutants apply")
        return 0
    if args.if_changed:
        recorded = json.loads(RECORD.read_text()).get("digest") if RECORD.exists() else None
        if recorded == kernels_digest():
            print(f"mutation run skipped: kernels/ and the mutants match {RECORD.name} ({recorded})")
            return 0
        print("kernels/ changed since the recorded mutation run: running every mutant")
    results = run(mutants, args.schedules, timeout=args.timeout, check_baseline=not args.no_baseline)
    s = summary(results)
    print(f"mutation score {s['killed']}/{s['mutants']} = {100 * s['score']:.1f}% "
          f"(target {100 * TARGET:.0f}%), non-deterministic kills: {s['nondeterministic'] or 'none'}, "
          f"survivors: {s['survived'] or 'none'}, {s['seconds']} s")
    data = {"digest": kernels_digest(), "schedules": list(args.schedules), **s,
            "results": {r.mutant.id: r.outcome for r in results}}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.record:
        RECORD.write_text(json.dumps(data, indent=1) + "\n")
    full = len(mutants) == len(MUTANTS)
    ok = s["score"] >= TARGET and not s["nondeterministic"]
    return 0 if ok or not full else 1


if __name__ == "__main__":
    raise SystemExit(main())
