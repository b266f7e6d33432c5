"""Transactional graph changes.

Each change is applied when it is created (so later steps of the same
transaction see it) and returns an object with ``commit()`` and ``abort()``;
``abort()`` restores exactly what was there (links, permissions, and the
overlay's header bytes), ``commit()`` only releases what the change made
obsolete. A :class:`GraphTransaction` collects changes: commit all in order,
or abort all in reverse order; as a context manager it commits on success
and aborts on an exception.
"""
from __future__ import annotations

import abc
import os
from typing import Any, TypeVar

from ..errors import ImageError, UsageError
from ..native import dio
from .node import Node
from .perm import Permission


class Change(abc.ABC):
    """One applied graph change, waiting for the transaction's verdict."""

    done = False

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the change permanent (release what abort would have needed)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Restore the graph (and any rewritten header) exactly as it was."""

    def _finish(self) -> None:
        if self.done:
            raise UsageError("graph change already committed or aborted")
        self.done = True


class ReplaceNode(Change):
    """Make every parent of ``old`` (nodes using it as backing, filters using
    it as file) use ``new``."""

    def __init__(self, old: Node, new: Node):
        if old.graph is not new.graph:
            raise UsageError("nodes belong to different graphs")
        if old is new or old in new.chain():
            raise UsageError(f"cannot replace '{old.name}' by a node above it")
        self.old, self.new = old, new
        #: (parent, its permission on old, its permission on new)
        self.moves: list[tuple[Node, Permission, Permission | None]] = []
        try:
            for p in old.graph.parents(old):
                held = p.file_perm if p.file is old else p.backing_perm
                # a parent holds a permission on each child it links to
                assert held is not None
                if p.file is old:
                    perm = new.take(held.owner, held.perm, held.shared)
                    self.moves.append((p, held, perm))
                    held.pending_release = True
                    p.file, p.file_perm = new, perm
                    continue
                link = p._link(new)
                self.moves.append((p, held, link))
                held.pending_release = True
                p.backing, p.backing_perm = new, link
        except BaseException:
            self._undo()
            raise

    def _undo(self) -> None:
        for p, old_perm, new_perm in reversed(self.moves):
            if new_perm is not None:
                new_perm.release()
            old_perm.pending_release = False
            if p.file is self.new:
                p.file, p.file_perm = self.old, old_perm
                continue
            p.backing, p.backing_perm = self.old, old_perm
        self.moves = []

    def commit(self) -> None:
        self._finish()
        for _, old_perm, _new in self.moves:
            old_perm.release()

    def abort(self) -> None:
        self._finish()
        self._undo()


class SetBacking(Change):
    """Change ``node``'s backing link to ``backing`` (None = no backing) and,
    when ``update_header``, record it in the image header (name relative to
    the node's directory unless ``filename`` is given; format from the new
    node unless ``fmt`` is given)."""

    def __init__(self, node: Node, backing: Node | None, update_header: bool = True,
                 filename: str | None = None, fmt: str | None = None):
        if backing is not None and node in backing.chain():
            raise UsageError(f"making '{backing.name}' the backing of '{node.name}' "
                             "would create a loop")
        self.node, self.old_backing, self.old_perm = node, node.backing, node.backing_perm
        self.header_saved: tuple[bytes, str | None, str | None] | None = None
        drv = node.driver
        if update_header:
            if not drv.can_set_backing:
                raise ImageError(f"node '{node.name}' ({node.format}) cannot record a backing file")
            if drv.read_only:
                raise ImageError(f"node '{node.name}' is read-only: cannot rewrite its header")
        new_perm = node._link(backing)
        try:
            if update_header:
                if backing is not None and filename is None:
                    filename = os.path.relpath(os.path.abspath(backing.filename),
                                               os.path.dirname(os.path.abspath(node.filename)))
                if backing is not None and fmt is None:
                    fmt = backing.format
                self.header_saved = (drv.header_bytes(), drv.backing_filename,
                                     drv.backing_format)
                drv.set_backing(filename if backing is not None else None,
                                fmt if backing is not None else None)
        except BaseException:
            if new_perm is not None:
                new_perm.release()
            raise
        if self.old_perm is not None:
            self.old_perm.pending_release = True
        node.backing, node.backing_perm = backing, new_perm

    def commit(self) -> None:
        self._finish()
        if self.old_perm is not None:
            self.old_perm.release()

    def abort(self) -> None:
        self._finish()
        n = self.node
        if n.backing_perm is not None:
            n.backing_perm.release()
        n.backing, n.backing_perm = self.old_backing, self.old_perm
        if self.old_perm is not None:
            self.old_perm.pending_release = False
        if self.header_saved is not None:
            raw, bf, bfmt = self.header_saved
            drv = n.driver
            # restore exactly the old bytes of cluster 0, then re-read the header
            dio.pwrite(drv.fd, raw, 0)
            os.fsync(drv.fd)
            drv.header.backing_file, drv.header.backing_format = bf, bfmt
            drv.backing_filename, drv.backing_format = bf, bfmt


class DropNode(Change):
    """Remove ``node`` from the graph at commit (closing it). Refused while
    another node uses it as backing or a user other than ``'open'`` holds it."""

    def __init__(self, node: Node):
        parents = node.graph.parents(node)
        if parents:
            raise UsageError(f"node '{node.name}' is in use as backing of "
                             f"'{parents[0].name}'")
        others = [p for p in node.users() if p.owner != "open" and not p.pending_release]
        if others:
            raise UsageError(f"node '{node.name}' is in use by {others[0].owner}")
        self.node = node

    def commit(self):
        self._finish()
        for p in self.node.users():
            p.release()
        self.node.close()

    def abort(self):
        self._finish()


C = TypeVar("C", bound=Change)


class GraphTransaction:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.state = "open"

    def add(self, change: C) -> C:
        if self.state != "open":
            raise UsageError(f"transaction already {self.state}")
        self.changes.append(change)
        return change

    def replace_node(self, old: Node, new: Node) -> ReplaceNode:
        return self.add(ReplaceNode(old, new))

    def set_backing(self, node: Node, backing: Node | None, **kw: Any) -> SetBacking:
        return self.add(SetBacking(node, backing, **kw))

    def drop_node(self, node: Node) -> DropNode:
        return self.add(DropNode(node))

    def commit(self) -> None:
        if self.state != "open":
            raise UsageError(f"transaction already {self.state}")
        self.state = "committed"
        for c in self.changes:
            c.commit()

    def abort(self) -> None:
        if self.state != "open":
            raise UsageError(f"transaction already {self.state}")
        self.state = "aborted"
        for c in reversed(self.changes):
            c.abort()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if self.state != "open":
            return False
        if et is None:
            self.commit()
        else:
            self.abort()
        return False
