"""PNG charts (matplotlib, Agg backend, imported only here so the bench runs without it)."""

from __future__ import annotations

__all__ = ["write_png"]


def _cases(results):
    cases, impls = [], []
    for r in results:
        case = f"{r['workload']}\n{r['dtype']}"
        if case not in cases:
            cases.append(case)
        if r["status"] == "ok" and r["label"] not in impls:
            impls.append(r["label"])
    return cases, impls


def _bars(ax, results, cases, impls, value, ylabel, log):
    import numpy as np

    width = 0.8 / max(1, len(impls))
    x = np.arange(len(cases))
    for k, label in enumerate(impls):
        ys = []
        for case in cases:
            v = float("nan")
            for r in results:
                if (r["status"] == "ok" and r["label"] == label
                        and f"{r['workload']}\n{r['dtype']}" == case):
                    v = value(r)
                    v = float("nan") if v is None else v
            ys.append(v)
        ax.bar(x + (k - (len(impls) - 1) / 2) * width, ys, width, label=label)
    ax.set_xticks(x, cases, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def write_png(doc: dict, path: str) -> None:
    """Forward time, gradient time and gradient/forward ratio per implementation and
    workload; the seed thread's per-sample vs batched gradient when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    thread = [t for t in doc.get("thread") or [] if t["status"] == "ok"]
    cases, impls = _cases(results)
    n = 3 + (1 if thread else 0)
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 1.6 * len(cases) + 4), 3.4 * n))
    m = doc["machine"]
    fig.suptitle(f"cupynn bench — {m.get('gpu') or m.get('cpu')} ({m['device']}), {m['date'][:10]}",
                 fontsize=10)

    def ms(phase):
        return lambda r: r[phase]["median_s"] * 1e3 if r.get(phase) else None

    _bars(axes[0], results, cases, impls, ms("forward"), "forward, ms (median)", True)
    _bars(axes[1], results, cases, impls, ms("gradient"), "gradient, ms (median)", True)
    _bars(axes[2], results, cases, impls, lambda r: r.get("ratio"), "gradient / forward", False)
    axes[2].axhline(2.0, color="k", lw=0.8, ls="--")
    ratios = [r["ratio"] for r in results if r["status"] == "ok" and r.get("ratio")]
    if ratios and max(ratios) > 20:
        from matplotlib.ticker import FuncFormatter

        axes[2].set_yscale("log")
        ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
                 if min(ratios) / 1.5 <= t <= max(ratios) * 1.5]
        axes[2].set_yticks(ticks)
        axes[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[2].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    axes[0].legend(fontsize=7, ncol=min(4, max(1, len(impls))))
    if thread:
        import numpy as np

        ax = axes[3]
        labels = [t["label"] for t in thread]
        x = np.arange(len(labels))
        per = [t["per_sample_gradient"]["seconds_total"] * 1e3 for t in thread]
        bat = [t["batched_gradient_s"] * 1e3 for t in thread]
        ax.bar(x - 0.2, per, 0.4, label="one call per input (accumulated)")
        ax.bar(x + 0.2, bat, 0.4, label="one batched call")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seed gradient, ms")
        ax.set_title("the seed thread's pattern (float64)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
