"""Samples and their summary: median with min and max, never the mean.

On a shared, noisy machine one slow run (page-cache writeback, a neighbour's
job, first-touch page faults) drags a mean far off; the median of >= 5 runs
after a warm-up is what the figure is, min..max shows how much to trust it.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from .devio import DevIO

MB = 1_000_000
MiB = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One measured run of one contender."""
    bytes: int          # bytes of the workload moved (copy: the image's virtual size)
    ops: int            # requests (0 when the tool does not say)
    elapsed_s: float    # wall time of the measured part
    cpu_s: float        # user + system CPU time, all threads
    rss_bytes: int      # peak resident set size during the run (0 = unknown)
    #: requests per latency bucket (csrc/ioloop.c), None when not measured
    latency: tuple[int, ...] | None = None
    #: what reached the block device under DIR during the run (devio.DevIO)
    device: DevIO | None = None
    #: the tool's own account of the device (fio's disk_util entry for it:
    #: name, read_ios, write_ios, util in percent...), None when it has none
    tool_disk: dict | None = None
    #: bytes the contender's own process(es) read and wrote at the block
    #: layer (getrusage's ru_inblock/ru_oublock): unlike the device
    #: counters, a neighbour's I/O is not in it; None when not known
    block_io: tuple[int, int] | None = None

    @property
    def cpu_s_per_gb(self) -> float:
        """CPU seconds per 10^9 bytes of the workload."""
        return self.cpu_s / (self.bytes / 1e9) if self.bytes else 0.0

    @property
    def bps(self) -> float:
        return self.bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def iops(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Summary:
    runs: int
    median_bps: float
    min_bps: float
    max_bps: float
    median_iops: float
    median_elapsed_s: float
    median_cpu_s: float
    peak_rss_bytes: int
    median_cpu_s_per_gb: float = 0.0
    #: median of the runs' device bytes (read + written) per second; None
    #: without device counters
    median_device_bps: float | None = None
    median_device_read_bytes: float | None = None
    median_device_write_bytes: float | None = None
    #: median requests the device completed per run, and the share (percent)
    #: of the run's time it was busy
    median_device_ios: float | None = None
    median_device_util: float | None = None
    #: median of the runs' own block-layer bytes (read + written)
    median_block_io_bytes: float | None = None

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means the runs agree within 5%."""
        return (self.max_bps - self.min_bps) / self.median_bps if self.median_bps else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median_mb_s=self.median_bps / MB, median_mib_s=self.median_bps / MiB,
                 min_mb_s=self.min_bps / MB, max_mb_s=self.max_bps / MB, spread=self.spread)
        return d


def summarize(samples: list[Sample]) -> Summary:
    if not samples:
        raise ValueError("no samples")
    bps = [s.bps for s in samples]
    return Summary(
        runs=len(samples),
        median_bps=statistics.median(bps),
        min_bps=min(bps),
        max_bps=max(bps),
        median_iops=statistics.median(s.iops for s in samples),
        median_elapsed_s=statistics.median(s.elapsed_s for s in samples),
        median_cpu_s=statistics.median(s.cpu_s for s in samples),
        peak_rss_bytes=max(s.rss_bytes for s in samples),
        median_cpu_s_per_gb=statistics.median(s.cpu_s_per_gb for s in samples),
        **_device(samples),
        median_block_io_bytes=statistics.median(sum(s.block_io) for s in samples
                                                if s.block_io is not None)
        if any(s.block_io is not None for s in samples) else None,
    )


def _device(samples: list[Sample]) -> dict:
    devs = [(s.device, s.elapsed_s) for s in samples if s.device is not None]
    if not devs:
        return {}
    return {"median_device_bps": statistics.median(d.bytes / t if t > 0 else 0.0
                                                   for d, t in devs),
            "median_device_read_bytes": statistics.median(d.read_bytes for d, _ in devs),
            "median_device_write_bytes": statistics.median(d.write_bytes for d, _ in devs),
            "median_device_ios": statistics.median(d.ios for d, _ in devs),
            "median_device_util": statistics.median(d.util for d, _ in devs)}
