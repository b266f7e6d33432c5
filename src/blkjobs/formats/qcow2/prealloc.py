"""qcow2 images preallocated ``falloc`` or ``full``, laid out as QEMU 7.2's
``blockdev-create`` leaves them (``qcow2_co_create`` makes an empty image,
then ``qcow2_co_truncate`` grows it with the preallocation mode).

QEMU's steps, and the clusters they leave, for an image of ``N`` data
clusters and ``T`` L2 tables created empty (cluster 0 the header, 1 the
refcount table, 2 the refcount block):

1. the L1 table grows to ``T`` entries: allocated at cluster 3 (``L``
   clusters); the refcount blocks this run reaches into (past the first
   block's range) follow it, placed as QEMU hooks them up. Where those
   blocks need more than the first table's entries (512-byte clusters,
   8 451 523 072 bytes and up with 64-bit refcounts), the table grows
   meanwhile: the block past it counts itself, a refcount area (a table
   half as large again) comes from the next block's range, the old table
   is freed and the L1 run sought anew;
2. the refcount structures are made to cover the image to be
   (``qcow2_refcount_area``): the clusters in use, the data clusters and
   one L2 table per L2 table's worth of data clusters plus one, counted to
   a fixed point with the refcount blocks and table themselves
   (``qcow2_refcount_metadata_size``). The blocks there stay where they
   are; the others follow them, then the new refcount table, sized to a
   whole cluster of entries; the old table is freed;
3. the data clusters, contiguous after the new refcount table; the file is
   extended over them with ``fallocate`` (``falloc``) or with written zeroes
   (``full``);
4. the L2 tables, allocated in guest order at the first free clusters: the
   freed cluster 1 for the first (and the clusters a growth in step 1 left
   free), after the data for the others.

Steps 1, 2 and 4 run QEMU's allocator in memory (:class:`_Sim`), so the
layout is QEMU's wherever its refcount blocks and tables land.

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


class _Again(Exception):
    """QEMU's -EAGAIN: refcount metadata was placed, seek the run anew."""


