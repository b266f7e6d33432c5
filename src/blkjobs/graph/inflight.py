"""Ranges in flight on a node, for the I/O layer (:mod:`.io`).

:class:`InFlight`: guest ranges a job is copying, guest writes being done,
clusters allocated and not yet filled (sorted, for many ranges).
:class:`Reads`: guest reads being done outside the I/O lock (few at once).
Moved out of ``io.py`` (which re-exports :class:`InFlight`).
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Callable


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
    (:meth:`~.io.BlockIO.guest_read`). :meth:`add` and the waits need the
    I/O lock (``cond``) held (the waits release it); :meth:`remove` does
    not: a read ending takes the lock again only when someone waits for
    reads (``waiters``), which saves every read a second trip through the
    contended lock.

    Why a waiter cannot miss a read's end: it counts itself in ``waiters``
    (lock held) *before* it looks at the reads in flight; a read's end
    drops its ticket and *then* looks at ``waiters``. If the waiter saw the
    ticket, the drop came after its look, so the read sees the count and
    notifies, which needs the lock the waiter holds until it waits. (Each
    step is one operation under the GIL; the views of ``_live`` are copied
    first, as a read may drop its ticket meanwhile.)

    Few reads are in flight at once (one per server worker), so they are a
    plain dict. Each has a ticket, a serial number: :meth:`drain` waits for
    the reads in flight when it was called, not for later ones, so readers
    that keep coming (the four connections of ``nbdcopy``) cannot starve a
    pivot or a close."""

    def __init__(self, cond: threading.Condition):
        self.cond = cond
        self._next = 0
        self._live: dict[int, tuple[int, int]] = {}    # ticket -> (start, end)
        #: threads in :meth:`wait_clear` or :meth:`drain`
        self.waiters = 0

    @property
    def count(self) -> int:
        return len(self._live)

    def add(self, start: int, length: int) -> int:
        ticket = self._next
        self._next += 1
        self._live[ticket] = (start, start + length)
        return ticket

    def remove(self, ticket: int) -> None:
        """The read ended (the I/O lock need not be held)."""
        del self._live[ticket]
        if self.waiters:
            with self.cond:
                self.cond.notify_all()

    def busy(self, start: int, length: int) -> bool:
        end = start + length
        return any(s < end and e > start for s, e in list(self._live.values()))

    def wait_clear(self, start: int, length: int, also: Callable[[], bool] = lambda: False) -> None:
        """Wait until no read in flight overlaps [start, start+length) and
        ``also()`` is false (another condition on the same lock)."""
        self.waiters += 1
        try:
            while self.busy(start, length) or also():
                self.cond.wait(1.0)
        finally:
            self.waiters -= 1

    def drain(self) -> None:
        """Wait until every read in flight now is done."""
        last = self._next
        self.waiters += 1
        try:
            while any(t < last for t in list(self._live)):
                self.cond.wait(1.0)
        finally:
            self.waiters -= 1
