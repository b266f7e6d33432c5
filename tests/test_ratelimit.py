"""Token bucket on a virtual clock: exact figures, no wall-clock waits."""
from __future__ import annotations

import pytest

from blkjobs.errors import UsageError
from blkjobs.native.ratelimit import TokenBucket

S = 1_000_000_000


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


def test_burst_then_exact_waits():
    clk = Clock()
    b = TokenBucket(1_000_000, burst=1.0, clock=clk)
    assert b.take(1_000_000) == 0              # the initial burst
    assert b.take(250_000) == S // 4           # 0.25 s of debt
    clk.t = S // 4
    assert b.tokens() == pytest.approx(0.0, abs=1e-6)
    clk.t = S // 2
    assert b.tokens() == pytest.approx(250_000, abs=1e-3)


def test_refill_caps_at_burst():
    clk = Clock()
    b = TokenBucket(1000, burst=2.0, clock=clk)
    b.take(2000)
    clk.t = 100 * S
    assert b.tokens() == pytest.approx(4096)   # minimum capacity is one 4 KiB request


def test_change_rate_live():
    clk = Clock()
    b = TokenBucket(1_000_000, burst=0.0, clock=clk)
    b.take(4096)
    assert b.take(1_000_000) == S              # 1 s at 1 MB/s
    b.rate = 2_000_000                          # debt is now repaid twice as fast
    assert b.take(0) == S // 2
    b.rate = 0                                  # unlimited forgives the debt
    assert b.take(10**12) == 0
    assert b.max_request is None


def test_max_request_keeps_within_one_percent():
    clk = Clock()
    rate = 10_000_000
    b = TokenBucket(rate, burst=1.0, clock=clk)
    req = b.max_request
    assert req <= rate // 100
    # A greedy consumer on a virtual clock: issue max_request bytes, waiting
    # exactly as told. Record (time, bytes) of each issued request.
    issued = []
    for _ in range(5000):
        w = b.take(req)
        clk.t += w
        issued.append((clk.t, req))
    # After the initial burst (first second), no 1 s window carries more
    # than 1% over the rate.
    start = issued[0][0] + S
    times = [t for t, _ in issued]
    j = 0
    total = 0
    worst = 0
    for i, (t, n) in enumerate(issued):
        total += n
        while times[j] <= t - S:
            total -= issued[j][1]
            j += 1
        if t - S >= start:
            worst = max(worst, total)
    assert worst <= rate * 1.01
    assert worst >= rate * 0.98                 # and it is really used


def test_bad_values():
    with pytest.raises(UsageError, match="invalid rate -1: must be a non-negative integer"):
        TokenBucket(-1)
    b = TokenBucket(1)
    with pytest.raises(UsageError):
        b.rate = -5
