"""``--plot FILE.png``: what a reader would rather see than read, side by
side: the median throughput by request size, one line per workload, thread
count, kind of I/O and tool; and the latency CDF of every row that has its
requests' latency (the C loops' and fio's: the share of requests that
completed within a time), blkjobs solid, other tools dashed. matplotlib is an
optional extra (``pip install blkjobs[plot]``); without it ``--plot`` fails
before any I/O is done."""
from __future__ import annotations

import importlib

import numpy as np

from ..errors import UsageError
from .runner import Row, row_latency
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


def throughput_series(rows: list[Row]) -> dict[str, tuple[list[int], list[float]]]:
    """label -> (request sizes, median MB/s), one series per workload,
    threads, io and tool, sizes ascending."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if not r.samples or r.error:
            continue
        c = r.case
        key = f"{c.workload} j{c.threads} {r.io} {r.tool}"
        out.setdefault(key, {})[c.bs] = summarize(r.samples).median_bps / MB
    return {k: (sorted(v), [v[b] for b in sorted(v)]) for k, v in out.items()}


def latency_cdfs(rows: list[Row]) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (latency in us at each non-empty bucket's low bound, share
    of the requests at or below that bucket)."""
    out = {}
    for r in rows:
        lat = row_latency(r) if r.samples and not r.error else None
        if lat is None:
            continue
        c = r.case
        cum = np.cumsum(np.array(lat.bucket_count, dtype=np.float64)) / lat.requests
        xs = [x / 1000 for x in lat.bucket_low_ns]
        out[f"{c.workload} {format_size(c.bs)} j{c.threads} {r.io} {r.tool}"] = \
            (xs, [float(y) for y in cum])
    return out


def _style(label: str) -> str:
    """blkjobs' lines solid, the other tools' dashed (a label ends with the tool)."""
    return "-" if label.endswith(" blkjobs") else "--"


def plot(rows: list[Row], path: str, plt=None) -> None:
    plt = plt or load_pyplot()
    fig = plt.figure(figsize=(13, 5))
    ax = fig.add_subplot(1, 2, 1)
    series = throughput_series(rows)
    sizes: set[int] = set()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label, linestyle=_style(label))
        sizes.update(xs)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes))
    ax.set_xticklabels([format_size(b) for b in sorted(sizes)])
    ax.set_xlabel("request size")
    ax.set_ylabel("MB/s (10^6 bytes/s), median")
    ax.set_title("throughput by request size and threads")
    ax.legend(fontsize=7)
    cx = fig.add_subplot(1, 2, 2)
    cdfs = latency_cdfs(rows)
    for label, (lat, frac) in cdfs.items():
        cx.step(lat, frac, where="post", label=label, linestyle=_style(label))
    if cdfs:
        cx.set_xscale("log")
        cx.legend(fontsize=7)
    cx.set_xlabel("latency per request (microseconds)")
    cx.set_ylabel("share of requests completed within")
    cx.set_title("latency CDF")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
