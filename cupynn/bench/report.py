"""Derived numbers (ratios, % of floor), the machine description, and the tables."""

from __future__ import annotations

import datetime
import os
import platform
import sys

from .roofline import Ceilings, floor_seconds
from .workloads import WORKLOADS, Workload, custom_workload

__all__ = ["finalize", "machine_info", "terminal_table", "markdown", "fmt_time", "kernels_table",
           "train_table", "SPREAD_LIMIT", "COLUMNS"]

PHASES = ("forward", "gradient")
# A time whose spread (half the 10th-90th percentile range over the median) is above this is
# marked NOISY: its median, and every ratio computed from it, is not to be trusted.
SPREAD_LIMIT = 0.20

COLUMNS = """\
Columns: forward / gradient = the median time of one call (the loss; the loss and every
gradient), ±N% = half the 10th-90th percentile range of the timed calls over the median, and
NOISY when that exceeds ±20% (the median and the ratios built on it are not to be trusted:
rerun on a quieter machine); grad/fwd = gradient median / forward median; % floor = the
roofline floor (max(FLOPs / matrix rate, minimum bytes / copy bandwidth), measured on this
device) over the time; vs best peer = the time over the fastest other implementation's for
the same case; loss = the forward loss (equal across implementations after the check).
bench/README.md says how each is measured."""


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _workload_of(r: dict) -> Workload:
    base = WORKLOADS.get(r["workload"])
    if base is not None and base.shape == r["shape"]:
        return base.with_batch(r["batch"])
    sizes = tuple(int(s) for s in r["shape"].split("→"))
    return custom_workload(sizes, r["activation"], r["batch"])


def finalize(results: list[dict], ceilings: Ceilings | None) -> None:
    """Add ``ratio``, ``floor_s``, ``pct_of_floor`` and ``vs_best_peer`` to each ok result."""
    best: dict[tuple, float] = {}
    for r in results:
        if r["status"] != "ok" or r["is_cupynn"]:
            continue
        for ph in PHASES:
            if r.get(ph):
                key = (r["workload"], r["batch"], r["dtype"], ph)
                best[key] = min(best.get(key, float("inf")), r[ph]["median_s"])
    for r in results:
        if r["status"] != "ok":
            continue
        f, g = r.get("forward"), r.get("gradient")
        r["ratio"] = g["median_s"] / f["median_s"] if f and g else None
        r["floor_s"], r["bound"], r["pct_of_floor"], r["vs_best_peer"] = {}, {}, {}, {}
        w = _workload_of(r)
        for ph in PHASES:
            if not r.get(ph):
                continue
            t = r[ph]["median_s"]
            if ceilings is not None:
                floor, bound = floor_seconds(w, r["dtype"], ph, ceilings)
                r["floor_s"][ph], r["bound"][ph] = floor, bound
                r["pct_of_floor"][ph] = 100.0 * floor / t
            b = best.get((r["workload"], r["batch"], r["dtype"], ph))
            r["vs_best_peer"][ph] = t / b if b else None
            r[ph]["flops"] = w.flops(ph)


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod else None


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else name
        info["gpu_memory_gb"] = round(props["totalGlobalMem"] / 1e9, 1)
        info["gpu_sms"] = props["multiProcessorCount"]
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    info["versions"] = {
        m: v for m in ("cupynn", "numpy", "cupy", "torch", "jax", "jaxlib", "optax", "matplotlib")
        if (v := _version(m))
    }
    return info


def _pct(r: dict, ph: str) -> str:
    v = (r.get("pct_of_floor") or {}).get(ph)
    return "—" if v is None else (f"{v:.2g}%" if v < 10 else f"{v:.0f}%")


def _vs(r: dict, ph: str) -> str:
    v = (r.get("vs_best_peer") or {}).get(ph)
    return "—" if v is None else f"{v:.2f}×"


def _spread_cell(median_s: float, spread: float) -> str:
    """``1.2 ms ±3%``, with NOISY appended above SPREAD_LIMIT."""
    return (f"{fmt_time(median_s)} ±{100 * spread:.0f}%"
            + (" NOISY" if spread > SPREAD_LIMIT else ""))


