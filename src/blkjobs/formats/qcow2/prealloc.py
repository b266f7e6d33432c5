"""qcow2 images preallocated ``falloc`` or ``full``, laid out as QEMU 7.2's
``blockdev-create`` leaves them (``qcow2_co_create`` makes an empty image,
then ``qcow2_co_truncate`` grows it with the preallocation mode).

QEMU's steps, and the clusters they leave, for an image of ``N`` data
clusters and ``T`` L2 tables created empty (cluster 0 the header, 1 the
refcount table, 2 the refcount block):

1. the L1 table grows to ``T`` entries: allocated at cluster 3 (``L``
   clusters);
2. the refcount structures are made to cover the image to be: a new
   refcount table right after the L1 table (cluster ``3 + L``), the old one
   (cluster 1) freed; the refcount block stays where it is when it covers
   everything (the only case handled here);
3. the data clusters, contiguous after the new refcount table; the file is
   extended over them with ``fallocate`` (``falloc``) or with written zeroes
   (``full``);
4. the L2 tables, allocated in guest order at the first free clusters: the
   freed cluster 1 for the first, after the data for the others.

Every L2 entry then points at its data cluster (a normal allocated cluster,
reading what the file holds there: zeroes). ``qemu-img map``, ``check`` and
the file's allocation are QEMU's (tests/test_daemon_create.py).
"""
from __future__ import annotations

import os
import struct

from ...errors import UsageError
from .header import parse_header
from .refcount import Refcounts

_COPIED = 1 << 63
_ZEROS = bytes(1 << 20)


def preallocate(path: str, size: int, mode: str) -> None:
    """Grow the empty qcow2 image at ``path`` (as :func:`.create.create`
    makes it with size 0) to ``size`` bytes, every cluster allocated, with
    preallocation ``mode`` ``falloc`` or ``full``."""
    if mode not in ("falloc", "full"):
        raise UsageError(f"preallocate: mode {mode!r} is not falloc or full")
    fd = os.open(path, os.O_RDWR)
    try:
        h = parse_header(os.pread(fd, 1 << 21, 0), os.fstat(fd).st_size, path)
        cs = h.cluster_size
        if h.extended_l2:
            raise UsageError("blkjobs does not preallocate (falloc, full) images with "
                             "extended L2 entries")
        if h.l1_size or h.refcount_table_offset != cs or h.refcount_table_clusters != 1:
            raise UsageError(f"preallocate: '{path}' is not a freshly created empty image")
        l2e = cs // 8
        ndata = -(-size // cs)
        nl2 = -(-size // (cs * l2e))
        l1c = -(-nl2 * 8 // cs)
        rt = 3 + l1c                    # the new refcount table
        start = rt + 1                  # the data clusters
        rbe = cs * 8 // h.refcount_bits
        # QEMU sizes the refcount area for the data, their L2 tables and one more
        if rt + 1 + ndata + -(-ndata // l2e) + 1 > rbe:
            raise UsageError(f"blkjobs preallocates (falloc, full) qcow2 images only as far "
                             f"as one refcount block reaches ({rbe} clusters of {cs} bytes "
                             f"with {h.refcount_bits}-bit refcounts)")
        l2s = ([1] + [start + ndata + i for i in range(nl2 - 1)])[:nl2]
        used = [0, 2, *range(3, 3 + l1c), rt, *range(start, start + ndata), *l2s]
        # 2. the refcount table, then 3. the data area
        os.pwrite(fd, struct.pack(">Q", 2 * cs).ljust(cs, b"\0"), rt * cs)
        data_end = (start + ndata) * cs
        if mode == "falloc":
            os.posix_fallocate(fd, start * cs, data_end - start * cs)
        else:
            pos = start * cs
            while pos < data_end:
                pos += os.pwrite(fd, _ZEROS[:min(len(_ZEROS), data_end - pos)], pos)
        # 4. the L2 tables; 1. the L1 table (QEMU writes it in 512-byte units)
        for t, c in enumerate(l2s):
            first = start + t * l2e
            n = min(l2e, ndata - t * l2e)
            entries = [(first + i) * cs | _COPIED for i in range(n)]
            os.pwrite(fd, struct.pack(f">{n}Q", *entries).ljust(cs, b"\0"), c * cs)
        if nl2:
            l1 = struct.pack(f">{nl2}Q", *[c * cs | _COPIED for c in l2s])
            os.pwrite(fd, l1.ljust(-(-len(l1) // 512) * 512, b"\0"), 3 * cs)
        refs = [0] * rbe
        for c in used:
            refs[c] = 1
        enc = Refcounts.__new__(Refcounts)
        enc.bits = h.refcount_bits
        os.pwrite(fd, enc._encode(refs), 2 * cs)
        h.size, h.l1_size, h.l1_table_offset = size, nl2, 3 * cs if nl2 else 0
        h.refcount_table_offset = rt * cs
        # the header cluster, written whole as QEMU does
        os.pwrite(fd, h.pack().ljust(cs, b"\0"), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
