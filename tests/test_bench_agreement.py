"""Pooled percentiles and their paired bootstrap interval
(blkjobs.diskbench.agreement, used by benchmarks/fio_compare.py
--agreement), on synthetic latencies."""
from __future__ import annotations

import numpy as np
import pytest

from blkjobs.diskbench.agreement import (RatioCI, cell_verdict, percentile_ratios,
                                         pooled_percentiles)
from blkjobs.errors import UsageError
from blkjobs.diskbench.latency import summarize_latency
from test_bench_latency import N, hist_of


def disk(rng, n, scale=1.0, tail=0.002, tail_ns=5_000_000):
    """n latencies around 100 us with a share ``tail`` of multi-ms stalls."""
    v = rng.lognormal(np.log(100_000 * scale), 0.3, n)
    stall = rng.random(n) < tail
    v[stall] = rng.exponential(tail_ns * scale, stall.sum()) + 1_000_000 * scale
    return np.round(v).astype(np.int64)


def rounds_of(rng, k, runs=2, n=8192, **kw):
    return [[hist_of(disk(rng, n, **kw)) for _ in range(runs)] for _ in range(k)]


def test_pooled_is_the_summary_of_every_request():
    rng = np.random.default_rng(7)
    rounds = rounds_of(rng, 3)
    every = [h for r in rounds for h in r]
    lat = summarize_latency(every)
    assert lat is not None
    assert pooled_percentiles(rounds) == lat.percentiles_ns


def test_same_runs_on_both_sides_agree_exactly():
    rng = np.random.default_rng(1)
    rounds = rounds_of(rng, 5)
    res = percentile_ratios(rounds, rounds)
    assert set(res) == {"p50", "p90", "p99", "p99.9"}
    for ci in res.values():
        assert (ci.ratio, ci.low, ci.high) == (1.0, 1.0, 1.0)
        assert ci.rounds == 5 and ci.requests_a == ci.requests_b == 5 * 2 * 8192
        assert ci.verdict() == "agree"


def test_a_slower_tool_is_found_slower_at_every_percentile():
    # the same draws 25% slower: every ratio is 1.25 to a bucket's width
    # (1/64 each side), and the interval says 'differ'
    rng = np.random.default_rng(2)
    vals = [[disk(rng, 8192) for _ in range(2)] for _ in range(6)]
    a = [[hist_of(np.round(v * 1.25)) for v in r] for r in vals]
    b = [[hist_of(v) for v in r] for r in vals]
    for name, ci in percentile_ratios(a, b).items():
        assert 1.25 / (1 + 1 / 32) <= ci.ratio <= 1.25 * (1 + 1 / 32), name
        assert ci.low > 1.1 and ci.verdict() == "differ", name


def test_two_samples_of_one_distribution_the_interval_holds_the_truth():
    # independent draws of the same disk on both sides: the pooled ratio's
    # interval contains 1 at every percentile, and it is narrow at p50
    rng = np.random.default_rng(3)
    res = percentile_ratios(rounds_of(rng, 8), rounds_of(rng, 8))
    for name, ci in res.items():
        assert ci.low <= 1.0 <= ci.high, (name, ci)
    assert res["p50"].high - res["p50"].low < 0.03
    assert res["p50"].verdict() == "agree"


def test_a_burst_in_one_round_widens_the_tail_interval():
    # one round of B has a stall burst 10x longer: pooled, p99.9 moves, and
    # the interval over rounds spans the rounds with and without the burst
    # ('open': more rounds needed), while p50 still agrees
    rng = np.random.default_rng(4)
    a = rounds_of(rng, 6)
    b = rounds_of(rng, 5) + rounds_of(rng, 1, tail=0.01, tail_ns=50_000_000)
    res = percentile_ratios(a, b)
    assert res["p50"].verdict() == "agree"
    tail = res["p99.9"]
    assert tail.low < tail.ratio < tail.high and tail.high - tail.low > 0.2
    assert tail.verdict() != "agree"


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    a, b = rounds_of(rng, 4), rounds_of(rng, 4)
    assert percentile_ratios(a, b, seed=3) == percentile_ratios(a, b, seed=3)


def test_verdicts():
    assert RatioCI(1.0, 0.95, 1.08, 5, 1, 1).verdict() == "agree"
    assert RatioCI(1.2, 1.12, 1.3, 5, 1, 1).verdict() == "differ"
    assert RatioCI(0.8, 0.7, 0.89, 5, 1, 1).verdict() == "differ"
    assert RatioCI(1.05, 0.98, 1.14, 5, 1, 1).verdict() == "open"
    assert RatioCI(1.05, 0.98, 1.14, 5, 1, 1).verdict(tolerance=0.15) == "agree"
    # too few rounds for a bootstrap: no verdict, however narrow
    assert RatioCI(1.3, 1.29, 1.31, 4, 1, 1).verdict() == "open"
    assert RatioCI(1.0, 1.0, 1.0, 4, 1, 1).verdict() == "open"


def test_bad_input():
    rng = np.random.default_rng(6)
    a = rounds_of(rng, 2, n=100)
    with pytest.raises(UsageError, match="same number"):
        percentile_ratios(a, a[:1])
    with pytest.raises(UsageError, match="same number"):
        percentile_ratios([], [])
    with pytest.raises(UsageError, match="buckets"):
        percentile_ratios([[(1, 2, 3)]], [[(1, 2, 3)]])
    with pytest.raises(UsageError, match="without requests"):
        percentile_ratios([[(0,) * N]], a[:1])


def test_cell_verdicts():
    floor = RatioCI(1.0, 0.80, 1.25, 10, 1, 1)      # fio against itself, width 1.5625
    # within the band: agree, tail or not, whatever the floor
    assert cell_verdict("p50", RatioCI(1.0, 0.95, 1.08, 10, 1, 1), floor) == "agree"
    assert cell_verdict("p99.9", RatioCI(1.0, 0.95, 1.08, 10, 1, 1), None) == "agree"
    # straddling the band: open at p50/p90 even when narrower than fio's own
    assert cell_verdict("p50", RatioCI(1.05, 0.98, 1.14, 10, 1, 1), floor) == "open"
    assert cell_verdict("p90", RatioCI(1.05, 0.98, 1.14, 10, 1, 1), floor) == "open"
    # a tail no wider than fio's own interval agrees as noise ...
    assert cell_verdict("p99", RatioCI(1.05, 0.85, 1.30, 10, 1, 1), floor) == "agree (noise)"
    assert cell_verdict("p99.9", RatioCI(1.0, 0.80, 1.25, 10, 1, 1), floor) == "agree (noise)"
    # ... not one wider than it, nor one without a floor
    assert cell_verdict("p99", RatioCI(1.05, 0.75, 1.30, 10, 1, 1), floor) == "open"
    assert cell_verdict("p99", RatioCI(1.05, 0.85, 1.30, 10, 1, 1), None) == "open"
    # a tail wholly outside the band differs, however narrow
    assert cell_verdict("p99.9", RatioCI(1.3, 1.25, 1.35, 10, 1, 1), floor) == "differ"
    # too few rounds: open, floor or not
    few = RatioCI(1.0, 0.85, 1.30, 4, 1, 1)
    assert cell_verdict("p99", few, RatioCI(1.0, 0.5, 2.0, 4, 1, 1)) == "open"
    assert RatioCI(1.0, 0.8, 1.25, 10, 1, 1).width == 1.5625
