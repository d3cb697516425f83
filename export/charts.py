"""Charts of timing results: PNG bytes, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

LOG_SCALE_SPREAD = 20  # log latency axis when the slowest p50 is more than this times the fastest


CHART_EXTRA = "pip install 'vitfold[plots]'"  # what draws the chart when matplotlib is missing


def latency_chart(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """PNG: horizontal bars of p50 latency per backend, one colour per batch size, whiskers to p90;
    None when matplotlib (the `plots` extra) is not installed.

    `rows`: dicts with backend, provider, batch_size, p50_ms and p90_ms (and `unstable`, marked on its bar);
    every backend at every batch size."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    by_key = {(r["backend"], r["batch_size"]): r for r in rows}  # every benched backend ran every batch size
    height = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.3 * len(backends) * len(batches)), dpi=120)
    for i, batch in enumerate(batches):
        found = [by_key[name, batch] for name in backends]
        p50 = [r["p50_ms"] for r in found]
        to_p90 = [r["p90_ms"] - r["p50_ms"] for r in found]
        y = np.arange(len(backends)) + (i - (len(batches) - 1) / 2) * height
        bars = ax.barh(y, p50, height, xerr=[[0.0] * len(found), to_p90], capsize=2, label=str(batch))
        labels = [f"{r['p50_ms']:.3g} ms" + (" (unstable)" if r.get("unstable") else "") for r in found]
        ax.bar_label(bars, labels=labels, padding=3, fontsize=7)
    providers = {r["backend"]: r["provider"] for r in rows}
    ax.set_yticks(np.arange(len(backends)), [f"{name}\n({providers[name]})" for name in backends])
    ax.invert_yaxis()
    p50s = [r["p50_ms"] for r in rows]
    if max(p50s) > LOG_SCALE_SPREAD * min(p50s):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 rather than 10^0 ...
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15)
    ax.set_xlabel("p50 latency per call (ms), whisker to p90" + (" — log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("backend")
    ax.set_title(title, fontsize=10)
    ax.legend(title="batch size", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png")
    plt.close(fig)
    return data.getvalue()
