"""QEMU's blkdebug rule semantics (block/blkdebug.c) on the library's
blkdebug driver wrapper: the rules ``blockdev-add`` of a ``blkdebug`` node
sets up over QMP (docs/qmp.md, ``blkjobs.daemon.blkdebug_commands``).

The node has a state, 1 at first. An event the node raises processes the
rules listed for it whose ``state`` is 0 or the current state: each
set-state rule moves the state (once all rules of the event are processed);
the inject-error rules become the *active* ones, replacing those of an
earlier event. A request then fails with the errno of the first active
rule whose iotypes and offset match; a ``once`` rule is then removed.
"""
from __future__ import annotations

import errno as _errno
import os
import threading
from dataclasses import dataclass
from typing import Any

from .blkdebug import EVENTS, Blkdebug, _tls

__all__ = ["EVENTS", "DEFAULT_IOTYPES", "InjectRule", "SetStateRule", "QemuRules",
           "QemuBlkdebug"]

#: QEMU's default iotype mask: everything but block-status.
DEFAULT_IOTYPES = frozenset(("read", "write", "write-zeroes", "discard", "flush"))


@dataclass(eq=False)
class InjectRule:
    event: str
    state: int = 0
    iotypes: frozenset = DEFAULT_IOTYPES
    errno: int = _errno.EIO
    offset: int = -1            # bytes; -1: any
    once: bool = False


@dataclass(eq=False)
class SetStateRule:
    event: str
    new_state: int
    state: int = 0


class QemuRules:
    """One blkdebug node's rules and state (see the module docstring)."""

    def __init__(self, inject: list[InjectRule], set_state: list[SetStateRule]):
        self.lock = threading.Lock()
        self.state = 1
        self.inject = inject
        self.set_state = set_state
        self.active: list[InjectRule] = []

    def debug_event(self, event: str) -> None:
        with self.lock:
            new_state = self.state
            fresh: list[InjectRule] | None = None
            for r in self.inject:
                if r.event == event and r.state in (0, self.state):
                    if fresh is None:
                        fresh = []
                    fresh.insert(0, r)
            for s in self.set_state:
                if s.event == event and s.state in (0, self.state):
                    new_state = s.new_state
            if fresh is not None:
                self.active = fresh
            self.state = new_state

    def check(self, iotype: str, offset: int, length: int) -> int:
        with self.lock:
            for r in self.active:
                if (r.offset == -1 or (length and offset <= r.offset < offset + length)) \
                        and iotype in r.iotypes:
                    if r.once:
                        self.active.remove(r)
                        self.inject.remove(r)
                    return r.errno
            return 0


class QemuBlkdebug(Blkdebug):
    """The library's blkdebug driver wrapper, with QEMU's rules: every event
    the node raises (a job's planning, a front-end request) goes through
    :meth:`QemuRules.debug_event`, every request through its check."""

    #: the job data path raises events for this node even without break points
    wants_events = True

    def __init__(self, inner: Any, qrules: QemuRules, node_name: str,
                 format_events: bool = True, file_offsets: bool = False):
        super().__init__(inner, [], None, node_name)
        self.qrules = qrules
        #: the events of the format's requests reach the rules. False: a
        #: blkdebug node *above* a format node (a json: name whose top driver
        #: is blkdebug), where QEMU's format driver raises its events on its
        #: own file, never on the blkdebug node: only ``none`` fires
        self.format_events = format_events
        #: ``file_offsets``: the layer is between a qcow2 node and its file (a
        #: ``blkdebug:`` name): the qcow2 driver checks the reads of its file
        #: itself, at the file's offsets, which QEMU's ``sector`` counts
        self.file_offsets = file_offsets and inner.has_debug_hook
        if format_events and inner.has_debug_hook:   # qcow2: its metadata events too
            inner.blkdebug = qrules
        qrules.debug_event("none")          # QEMU raises it as the node opens

    def readinto(self, offset: int, buf) -> None:
        """Under a qcow2 image (``file_offsets``), as QEMU's qcow2 reads: per
        run of the request its event (``read_aio`` data, ``read_compressed``,
        none for zeroes), then its I/O, checked at the file's offsets."""
        if not self.file_offsets:
            return super().readinto(offset, buf)
        from ..formats.base import Kind
        mv = memoryview(buf).cast("B")
        for m in self.inner.map_host(offset, len(mv)):
            if m.kind == Kind.DATA:
                self.event(("read_aio",), m.start, m.length)
            elif m.kind == Kind.COMPRESSED:
                self.event(("read_compressed",), m.start, m.length)
            self.inner.readinto(m.start, mv[m.start - offset:m.start - offset + m.length])

    def backing_read(self, offset: int, length: int) -> None:
        """The image reads [offset, offset+length) from its backing file
        (graph.node: a read through the chain). Under the image QEMU's
        format raises ``read_backing_aio`` on this layer (not over it:
        ``format_events`` False); the read itself goes to the backing file,
        past the layer."""
        if self.format_events:
            self.event(("read_backing_aio",), offset, length)

    def _events(self, events: Any) -> None:
        if not self.format_events:
            return
        for ev in events:
            self.qrules.debug_event(ev)

    def take_break(self, events, offset: int, length: int):
        events = tuple(events)
        self._events(events)
        return super().take_break(events, offset, length)

    def event(self, events, offset: int, length: int) -> None:
        if getattr(_tls, "quiet", False):
            return              # a job's planning raised them already
        events = tuple(events)
        self._events(events)
        while self.breaks is not None:
            s = Blkdebug.take_break(self, events, offset, length)
            if s is None:
                return
            self.breaks.suspend(s)

    def inject_check(self, op: str, offset: int, length: int) -> int:
        return self.qrules.check(op, offset, length) or super().inject_check(op, offset, length)

    def _fail(self, iotype: str, offset: int, length: int) -> None:
        e = self.qrules.check(iotype, offset, length)
        if e:
            raise OSError(e, os.strerror(e))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True, fill=None) -> None:
        self.event(("pwritev", "pwritev_zero"), offset, length)
        self._fail("write-zeroes", offset, length)
        if fill is None:
            self.inner.write_zeroes(offset, length, may_unmap)
        else:
            self.inner.write_zeroes(offset, length, may_unmap, fill=fill)

    def discard(self, offset: int, length: int) -> None:
        self._fail("discard", offset, length)
        self.inner.discard(offset, length)
