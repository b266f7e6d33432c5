"""Threads of the NBD server: started without waiting for them, and kept
for the next connection once their work is done.

``threading.Thread.start`` waits until the new thread holds the GIL and
has begun, which on a loaded host is a scheduling delay -- milliseconds --
on the path of a client's next connection (the accept loop). And a thread's start
and end cost about 80 us of CPU (clone, Python's thread state, exit, join)
where handing work to a thread that waits for it costs about 8: a short
session (nbdinfo, a small nbdcopy) started two and ended two -- its
connection's and its reaper's, which is now one thread for the process
(``fastpath._reap``) -- (benchmarks/README.md, "Issue 14: the export's
sessions ... (`nbdsess`)").
"""
from __future__ import annotations

import _thread
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: idle threads kept for the next connection's work at most
KEEP = 8


class _Idle:
    """An idle thread of the pool: it waits on its own lock (``go``, held
    until work is handed to it in ``fn``)."""

    __slots__ = ("go", "fn")

    def __init__(self) -> None:
        self.go = _thread.allocate_lock()
        self.go.acquire()
        self.fn: Callable[[], None] | None = None


class _Pool:
    """Threads that run one function each, then wait for the next (up to
    ``KEEP`` of them idle; more end).

    Each idle thread waits on a lock of its own, and work goes to the one
    back last: a hand-off wakes that thread only. (With one queue they all
    waited on, a ``put`` woke one, which woke the next to look at the
    empty queue: two more wake-ups and a turn of the GIL per hand-off, two
    hand-offs per NBD session -- its connection and its reaper, which is
    one thread for the process now.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: notified when a thread is back, idle (for the tests)
        self.back = threading.Condition(self._lock)
        self._waiting: list[_Idle] = []

    def idle(self) -> int:
        """Threads waiting for work (the lock held: :attr:`back`'s)."""
        return len(self._waiting)

    def run(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._waiting:
                w = self._waiting.pop()
                w.fn = fn
                w.go.release()
                return
        _thread.start_new_thread(self._thread, (fn,))

    def _thread(self, fn: Callable[[], None]) -> None:
        me: _Idle | None = None
        while True:
            try:
                fn()
            except BaseException:   # a bug, said by Thread._run: this thread ends
                return
            del fn              # (nothing of the last connection kept alive)
            if me is None:
                me = _Idle()
            with self._lock:
                if len(self._waiting) >= KEEP:
                    return
                self._waiting.append(me)
                self.back.notify_all()
            me.go.acquire()
            fn, me.fn = me.fn, None     # type: ignore[assignment]


_pool = _Pool()


class Thread:
    """A function run by a thread of the pool, started without waiting for
    it; ``join`` as threading's (timeout in seconds). The function must
    catch what it raises (the thread goes on to the next connection)."""

    def __init__(self, target: Callable[[], object]):
        self._target: Callable[[], object] | None = target
        #: held from start to the function's end (an Event is a Condition
        #: and two locks: made per connection, it cost more than this)
        self._running = _thread.allocate_lock()
        self._started = False

    def start(self) -> None:
        self._started = True
        self._running.acquire()
        _pool.run(self._run)

    def _run(self) -> None:
        try:
            if self._target is not None:
                self._target()
        except BaseException:
            # said before join returns (the caller's log, not a later one's)
            log.exception("NBD server thread failed")
            raise
        finally:
            self._target = None     # (the connection it ran: no cycle through it)
            self._running.release()

    def join(self, timeout: float | None = None) -> None:
        if self._started and self._running.acquire(timeout=-1 if timeout is None else timeout):
            self._running.release()

    def is_alive(self) -> bool:
        return self._started and self._running.locked()
