"""Reading fio's ``--output-format=json+`` report of one ``bench --compare``
run: its figures (io_bytes, total_ios, runtime), the completion latency of
every request (``clat_ns``: its percentiles and, json+ only, the non-empty
buckets of its histogram) and its own account of the disk (``disk_util``).

fio's histogram has the buckets of csrc/ioloop.c (see :mod:`.latency`), so
its ``bins`` become the same per-bucket counts as the C loops' and a fio row
is summarised exactly as a blkjobs row is; for one run that gives fio's own
percentiles (tests/test_bench_fio.py checks it on a stored report).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .latency import histogram_of_values
from .measure import ToolError


@dataclass(frozen=True)
class FioRun:
    io_bytes: int
    total_ios: int
    runtime_ms: int
    #: per-bucket request counts (latency.py's buckets), None without bins
    latency: tuple[int, ...] | None
    #: fio's own clat percentiles, {'50.000000': ns, ...}
    percentiles_ns: dict[str, int]
    #: fio's disk_util entries (the device first, then what it sits on)
    disk_util: list[dict]


def parse_fio(text: str, writes: bool) -> FioRun:
    """fio's JSON (anything before the first '{' skipped: fio may print
    notes there); ``writes``: take the write direction, else the read."""
    try:
        doc = json.loads(text[text.find("{"):])
        job = doc["jobs"][0]
        if job.get("error"):
            raise ToolError(f"fio reported error {job['error']}")
        part = job["write" if writes else "read"]
        clat = part.get("clat_ns") or {}
        bins = clat.get("bins")
        return FioRun(
            io_bytes=int(part["io_bytes"]), total_ios=int(part["total_ios"]),
            runtime_ms=int(part["runtime"]),
            latency=histogram_of_values({int(k): int(v) for k, v in bins.items()})
            if bins else None,
            percentiles_ns={k: int(v) for k, v in (clat.get("percentile") or {}).items()},
            disk_util=[dict(d) for d in doc.get("disk_util") or []])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ToolError(f"cannot read fio's JSON output: {e!r}") from None
