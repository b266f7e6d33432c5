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
"""
from __future__ import annotations

import errno as _errno
import os
import threading
from dataclasses import dataclass
from typing import Any


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
    I/O methods, which consult the rules first."""

    def __init__(self, inner: Any, rules: list[Rule]):
        self.inner = inner
        self.rules = list(rules)
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

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
        self._maybe_fail("read", offset, len(buf))
        self.inner.readinto(offset, buf)

    def write(self, offset: int, data, fill=None) -> None:
        self._maybe_fail("write", offset, len(data))
        if fill is None:
            self.inner.write(offset, data)
        else:
            self.inner.write(offset, data, fill=fill)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill=None) -> None:
        self._maybe_fail("write", offset, length)
        if fill is None:
            self.inner.write_zeroes(offset, length, may_unmap)
        else:
            self.inner.write_zeroes(offset, length, may_unmap, fill=fill)

    def discard(self, offset: int, length: int) -> None:
        self._maybe_fail("write", offset, length)
        self.inner.discard(offset, length)

    def flush(self) -> None:
        self._maybe_fail("flush", 0, 0)
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
