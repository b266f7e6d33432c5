"""Samples and their summary: median with min and max, never the mean.

On a shared, noisy machine one slow run (page-cache writeback, a neighbour's
job, first-touch page faults) drags a mean far off; the median of >= 5 runs
after a warm-up is what the figure is, min..max shows how much to trust it.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

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
    )