def _time_cell(r: dict, ph: str) -> str:
    s = r.get(ph)
    if not s:
        return "—"
    return _spread_cell(s["median_s"], s["spread"])


HEADER = ("workload", "dtype", "implementation", "forward", "gradient", "grad/fwd",
          "fwd % floor", "grad % floor", "fwd vs best peer", "grad vs best peer", "loss")


def _rows(results: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        head = (f"{r['workload']} ({r['shape']}, {r['batch']:,})", r["dtype"], r["label"])
        if r["status"] == "ok":
            ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "—"
            rows.append(head + (_time_cell(r, "forward"), _time_cell(r, "gradient"), ratio,
                                _pct(r, "forward"), _pct(r, "gradient"),
                                _vs(r, "forward"), _vs(r, "gradient"), f"{r['loss']:.6g}"))
        else:
            rows.append(head + (f"{r['status'].upper()}: {r['reason']}",))
    return rows


def _aligned(header: tuple[str, ...], rows: list[tuple[str, ...]], lead: int) -> str:
    """Columns padded to width; a short row (a skip or failure) prints its
    first ``lead`` cells aligned and the rest as one message."""
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(h), *(len(r[i]) for r in full)) if full else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        if len(r) == len(header):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:lead], widths))
                         + "  " + " ".join(r[lead:]))
    return "\n".join(lines)


def terminal_table(results: list[dict]) -> str:
    return _aligned(HEADER, _rows(results), 3)


def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        r = tuple(r) + ("",) * (len(header) - len(r))
        out.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return "\n".join(out)


