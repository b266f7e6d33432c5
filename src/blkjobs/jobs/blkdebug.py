"""Fault injection in the manner of QEMU's blkdebug.

A :class:`Blkdebug` wraps a node's driver and fails chosen requests with
``EIO`` or ``ENOSPC``: reads, writes (write, write-zeroes, discard) or
flushes, optionally only those touching an offset range, optionally only
after N matching operations, once or always::

    eng.blkdebug("tgt", [Rule("write", errno.ENOSPC, after=2, once=True)])

The job data path asks the node before it queues a batch into the C engine
(``inject_check``: the C engine reads file descriptors, which cannot fail on
demand), so an injected error reaches the job exactly where a real one
would: as a :class:`~blkjobs.errors.CopyError` of the source (read) or the
target (write), then through the job's error policy. Front-end I/O on the
node fails with ``OSError`` like a real device.

Break points, as QEMU's blkdebug ``break``/``wait_break``/``resume``/
``remove-break`` (qemu-io's ``break EVENT TAG``): a request that raises
``EVENT`` on the node is suspended *before it runs* until resumed::

    eng.blkdebug_break("tgt", "write_aio", "w")
    job = eng.backup("src", "tgt", sync="full", job_id="b0")
    req = eng.blkdebug_wait_break("w")      # the job's first write is held
    ...                                     # the job is RUNNING, copying nothing
    eng.blkdebug_resume("w")

A break point fires once (the rule is consumed, as in QEMU); set it again
before resuming to stop at the next request too. The events are QEMU's
names where one of our requests maps to them (:data:`EVENTS`):

* ``read_aio``: a read of the node (a job reading a run the node holds, a
  front-end read);
* ``pwritev``: any write, write-zeroes or compressed write; then
  ``write_aio`` (data), ``pwritev_zero`` (zeroes) or ``write_compressed``;
* ``cluster_alloc``: a job's write to a qcow2 target that allocates clusters
  (raised first, before ``pwritev``);
* ``flush_to_os`` then ``flush_to_disk``: a flush.

A job's copy raises its events per planned request (a run of the source
read from one layer; a target write per plan chunk) before anything of that
request is allocated or queued into the C engine, and it waits for the
resume without the engine's I/O lock: the job stays RUNNING, guest I/O and
job verbs go on, and only the copy is held, at that exact request (what was
planned before it in the same batch is queued and lands). A Python-side
request (front end, copy-before-write's Python parts) waits releasing the
I/O lock too, like a suspended coroutine in QEMU. Closing the engine
resumes everything still suspended.
"""
from __future__ import annotations

import errno as _errno
import os
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..formats.qcow2.debug import EVENTS as QCOW2_EVENTS

#: QEMU's blkdebug events (``BlkdebugEvent``) our requests raise (break
#: points can be set on these).
EVENTS = ("read_aio", "pwritev", "write_aio", "pwritev_zero", "write_compressed",
          "cluster_alloc", "flush_to_os", "flush_to_disk")
#: the events an inject-error or set-state rule may name: those, the ones
#: the qcow2 driver raises in its metadata updates (formats.qcow2.debug), and
#: ``none``, which QEMU's blkdebug raises once, when it is opened (its rules
#: are active from the start)
#: (with READ_EVENTS, those of a qcow2 image's reads on a blkdebug layer
#: between it and its file, ``blkdebug:CONF:IMG``, besides ``read_aio`` for
#: its own data: ``read_backing_aio`` for a range it leaves to its backing
#: file, whose read does not pass the layer, ``read_compressed`` for a
#: compressed cluster)
READ_EVENTS = ("read_backing_aio", "read_compressed")
RULE_EVENTS = EVENTS + QCOW2_EVENTS + ("none",) + READ_EVENTS
#: QEMU's other event names: accepted nowhere (they would never fire here).
QEMU_ONLY = tuple(e for e in (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_backing_aio", "read_compressed", "vmstate_load", "vmstate_save", "cow_read",
    "cow_write", "reftable_load", "reftable_grow", "reftable_update", "refblock_load",
    "refblock_update", "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc_bytes", "cluster_free", "pwritev_rmw_head",
    "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none", "write_aio_before") if e not in RULE_EVENTS)


def rule_event(ev: str) -> str:
    """``ev`` as a rule's event; UsageError with QEMU's text for a name
    QEMU does not know, ours for one blkjobs never raises."""
    if ev in RULE_EVENTS:
        return ev
    if ev in QEMU_ONLY:
        raise UsageError(f"blkdebug event '{ev}' is not raised by blkjobs "
                         f"(supported: {', '.join(RULE_EVENTS)})")
    raise UsageError(f"invalid parameter value: {ev}")


