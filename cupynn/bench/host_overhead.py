"""Host cost of the CUDA backend's calls (``python -m cupynn bench --host-overhead``).

The CUDA backend's real host code -- path choice, cached plans and workspaces, argument
checks, output allocation, the launch calls -- runs against a stand-in module whose kernels
do nothing and NumPy as the array module, so what is timed is the Python (and NumPy) work of
a call and nothing on a device.  For each workload and call kind it reports microseconds per
call (median of repeated loops), kernel launches per call and allocations per call (every
buffer the backend takes from ``Launcher.empty``), for the first call of a shape (which builds
the plan) and for the calls after it.  On a GPU a CuPy allocation and a CuPy view cost more
than NumPy's, and each launch adds the driver's few microseconds; those are not in here.
"""

from __future__ import annotations

import time
from statistics import median

import numpy as np

__all__ = ["NullModule", "host_overhead", "format_table", "WORKLOADS"]


class NullModule:
    """A module class whose kernels launch nothing (CuPy RawModule's constructor keywords)."""

    def __init__(self, code=None, options=(), name_expressions=(), **_):
        pass

    def get_function(self, name):
        def kernel(grid, block, args, shared_mem=0, stream=None):
            return None

        kernel.max_dynamic_shared_size_bytes = 48 * 1024
        return kernel


# (label, sizes, activations, batch, dtype, precision)
WORKLOADS = (
    ("seed", (1, 1000, 20, 1), ("identity", "identity", "identity"), 10_000, "float64", "strict"),
    ("seed tanh", (1, 1000, 20, 1), ("tanh", "tanh", "identity"), 10_000, "float64", "strict"),
    ("narrow", (32, 64, 64, 64, 64, 1), ("relu",) * 4 + ("identity",), 1 << 20, "float32", "strict"),
)


def _model(sizes, acts, dtype, rng):
    import cupynn

    layers = [cupynn.Dense.from_arrays((rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype),
                                       rng.standard_normal(o).astype(dtype), a)
              for i, o, a in zip(sizes, sizes[1:], acts)]
    return cupynn.Chain(*layers)


def _measure(fn, *, reps: int, loops: int) -> tuple[float, float]:
    """(fastest, median) over ``reps`` loops of ``loops`` calls, seconds per call.  On a busy
    machine the fastest loop is the better estimate of the code's own cost."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t) / loops)
    return min(times), median(times)


def _rows_for(label, model, x, path: str, *, reps: int, loops: int) -> list[dict]:
    """The rows of one workload on one path ("fused" or "per-layer")."""
    import cupynn
    from cupynn import functional
    from cupynn.backends import cuda_backend

    be = cuda_backend.CudaBackend(xp=np, module_cls=NullModule, arch="sm_90")
    be.fused.enabled = path == "fused"
    _layers, net, params, _ = functional._model_parts(model)
    loss = cupynn.backends.LossSpec("sum_squares")
    counts = {"alloc": 0}
    real_empty = be.kernels.empty

    def empty(shape, dtype):
        counts["alloc"] += 1
        return real_empty(shape, dtype)

    be.kernels.empty = empty
    kinds = {
        "value_and_grad": lambda: be.network_value_and_grad(net, params, x, loss),
        "forward": lambda: be.network_forward(net, params, x),
    }
    held: dict = {}  # out= gets the arrays of an earlier call (made after the plain call ran)
    if path == "fused":
        kinds["value_and_grad out="] = lambda: be.network_value_and_grad(net, params, x, loss,
                                                                         out=held["out"])
    kinds["cupynn.value_and_grad"] = lambda: cupynn.value_and_grad(model, x)
    rows = []
    orig = functional.get_backend
    functional.get_backend = lambda device: be  # the public entry point, this backend behind it
    functional._PARTS.pop(model, None)  # functional keeps the backend with the model's parts
    try:
        for kind, fn in kinds.items():
            if kind == "value_and_grad out=":
                held["out"] = be.network_value_and_grad(net, params, x, loss)
            be.kernels.launch_log = []
            counts["alloc"] = 0
            t0 = time.perf_counter()
            fn()  # the first call of a shape builds the plan (fused) / records it (per layer)
            first_s = time.perf_counter() - t0
            first = (len(be.kernels.launch_log), counts["alloc"])
            be.kernels.launch_log = []
            counts["alloc"] = 0
            fn()
            steady = (len(be.kernels.launch_log), counts["alloc"], be.kernels.launch_log)
            be.kernels.launch_log = None
            best, med = _measure(fn, reps=reps, loops=loops)
            rows.append({
                "workload": label, "batch": x.shape[0], "dtype": str(x.dtype), "path": path,
                "call": kind, "us_per_call": best * 1e6, "us_per_call_median": med * 1e6,
                "first_call_us": first_s * 1e6, "launches": steady[0], "allocations": steady[1],
                "first_launches": first[0], "first_allocations": first[1],
                "ranges": [r for r, _ in steady[2]],
            })
    finally:
        functional.get_backend = orig
        functional._PARTS.pop(model, None)
    return rows


def host_overhead(*, workloads=WORKLOADS, reps: int = 5, loops: int = 300,
                  paths=("fused", "per-layer")) -> list[dict]:
    """One row per (workload, path, call kind): us per call, launches and allocations."""
    try:  # the loader looks for CuPy on a module's first build: import it before any timing
        import cupy  # noqa: F401
    except Exception:  # noqa: BLE001 - no CuPy is fine: nothing here needs it
        pass
    rows = []
    rng = np.random.default_rng(0)
    for label, sizes, acts, batch, dtype, precision in workloads:
        model = _model(sizes, acts, dtype, rng)
        model.precision = precision
        x = rng.standard_normal((batch, sizes[0])).astype(dtype) if sizes[0] > 1 else \
            np.linspace(-1, 1, batch, dtype=dtype).reshape(-1, 1)
        for path in paths:
            rows += _rows_for(label, model, x, path, reps=reps, loops=loops)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| workload | path | call | µs per call (fastest loop / median) | launches | "
            "allocations | first call: µs, launches, allocations |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} ({r['dtype']}, {r['batch']:,}) | {r['path']} | "
                     f"`{r['call']}` | {r['us_per_call']:.1f} / {r['us_per_call_median']:.1f} | "
                     f"{r['launches']} | {r['allocations']} | {r['first_call_us']:.0f}, "
                     f"{r['first_launches']}, {r['first_allocations']} |")
    return "\n".join(lines)
