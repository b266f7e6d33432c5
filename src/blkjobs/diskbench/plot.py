"""``--plot FILE.png``: one bar per (case, tool), the median in MB/s with a
min..max error bar. matplotlib is an optional extra (``pip install
blkjobs[plot]``); without it ``--plot`` fails before any I/O is done."""
from __future__ import annotations

import importlib

from ..errors import UsageError
from .runner import Row
from .sizes import format_size
from .stats import MB, summarize


def load_pyplot():
    """Import matplotlib's pyplot with a file-only backend, or explain."""
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'blkjobs[plot]' "
                         "(or apt install python3-matplotlib)") from None


def plot(rows: list[Row], path: str, plt=None) -> None:
    plt = plt or load_pyplot()
    rows = [r for r in rows if r.samples]
    labels, med, lo, hi, colors = [], [], [], [], []
    tools = sorted({r.tool for r in rows}, key=lambda t: (t != "blkjobs", t))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for r in rows:
        s = summarize(r.samples)
        c = r.case
        labels.append(f"{c.workload} {format_size(c.bs)} j{c.threads} "
                      f"{'D' if c.direct else 'B'}\n{r.tool}")
        med.append(s.median_bps / MB)
        lo.append((s.median_bps - s.min_bps) / MB)
        hi.append((s.max_bps - s.median_bps) / MB)
        colors.append(palette[tools.index(r.tool) % len(palette)])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 5))
    xs = list(range(len(rows)))
    ax.bar(xs, med, yerr=[lo, hi], color=colors, capsize=3)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MB/s (10^6 bytes/s), median with min-max")
    ax.set_title("blkjobs bench")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
