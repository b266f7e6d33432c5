"""How far two contenders' latency percentiles agree, and how sure that is
(``benchmarks/fio_compare.py --agreement``: ``blkjobs bench --compare fio``
against fio, and fio against itself as the noise floor).

A p99.9 of one 16,384-request run is its 17th slowest request; on a shared
host the slow requests come in bursts (a neighbour's I/O, the CPU taken
away), so one run's tail is a handful of events and the ratio of two runs'
p99.9 moves by tens of percent between rounds, for two runs of the same
tool as much as for two tools. So the comparison pools: every round's
histograms of a contender are summed (the percentiles of all its requests),
the ratio A/B is taken of the pooled percentiles, and its confidence
interval comes from a paired bootstrap over the rounds -- rounds drawn with
replacement, A's and B's runs of a drawn round kept together, so the drift
both saw cancels and the bursts stay whole inside their round. The
percentile rule is :mod:`.latency`'s (fio's): the bucket where the
cumulative count first reaches p% of the requests, at its midpoint.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .latency import PERCENTILES, bucket_bounds, pname

#: rounds below which no verdict is given
MIN_ROUNDS = 5

#: a histogram per run (latency.py's buckets), the runs of one round
Round = Sequence[Sequence[int]]


@dataclass(frozen=True)
class RatioCI:
    """A/B of one percentile over all rounds pooled, with its bootstrap
    confidence interval [low, high] at ``level``."""
    ratio: float
    low: float
    high: float
    rounds: int
    requests_a: int
    requests_b: int

    @property
    def width(self) -> float:
        """high / low: how many times wider the top of the interval is than
        its bottom (a width on the ratio's own, multiplicative, scale)."""
        return self.high / self.low if self.low > 0 else float("inf")

    def verdict(self, tolerance: float = 0.10) -> str:
        """'agree': the whole interval is within ``tolerance`` of 1;
        'differ': none of it is; 'open': more rounds are needed to say
        (always, below :data:`MIN_ROUNDS`: a bootstrap over two or three
        rounds has only a handful of distinct resamples, its interval is
        far too narrow)."""
        if self.rounds < MIN_ROUNDS:
            return "open"
        lo, hi = 1 - tolerance, 1 + tolerance
        if lo <= self.low and self.high <= hi:
            return "agree"
        if self.high < lo or self.low > hi:
            return "differ"
        return "open"


def _round_sums(rounds: Sequence[Round]) -> np.ndarray:
    """One summed histogram per round: shape (rounds, buckets)."""
    n = len(bucket_bounds()) - 1
    out = np.zeros((len(rounds), n), dtype=np.float64)
    for i, runs in enumerate(rounds):
        for h in runs:
            if len(h) != n:
                raise UsageError(f"a histogram has {len(h)} buckets, not {n}")
            out[i] += np.asarray(h, dtype=np.float64)
    return out


def _percentiles(pooled: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """Percentiles (ns) of each row of ``pooled`` (shape (k, buckets)):
    shape (k, len(percentiles)); NaN for an empty row."""
    bounds = bucket_bounds()
    lo, hi = bounds[:-1], bounds[1:]
    mid = lo + np.floor((hi - lo) / 2)
    cum = np.cumsum(pooled, axis=1)
    total = cum[:, -1]
    out = np.full((pooled.shape[0], len(percentiles)), np.nan)
    for j, p in enumerate(percentiles):
        rank = np.maximum(1.0, np.ceil(p / 100.0 * total))
        idx = (cum < rank[:, None]).sum(axis=1)
        ok = total > 0
        out[ok, j] = mid[np.minimum(idx[ok], len(mid) - 1)]
    return out


def pooled_percentiles(rounds: Sequence[Round],
                       percentiles: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """The percentiles (ns) of every request of every round."""
    pooled = _round_sums(rounds).sum(axis=0, keepdims=True)
    vals = _percentiles(pooled, percentiles)[0]
    return {pname(p): float(v) for p, v in zip(percentiles, vals, strict=True)}


def percentile_ratios(a: Sequence[Round], b: Sequence[Round], *,
                      percentiles: Sequence[float] = PERCENTILES, level: float = 0.95,
                      resamples: int = 2000, seed: int = 1) -> dict[str, RatioCI]:
    """A/B of each percentile of the pooled rounds, with a paired bootstrap
    interval: ``a[i]`` and ``b[i]`` are the runs of round i (the same
    number of rounds on both sides). Deterministic for a given ``seed``."""
    if len(a) != len(b) or not a:
        raise UsageError("need the same number (> 0) of rounds on both sides")
    ha, hb = _round_sums(a), _round_sums(b)
    if not (ha.sum(axis=1) > 0).all() or not (hb.sum(axis=1) > 0).all():
        raise UsageError("a round without requests")
    k = len(a)
    rng = np.random.default_rng(seed)
    # weights[r, i]: how often round i is drawn in resample r
    weights = rng.multinomial(k, [1.0 / k] * k, size=resamples).astype(np.float64)
    whole = np.ones((1, k))
    pa = _percentiles(np.vstack([whole @ ha, weights @ ha]), percentiles)
    pb = _percentiles(np.vstack([whole @ hb, weights @ hb]), percentiles)
    ratios = pa / pb
    tail = (1 - level) / 2 * 100
    out = {}
    for j, p in enumerate(percentiles):
        lo, hi = np.percentile(ratios[1:, j], [tail, 100 - tail])
        out[pname(p)] = RatioCI(float(ratios[0, j]), float(lo), float(hi), k,
                                int(ha.sum()), int(hb.sum()))
    return out


#: the percentiles judged against the noise floor as well as the band
TAILS = ("p99", "p99.9")


def cell_verdict(name: str, ci: RatioCI, floor: RatioCI | None,
                 tolerance: float = 0.10) -> str:
    """The verdict on one cell (a percentile of a case), blkjobs/fio's
    interval ``ci`` beside fio-against-itself's ``floor``:

    - 'differ': the whole interval lies outside [1 - tolerance, 1 + tolerance]
      (a tail too, however narrow: the noise floor does not excuse that);
    - 'agree': the whole interval lies within it;
    - 'agree (noise)': a tail (p99, p99.9) whose interval is no wider than
      fio's own against itself (:attr:`RatioCI.width`): fio cannot tell
      itself apart more closely, so the comparison says nothing more;
    - 'open': otherwise (and always below :data:`MIN_ROUNDS` rounds).
    """
    v = ci.verdict(tolerance)
    if v != "open" or ci.rounds < MIN_ROUNDS:
        return v
    if name in TAILS and floor is not None and floor.rounds >= MIN_ROUNDS \
            and ci.width <= floor.width:
        return "agree (noise)"
    return "open"
