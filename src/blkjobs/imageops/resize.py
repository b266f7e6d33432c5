"""``resize``: change an image's virtual size (``qemu-img resize``).

raw: the file is truncated or extended; ``falloc`` allocates the new range
(posix_fallocate), ``full`` writes zeroes over it. qcow2: see
:mod:`blkjobs.formats.qcow2.resize` (``metadata``, ``falloc`` and ``full``
allocate the new clusters as QEMU's qcow2 does).
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError

PREALLOC = ("off", "metadata", "falloc", "full")
_ZEROES = bytes(1 << 20)
GROW_ONLY = "Preallocation can only be used for growing images"


def resize_node(node, new_size: int, prealloc: str = "off") -> None:
    """Resize the image of ``node`` (opened writable, holding resize)."""
    drv = node.driver
    old = drv.size
    if node.format == "raw":
        if prealloc == "metadata":
            raise UsageError("Unsupported preallocation mode: metadata")
        if prealloc != "off" and new_size < old:
            raise UsageError(GROW_ONLY)
        os.ftruncate(drv.fd, new_size)
        if prealloc == "falloc" and new_size > old:
            os.posix_fallocate(drv.fd, old, new_size - old)
        elif prealloc == "full" and new_size > old:
            pos = old
            while pos < new_size:
                pos += os.pwrite(drv.fd, _ZEROES[:min(len(_ZEROES), new_size - pos)], pos)
        drv.flush()
        return
    if prealloc != "off" and new_size < old:
        raise UsageError(GROW_ONLY)
    from ..formats.qcow2.resize import resize
    resize(drv, new_size, *backing_args(node), prealloc=prealloc)
    drv.flush()


def backing_args(node) -> tuple[int | None, Any]:
    """The backing node's size and the copy-on-write hook for growing a
    qcow2 image: the new area is zeroed when the backing node is longer than
    the old size (else the backing file would show through), as in QEMU."""
    below = node.backing
    if below is None:
        return None, None
    return below.size, node._fill()
