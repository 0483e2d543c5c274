"""``python -m cupynn selfcheck``: run the CUDA kernels once and compare them with NumPy.

The check a fresh install (or the Docker image, before its benchmark) runs: build a small
MLP, evaluate ``value_and_grad`` on the GPU and with the NumPy backend from the same
parameters and inputs, and compare value and every gradient against the tolerances of
docs/design.md (section 4). The first GPU call compiles the kernels through NVRTC, so its time is
reported separately.

``--compile-only`` compiles every kernel instantiation through NVRTC and launches nothing:
it needs CuPy and NVRTC but no GPU or driver (the Docker build and CI run it).

Exit status: 0 passed, 1 a comparison or compilation failed, 2 no usable GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CheckResult", "run_check", "compile_kernels", "sample_instantiations", "main"]

# Relative to the norm of the NumPy reference (docs/design.md section 4, "strict" precision).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}

DEFAULT_SIZES = (1, 64, 20, 1)
DEFAULT_BATCH = 1000
DEFAULT_ARCHS = ("sm_80", "sm_90")


@dataclass
class CheckResult:
    dtype: str
    sizes: tuple[int, ...]
    activation: str
    batch: int
    value: float
    value_error: float
    grad_error: float
    output_error: float
    tolerance: float
    first_call_s: float
    second_call_s: float
    worst: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        errors = (self.value_error, self.grad_error, self.output_error)
        return all(np.isfinite(e) and e <= self.tolerance for e in errors)


def _to_host(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)  # cupy.ndarray
    return np.asarray(get() if get is not None else array)


def _relative_error(result, reference) -> float:
    result, reference = _to_host(result).astype(np.float64), _to_host(reference).astype(np.float64)
    if result.shape != reference.shape:
        return float("inf")
    scale = float(np.linalg.norm(reference))
    diff = float(np.linalg.norm(result - reference))
    if not np.isfinite(diff):
        return float("inf")
    return diff / scale if scale > 0 else diff


def _synchronize(device: str) -> None:
    if device == "cuda":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def run_check(
    *,
    device: str = "cuda",
    dtype: str = "float64",
    sizes=DEFAULT_SIZES,
    activation: str = "tanh",
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
) -> CheckResult:
    """Compare ``value_and_grad`` (and the forward pass) on ``device`` with the NumPy backend."""
    import cupynn

    sizes = tuple(int(s) for s in sizes)
    reference_model = cupynn.MLP(sizes, activation, dtype=dtype, device="cpu", rng=seed)
    model = cupynn.MLP(sizes, activation, dtype=dtype, device="cpu", rng=seed).to(device)
    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(-1.0, 1.0, size=(batch, sizes[0])).astype(dtype)
    if device == "cuda":
        import cupy

        x_device = cupy.asarray(x)
    else:
        x_device = x.copy()

    ref_value, ref_grads = cupynn.value_and_grad(reference_model, x, "sum_squares")
    ref_y = reference_model(x)

    start = time.perf_counter()
    value, grads = cupynn.value_and_grad(model, x_device, "sum_squares")
    _synchronize(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    value, grads = cupynn.value_and_grad(model, x_device, "sum_squares")
    _synchronize(device)
    second = time.perf_counter() - start
    y = model(x_device)

    grad_error, worst = 0.0, ""
    if len(grads) != len(ref_grads):
        grad_error, worst = float("inf"), f"{len(grads)} gradients for {len(ref_grads)} layers"
    else:
        for index, (g, g_ref) in enumerate(zip(grads, ref_grads, strict=True)):
            for name in ("weight", "bias"):
                if g_ref.get(name) is None:
                    continue
                error = _relative_error(g.get(name), g_ref[name])
                if not error <= grad_error:  # also catches NaN
                    grad_error, worst = error, f"layer {index} d{name}"

    return CheckResult(
        dtype=str(np.dtype(dtype)),
        sizes=sizes,
        activation=activation,
        batch=batch,
        value=float(_to_host(value)),
        value_error=_relative_error(value, ref_value),
        grad_error=grad_error,
        output_error=_relative_error(y, ref_y),
        tolerance=TOLERANCE[str(np.dtype(dtype))],
        first_call_s=first,
        second_call_s=second,
        worst=worst,
    )


def _gpu_description() -> str:
    import cupy

    runtime = cupy.cuda.runtime
    device_id = cupy.cuda.Device().id
    props = runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]

    def version(v: int) -> str:
        return f"{v // 1000}.{(v % 1000) // 10}"

    return (
        f"GPU {device_id}: {name} (sm_{props['major']}{props['minor']}), CuPy {cupy.__version__}, "
        f"CUDA runtime {version(runtime.runtimeGetVersion())}, "
        f"driver {version(runtime.driverGetVersion())}"
    )


# -- NVRTC compilation of every kernel, no GPU needed --------------------------------


def sample_instantiations(name_expressions) -> tuple[str, ...]:
    """The first instantiation of each kernel template for each first template argument
    (the dtype): every template and header gets compiled, in seconds instead of minutes."""
    groups: dict[str, list[str]] = {}
    for name in name_expressions:
        template, _, arguments = name.partition("<")
        groups.setdefault(f"{template}<{arguments.split(',')[0]}", []).append(name)
    picked = {names[0] for names in groups.values()}
    return tuple(n for n in name_expressions if n in picked)


def _compile_program(job) -> tuple[str, str, int, float, str | None]:
    """Compile one (source file, arch, name expressions) program; NVRTC's log on failure."""
    source_file, code, arch, options, names = job
    from cupynn.compile_check import load_nvrtc

    nvrtc = load_nvrtc()  # a spawned worker: pip's libnvrtc preloaded where CuPy cannot find it

    start = time.perf_counter()
    program = nvrtc.createProgram(code, source_file, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            return source_file, arch, len(names), 0.0, f"{exc}\n{nvrtc.getProgramLog(program)}"
        for name in names:
            nvrtc.getLoweredName(program, name)
    finally:
        nvrtc.destroyProgram(program)
    return source_file, arch, len(names), time.perf_counter() - start, None


def compile_kernels(
    archs=DEFAULT_ARCHS, *, sample: bool = False, jobs: int | None = None, verbose: bool = True
) -> list[str]:
    """NVRTC-compile the instantiations of ``cuda_catalog.all_instantiations()``.

    Uses ``cupy_backends.cuda.libs.nvrtc`` directly, so it needs NVRTC (pip's
    ``nvidia-cuda-nvrtc-cu12``) but neither a GPU nor a driver; the sources and options
    are the loader's (``KERNEL_DIR``, ``nvrtc_options(arch)``: CuPy's -ftz=true included). ``sample=True`` compiles
    only :func:`sample_instantiations`. The programs are split over ``jobs`` processes
    (default: one per CPU). Returns the failures, each with NVRTC's log.
    """
    import concurrent.futures
    import multiprocessing
    import os

    from cupynn import _loader
    from cupynn.backends import cuda_catalog

    jobs = max(1, jobs or os.cpu_count() or 1)
    work = []
    for source_file, name_expressions in cuda_catalog.all_instantiations():
        names = sample_instantiations(name_expressions) if sample else tuple(name_expressions)
        code = (Path(_loader.KERNEL_DIR) / source_file).read_text()
        chunks = max(1, min(jobs, len(names) // 8))
        for arch in archs:
            options = tuple(_loader.nvrtc_options(arch))
            for i in range(chunks):
                work.append((source_file, code, arch, options, names[i::chunks]))

    failures: list[str] = []
    if jobs == 1 or len(work) == 1:
        results = map(_compile_program, work)
        pool = None
    else:
        # fresh interpreters, not forks of a process that may run threads (JAX, BLAS)
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_compile_program, work)
    try:
        for source_file, arch, count, seconds, error in results:
            if error is not None:
                failures.append(f"{source_file} [{arch}]: {error}")
                if verbose:
                    print(f"FAIL {source_file} [{arch}]: {error}", flush=True)
            elif verbose:
                print(f"ok   {source_file} [{arch}] {count} instantiations in {seconds:.1f} s",
                      flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    return failures


def _compile_only(archs, *, sample: bool, jobs: int | None) -> int:
    try:
        from cupy_backends.cuda.libs import nvrtc

        major, minor = nvrtc.getVersion()
    except Exception as exc:
        print(f"NVRTC is not usable ({type(exc).__name__}: {exc}); pip install cupynn[cuda12]")
        return 1
    try:
        from cupynn import _loader
        from cupynn.backends import cuda_catalog

        sources = cuda_catalog.all_instantiations()
    except Exception as exc:
        print(f"the kernel catalog is not usable ({type(exc).__name__}: {exc})")
        return 1
    what = "a sample of the" if sample else "all"
    print(f"NVRTC {major}.{minor}: compiling {what} kernel instantiations from "
          f"{_loader.KERNEL_DIR} for {', '.join(archs)}", flush=True)
    start = time.perf_counter()
    failures = compile_kernels(archs, sample=sample, jobs=jobs)
    if failures:
        print(f"{len(failures)} compilation(s) failed")
        return 1
    total = sum(len(sample_instantiations(n) if sample else n) for _, n in sources)
    print(f"compiled {total} instantiations of {len(sources)} source file(s) for "
          f"{len(archs)} arch(s) in {time.perf_counter() - start:.1f} s")
    return 0


# -- command line --------------------------------------------------------------------


def in_container() -> bool:
    """True inside a Docker (``/.dockerenv``) or Podman (``/run/.containerenv``) container."""
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def _no_gpu_hint() -> str:
    if in_container():
        return ("(this runs in a container: start it with `docker run --gpus all ...` and the "
                "NVIDIA Container Toolkit on the host; `python -m cupynn info` shows the setup)")
    return ("(check that `nvidia-smi` sees a GPU and that one CUDA extra is installed, "
            "pip install \"cupynn[cuda12]\" or \"cupynn[cuda13]\"; `python -m cupynn info` shows "
            "the setup)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cupynn selfcheck",
        description="Run cupynn's CUDA kernels once and compare them with the NumPy backend.",
    )
    parser.add_argument("--dtype", action="append", choices=sorted(TOLERANCE),
                        help="dtype(s) to check (repeatable; default: float64 and float32)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="layer widths, input first (default: %(default)s)")
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="device under test; 'cpu' compares NumPy with itself (plumbing test)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only NVRTC-compile every kernel (no GPU needed)")
    parser.add_argument("--arch", action="append",
                        help=f"with --compile-only: target(s) (default: {' '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--sample", action="store_true",
                        help="with --compile-only: only the first instantiation of each kernel "
                             "template and dtype")
    parser.add_argument("--jobs", type=int, default=None,
                        help="with --compile-only: parallel NVRTC processes (default: CPUs)")
    args = parser.parse_args(argv)

    if args.compile_only:
        return _compile_only(tuple(args.arch or DEFAULT_ARCHS), sample=args.sample,
                             jobs=args.jobs)

    import cupynn

    if args.device == "cuda":
        if not cupynn.cuda_available():
            from cupynn._devices import cuda_unavailable_reason

            print(f"self-check: no usable GPU: {cuda_unavailable_reason()}")
            print(_no_gpu_hint())
            return 2
        print(f"cupynn {cupynn.__version__} self-check on {_gpu_description()}", flush=True)
    else:
        print(f"cupynn {cupynn.__version__} self-check on the CPU (NumPy against itself)")

    ok = True
    for dtype in args.dtype or ["float64", "float32"]:
        label = f"{dtype:<8} MLP {list(args.sizes)} {args.activation}, batch {args.batch}"
        try:
            r = run_check(device=args.device, dtype=dtype, sizes=args.sizes,
                          activation=args.activation, batch=args.batch)
        except Exception as exc:
            ok = False
            print(f"  {label}: ERROR {type(exc).__name__}: {exc}")
            continue
        ok &= r.passed
        print(
            f"  {label}: loss {r.value:.6g}; rel. error vs NumPy: value {r.value_error:.1e}, "
            f"output {r.output_error:.1e}, gradients {r.grad_error:.1e}"
            f"{f' ({r.worst})' if r.worst else ''} [tol {r.tolerance:.0e}]; "
            f"first call {r.first_call_s:.2f} s (incl. compile), "
            f"then {r.second_call_s * 1e3:.2f} ms  {'PASS' if r.passed else 'FAIL'}",
            flush=True,
        )
    print("self-check passed" if ok else "self-check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