_tls = threading.local()


@contextmanager
def quiet_breaks():
    """On this thread, the Python-side I/O of wrapped drivers raises no break
    events (a job's planning raised them already, for the whole request)."""
    old = getattr(_tls, "quiet", False)
    _tls.quiet = True
    try:
        yield
    finally:
        _tls.quiet = old


@dataclass
class Suspended:
    """A request held at a break point: which, on which node, where."""

    tag: str
    event: str
    node: str
    offset: int
    length: int
    resumed: bool = False


class Breaks:
    """The break points of one engine and the requests they hold. ``cond``:
    the engine's I/O lock (a suspended request waits on it, releasing it)."""

    def __init__(self, cond: threading.Condition):
        self.cond = cond
        self.rules: list[tuple[Any, str, str]] = []     # (Blkdebug, event, tag)
        self.suspended: list[Suspended] = []
        self.closed = False
        #: waiters (:meth:`wait`) give up: the owner shuts down
        self.interrupted = False

    def add(self, drv: Blkdebug, event: str, tag: str) -> None:
        if event not in EVENTS:
            if event in QEMU_ONLY or event in RULE_EVENTS:
                raise UsageError(f"blkdebug: event '{event}' is not raised by blkjobs "
                                 f"(supported: {', '.join(EVENTS)})")
            raise UsageError(f"blkdebug: unknown event '{event}'")
        if not tag:
            raise UsageError("blkdebug: a break point needs a tag")
        with self.cond:
            self.rules.append((drv, event, tag))

    def take(self, drv: Blkdebug, events: Iterable[str], offset: int,
             length: int) -> Suspended | None:
        """The first break point of ``drv`` on one of ``events`` (in order),
        consumed, as a :class:`Suspended` not yet registered; None: none."""
        if not self.rules or self.closed:
            return None
        with self.cond:
            for ev in events:
                for i, (d, e, tag) in enumerate(self.rules):
                    if d is drv and e == ev:
                        del self.rules[i]
                        return Suspended(tag, ev, drv.node_name, offset, length)
        return None

    def suspend(self, s: Suspended) -> None:
        """Hold the calling thread until ``s`` is resumed (the engine's I/O
        lock is released meanwhile, even when the caller holds it)."""
        with self.cond:
            if self.closed:
                return
            self.suspended.append(s)
            self.cond.notify_all()
            while not s.resumed:
                self.cond.wait()

    def wait(self, tag: str, timeout: float) -> Suspended:
        with self.cond:
            found: list[Suspended] = []

            def held() -> bool:
                found[:] = [s for s in self.suspended if s.tag == tag]
                return bool(found) or self.interrupted or self.closed
            if not self.cond.wait_for(held, timeout):
                raise TimeoutError(f"blkdebug: no request was suspended at break point "
                                   f"'{tag}' within {timeout:g} s")
            if not found:
                raise UsageError(f"blkdebug: stopped waiting for break point '{tag}': "
                                 "the engine is closing")
            return found[0]

    def interrupt(self) -> None:
        """Make every :meth:`wait` give up now, resuming nothing (a daemon
        shutting down: its only command worker may be waiting here)."""
        with self.cond:
            self.interrupted = True
            self.cond.notify_all()

    def is_suspended(self, tag: str) -> bool:
        with self.cond:
            return any(s.tag == tag for s in self.suspended)

    def _wake(self, s: Suspended) -> None:
        self.suspended.remove(s)
        s.resumed = True
        self.cond.notify_all()

    def resume(self, tag: str) -> Suspended:
        with self.cond:
            for s in self.suspended:
                if s.tag == tag:
                    self._wake(s)
                    return s
        raise UsageError(f"blkdebug: no request is suspended at break point '{tag}'")

    def remove(self, tag: str) -> None:
        """Drop the break points ``tag`` and resume what they hold."""
        with self.cond:
            n = len(self.rules)
            self.rules = [r for r in self.rules if r[2] != tag]
            held = [s for s in self.suspended if s.tag == tag]
            for s in held:
                self._wake(s)
            if n == len(self.rules) and not held:
                raise UsageError(f"blkdebug: no break point '{tag}'")

    def close(self) -> None:
        """Resume everything and fire no more (the engine closes)."""
        with self.cond:
            self.closed = True
            self.rules = []
            for s in list(self.suspended):
                self._wake(s)


