"""Live I/O: what a VM (or a test's writer thread, or an NBD export later)
uses to keep reading and writing a node while jobs run on it.

``engine.attach(node)`` returns a :class:`Frontend`. Every request takes the
engine's I/O lock, passes the write hooks of the filter nodes jobs put above
the node (the front end is re-pointed to the top-most one; hooks run top
down, in the manner of nbdkit filters stacked through ``next``), does the
I/O on the image node below them, then marks its enabled dirty bitmaps:

* :meth:`Filter.before_write` runs first (backup's copy-before-write saves
  the old data; write-blocking mirror waits for in-flight copies);
* then the node is written;
* :meth:`Filter.after_write` (mirror marks the range dirty or writes it to the
  target synchronously);
* :meth:`Filter.notify` runs after the I/O lock is released (waking a job
  takes the job manager's lock, which must never be taken under the I/O lock).

Reads and flushes pass no filter; they wait for clusters a job allocated in
the chain and has not filled yet (``Engine.mark_unfilled``).

A frontend is a *parent* of its node: a mirror/active-commit pivot moves it to
the new node, and a node being quiesced for a pivot makes writes wait.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError
from ..graph import ALL, Node, Perm

if TYPE_CHECKING:
    from .engine import Engine


class Filter:
    """A write filter a job installs on a node (see the module docstring).

    All hooks but :meth:`notify` run with the engine's I/O lock held; they
    may wait on it (``eng.io.wait``) but must not take the job manager's lock.
    ``op`` is "write", "zero" or "discard".
    """

    def before_write(self, node: Node, op: str, offset: int, length: int) -> None:
        """Before the request reaches ``node``. Raise to fail the request
        (nothing is written then)."""

    def after_write(self, node: Node, op: str, offset: int, length: int,
                    data=None) -> None:
        """After the request was done on ``node``. ``data``: what a "write"
        wrote (None for zero/discard)."""

    def notify(self) -> None:
        """After the I/O lock was released (wake the job)."""


class Frontend:
    """Read/write/zero/discard/flush on the node it is attached to.

    Thread-safe; several frontends may be attached to one node. The node may
    change under it (a pivot); :attr:`node` is the current one.
    """

    def __init__(self, eng: Engine, node: Node, name: str):
        self._eng = eng
        self.name = name
        self.node = node
        self._perm = node.take(name, Perm.CONSISTENT_READ | Perm.WRITE, ALL)
        self.closed = False

    def _move(self, node: Node) -> None:
        """Re-point to ``node`` (I/O lock held): the pivot of a job."""
        perm = node.take(self.name, Perm.CONSISTENT_READ | Perm.WRITE, ALL)
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

    def readinto(self, offset: int, buf) -> None:
        self._check(offset, len(buf))
        self._eng._guest_read(self, offset, buf)

    def write(self, offset: int, data) -> None:
        self._check(offset, len(data))
        self._eng._guest_write(self, "write", offset, len(data),
                               lambda n: n.write(offset, data), data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._check(offset, length)
        self._eng._guest_write(self, "zero", offset, length,
                               lambda n: n.write_zeroes(offset, length, may_unmap))

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._eng._guest_write(self, "discard", offset, length,
                               lambda n: n.discard(offset, length))

    def flush(self) -> None:
        self._eng._guest_flush(self)

    def close(self) -> None:
        with self._eng.io:
            if not self.closed:
                self.closed = True
                self._perm.release()
                self._eng._frontends.remove(self)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
