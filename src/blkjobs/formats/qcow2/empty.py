"""Emptying a qcow2 overlay in place -- what ``qemu-img commit`` does to the
image it committed: every cluster unallocated again, so the image reads
through to its backing file. The file stays the same (inode, owner, mode,
locks of other openers) and so does cluster 0 (size, cluster size, version,
extended L2, backing link, header extensions).

Done in place when the metadata sits where :class:`.create.Layout` puts it
(every image ``qemu-img create`` or blkjobs made and nobody resized): then
the empty image has the same header, refcount table, refcount block and L1
offsets, and only their contents change. The steps are QEMU's
(make_completely_empty), each raising its blkdebug event first
(:mod:`.debug`: an injected error stops the emptying right there, leaving
the file as QEMU leaves it):

1. the dirty flag is set (version 3; refcounts are about to be wrong, and
   an interrupted emptying is repaired on the next open);
2. ``l1_update``: the L1 table's clusters are zeroed: from here on the
   image reads through, and the clusters it referenced are merely leaked;
3. ``empty_image_prepare``: the refcount table, refcount blocks and L1 table
   are zeroed;
4. ``l1_update``, ``reftable_update``: the header's L1 and refcount table
   fields are written (the values they have: the layout stays);
5. ``refblock_alloc``: the refcount table and blocks are written for the
   metadata alone (everything else: refcount 0, referenced by nothing);
6. the dirty flag is cleared, and the file cut after the L1 table (the data
   clusters are freed).

An encrypted image is neither cut nor re-created (its LUKS area, in clusters
after the tables, holds the keys): every L2 entry is cleared and its
cluster freed (:func:`unmap_all`), as QEMU discards every cluster of an
image it cannot rebuild.

An image with an external data file is emptied as QEMU does it (its
make_empty cannot reset such an image): every L2 entry cleared, the tables
kept, the data file's clusters punched (:func:`_discard_all`).

Anything else (internal snapshots, persistent bitmaps, a dirty or corrupt
image, tables moved by a resize) is left alone: :func:`make_empty` returns
False and the caller re-creates the image.
"""
from __future__ import annotations

import os
import struct

from . import debug as dbg
from .create import Layout
from .debug import Hook
from .header import (EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
                     parse_header)
from ...native import dio

RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


def make_empty(path: str, debug: Hook | None = None) -> bool:
    """Empty the qcow2 image at ``path`` in place (see the module notes);
    False, with the file untouched, when its layout is not the standard one.
    ``debug``: the image's blkdebug hook (an injected error: OSError, the
    file left as it is at that step)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        from .header import read_cluster0
        h = parse_header(read_cluster0(fd), size, path)
        if (h.nb_snapshots or h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
                or h.ext(EXT_BITMAPS) is not None):
            return False
        if h.incompatible & INCOMPAT_DATA_FILE:
            _discard_all(path)
            return True
        if h.crypt_method:      # its LUKS area lives in clusters after the tables
            unmap_all(path)
            return True
        lay = Layout(h.size, h.cluster_size, h.l2_entries, h.refcount_bits)
        if ((h.refcount_table_offset, h.refcount_table_clusters, h.l1_table_offset,
             h.l1_size) != (lay.rt_offset, lay.rt, lay.l1_offset, lay.l1_size)
                or size < lay.end):
            return False
        raw = dio.pread(fd, lay.rb * 8, lay.rt_offset)
        blocks = [e & RT_OFFSET_MASK for e in struct.unpack(f">{lay.rb}Q", raw)]
        if blocks != [lay.rb_offset + i * lay.cluster_size for i in range(lay.rb)]:
            return False
        _empty(fd, h, lay, debug)
        return True
    finally:
        os.close(fd)


def _empty(fd: int, h, lay: Layout, debug: Hook | None) -> None:
    cs = lay.cluster_size
    v3 = h.version >= 3
    if v3:
        dbg.io(debug, "write", 72, 8)
        dio.pwrite(fd, struct.pack(">Q", h.incompatible | INCOMPAT_DIRTY), 72)
        os.fsync(fd)
    dbg.event(debug, "l1_update")
    l1_bytes = lay.l1_clusters * cs
    dbg.io(debug, "write-zeroes", lay.l1_offset, l1_bytes)
    dio.pwrite(fd, bytes(l1_bytes), lay.l1_offset)
    os.fsync(fd)
    dbg.event(debug, "empty_image_prepare")
    dbg.io(debug, "write-zeroes", lay.rt_offset, lay.l1_offset + l1_bytes - lay.rt_offset)
    dio.pwrite(fd, bytes(lay.l1_offset - lay.rt_offset), lay.rt_offset)
    dbg.event(debug, "l1_update")
    dbg.event(debug, "reftable_update")
    dbg.io(debug, "write", 40, 20)      # l1_table_offset, refcount_table_offset/clusters
    dio.pwrite(fd, struct.pack(">QQI", lay.l1_offset, lay.rt_offset, lay.rt), 40)
    if h.size % 512:    # the size in whole sectors, as QEMU's header update (Qcow2.size)
        dio.pwrite(fd, struct.pack(">Q", h.size // 512 * 512), 24)
    dbg.event(debug, "refblock_alloc")
    dbg.io(debug, "write", lay.rt_offset, 8)
    lay.write_refcounts(fd)
    os.fsync(fd)
    if v3:
        dio.pwrite(fd, struct.pack(">Q", h.incompatible & ~INCOMPAT_DIRTY), 72)
        os.fsync(fd)
    os.ftruncate(fd, lay.end)
    os.fsync(fd)


def _discard_all(path: str) -> None:
    """Every guest cluster of the image at ``path`` (with an external data
    file) unallocated: its L2 entry cleared (the L2 tables stay), its data
    file cluster punched, as QEMU's discard of a whole image."""
    from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
    from .driver import Qcow2
    with Qcow2(path, read_only=False) as img:
        img._check_writable(0, 0)
        cs, n = img.cluster_size, -(-img.size // img.cluster_size)
        tables = [i for i in range(len(img.l1)) if img._l2_offset(i)]
        for gc in (g for i in tables for g in range(i * img.l2e, min(n, (i + 1) * img.l2e))):
            _, _, e, bm = img._entry(gc)
            if not (e or bm):
                continue
            if img._has_host(e) or (e & 1 and e & ~1):
                _fallocate(img.data_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           gc * cs, cs)
            img._set_entry(gc, 0, 0)


def unmap_all(path: str) -> None:
    """Every guest cluster of the encrypted qcow2 image at ``path``
    unallocated (its L2 entry cleared, its host cluster freed), the rest of
    the file as it was."""
    from .crypt import CryptQcow2
    with CryptQcow2(path, read_only=False, header_only=True) as img:   # no data read
        img._check_writable(0, 0)
        n = -(-img.size // img.cluster_size)
        tables = [i for i in range(len(img.l1)) if img._l2_offset(i)]
        for gc in (g for i in tables for g in range(i * img.l2e, min(n, (i + 1) * img.l2e))):
            _, _, e, bm = img._entry(gc)
            if e or bm:
                img._classify(gc, e, bm)        # refuses a corrupt entry
                img._release(e)
                img._set_entry(gc, 0, 0)
