"""The latency histogram of csrc/ioloop.c and its numpy summary, on
synthetic latencies whose exact percentiles are known."""
from __future__ import annotations

import numpy as np
import pytest

from blkjobs.diskbench.latency import bucket_bounds, summarize_latency
from blkjobs.native._lib import lib

N = int(lib.BJ_LAT_BUCKETS)


def hist_of(values) -> tuple[int, ...]:
    counts = [0] * N
    for v in values:
        counts[lib.bj_lat_bucket(int(v))] += 1
    return tuple(counts)


def test_bounds_hold_their_values():
    b = bucket_bounds()
    assert len(b) == N + 1 and np.all(np.diff(b) > 0)
    for v in (0, 1, 63, 64, 65, 127, 128, 129, 1000, 4095, 4096, 123_456_789, 2**40 + 7):
        i = lib.bj_lat_bucket(v)
        assert b[i] <= v < b[i + 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_match_exact_order_statistics(seed):
    # log-normal latencies around 100 us, as a disk's: each percentile is
    # within a bucket's width (1/64) of the exact one (numpy's 'inverted_cdf'
    # is the definition fio and we use: the smallest value with at least p%
    # of the requests at or below it)
    rng = np.random.default_rng(seed)
    vals = np.round(rng.lognormal(np.log(100_000), 0.6, 20_000)).astype(np.int64)
    half = len(vals) // 2   # two runs: their histograms are summed
    lat = summarize_latency([hist_of(vals[:half]), hist_of(vals[half:])])
    assert lat is not None and lat.requests == len(vals)
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        exact = float(np.percentile(vals, p, method="inverted_cdf"))
        assert abs(lat.percentiles_ns[name] - exact) <= exact / 64, (name, exact)
    assert abs(lat.mean_ns - vals.mean()) <= vals.mean() / 64
    assert sum(lat.bucket_count) == len(vals)
    assert lat.bucket_low_ns == sorted(lat.bucket_low_ns)


def test_small_values_are_exact_and_empty_is_none():
    lat = summarize_latency([hist_of([10] * 50 + [20] * 40 + [30] * 9 + [63])])
    assert lat is not None
    assert lat.percentiles_ns == {"p50": 10.0, "p90": 20.0, "p99": 30.0, "p99.9": 63.0}
    assert lat.bucket_low_ns == [10, 20, 30, 63] and lat.bucket_count == [50, 40, 9, 1]
    assert lat.as_dict()["histogram"] == {"bucket_low_ns": [10, 20, 30, 63],
                                          "count": [50, 40, 9, 1]}
    assert summarize_latency([]) is None
    assert summarize_latency([(0,) * N]) is None


def test_table_and_json_show_the_row_latency():
    from blkjobs.diskbench import report
    from blkjobs.diskbench.matrix import Case
    from blkjobs.diskbench.runner import Row, Settings
    from blkjobs.diskbench.stats import Sample
    c = Case("randread", 4096, 1, True)
    runs = [Sample(4096 * 100, 100, 0.5, 0.0, 0,
                   hist_of([20_000] * 50 + [63_000] * 40 + [500_000] * 10)),
            Sample(4096 * 100, 100, 0.5, 0.0, 0,
                   hist_of([20_000] * 50 + [63_000] * 40 + [5_000_000] * 10))]
    rows = [Row(c, "blkjobs", "direct", "bypassed", runs)]
    text = report.table(Settings(dir="/x", cases=[]), rows, [])
    # reported at low + width/2 of their buckets, as fio reports its
    # percentiles: 20 us lies in [19968, 20224), 63 us in [62976, 63488),
    # 5 ms in [4980736, 5046272)
    assert text.splitlines()[1].split()[-4:] == ["20.1", "63.2", "5,014", "5,014"]
    doc = report.to_json(Settings(dir="/x", cases=[]), rows, [])
    lat = doc["results"][0]["latency"]
    assert lat["requests"] == 200
    assert lat["percentiles_ns"] == {"p50": 20_096.0, "p90": 63_232.0, "p99": 5_013_504.0,
                                     "p99.9": 5_013_504.0}
    assert lat["histogram"]["bucket_low_ns"] == [19_968, 62_976, 499_712, 4_980_736]
    assert lat["histogram"]["count"] == [100, 80, 10, 10]
