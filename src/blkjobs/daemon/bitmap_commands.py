"""The dirty-bitmap commands (``block-dirty-bitmap-*``, mixed into
:class:`~blkjobs.daemon.commands.Commands`): add/remove/clear/enable/
disable/merge, each also a ``transaction`` action (:meth:`_bitmap_action`
returns its undo), and ``x-debug-block-dirty-bitmap-sha256``. The bitmaps
themselves are the Engine's (``eng.io.bitmaps_of``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from ..graph import Node
from .protocol import QMPError


class BitmapCommands:
    """The dirty-bitmap commands (mixed into Commands)."""

    eng: Any
    _lookup: Callable[[str], Node]

    def _bitmaps_of(self, g: Node) -> dict:
        # The Engine keeps a node's bitmaps on the node (read-only here,
        # except when the node itself goes away).
        return self.eng.io.bitmaps_of(g)

    def _bitmap(self, node: str, name: str):
        g = self._lookup(node)
        bm = self._bitmaps_of(g).get(name)
        if bm is None:
            raise QMPError(f"Dirty bitmap '{name}' not found")
        return bm

    @staticmethod
    def _check(bm, allow_ro: bool = False) -> None:
        bm.check(allow_ro)

    @staticmethod
    def _bitmap_info(bm) -> dict[str, Any]:
        info = {"name": bm.name, "count": bm.count(), "granularity": bm.granularity,
                "recording": bm.recording, "busy": bm.busy, "persistent": bm.persistent}
        if bm.inconsistent:
            info["inconsistent"] = True
        return info

    def _dirty_bitmaps_info(self, g: Node) -> list[dict[str, Any]]:
        """``dirty-bitmaps`` of query-named-block-nodes in QEMU's order (the
        newest first): a pending backup's anonymous bitmaps -- its copy
        bitmap (disabled) and the successor of the bitmap it froze -- then
        the named ones."""
        out: list[dict[str, Any]] = []
        for job in reversed(self.eng.jobs.jobs()):
            d = job.driver
            if job.type != "backup" or d.src is not g:
                continue
            copy_bm = d.copy_bm
            if copy_bm is not None and d.fnode is not None:
                # QEMU's block-copy bitmap lives as long as the job's filter
                out.append({"recording": False, "persistent": False, "busy": False,
                            "granularity": copy_bm.granularity, "count": copy_bm.count()})
            bm = d.bm
            if bm is not None and bm.successor is not None:
                out.append({"recording": bool(bm.enabled), "persistent": False,
                            "busy": False, "granularity": bm.granularity,
                            "count": bm.successor.count()})
        out += [self._bitmap_info(bm) for bm in reversed(self._bitmaps_of(g).values())]
        return out

    def _bitmap_add(self, node: str, name: str, granularity: int | None = None,
                    persistent: bool = False, disabled: bool = False) -> Callable[[], None]:
        g = self._lookup(node)
        if not name:
            raise QMPError("Bitmap name cannot be empty")
        if len(name) > 1023 and not persistent:   # persistent: the image's limit says
            raise QMPError("Bitmap name too long")
        if granularity is None:
            cs = g.driver.cluster_size
            # QEMU: the cluster size clamped to [4 KiB, 64 KiB]; 64 KiB when the
            # driver has none (raw over file, checked against qemu-storage-daemon)
            granularity = min(max(cs, 4096), 65536) if cs else 65536
        elif granularity < 512 or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
        bm = self.eng.block_dirty_bitmap_add(g, name, granularity, persistent=persistent,
                                             disabled=disabled)

        def undo() -> None:
            self._bitmaps_of(g).pop(name, None)
            if bm.persistent:
                bm.drop()
        return undo

    def _bitmap_remove(self, node: str, name: str) -> Callable[[], None]:
        bm = self._bitmap(node, name)
        # QEMU checks only busy: an inconsistent bitmap is removed
        self.eng.io.remove_bitmap(bm.node, name)
        bms = self._bitmaps_of(bm.node)

        def undo() -> None:
            bms.setdefault(name, bm)
            if bm.persistent:
                bm.restore()
        return undo

    def _bitmap_clear(self, node: str, name: str) -> Callable[[], None]:
        bm = self._bitmap(node, name)
        old = bm.bitmap
        bm.clear()

        def undo() -> None:
            bm.bitmap = old
        return undo

    def _bitmap_enable(self, node: str, name: str, enable: bool = True) -> Callable[[], None]:
        bm = self._bitmap(node, name)
        old = bm.enabled
        bm.enable() if enable else bm.disable()

        def undo() -> None:
            bm.enabled = old
        return undo

    def _bitmap_merge(self, node: str, target: str, bitmaps: list) -> Callable[[], None]:
        dst = self._bitmap(node, target)
        self._check(dst)
        srcs = [self._bitmap(node, ref) if isinstance(ref, str) else
                self._bitmap(ref["node"], ref["name"]) for ref in bitmaps]
        old = dst.bitmap
        dst.merge(*srcs)

        def undo() -> None:
            dst.bitmap = old
        return undo

    def _bitmap_action(self, kind: str, data: dict[str, Any]) -> Callable[[], None]:
        with self.eng.io:
            if kind == "block-dirty-bitmap-add":
                return self._bitmap_add(**data)
            if kind == "block-dirty-bitmap-remove":
                return self._bitmap_remove(**data)
            if kind == "block-dirty-bitmap-clear":
                return self._bitmap_clear(**data)
            if kind == "block-dirty-bitmap-enable":
                return self._bitmap_enable(**data)
            if kind == "block-dirty-bitmap-disable":
                return self._bitmap_enable(**data, enable=False)
            if kind == "block-dirty-bitmap-merge":
                return self._bitmap_merge(**data)
        raise AssertionError(kind)

    def cmd_block_dirty_bitmap_add(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-add", a)
        return {}

    def cmd_block_dirty_bitmap_remove(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-remove", a)
        return {}

    def cmd_block_dirty_bitmap_clear(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-clear", a)
        return {}

    def cmd_block_dirty_bitmap_enable(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-enable", a)
        return {}

    def cmd_block_dirty_bitmap_disable(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-disable", a)
        return {}

    def cmd_block_dirty_bitmap_merge(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-merge", a)
        return {}

    def cmd_x_debug_block_dirty_bitmap_sha256(self, node: str, name: str):
        """Not QEMU's hash (that one hashes QEMU's in-memory HBitmap): the
        SHA-256 of our serialized bitmap. Equal bitmaps hash equal, which
        is what tests use it for."""
        with self.eng.io:
            bm = self._bitmap(node, name)
            return {"sha256": hashlib.sha256(bytes(bm.bitmap.to_bytes())).hexdigest()}
