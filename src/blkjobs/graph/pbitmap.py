"""Persistent dirty bitmaps: a node's :class:`~.dirty_bitmap.DirtyBitmap` stored in
its qcow2 image (the bitmaps extension, ``formats/qcow2/bitmaps.py``).

A :class:`PersistentDirtyBitmap` is a view of one bitmap of the image's
``drv.persistent_bitmaps``: its bits, ``enabled`` ('auto') flag and
successor live there, so the one copy is what the engine uses and what
the image gets. The qcow2 driver marks it on every write through it (the
guest's, a job's), before the data. As in QEMU, the image's bitmaps are
flagged in use on disk once a read-write node holds its locks, and stored
back, in-use flag cleared, when it is closed (``blockdev-del``,
``Engine.close``, daemon exit) or reopened read-only; one added meanwhile
is on disk only from then. A bitmap found in use at open (a crash) is
*inconsistent*: listed, removable, never used. See docs/bitmaps.md.
"""
from __future__ import annotations

from typing import Any

from ..errors import JobError
from ..native.bitmap import Bitmap
from .dirty_bitmap import DirtyBitmap
from .node import Node


def _pbm(node: Node, create: bool) -> Any:
    """The node's qcow2 ``Bitmaps`` (None: the node has none to show, or
    its format cannot store any)."""
    drv = node.driver
    if node.is_filter:
        return None
    if not create and not drv.bitmaps and not drv.bitmaps_loaded:
        return None         # not loaded for nothing: most images have none
    return drv.persistent_bitmaps


class PersistentDirtyBitmap(DirtyBitmap):
    """One bitmap of a qcow2 image as a node's dirty bitmap (see the module
    docstring). ``busy`` (a backup holds it) is the engine's only."""

    persistent = True

    def __init__(self, node: Node, pbm: Any, pb: Any,
                 loaded: bool = True):  # super().__init__ would set through pb
        self.node = node
        self.name = pb.name
        self.busy = False
        self._pbm = pbm
        self._pb = pb
        self._empty: Bitmap | None = None
        self._loaded = loaded     # found in the image (not added since)

    @property
    def readonly(self) -> bool:
        """Loaded from an image opened read-only (QEMU's rule: one added
        since is not, though it cannot be stored)."""
        return self._loaded and bool(self.node.read_only)

    @property
    def granularity(self) -> int:
        return int(self._pb.granularity)

    @property
    def inconsistent(self) -> bool:
        return bool(self._pb.in_use)

    @property
    def recording(self) -> bool:
        return not self.inconsistent and super().recording

    @property
    def bitmap(self) -> Bitmap:
        if self._pb.in_use:         # never read: shown empty, as QEMU does
            if self._empty is None:
                self._empty = Bitmap(self.node.size, self.granularity)
            return self._empty
        return self._pbm.load(self._pb)

    @bitmap.setter
    def bitmap(self, bits: Bitmap) -> None:
        self._pb.bitmap = bits
        self._pb.dirty = True
        self._pbm.changed = True

    @property
    def enabled(self) -> bool:
        return bool(self._pb.enabled and not self._pb.in_use)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        if bool(self._pb.enabled) != on:
            if on:
                self._pbm.enable(self.name)
            else:
                self._pbm.disable(self.name)

    @property
    def successor(self) -> Bitmap | None:
        return self._pb.successor

    @successor.setter
    def successor(self, bits: Bitmap | None) -> None:
        self._pb.successor = bits

    def mark(self, offset: int, length: int) -> None:
        """Nothing: the driver marks it with the write itself."""

    def drop(self) -> None:
        """Removed from the node: from the image too, at once (as QEMU)."""
        if self._pbm.find(self.name) is self._pb:
            self._pbm.remove(self.name)

    def restore(self) -> None:
        """Undo :meth:`drop` (a transaction rolled back)."""
        if self._pbm.find(self.name) is None:
            self._pbm.items.append(self._pb)
            self._pbm.changed = True


def load_persistent(node: Node, bms: dict[str, DirtyBitmap]) -> None:
    """Add the image's persistent bitmaps to ``bms`` (the node's first use)."""
    pbm = _pbm(node, create=False)
    if pbm is None:
        return
    for pb in pbm:
        bms.setdefault(pb.name, PersistentDirtyBitmap(node, pbm, pb))


def add_persistent(node: Node, name: str, granularity: int,
                   disabled: bool) -> PersistentDirtyBitmap:
    """A new bitmap stored in ``node``'s image (QEMU's refusals and texts)."""
    pbm = _pbm(node, create=True)
    if pbm is None:
        raise JobError(f"Can't store persistent bitmaps to {node.name}: "
                       "Operation not supported")
    pb = pbm.add(name, granularity, disabled=disabled, node_name=node.name)
    if pbm.tracking and not disabled:
        # writes since the image started tracking are not in it: it starts
        # empty, as a new bitmap does
        pbm.load(pb)
    return PersistentDirtyBitmap(node, pbm, pb, loaded=False)


def store_persistent(node: Node, bms: dict[str, DirtyBitmap]) -> None:
    """Store the image's bitmaps if anything changed (read-write nodes)."""
    if node.read_only:
        return
    pbm = _pbm(node, create=False)
    if pbm is not None:
        pbm.store()
