"""Job events, the clock that stamps them, and listeners that collect them.

An :class:`Event` is a QMP event: a name, a ``data`` dict whose key order is
the member order of docs/job-model.md §11, and a wall-clock timestamp ``{seconds,
microseconds}``. The :class:`EventBus` is the one place events come from: the
manager calls :meth:`EventBus.emit` with its lock held, so events reach every
listener in the order the state changes happened.

Listeners are either plain callables (called synchronously, under the manager
lock: they must be quick and must not call back into the manager, e.g. the
:class:`JsonLinesWriter`), or :class:`EventListener` objects that keep what
they receive and let another thread wait for it, with a timeout.

Time comes from a :class:`Clock`. :class:`SystemClock` is the real one;
:class:`FakeClock` is virtual time for tests: ``job.sleep()`` waits until a
test calls :meth:`FakeClock.advance`, or jumps ahead at once with
``auto_advance=True``.
"""
from __future__ import annotations

import abc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

_log = logging.getLogger(__name__)

JOB_STATUS_CHANGE = "JOB_STATUS_CHANGE"
BLOCK_JOB_READY = "BLOCK_JOB_READY"
BLOCK_JOB_PENDING = "BLOCK_JOB_PENDING"
BLOCK_JOB_COMPLETED = "BLOCK_JOB_COMPLETED"
BLOCK_JOB_CANCELLED = "BLOCK_JOB_CANCELLED"
BLOCK_JOB_ERROR = "BLOCK_JOB_ERROR"


# --------------------------------------------------------------------------
# Clocks


class Clock(abc.ABC):
    """Where jobs get time from. Subclass to replace; all methods are required."""

    @abc.abstractmethod
    def monotonic_ns(self) -> int:
        """Monotonic time in nanoseconds (job.sleep deadlines)."""

    @abc.abstractmethod
    def wall(self) -> tuple[int, int]:
        """Wall-clock time since the epoch as (seconds, microseconds) (event stamps)."""

    @abc.abstractmethod
    def wait(self, cond: threading.Condition, deadline_ns: int) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``deadline_ns``.

        May return early; callers re-check their condition and the deadline.
        """


class SystemClock(Clock):
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def wall(self) -> tuple[int, int]:
        ns = time.time_ns()
        return ns // 1_000_000_000, (ns // 1000) % 1_000_000

    def wait(self, cond: threading.Condition, deadline_ns: int) -> None:
        cond.wait(max(0, deadline_ns - time.monotonic_ns()) / 1e9)


class FakeClock(Clock):
    """Virtual time. ``advance(ns)`` moves it and wakes sleepers.

    With ``auto_advance=True`` a wait jumps straight to its deadline, so a
    rate-limited job runs at full speed while its clock says it took as long
    as the limit requires.
    """

    def __init__(self, start_ns: int = 0, epoch: float = 1_700_000_000.0,
                 auto_advance: bool = False):
        self._now = start_ns
        self._epoch_us = int(epoch * 1_000_000)
        self.auto_advance = auto_advance
        self._mutex = threading.Lock()
        self._sleepers: set[threading.Condition] = set()

    def monotonic_ns(self) -> int:
        return self._now

    def wall(self) -> tuple[int, int]:
        us = self._epoch_us + self._now // 1000
        return us // 1_000_000, us % 1_000_000

    def advance(self, ns: int) -> None:
        with self._mutex:
            self._now += ns
            sleepers = list(self._sleepers)
        for cond in sleepers:
            with cond:
                cond.notify_all()

    def wait(self, cond: threading.Condition, deadline_ns: int) -> None:
        if self.auto_advance:
            with self._mutex:
                self._now = max(self._now, deadline_ns)
            return
        with self._mutex:
            self._sleepers.add(cond)
        try:
            # The cap only bounds a lost wake-up; it never moves virtual time.
            cond.wait(0.05)
        finally:
            with self._mutex:
                self._sleepers.discard(cond)


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Event:
    """One QMP event. ``data`` keeps the spec's member order."""

    name: str
    data: dict[str, Any]
    seconds: int = 0
    microseconds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.name, "data": self.data,
                "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds}}

    def to_json(self) -> str:
        """The event as one JSON line (without the newline)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def matches(self, name: str | Iterable[str] | None = None, **data: Any) -> bool:
        """True if the name is ``name`` (or one of them) and ``data`` has these members."""
        if name is not None:
            names = (name,) if isinstance(name, str) else tuple(name)
            if self.name not in names:
                return False
        return all(self.data.get(k, _MISSING) == v for k, v in data.items())


_MISSING = object()


class EventListener:
    """Collects events (optionally only some names / a predicate) for waiting.

    Thread-safe: the bus appends under the manager lock; any thread may wait.
    Every wait takes a timeout and raises ``TimeoutError`` when it expires, so
    a missing event fails a test instead of hanging it.
    """

    def __init__(self, names: Iterable[str] | None = None,
                 predicate: Callable[[Event], bool] | None = None):
        self.names = None if names is None else frozenset(names)
        self.predicate = predicate
        self.events: list[Event] = []       # everything received, in order
        self._cursor = 0                    # next event get()/wait_for() looks at
        self._cond = threading.Condition()

    def accepts(self, ev: Event) -> bool:
        if self.names is not None and ev.name not in self.names:
            return False
        return self.predicate is None or self.predicate(ev)

    def __call__(self, ev: Event) -> None:
        if self.accepts(ev):
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def get(self, timeout: float = 5.0) -> Event:
        """The next event not yet consumed."""
        return self.wait_for(timeout=timeout)

    def wait_for(self, name: str | Iterable[str] | None = None, timeout: float = 5.0,
                 **data: Any) -> Event:
        """Consume events until one matches (see :meth:`Event.matches`); return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self.events):
                    ev = self.events[self._cursor]
                    self._cursor += 1
                    if ev.matches(name, **data):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event {name or ''} {data or ''} within {timeout}s")
                self._cond.wait(left)

    def clear(self) -> list[Event]:
        """Forget everything received so far; return it."""
        with self._cond:
            old, self.events, self._cursor = self.events, [], 0
            return old


class JsonLinesWriter:
    """A listener that writes each event as one JSON line to ``stream``."""

    def __init__(self, stream: TextIO, flush: bool = True):
        self.stream = stream
        self.flush = flush

    def __call__(self, ev: Event) -> None:
        self.stream.write(ev.to_json() + "\n")
        if self.flush:
            self.stream.flush()


@dataclass
class EventBus:
    """Stamps events with the clock and hands them to listeners, in order.

    :meth:`emit` is called only by the manager, with its lock held; that lock
    is what orders events. Listener exceptions are kept in ``errors`` (and
    never break the job that emitted).
    """

    clock: Clock
    listeners: list[Callable[[Event], None]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def add_listener(self, listener: Callable[[Event], None]) -> Callable[[Event], None]:
        self.listeners.append(listener)
        return listener

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self.listeners.remove(listener)

    def emit(self, name: str, data: dict[str, Any]) -> Event:
        sec, usec = self.clock.wall()
        ev = Event(name, data, sec, usec)
        for listener in list(self.listeners):
            try:
                listener(ev)
            except Exception as e:  # a broken listener must not break a job
                self.errors.append(e)
                _log.warning("event listener %r failed on %s", listener, name, exc_info=e)
        return ev
