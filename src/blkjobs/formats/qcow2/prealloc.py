"""qcow2 images preallocated ``falloc`` or ``full``, laid out as QEMU 7.2's
``blockdev-create`` leaves them (``qcow2_co_create`` makes an empty image,
then ``qcow2_co_truncate`` grows it with the preallocation mode).

QEMU's steps, and the clusters they leave, for an image of ``N`` data
clusters and ``T`` L2 tables created empty (cluster 0 the header, 1 the
refcount table, 2 the refcount block):

1. the L1 table grows to ``T`` entries: allocated at cluster 3 (``L``
   clusters); the refcount blocks this run reaches into (past the first
   block's range) follow it, placed as QEMU hooks them up;
2. the refcount structures are made to cover the image to be
   (``qcow2_refcount_area``): the clusters in use, the data clusters and
   one L2 table per L2 table's worth of data clusters plus one, counted to
   a fixed point with the refcount blocks and table themselves
   (``qcow2_refcount_metadata_size``). The blocks there stay where they
   are; the others follow them, then the new refcount table, sized to a
   whole cluster of entries; the old table (cluster 1) is freed. Refused
   only where the L1 table alone would need a larger refcount table;
3. the data clusters, contiguous after the new refcount table; the file is
   extended over them with ``fallocate`` (``falloc``) or with written zeroes
   (``full``);
4. the L2 tables, allocated in guest order at the first free clusters: the
   freed cluster 1 for the first, after the data for the others.

Every L2 entry then points at its data cluster (a normal allocated cluster,
reading what the file holds there: zeroes). With extended L2 entries (16
bytes an entry) the subcluster bitmaps stay 0: QEMU links preallocated
clusters without marking their subclusters allocated. ``qemu-img map``, ``check`` and
the file's allocation are QEMU's (tests/test_daemon_create.py).
"""
from __future__ import annotations

import os
import struct

from ...errors import UsageError
from .header import Header, parse_header
from .refcount import Refcounts, metadata_blocks

_COPIED = 1 << 63
_ZEROS = bytes(1 << 20)