class _Sim:
    """QEMU 7.2's cluster allocator on a fresh empty image, in memory: the
    free cluster index, the clusters in use, the refcount table (index ->
    block cluster). Runs ``qcow2_alloc_clusters`` (a run sought from the
    free index, its counts raised, restarted on -EAGAIN with the raised
    counts undone), ``alloc_refcount_block`` (a missing block at the first
    free cluster, counting itself or counted by the block of its range;
    hooked up, or, past the end of a full table, the table grown with a
    refcount area from the next block's range) and ``qcow2_refcount_area``.
    ``data`` is the data run ``[lo, hi)``, in use without a set."""

    def __init__(self, cs: int, bits: int):
        self.cs, self.bits = cs, bits
        self.rbe, self.per = cs * 8 // bits, cs // 8
        self.table = [2] + [0] * (self.per - 1)
        self.used = {0, 1, 2}
        self.free = 0
        self.rt = (1, 1)                # table cluster, clusters
        self.data = (0, 0)
        #: the tables freed, with the entries they held then (QEMU writes
        #: each hooked-up block's entry at once): their bytes stay
        self.stale: list[tuple[int, list[int]]] = []

    def busy(self, c: int) -> bool:
        return c in self.used or self.data[0] <= c < self.data[1]

    def noref(self, n: int) -> int:
        i = 0
        while i < n:
            c = self.free
            self.free += 1
            if self.data[0] <= c < self.data[1]:
                self.free, i = self.data[1], 0
            elif c in self.used:
                i = 0
            else:
                i += 1
        return self.free - n

    def dec(self, c: int) -> None:
        self.used.discard(c)
        self.free = min(self.free, c)

    def update(self, start: int, n: int) -> None:
        old = -1
        for c in range(start, start + n):
            t = c // self.rbe
            if t != old:
                try:
                    self.block(c)
                except _Again:
                    self.free = min(self.free, start)
                    for x in range(start, c):
                        self.dec(x)
                    raise
            old = t
            self.used.add(c)

    def alloc(self, n: int) -> int:
        while True:
            c = self.noref(n)
            try:
                self.update(c, n)
                return c
            except _Again:
                continue

    def block(self, c: int) -> None:
        t = c // self.rbe
        if t < len(self.table) and self.table[t]:
            return
        b = self.noref(1)
        if b // self.rbe == t:
            self.used.add(b)
        else:
            self.update(b, 1)
        if t < len(self.table):
            self.table[t] = b
            raise _Again
        used = -(-max(c + 1, b + 1) // self.rbe)
        self.area(used * self.rbe, 0, False, t, b)
        raise _Again

    def area(self, start: int, more: int, exact: bool, index: int = 0, new: int = 0) -> int:
        total = metadata_blocks(start + more, self.cs, self.bits, generous=not exact)
        size = total if exact else total + -(-total // 2)
        size = -(-size // self.per) * self.per
        table = (self.table + [0] * size)[:size]
        if new:
            table[index] = new
        at = start
        for i in range(start // self.rbe, total):
            if not table[i]:
                table[i], at = at, at + 1
        tcl = size // self.per
        self.used.update(range(start, at + tcl))
        old = self.rt
        self.stale.append((old[0], list(self.table)))   # as it is when freed
        self.table, self.rt = table, (at, tcl)
        for c in range(old[0], old[0] + old[1]):
            self.dec(c)
        return at + tcl


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
    sim = _Sim(cs, h.refcount_bits)
    # 1. the L1 table (from cluster 3), the refcount blocks it needs after it,
    # the table grown where they need a larger one
    l1 = sim.alloc(l1c) if l1c else 3
    # 2. the refcount area from the end of the clusters in use: the blocks
    # missing, then the table
    start = max(sim.used) + 1
    data = sim.area(start, ndata + -(-ndata // l2e) + 1, True)
    sim.data = (data, data + ndata)     # 3. the data clusters
    rt, tclusters = sim.rt
    # 4. the L2 tables, first fit
    l2s = [sim.alloc(1) for _ in range(nl2)]
    nblocks = len(sim.table)
    table = [c * cs for c in sim.table]
    rbe = sim.rbe
    # Written in QEMU's order: the metadata first (the L1 table, in 512-byte
    # units, the refcount table and blocks), then the data area, then the L2
    # tables and the header.
    if nl2:
        l1t = struct.pack(f">{nl2}Q", *[c * cs | _COPIED for c in l2s])
        os.pwrite(fd, l1t.ljust(-(-len(l1t) // 512) * 512, b"\0"), l1 * cs)
    for at, stale in sim.stale:     # freed tables: their bytes stay (or L2 tables cover them)
        os.pwrite(fd, struct.pack(f">{len(stale)}Q", *[c * cs for c in stale]), at * cs)
    os.pwrite(fd, struct.pack(f">{nblocks}Q", *table), rt * cs)
    enc = Refcounts.__new__(Refcounts)
    enc.bits = h.refcount_bits
    ones = enc._encode([1] * rbe)
    for b, off in enumerate(table):
        lo = b * rbe
        if not off:
            continue
        if data <= lo and lo + rbe <= data + ndata:
            os.pwrite(fd, ones, off)
        else:
            os.pwrite(fd, enc._encode([int(sim.busy(c)) for c in range(lo, lo + rbe)]), off)
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
    # the L2 tables (runs of adjacent ones in one write)
    run: list[bytes] = []
    for t, c in enumerate(l2s):
        first = data + t * l2e
        n = min(l2e, ndata - t * l2e)
        if esz == 8:
            raw = struct.pack(f">{n}Q", *range(first * cs | _COPIED, (first + n) * cs | _COPIED, cs))
        else:
            entries = [0] * (n * esz // 8)
            entries[::esz // 8] = [(first + i) * cs | _COPIED for i in range(n)]
            raw = struct.pack(f">{len(entries)}Q", *entries)
        run.append(raw.ljust(cs, b"\0"))
        if t + 1 == nl2 or l2s[t + 1] != c + 1:
            os.pwrite(fd, b"".join(run), (c + 1 - len(run)) * cs)
            run = []
    h.size, h.l1_size, h.l1_table_offset = size, nl2, l1 * cs if nl2 else 0
    h.refcount_table_offset, h.refcount_table_clusters = rt * cs, tclusters
    # the header cluster, written whole as QEMU does
    os.pwrite(fd, h.pack().ljust(cs, b"\0"), 0)
