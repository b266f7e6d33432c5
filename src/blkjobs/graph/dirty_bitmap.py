"""A named dirty bitmap of a node (:class:`DirtyBitmap`): in memory; its
persistent kind, stored in a qcow2 image, is in :mod:`.pbitmap`. The I/O
layer (:mod:`.io`) keeps them by node and marks them on guest writes.
Moved out of ``io.py`` (still importable from there)."""
from __future__ import annotations

from collections.abc import Iterator

from ..errors import JobError
from ..native.bitmap import Bitmap
from .node import Node


class DirtyBitmap:
    """A named dirty bitmap on a node (``block-dirty-bitmap-add``;
    ``Engine.block_dirty_bitmap_add``).

    Front-end writes to the node mark it while ``enabled``. A backup freezes
    it (``busy``): new writes then go to a hidden ``successor`` until the job
    hands the bitmap over (see ``docs/jobs.md``, bitmap-mode).

    This one lives in memory only; a *persistent* one
    (:class:`~.pbitmap.PersistentDirtyBitmap`) is stored in its qcow2
    image. The operations (:meth:`clear`, :meth:`enable`, :meth:`disable`,
    :meth:`merge`) check what QEMU checks and raise :class:`JobError` with
    its texts; take the I/O lock (``with eng.io:``) around them when guest
    writes may run. See docs/bitmaps.md.
    """

    #: stored in the image (see PersistentDirtyBitmap)
    persistent = False

    def __init__(self, node: Node, name: str, granularity: int):
        self.node = node
        self.name = name
        self.bitmap = Bitmap(node.size, granularity)
        self.enabled = True
        self.busy = False
        self.successor: Bitmap | None = None

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity

    @property
    def inconsistent(self) -> bool:
        """Found in use in its image at open (a crash): never used."""
        return False

    @property
    def readonly(self) -> bool:
        """Loaded from a read-only image: cannot be changed (QEMU's)."""
        return False

    @property
    def recording(self) -> bool:
        """Writes are being recorded (in the bitmap or its successor)."""
        return bool(self.enabled and (not self.busy or self.successor is not None))

    def mark(self, offset: int, length: int) -> None:
        # QEMU: the successor of a disabled bitmap is disabled too
        if self.enabled:
            (self.successor if self.successor is not None else self.bitmap).set(offset, length)

    def count(self) -> int:
        """Dirty bytes (whole granules)."""
        return self.bitmap.count()

    def dirty_extents(self, offset: int = 0, length: int | None = None
                      ) -> Iterator[tuple[int, int]]:
        """The dirty extents ``(offset, length)`` in ``[offset, offset+length)``
        (default: to the end), in order, each a maximal run of dirty granules
        clipped to the range: what changed since the bitmap was last cleared
        or handed over by a backup. Reads a snapshot taken now."""
        end = self.node.size if length is None else min(self.node.size, offset + length)
        snap = self.bitmap.copy()
        for a, n in snap.areas(offset):
            if a >= end:
                return
            s, e = max(a, offset), min(a + n, end)
            if e > s:
                yield s, e - s

    # -- operations (QEMU's checks and texts) ------------------------------
    def check(self, allow_ro: bool = False) -> None:
        """QEMU's bdrv_dirty_bitmap_check: busy, then read-only (unless
        ``allow_ro``), then inconsistent."""
        if self.busy:
            raise JobError(f"Bitmap '{self.name}' is currently in use by another operation "
                           "and cannot be used")
        if not allow_ro and self.readonly:
            raise JobError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent:
            raise JobError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def clear(self) -> None:
        """Forget every dirty bit (``block-dirty-bitmap-clear``)."""
        self.check()
        new = self.bitmap.copy()
        new.clear()
        self.bitmap = new

    def enable(self) -> None:
        """Record writes again (``block-dirty-bitmap-enable``)."""
        self.check(allow_ro=True)
        self.enabled = True

    def disable(self) -> None:
        """Stop recording writes (``block-dirty-bitmap-disable``)."""
        self.check(allow_ro=True)
        self.enabled = False

    def merge(self, *sources: DirtyBitmap) -> None:
        """Add the dirty bits of ``sources`` (same node size; any
        granularity) to this bitmap (``block-dirty-bitmap-merge``)."""
        self.check()
        for src in sources:
            src.check(allow_ro=True)
            if src.node.size != self.node.size:
                raise JobError("Bitmaps are incompatible and can't be merged")
        new = self.bitmap.copy()
        for src in sources:
            for off, n in src.bitmap.areas():
                new.set(off, n)
        self.bitmap = new