def refcount_blocks(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """How many refcount blocks cover ``clusters`` clusters and the refcount
    blocks and table themselves: QEMU's qcow2_refcount_metadata_size (no
    generous increase), a fixed point."""
    return metadata_blocks(clusters, cluster_size, refcount_bits)


def _l1_blocks(table: dict[int, int], first: int, n: int, rbe: int) -> int:
    """The refcount blocks QEMU hooks up while it allocates the L1 table's
    run ``[first, first + n)`` (qcow2_grow_l1_table): each block the run
    lacks, in cluster order, at the first free cluster after the run; a
    block outside its own range is counted by the block of that range,
    placed right after it. Enters them in ``table`` (index -> cluster) and
    returns the first free cluster after them."""
    end = first + n

    def ensure(c: int) -> None:
        nonlocal end
        t = c // rbe
        if t in table:
            return
        table[t] = b = end
        end += 1
        ensure(b)
    for t in range(first // rbe, (first + n - 1) // rbe + 1):
        ensure(max(first, t * rbe))
    return end


def preallocate(path: str, size: int, mode: str) -> None:
    """Grow the empty qcow2 image at ``path`` (as :func:`.create.create`
    makes it with size 0) to ``size`` bytes, every cluster allocated, with
    preallocation ``mode`` ``falloc`` or ``full``."""
    if mode not in ("falloc", "full"):
        raise UsageError(f"preallocate: mode {mode!r} is not falloc or full")
    fd = os.open(path, os.O_RDWR)
    try:
        h = parse_header(os.pread(fd, 1 << 21, 0), os.fstat(fd).st_size, path)
        if h.l1_size or h.refcount_table_offset != h.cluster_size or \
                h.refcount_table_clusters != 1:
            raise UsageError(f"preallocate: '{path}' is not a freshly created empty image")
        _grow(fd, h, size, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _grow(fd: int, h: Header, size: int, mode: str) -> None:
    """The steps of the module docstring on the open image ``fd``."""
    cs, esz = h.cluster_size, 16 if h.extended_l2 else 8
    l2e = cs // esz
    ndata = -(-size // cs)
    nl2 = -(-size // (cs * l2e))
    l1c = -(-nl2 * 8 // cs)
    rbe, per = cs * 8 // h.refcount_bits, cs // 8
    # 1. the L1 table at cluster 3, the refcount blocks it reaches into after it
    blocks = {0: 2}
    start = _l1_blocks(blocks, 3, l1c, rbe) if l1c else 3
    if max(blocks) >= per:
        raise UsageError(f"blkjobs preallocates (falloc, full) qcow2 images only while "
                         f"their L1 table needs no larger refcount table ({per * rbe} "
                         f"clusters of {cs} bytes with {h.refcount_bits}-bit refcounts)")
    # 2. the refcount area: the blocks missing from ``start`` on, then the table
    nblocks = refcount_blocks(start + ndata + -(-ndata // l2e) + 1, cs, h.refcount_bits)
    rt = start
    for i in range(start // rbe, nblocks):
        if i not in blocks:
            blocks[i], rt = rt, rt + 1
    tclusters = -(-nblocks * 8 // cs)
    data = rt + tclusters               # 3. the data clusters
    l2s = ([1] + [data + ndata + i for i in range(nl2 - 1)])[:nl2]
    table = [blocks[i] * cs for i in range(nblocks)]
    if nl2:         # 1. the L1 table (QEMU writes it in 512-byte units)
        l1 = struct.pack(f">{nl2}Q", *[c * cs | _COPIED for c in l2s])
        os.pwrite(fd, l1.ljust(-(-len(l1) // 512) * 512, b"\0"), 3 * cs)
    os.pwrite(fd, struct.pack(f">{nblocks}Q", *table).ljust(tclusters * cs, b"\0"), rt * cs)
    used = [0, *blocks.values(), *range(3, 3 + l1c), *range(start, data + ndata), *l2s]
    refs = [0] * (nblocks * rbe)
    for c in used:
        refs[c] = 1
    enc = Refcounts.__new__(Refcounts)
    enc.bits = h.refcount_bits
    for b, off in enumerate(table):
        os.pwrite(fd, enc._encode(refs[b * rbe:(b + 1) * rbe]), off)
    # The metadata written so far gets its blocks before the data area does,
    # as in QEMU (which syncs after each metadata update): with delayed
    # allocation the file system would otherwise place the data first and
    # the file would end up with other extents than QEMU's (ext4: one more
    # extent-tree block once the data is written, qemu-iotests 125).
    os.fdatasync(fd)
    data_end = (data + ndata) * cs
    if mode == "falloc":
        if ndata:
            os.posix_fallocate(fd, data * cs, data_end - data * cs)
    else:
        # QEMU's file driver: the new length first, then zeroes in 64 KiB
        # writes from the old end, then fsync
        pos = data * cs
        os.ftruncate(fd, data_end)
        while pos < data_end:
            pos += os.pwrite(fd, _ZEROS[:min(1 << 16, data_end - pos)], pos)
        os.fsync(fd)
    # 4. the L2 tables
    for t, c in enumerate(l2s):
        first = data + t * l2e
        n = min(l2e, ndata - t * l2e)
        entries = [0] * (n * esz // 8)
        entries[::esz // 8] = [(first + i) * cs | _COPIED for i in range(n)]
        os.pwrite(fd, struct.pack(f">{len(entries)}Q", *entries).ljust(cs, b"\0"), c * cs)
    h.size, h.l1_size, h.l1_table_offset = size, nl2, 3 * cs if nl2 else 0
    h.refcount_table_offset, h.refcount_table_clusters = rt * cs, tclusters
    # the header cluster, written whole as QEMU does
    os.pwrite(fd, h.pack().ljust(cs, b"\0"), 0)
