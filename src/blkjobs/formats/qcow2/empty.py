"""Emptying a qcow2 overlay in place -- what ``qemu-img commit`` does to the
image it committed: every cluster unallocated again, so the image reads
through to its backing file. The file stays the same (inode, owner, mode,
locks of other openers) and so does cluster 0 (size, cluster size, version,
extended L2, backing link, header extensions).

Done in place when the metadata sits where :class:`.create.Layout` puts it
(every image ``qemu-img create`` or blkjobs made and nobody resized): then
the empty image has the same header, refcount table, refcount block and L1
offsets, and only their contents change. Each step is made durable before
the next, so a crash anywhere leaves a consistent image:

1. the L1 table is zeroed: from here on the image reads through, and the
   clusters it referenced are merely leaked;
2. the refcount table and blocks are rewritten for the metadata alone
   (everything else: refcount 0, referenced by nothing);
3. the file is cut after the L1 table (the data clusters are freed).

Anything else (internal snapshots, persistent bitmaps, a dirty or corrupt
image, tables moved by a resize) is left alone: :func:`make_empty` returns
False and the caller re-creates the image.
"""
from __future__ import annotations

import os
import struct

from .create import Layout
from .header import EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, parse_header

RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


def make_empty(path: str) -> bool:
    """Empty the qcow2 image at ``path`` in place (see the module notes);
    False, with the file untouched, when its layout is not the standard one."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        h = parse_header(os.pread(fd, 2 << 20, 0), size, path)
        if (h.nb_snapshots or h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
                or h.ext(EXT_BITMAPS) is not None):
            return False
        lay = Layout(h.size, h.cluster_size, h.l2_entries, h.refcount_bits)
        if ((h.refcount_table_offset, h.refcount_table_clusters, h.l1_table_offset,
             h.l1_size) != (lay.rt_offset, lay.rt, lay.l1_offset, lay.l1_size)
                or size < lay.end):
            return False
        raw = os.pread(fd, lay.rb * 8, lay.rt_offset)
        blocks = [e & RT_OFFSET_MASK for e in struct.unpack(f">{lay.rb}Q", raw)]
        if blocks != [lay.rb_offset + i * lay.cluster_size for i in range(lay.rb)]:
            return False
        os.pwrite(fd, bytes(lay.l1_size * 8), lay.l1_offset)
        os.fsync(fd)
        lay.write_refcounts(fd)
        os.fsync(fd)
        os.ftruncate(fd, lay.end)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)
