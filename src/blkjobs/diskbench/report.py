"""The report: a plain table for people (stdout), a JSON document for
programs (``--output json``, schema below, version in ``schema``).

JSON (schema "blkjobs-bench/1")::

    {"schema": "blkjobs-bench/1",
     "settings": {"dir", "size", "runtime_s", "repeat", "warmup", "cold",
                  "density": {"data", "zero", "hole"}, "compare": [...], "seed"},
     "host": {"kernel", "cpus", "filesystem"},
     "notes": ["..."],
     "results": [{"case": {"workload", "bs", "threads", "direct"},
                  "tool", "io": "direct"|"buffered",
                  "cache": "bypassed"|"page-cache"|"cold:drop_caches"|"cold:fadvise",
                  "rank": null | 1.. (by median throughput among the case's rows
                          of the same "io"),
                  "error": null | "message",
                  "runs": [{"bytes", "ops", "elapsed_s", "cpu_s", "peak_rss_bytes",
                            "device": null | {"read_bytes", "write_bytes", "busy_ms",
                                              "read_ios", "write_ios", "window_ms"},
                            "tool_disk": null | fio's disk_util entry {"name",
                                "read_ios", "write_ios", "util", ...},
                            "block_io": null | {"read_bytes", "write_bytes"},
                            "latency": null | this run's, as the row's below}],
                  "summary": null | {"runs", "median_bps", "min_bps", "max_bps",
                      "median_mb_s", "median_mib_s", "min_mb_s", "max_mb_s", "spread",
                      "median_iops", "median_elapsed_s", "median_cpu_s",
                      "peak_rss_bytes", "median_cpu_s_per_gb", "median_device_bps",
                      "median_device_read_bytes", "median_device_write_bytes",
                      "median_device_ios", "median_device_util",
                      "median_block_io_bytes"},
                  "latency": null | {"requests", "mean_ns",
                      "percentiles_ns": {"p50", "p90", "p99", "p99.9"},
                      "histogram": {"bucket_low_ns": [...], "count": [...]}}}]}

``latency`` is per request (issue to completion of one pread/pwrite) over
all measured runs of the row (each run's own in its ``runs`` entry), from the C loops' log-linear histogram, or for
fio from its clat_ns histogram (the same buckets): a bucket ``i`` holds
[bucket_low_ns[i], next bucket's low), only non-empty buckets are listed;
the other external tools and the copy workload have none. ``device`` is the
block device's counters over the run, for every contender alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics

from .latency import PERCENTILES, pname
from .runner import Row, Settings, ranks, result_dicts, row_latency
from .workspace import PAGE_CACHE
from .sizes import format_size
from .stats import MB, MiB, summarize

SCHEMA = "blkjobs-bench/1"
IOPS_MAX_BS = 64 << 10  # IOPS is shown for requests up to this size


def _filesystem(path: str) -> str | None:
    best, fstype = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if os.path.realpath(path).startswith(mnt.rstrip("/") + "/") or \
                        os.path.realpath(path) == mnt:
                    if len(mnt) >= len(best):
                        best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def to_json(settings: Settings, rows: list[Row], notes: list[str]) -> dict:
    d = settings.density
    return {
        "schema": SCHEMA,
        "settings": {"dir": settings.dir, "size": settings.size,
                     "runtime_s": settings.runtime or None, "repeat": settings.repeat,
                     "warmup": settings.warmup, "cold": settings.cold,
                     "density": {"data": d.data, "zero": d.zero, "hole": d.hole},
                     "compare": list(settings.compare), "seed": settings.seed},
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "filesystem": _filesystem(settings.dir)},
        "notes": list(notes),
        "results": result_dicts(rows),
    }


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2) + "\n"


HEADERS = ("workload", "bs", "jobs", "io", "cache", "tool", "rank", "MB/s", "MiB/s", "min-max MB/s",
           "IOPS", "CPU s", "peak RSS", "dev MB", "own MB", "dev MB/s", "dev util%", "CPU s/GB") + \
    tuple(pname(p) for p in PERCENTILES)


def _us(ns: float) -> str:
    us = ns / 1000
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def _dev_bytes(r: Row) -> float:
    """Median bytes read + written at the device per run."""
    return statistics.median(x.device.bytes for x in r.samples if x.device is not None)


def tool_disk_notes(rows: list[Row]) -> list[str]:
    """For each row whose tool reports its own disk figures (fio's
    disk_util): those beside our device counters over the same runs, so
    the two accounts can be checked against each other."""
    out = []
    for r in rows:
        runs = [x for x in r.samples if x.tool_disk is not None]
        if r.error or not runs:
            continue
        td = [x.tool_disk for x in runs if x.tool_disk is not None]
        ios = statistics.median(int(d.get("read_ios", 0)) + int(d.get("write_ios", 0))
                                for d in td)
        util = statistics.median(float(d.get("util", 0.0)) for d in td)
        line = (f"{r.tool}'s own disk_util for {r.case.label} ({td[0].get('name', '?')}): "
                f"{ios:,.0f} ios, util {util:.1f}%")
        devs = [(x.device, x.elapsed_s) for x in runs if x.device is not None]
        if devs:
            dios = statistics.median(d.ios for d, _ in devs)
            dutil = statistics.median(d.util for d, _ in devs)
            line += f"; device counters over the same runs: {dios:,.0f} ios, util {dutil:.1f}%"
        out.append(line + " (medians)")
    return out


def table(settings: Settings, rows: list[Row], notes: list[str]) -> str:
    lines = []
    body = []
    for r, rank in zip(rows, ranks(rows), strict=True):
        c = r.case
        head = [c.workload, format_size(c.bs), str(c.threads), r.io, r.cache, r.tool,
                f"{rank}" if rank else "-"]
        if r.error or not r.samples:
            body.append(head + [f"error: {r.error or 'no runs'}"])
            continue
        s = summarize(r.samples)
        iops = f"{s.median_iops:,.0f}" if c.bs <= IOPS_MAX_BS and s.median_iops else "-"
        rss = f"{s.peak_rss_bytes / MiB:.0f} MiB" if s.peak_rss_bytes else "-"
        dev = ["-"] * 3 if s.median_device_bps is None else [
            f"{_dev_bytes(r) / MB:,.1f}", f"{s.median_device_bps / MB:,.1f}",
            f"{s.median_device_util or 0:.0f}"]
        dev.insert(1, "-" if s.median_block_io_bytes is None else
                   f"{s.median_block_io_bytes / MB:,.1f}")
        lat = row_latency(r)
        pct = [_us(lat.percentiles_ns[pname(p)]) if lat else "-" for p in PERCENTILES]
        body.append(head + [f"{s.median_bps / MB:,.1f}", f"{s.median_bps / MiB:,.1f}",
                            f"{s.min_bps / MB:,.1f}-{s.max_bps / MB:,.1f}", iops,
                            f"{s.median_cpu_s:.2f}", rss, *dev, f"{s.median_cpu_s_per_gb:.2f}"]
                    + pct)
    widths = [len(h) for h in HEADERS]
    for b in body:
        if len(b) == len(HEADERS):
            widths = [max(w, len(x)) for w, x in zip(widths, b, strict=True)]
    numeric = {2} | set(range(6, len(HEADERS)))

    def fmt(cells):
        out = []
        for i, x in enumerate(cells):
            if len(cells) != len(HEADERS) and i == len(cells) - 1:
                out.append(x)  # an error message runs to the end of the line
            else:
                out.append(x.rjust(widths[i]) if i in numeric else x.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines.append(fmt(list(HEADERS)))
    prev = None
    for b, r in zip(body, rows, strict=True):
        if prev is not None and r.case != prev:
            lines.append("")
        lines.append(fmt(b))
        prev = r.case
    lines.append("")
    lines.append(f"MB/s = 10^6 bytes/s, MiB/s = 2^20 bytes/s: the median of {settings.repeat} "
                 f"runs after {settings.warmup} warm-up run(s), contenders alternating; "
                 f"min-max over the same runs.")
    lines.append("Writes include the final fsync. IOPS shown for requests up to "
                 f"{format_size(IOPS_MAX_BS)}. CPU s: user+system time per run (median). "
                 "Peak RSS: largest of the runs.")
    lines.append("dev MB, dev MB/s, dev util%: bytes read + written at the block device "
                 "under DIR (its disk counters, neighbours' I/O included) per run, per "
                 "second of the run, and the share of the time between the counter readings "
                 "it was busy; own MB: what the tool's own process read + wrote at the block "
                 "layer (getrusage); medians, for every tool alike. CPU s/GB: CPU seconds "
                 "per 10^9 bytes of the workload, median.")
    lines.append("p50..p99.9: per-request latency in microseconds (issue to completion), "
                 "percentiles over all measured runs; fio's from its clat histogram, "
                 "computed alike.")
    if len({r.tool for r in rows}) > 1:
        lines.append("rank: by median MB/s among the rows of the same case and the same io; "
                     "buffered and direct contenders are never ranked together.")
    if any(r.cache == PAGE_CACHE for r in rows):
        lines.append("page-cache: buffered runs on a warm cache measure what the page cache "
                     "absorbed or served, not the disk (--cold evicts it before every run).")
    if any(r.case.workload == "copy" for r in rows):
        lines.append(f"copy: a {format_size(settings.size)} raw image ({settings.density}); "
                     "throughput counts its virtual size.")
    for n in notes + tool_disk_notes(rows):
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"
