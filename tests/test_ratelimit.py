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
    assert b.tokens() == pytest.approx(2000)   # 2 s of rate


def test_no_burst_by_default():
    clk = Clock()
    b = TokenBucket(1_000_000, clock=clk)
    assert b.tokens() == 0.0                   # starts empty
    assert b.take(1000) == S // 1000           # even the first request is earned
    clk.t = 100 * S
    assert b.tokens() == 0.0                   # and idling saves nothing up


def issue_times(b, clk, takers, sizes, busy, idle_every, n):
    """Greedy takers on the virtual clock: the first free one takes the next
    size, waits as told, issues, is busy ``busy(i)`` ns; every ``idle_every``
    requests all idle 2 s. Returns [(issue time, bytes)] in issue order."""
    free = [clk.t] * takers
    out = []
    for i in range(n):
        k = min(range(takers), key=free.__getitem__)
        clk.t = free[k]
        size = sizes(i)
        at = clk.t + b.take(size)
        out.append((at, size))
        free[k] = at + busy(i)
        if (i + 1) % idle_every == 0:
            free = [at + 2 * S] * takers
    return out


def worst_window(issued):
    worst = total = j = 0
    for t, n in issued:                          # windows [t, t + 1 s)
        while j < len(issued) and issued[j][0] < t + S:
            total += issued[j][1]
            j += 1
        worst = max(worst, total)
        total -= n
    return worst


@pytest.mark.parametrize("rate", [200 << 20, 10_000_000, 1 << 30])
def test_every_window_within_one_percent(rate):
    """`convert -r 200M`'s bucket (the default one): no 1 s window, the
    first one and those after idle spells included, exceeds the rate by more
    than 1%, with 4 workers of uneven request sizes and I/O times."""
    clk = Clock()
    b = TokenBucket(rate, clock=clk)
    req = b.max_request
    assert req <= rate // 100
    issued = issue_times(b, clk, 4, lambda i: req - (i * 7919) % (req // 2),
                         lambda i: (i * 104729) % (S // 50), 997, 4000)
    assert [t for t, _ in issued] == sorted(t for t, _ in issued)
    first = sum(n for t, n in issued if t < S)
    assert first <= rate * 1.01                # the first second
    worst = worst_window(issued)
    assert worst <= rate * 1.01
    assert worst >= rate * 0.98                # and the rate is really used


def test_burst_is_what_it_says():
    clk = Clock()
    b = TokenBucket(1_000_000, burst=2.0, clock=clk)
    issued = issue_times(b, clk, 1, lambda i: b.max_request, lambda i: 0, 10**9, 1000)
    first = sum(n for t, n in issued if t < S)
    assert 2_990_000 <= first <= 3_000_000     # 2 s saved up + 1 s of rate


def test_change_rate_live():
    clk = Clock()
    b = TokenBucket(1_000_000, burst=0.0, clock=clk)
    assert b.take(1_000_000) == S              # 1 s at 1 MB/s
    b.rate = 2_000_000                          # debt is now repaid twice as fast
    assert b.take(0) == S // 2
    b.rate = 0                                  # unlimited forgives the debt
    assert b.take(10**12) == 0
    assert b.max_request is None


def test_max_request_keeps_within_one_percent():
    clk = Clock()
    rate = 10_000_000
    b = TokenBucket(rate, burst=1.0, clock=clk)   # a deliberate burst
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
    for t, n in issued:
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
