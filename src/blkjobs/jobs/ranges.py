"""Range algebra of the copy path: guest ranges as (start, length) lists,
the run classifiers jobs hand to the block copy (:func:`select_full`,
:func:`select_window`) and the batch unit of jobs writing into their own
chain (:func:`batch_unit`).

Moved here from ``jobs/base.py`` (``_merge``/``_subtract``/``_intersect``
lost their underscore: :mod:`.blockcopy` uses them).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..graph import Node

#: A run classifier: block_status run -> "copy" | "zero" | "skip".
Select = Callable[[dict], str]


def batch_unit(dst: Node) -> int:
    """The unit of the batches of a job whose target is in its source's chain
    (stream, commit): whole target clusters (at least 512 KiB), so no two
    batches share one. A batch allocating a cluster fills all of it from
    below, and a second one would take its part as already there -- lost if
    the first batch fails and gives the cluster back."""
    return max(512 << 10, dst.driver.cluster_size)


def select_full(run: dict) -> str:
    """Everything the guest sees (backup/mirror sync=full)."""
    return "copy" if run["data"] else "zero"


def select_window(lo: int, hi: int | None) -> Select:
    """Only runs provided by layers lo <= depth < hi (hi None: to the end of
    the chain); a run past the chain's end (not present) is skipped, but not
    the zeroes past a short layer's end that hide the layers from ``hi`` on
    (``eof``): they are the guest view, which those layers must not show."""
    def select(run: dict) -> str:
        d = run["depth"]
        if d < lo or (hi is not None and d >= hi) or \
                not (run["present"] or (hi is not None and run.get("eof"))):
            return "skip"
        return "copy" if run["data"] else "zero"
    return select


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= s:
            out[-1][1] = max(out[-1][1], s + n - out[-1][0])
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]


def subtract(whole: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the (sorted, disjoint) ``whole`` ranges not covered by ``holes``."""
    out = []
    holes = merge(holes)
    for s, n in whole:
        pos, end = s, s + n
        for hs, hn in holes:
            he = hs + hn
            if he <= pos or hs >= end:
                continue
            if hs > pos:
                out.append((pos, hs - pos))
            pos = max(pos, he)
        if pos < end:
            out.append((pos, end - pos))
    return out


def intersect(a: list[tuple[int, int, Any]], b: list[tuple[int, int, int]]):
    """Pieces of guest runs ``a`` (start, len, payload) inside the guest runs
    ``b`` (start, len, host): yields (start, len, payload, delta_a, host+delta_b)."""
    j = 0
    for s, n, p in a:
        pos, end = s, s + n
        while pos < end:
            while j < len(b) and b[j][0] + b[j][1] <= pos:
                j += 1
            if j >= len(b) or b[j][0] >= end:
                # not in an allocated run: should not happen (allocation covers it)
                raise AssertionError(f"range {pos}+{end - pos} was not allocated")
            bs, bn, bh = b[j]
            if bs > pos:
                raise AssertionError(f"range {pos}+{bs - pos} was not allocated")
            k = min(end, bs + bn)
            yield pos, k - pos, p, pos - s, bh + (pos - bs)
            pos = k