@dataclass
class Rule:
    """Fail ``op`` ("read" | "write" | "flush") with ``errno``.

    ``offset``/``length``: only requests overlapping that range (None: any).
    ``after``: let this many matching requests pass first. ``once``: fire a
    single time, then stay quiet.
    """

    op: str
    errno: int = _errno.EIO
    offset: int | None = None
    length: int | None = None
    after: int = 0
    once: bool = False
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.op not in ("read", "write", "flush"):
            raise ValueError(f"blkdebug: unknown operation {self.op!r}")
        if isinstance(self.errno, str):
            self.errno = getattr(_errno, self.errno.upper())

    def matches(self, op: str, offset: int, length: int) -> bool:
        if op != self.op:
            return False
        if self.offset is not None and op != "flush":
            end = self.offset + (self.length if self.length is not None else 1 << 62)
            if offset >= end or offset + max(length, 1) <= self.offset:
                return False
        return True


class Blkdebug:
    """A driver wrapper: every attribute is the inner driver's, except the
    I/O methods, which consult the rules first (``injects_faults``: the
    Driver contract's capability)."""

    injects_faults = True

    def __init__(self, inner: Any, rules: list[Rule], breaks: Breaks | None = None,
                 node_name: str = ""):
        self.inner = inner
        self.rules = list(rules)
        self._lock = threading.Lock()
        #: the engine's break points (None: no break point was ever set)
        self.breaks = breaks
        self.node_name = node_name

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name == "allocate":
            def allocate(offset, length, *a, **kw):
                self.event(("cluster_alloc",), offset, length)
                return attr(offset, length, *a, **kw)
            return allocate
        if name == "write_compressed":
            def write_compressed(offset, data, *a, **kw):
                self.event(("pwritev", "write_compressed"), offset, len(data))
                self._maybe_fail("write", offset, len(data))
                return attr(offset, data, *a, **kw)
            return write_compressed
        return attr

    # -- break points ------------------------------------------------------
    def take_break(self, events: Iterable[str], offset: int, length: int) -> Suspended | None:
        """The break point ``events`` of a request hit, consumed (see
        :meth:`Breaks.take`); the caller suspends it once it let go of what it
        must not hold while waiting."""
        b = self.breaks
        return b.take(self, events, offset, length) if b is not None else None

    def event(self, events: Iterable[str], offset: int, length: int) -> None:
        """Raise ``events`` for a Python-side request about to run: suspend
        here while a break point holds it (not inside a job's planning,
        which raised them already)."""
        if self.breaks is None or getattr(_tls, "quiet", False):
            return
        while True:         # each break point fires once: a next one may hold it again
            s = self.take_break(events, offset, length)
            if s is None:
                return
            self.breaks.suspend(s)

    def inject_check(self, op: str, offset: int, length: int) -> int:
        """The errno to fail this request with, or 0. Counts the request."""
        with self._lock:
            for r in self.rules:
                if not r.matches(op, offset, length):
                    continue
                if r.once and r.fired:
                    continue
                r.seen += 1
                if r.seen > r.after:
                    r.fired += 1
                    return r.errno
            return 0

    def _maybe_fail(self, op: str, offset: int, length: int) -> None:
        e = self.inject_check(op, offset, length)
        if e:
            raise OSError(e, os.strerror(e))

    def readinto(self, offset: int, buf) -> None:
        self.event(("read_aio",), offset, len(buf))
        self._maybe_fail("read", offset, len(buf))
        self.inner.readinto(offset, buf)

    def write(self, offset: int, data, fill=None) -> None:
        self.event(("pwritev", "write_aio"), offset, len(data))
        self._maybe_fail("write", offset, len(data))
        if fill is None:
            self.inner.write(offset, data)
        else:
            self.inner.write(offset, data, fill=fill)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill=None) -> None:
        self.event(("pwritev", "pwritev_zero"), offset, length)
        self._maybe_fail("write", offset, length)
        if fill is None:
            self.inner.write_zeroes(offset, length, may_unmap)
        else:
            self.inner.write_zeroes(offset, length, may_unmap, fill=fill)

    def discard(self, offset: int, length: int) -> None:
        self._maybe_fail("write", offset, length)
        self.inner.discard(offset, length)

    def flush(self) -> None:
        self.event(("flush_to_os", "flush_to_disk"), 0, 0)
        self._maybe_fail("flush", 0, 0)
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