def thread_rows(thread: list[dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = ("implementation", "per-sample forward", "per-sample gradient", "grad/fwd",
              "batched forward", "batched gradient", "grad/fwd", "per-sample ÷ batched (grad)",
              "samples run")
    rows = []
    for t in thread:
        if t["status"] != "ok":
            rows.append((t["label"], f"{t['status'].upper()}: {t['reason']}"))
            continue
        pf, pg = t["per_sample_forward"], t["per_sample_gradient"]
        bf, bg = t["batched_forward_s"], t["batched_gradient_s"]
        n = f"fwd {pf['samples_run']:,}, grad {pg['samples_run']:,} of {t['samples_total']:,}"
        if pf["extrapolated"] or pg["extrapolated"]:
            n += " (EXTRAPOLATED to all)"
        rows.append((t["label"], fmt_time(pf["seconds_total"]), fmt_time(pg["seconds_total"]),
                     f"{pg['seconds_total'] / pf['seconds_total']:.1f}", fmt_time(bf),
                     fmt_time(bg), f"{bg / bf:.1f}", f"{pg['seconds_total'] / bg:,.0f}×", n))
    return header, rows


def thread_table(thread: list[dict]) -> str:
    header, rows = thread_rows(thread)
    return _aligned(header, rows, 1)


KERNEL_HEADER = ("range", "kernel", "grid", "regs", "smem", "blocks/SM", "waves", "time",
                 "share")


def kernel_rows(b: dict) -> list[tuple[str, ...]]:
    """Rows of one ``kernels.kernel_breakdown`` result."""
    def opt(v, f=str):
        return "—" if v is None else f(v)

    return [(r["range"], r["kernel"].replace("cupynn::", ""), "×".join(map(str, r["grid"])),
             opt(r["registers"]), opt(r["static_smem"], lambda v: f"{v / 1024:.1f} KiB"),
             opt(r["blocks_per_sm"]), opt(r["waves"], lambda v: f"{v:.2f}"),
             _spread_cell(r["median_s"], r["spread"]),
             opt(r["share"], lambda v: f"{100 * v:.0f}%")) for r in b["kernels"]]


def _kernels_summary(b: dict) -> str:
    return (f"sum of the kernels {fmt_time(b['sum_s'])}; all {len(b['kernels'])} launched back "
            f"to back {fmt_time(b['sequence_s'])} ±{100 * b['sequence_spread']:.0f}% "
            f"({b['timer']} timer)")


def _kernels_title(k: dict) -> str:
    return f"{k['workload']} ({k['shape']}, {k['batch']:,}) {k['dtype']}, gradient step"


def kernels_table(k: dict) -> str:
    """One entry of ``doc["kernels"]`` for the terminal."""
    if "error" in k:
        return f"{_kernels_title(k)}: {k['error']}"
    b = k["breakdown"]
    return "\n".join([_kernels_title(k), _aligned(KERNEL_HEADER, kernel_rows(b), 0),
                      _kernels_summary(b)])


TRAIN_HEADER = ("workload", "dtype", "implementation", "Adam step", "vs best peer", "checked")


def train_rows(results: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        head = (f"{r['workload']} ({r['shape']}, {r['batch']:,})", r["dtype"], r["label"])
        if r["status"] != "ok":
            rows.append(head + (f"{r['status'].upper()}: {r['reason']}",))
            continue
        s = r["step"]
        vs = "—" if r.get("vs_best_peer") is None else f"{r['vs_best_peer']:.2f}×"
        c = r["check"]
        rows.append(head + (_spread_cell(s["median_s"], s["spread"]), vs,
                            f"params {c['params_rel_err']:.0e}, loss {c['loss_rel_err']:.0e}"))
    return rows


def train_table(results: list[dict]) -> str:
    """``doc["train"]`` (one Adam training step per implementation) for the terminal."""
    return _aligned(TRAIN_HEADER, train_rows(results), 3)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    dev = m.get("gpu") or m.get("cpu")
    lines = [f"Device: {dev} ({m['device']}); {m.get('cpu_count')} CPU cores; "
             f"date {m['date']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()), ""]
    c = doc.get("ceilings")
    if c:
        rates = ", ".join(f"{k} {v / 1e9:.3g} GFLOP/s" for k, v in c["matmul_flops_per_s"].items())
        lines += [f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e9:.3g} GB/s "
                  f"(read + write); matrix product {rates}.", ""]
    if doc["results"] or not (doc.get("train") or doc.get("derivatives")):
        lines.append(_md_table(HEADER, _rows(doc["results"])))
        lines += ["", COLUMNS.replace("\n", " ")]
    if doc.get("thread"):
        header, rows = thread_rows(doc["thread"])
        n = doc["thread"][0]["samples_total"]
        lines += ["", f"Seed thread: {n:,} single-sample calls (loss summed, gradients "
                      f"accumulated) against one batched call of {n:,}, float64:", "",
                  _md_table(header, rows)]
    if doc.get("derivatives"):
        lines += ["", "Input derivatives (pinn): the Poisson residual loss and its gradient:", "",
                  pinn_markdown_table(doc["derivatives"])]
    if doc.get("train"):
        lines += ["", "Training step (loss, gradient and an Adam update of every parameter; "
                      "lr 1e-3):", "", _md_table(TRAIN_HEADER, train_rows(doc["train"]))]
    for k in doc.get("kernels") or ():
        lines += ["", f"Kernels of cupynn's {_kernels_title(k)}:", ""]
        if "error" in k:
            lines.append(k["error"])
        else:
            lines += [_md_table(KERNEL_HEADER, kernel_rows(k["breakdown"])), "",
                      _kernels_summary(k["breakdown"]) + "."]
    return "\n".join(lines) + "\n"


# -- the pinn workload's table (cupynn.bench.pinn runs it) --------------------------------

PINN_HEADER = ("workload", "implementation", "value and gradient", "vs best peer", "rel. error",
               "loss")


def pinn_rows(results):
    rows = []
    for r in results:
        head = (f"pinn ({r['shape']}, {r['batch']:,}, {r['dtype']})", r["label"])
        if r["status"] == "ok":
            g = r["gradient"]
            vs = "—" if r.get("vs_best_peer") is None else f"{r['vs_best_peer']:.2f}×"
            rows.append(head + (f"{fmt_time(g['median_s'])} ±{100 * g['spread']:.0f}%", vs,
                                f"{r['check']['rel_err']:.1e}", f"{r['loss']:.6g}"))
        else:
            rows.append(head + (f"{r['status'].upper()}: {r['reason']}",))
    return rows


def pinn_table(results) -> str:
    return _aligned(PINN_HEADER, pinn_rows(results), 2)


def pinn_markdown_table(results) -> str:
    return _md_table(PINN_HEADER, pinn_rows(results))
