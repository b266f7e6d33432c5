"""Per-request latency: the histograms csrc/ioloop.c collects (log-linear,
BJ_LAT_BUCKETS buckets, ns) summarised with numpy.

A row's latency is that of every request of its measured runs: their
histograms are summed, then a percentile is the bucket where the cumulative
count first reaches that share of the requests, reported at the bucket's
midpoint, low + width/2 (a bucket is at most 1/64 of its values wide, so
the figure is within 0.8% of the exact order statistic). fio's clat
histogram has the same buckets (64 per power of two, one per ns below 128)
and fio reports a percentile the same way, at low + width/2: a fio job's
bins (``--output-format=json+``) summarised here give fio's own figures, so
the two tools' rows are computed alike (:func:`histogram_of_values`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@lru_cache(maxsize=1)
def bucket_bounds() -> np.ndarray:
    """Lower bounds of the buckets (ns), and one more: the end of the last."""
    from ..native._lib import lib
    n = int(lib.BJ_LAT_BUCKETS)
    return np.array([lib.bj_lat_bucket_low(i) for i in range(n + 1)], dtype=np.float64)


@dataclass(frozen=True)
class Latency:
    """Percentiles (ns) of ``requests`` requests, and the non-empty buckets."""
    requests: int
    percentiles_ns: dict[str, float]
    mean_ns: float
    bucket_low_ns: list[int]
    bucket_count: list[int]

    def as_dict(self) -> dict:
        return {"requests": self.requests, "mean_ns": self.mean_ns,
                "percentiles_ns": dict(self.percentiles_ns),
                "histogram": {"bucket_low_ns": self.bucket_low_ns,
                              "count": self.bucket_count}}


def pname(p: float) -> str:
    """50.0 -> 'p50', 99.9 -> 'p99.9'."""
    return f"p{p:g}"


def histogram_of_values(values: dict[int, int]) -> tuple[int, ...]:
    """Our histogram of {latency ns: requests}, e.g. fio's json+ ``bins``
    (keyed by its buckets' reported values, which fall in the same buckets
    here)."""
    from ..native._lib import lib
    n = int(lib.BJ_LAT_BUCKETS)
    counts = [0] * n
    for v, c in values.items():
        counts[min(int(lib.bj_lat_bucket(int(v))), n - 1)] += int(c)
    return tuple(counts)


def summarize_latency(hists: list[tuple[int, ...]],
                      percentiles: tuple[float, ...] = PERCENTILES) -> Latency | None:
    """Sum the histograms (one per run) and summarise; None when empty."""
    if not hists:
        return None
    counts = np.sum(np.array(hists, dtype=np.uint64), axis=0)
    n = int(counts.sum())
    if n == 0:
        return None
    bounds = bucket_bounds()
    lo, hi = bounds[:-1], bounds[1:]
    mid = lo + np.floor((hi - lo) / 2)           # width-1 buckets: the value itself
    cum = np.cumsum(counts)
    out = {}
    for p in percentiles:
        rank = max(1, int(np.ceil(p / 100.0 * n)))
        out[pname(p)] = float(mid[int(np.searchsorted(cum, rank))])
    nz = np.nonzero(counts)[0]
    mean = float(np.dot(counts.astype(np.float64), mid) / n)
    return Latency(n, out, mean, [int(lo[i]) for i in nz], [int(counts[i]) for i in nz])
