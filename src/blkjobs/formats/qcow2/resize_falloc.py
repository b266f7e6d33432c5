"""qcow2 ``resize --preallocation=falloc|full`` (growing, no external data
file, standard L2 entries), laid out as QEMU 7.2's qcow2_co_truncate does,
so the file is the same as qemu-img's:

* the new data clusters run from the cluster the old end cuts through (it
  moves: its head is copied into the new run, its old host cluster freed)
  to the new end;
* first a refcount area at the end of the used clusters (QEMU's
  qcow2_refcount_area): the refcount blocks missing to cover the data run
  and the L2 tables it may need, then a new refcount table (always written,
  the header switched to it, the old table freed);
* the data run after it, allocated in the file by the file's own
  preallocation (``falloc``: fallocate from the file's end; ``full``: zeroes
  written);
* the L2 entries, table by table in guest order; a missing L2 table takes
  the first free cluster (QEMU's allocator is first fit: the freed old
  refcount table, the freed cut cluster...).
"""
from __future__ import annotations

import os

from ...native import dio
from .tables import COPIED, OFFSET_MASK

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def grow(img, old: int, new: int, mode: str, fill) -> None:
    cs, cb = img.cluster_size, img.cb
    img.flush()
    rc = img._rc()
    g0, g1 = old >> cb, -(-new // cs)
    head = _head(img, g0 << cb, old, fill) if old % cs else b""
    start = rc.end
    while start > 0 and rc.get(start - 1) == 0:
        start -= 1
    n_data = g1 - g0
    n_l2 = -(-n_data // img.l2e) + 1
    data = rc.refcount_area(start, n_data + n_l2)     # exact, the header switched
    for c in range(data, data + n_data):
        rc._set(c, 1)
    rc.end = data + n_data
    rc.flush_increments()
    cur = os.fstat(img.fd).st_size
    end = (data + n_data) << cb
    if cur < end:
        os.ftruncate(img.fd, end)
        if mode == "falloc":
            os.posix_fallocate(img.fd, cur, end - cur)
        else:
            _zeroes(img.fd, cur, end - cur)
    if head:
        dio.pwrite(img.fd, head, data << cb)     # QEMU's copy-on-write of the head
    _link(img, g0, g1, data)
    img.flush()
    img.file_size = max(img.file_size, os.fstat(img.fd).st_size)


def _link(img, g0: int, g1: int, data: int) -> None:
    """The L2 entries of [g0, g1) -> data..., one L2 table at a time; the
    old cluster of an entry freed once its table is written."""
    cb, l2e = img.cb, img.l2e
    rc = img._rc()
    gc = g0
    free_index = 0              # QEMU's free_cluster_index: first fit from here
    while gc < g1:
        l1i = gc // l2e
        stop = min(g1, (l1i + 1) * l2e)
        if not img.l1[l1i] & L1_OFFSET_MASK:
            c = _first_free(rc, free_index)
            free_index = c + 1
            rc._set(c, 1)
            rc.end = max(rc.end, c + 1)
            off = c << cb
            img.l2cache[off] = bytearray(img.cluster_size)
            img.l2dirty.add(off)
            img.l1[l1i] = off | COPIED
            img.l1_dirty = True
        for g in range(gc, stop):
            _, _, e, _ = img._entry(g)
            if e & OFFSET_MASK or e & (1 << 62):
                img._release(e)
            img._set_entry(g, ((data + g - g0) << cb) | COPIED)
        img.flush()             # the table written, then the old clusters freed
        if rc.pool:             # a free lowers the index (QEMU's update_refcount)
            free_index = min(free_index, min(rc.pool))
        gc = stop


def _head(img, start: int, old: int, fill) -> bytes:
    """The guest bytes of the cut cluster before the old end (what QEMU's
    copy-on-write reads: this image, or below it where unallocated)."""
    from ..base import Kind
    buf = bytearray(old - start)
    img.readinto(start, buf)
    if fill is not None:
        for m in img.map_host(start, old - start):
            if m.kind == Kind.UNALLOCATED:
                img._fill(fill, m.start, memoryview(buf)[m.start - start:
                                                        m.start - start + m.length])
    return bytes(buf)


def _first_free(rc, c: int) -> int:
    while rc.get(c):
        c += 1
    return c


def _zeroes(fd: int, pos: int, n: int) -> None:
    zero = bytes(min(n, 1 << 20))
    end = pos + n
    while pos < end:
        pos += dio.pwrite(fd, memoryview(zero)[:min(len(zero), end - pos)], pos)

