"""Ranges in flight on a node, for the I/O layer (:mod:`.io`).

:class:`InFlight`: guest ranges a job is copying, guest writes being done,
clusters allocated and not yet filled (sorted, for many ranges).
:class:`Reads`: guest reads being done outside the I/O lock (few at once).
Moved out of ``io.py`` (which re-exports :class:`InFlight`).
"""
from __future__ import annotations

import bisect
import threading


class InFlight:
    """Guest ranges a job is copying right now. All methods need the I/O
    lock (``cond``) held; :meth:`wait_clear` releases it while waiting.

    Every guest write asks :meth:`busy`, and a mirror batch may hold a
    thousand scattered granules, so the ranges are kept sorted (bisect):
    add/remove cost O(log n) plus a memmove, ``busy`` looks only at the
    ranges that can reach the request (starts within the longest length)."""

    def __init__(self, cond: threading.Condition):
        self.cond = cond
        self._sorted: list[tuple[int, int]] = []   # (start, end), duplicates allowed
        self._longest = 0
        self.total = 0                              # bytes in flight

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(self._sorted)

    @property
    def count(self) -> int:
        """Ranges in flight (zero-length ones too)."""
        return len(self._sorted)

    def add(self, start: int, length: int) -> tuple[int, int]:
        r = (start, start + length)
        bisect.insort(self._sorted, r)
        self._longest = max(self._longest, length)
        self.total += length
        return r

    def remove(self, r: tuple[int, int]) -> None:
        i = bisect.bisect_left(self._sorted, r)
        if i == len(self._sorted) or self._sorted[i] != r:
            raise ValueError(f"range {r} is not in flight")
        del self._sorted[i]
        self.total -= r[1] - r[0]
        if not self._sorted:
            self._longest = 0
        self.cond.notify_all()

    def busy(self, start: int, length: int) -> bool:
        end = start + length
        rs = self._sorted
        i = bisect.bisect_left(rs, (start - self._longest + 1, 0))
        j = bisect.bisect_left(rs, (end, 0))
        return any(e > start for _, e in rs[i:j])

    def wait_clear(self, start: int, length: int) -> None:
        while self.busy(start, length):
            self.cond.wait(1.0)


class Reads:
    """Guest reads of one node being done outside the I/O lock
    (:meth:`~.io.BlockIO.guest_read`). All methods need the I/O lock
    (``cond``) held; the waits release it.

    Few reads are in flight at once (one per server worker), so they are a
    plain dict. Each has a ticket, a serial number: :meth:`drain` waits for
    the reads in flight when it was called, not for later ones, so readers
    that keep coming (the four connections of ``nbdcopy``) cannot starve a
    pivot or a close."""

    def __init__(self, cond: threading.Condition):
        self.cond = cond
        self._next = 0
        self._live: dict[int, tuple[int, int]] = {}    # ticket -> (start, end)

    @property
    def count(self) -> int:
        return len(self._live)

    def add(self, start: int, length: int) -> int:
        ticket = self._next
        self._next += 1
        self._live[ticket] = (start, start + length)
        return ticket

    def remove(self, ticket: int) -> None:
        del self._live[ticket]
        self.cond.notify_all()

    def busy(self, start: int, length: int) -> bool:
        end = start + length
        return any(s < end and e > start for s, e in self._live.values())

    def drain(self) -> None:
        """Wait until every read in flight now is done."""
        last = self._next
        while any(t < last for t in self._live):
            self.cond.wait(1.0)
