"""Live I/O: what a VM (or a test's writer thread, or an NBD export later)
uses to keep reading and writing a node while jobs run on it, and the
:class:`Filter` a job puts on a node to see those writes.

``engine.attach(node)`` returns a :class:`Frontend`. Every request takes the
I/O lock (:class:`~blkjobs.graph.io.BlockIO`) and, for a write, travels down
the filter nodes jobs put above the node (the front end is re-pointed to the
top-most one): each filter node's :meth:`Filter.write` gets the request and
``next``, the way on to the node below -- the next filter or the image node
(nbdkit's filters call ``next``; QEMU's filter drivers write to
``bs->file``). The default :meth:`Filter.write` is

* :meth:`Filter.before_write` (backup's copy-before-write saves the old
  data; write-blocking mirror waits for in-flight copies);
* ``next(req)``: the request goes on down and lands on the image node;
* :meth:`Filter.after_write` (mirror marks the range dirty or writes it to
  the target synchronously);

then the image node's enabled dirty bitmaps are marked, and
:meth:`Filter.notify` runs for every filter the write passed, after the I/O
lock is released (waking a job takes the job manager's lock, which must
never be taken under the I/O lock).

Reads and flushes pass no filter; they wait for clusters a job allocated in
the chain and has not filled yet (``BlockIO.mark_unfilled``).

A frontend is a *parent* of its node: a mirror/active-commit pivot moves it to
the new node, and a node being quiesced for a pivot makes writes wait.

Moved here from ``jobs/frontend.py``; this module does not import the I/O
layer (:mod:`.io` imports it): a front end holds it as :class:`FrontendIO`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..errors import UsageError
from ..native.extents import is_zero
from .node import Node
from .perm import ALL, Perm


class WriteRequest:
    """A guest write on its way down the filter chain.

    ``op``: "write", "zero" or "discard"; ``data``: what a "write" writes
    (None for zero/discard); ``node``: the image node it lands on (below
    every filter); ``passed``: the filters it went through (notified once
    the I/O lock is released)."""

    __slots__ = ("op", "offset", "length", "data", "node", "passed")

    def __init__(self, op: str, offset: int, length: int, data: Any, node: Node):
        self.op, self.offset, self.length, self.data = op, offset, length, data
        self.node = node
        self.passed: list[Filter] = []


#: the way on: hands the request to the node below the filter
Next = Callable[[WriteRequest], None]


class Filter:
    """A write filter a job installs on a node (see the module docstring).

    All hooks but :meth:`notify` run with the I/O lock held; they may wait
    on it (``io.lock.wait``) but must not take the job manager's lock.
    ``op`` is "write", "zero" or "discard". A filter that does more than
    look at a write before and after it goes on overrides :meth:`write`.
    """

    def write(self, req: WriteRequest, next: Next) -> None:
        """Pass ``req`` on: ``next(req)`` sends it to the node below. The
        default runs :meth:`before_write`, ``next``, :meth:`after_write`."""
        self.before_write(req.node, req.op, req.offset, req.length)
        next(req)
        self.after_write(req.node, req.op, req.offset, req.length, req.data)

    def before_write(self, node: Node, op: str, offset: int, length: int) -> None:
        """Before the request reaches ``node``. Raise to fail the request
        (nothing is written then)."""

    def after_write(self, node: Node, op: str, offset: int, length: int,
                    data: bytes | bytearray | memoryview | None = None) -> None:
        """After the request was done on ``node``. ``data``: what a "write"
        wrote (None for zero/discard)."""

    def notify(self) -> None:
        """After the I/O lock was released (wake the job)."""


class FrontendIO(Protocol):
    """What a front end needs of the I/O layer (``BlockIO`` satisfies it)."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...

    def guest_read(self, fe: Frontend, offset: int, buf: Any) -> None: ...

    def guest_write(self, fe: Frontend, op: str, offset: int, length: int,
                    do: Callable[[Node], None], data: Any = None) -> None: ...

    def guest_flush(self, fe: Frontend) -> None: ...

    def detach(self, fe: Frontend) -> None: ...


class Frontend:
    """Read/write/zero/discard/flush on the node it is attached to.

    Thread-safe; several frontends may be attached to one node. The node may
    change under it (a pivot); :attr:`node` is the current one.
    """

    def __init__(self, io: FrontendIO, node: Node, name: str, writable: bool = True):
        self._io = io
        self.name = name
        self.node = node
        #: False: a reader only (a read-only export), holds no write permission
        self.writable = writable
        self._perm = node.take(name, self._wanted(), ALL)
        self.closed = False

    def _wanted(self) -> int:
        return Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else Perm(0))

    def _move(self, node: Node) -> None:
        """Re-point to ``node`` (I/O lock held): the pivot of a job."""
        perm = node.take(self.name, self._wanted(), ALL)
        self._perm.release()
        self.node, self._perm = node, perm

    @property
    def size(self) -> int:
        return self.node.size

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise UsageError(f"frontend {self.name} is closed")
        if offset < 0 or length < 0 or offset + length > self.node.size:
            raise UsageError(f"request {offset}+{length} is beyond the end of node "
                             f"'{self.node.name}' ({self.node.size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        self._check(offset, len(buf))
        self._io.guest_read(self, offset, buf)

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if not self.writable:
            raise UsageError(f"frontend {self.name} is read-only")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write(offset, len(data))
        self._io.guest_write(self, "write", offset, len(data),
                               lambda n: _land_write(n, offset, data), data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._check_write(offset, length)
        self._io.guest_write(self, "zero", offset, length,
                               lambda n: n.write_zeroes(offset, length, may_unmap))

    def discard(self, offset: int, length: int) -> None:
        """A discard; nothing (not even a dirty bit) where the image node
        ignores discards, as QEMU's bdrv_co_pdiscard without BDRV_O_UNMAP."""
        self._check_write(offset, length)
        with self._io:
            if not self.node.below_filters().unmap:
                return
        self._io.guest_write(self, "discard", offset, length,
                               lambda n: n.discard(offset, length))

    def flush(self) -> None:
        self._io.guest_flush(self)

    def close(self) -> None:
        with self._io:
            if not self.closed:
                self.closed = True
                self._perm.release()
                self._io.detach(self)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _land_write(n: Node, offset: int, data: bytes | bytearray | memoryview) -> None:
    """A front end's write lands on image node ``n``: with detect-zeroes,
    zeroes are written as a write-zeroes (QEMU's bdrv_aligned_pwritev)."""
    if n.detect_zeroes != "off" and is_zero(data):
        n.write_zeroes(offset, memoryview(data).nbytes, n.detect_zeroes == "unmap" and n.unmap)
    else:
        n.write(offset, data)
