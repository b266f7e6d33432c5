"""qcow2 ``amend -o refcount_bits=N``: the refcount structures rewritten at a
new entry width, laid out and reported as QEMU 7.2's
qcow2_change_refcount_order does, so the amended file is the same.

QEMU walks the old refcount table several times. Each allocation walk
reads every refcount in order, cut into new-width refcount blocks; a new
block that holds a non-zero refcount gets a cluster (first fit from the
start of the file, counted in the *old* structures, which is why they are
written back too). When a walk allocated something, the new table is
(re)allocated as well -- the previous copy freed first -- and the walk is
repeated, since the new clusters need refcounts too; a walk that allocates
nothing ends the loop. A last walk writes the new blocks, then the new
table is written, the header switched, and the old blocks and table freed
(now in the new blocks). The progress is reported per old table entry and
walk, ``index * size + entry`` of ``total * size``: three walks are
expected, so a fourth shows as progress going back (66.67 % to 50.00 %).

One thing QEMU does that is not modelled: an allocation past the clusters
the old refcount blocks cover, which would first add an old block. The new
blocks still cover every cluster in use (the walk reaches the last one).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from types import SimpleNamespace

from ...errors import ImageError
from ...native import dio
from .refcount import Refcounts

Status = Callable[[int, int], None] | None


class _Overflow(ImageError):
    """A refcount does not fit the new width (QEMU's text; amend raises it
    as its AmendError)."""


def change_refcount_order(drv, bits: int, status: Status = None) -> None:
    drv.flush()
    rc = drv._rc()
    ch = _Change(drv, rc, bits, status)
    ch.check_fit()
    ch.allocate()
    ch.write()
    drv.rc = None
    drv.file_size = max(drv.file_size, os.fstat(drv.fd).st_size)


class _Change:
    def __init__(self, drv, rc: Refcounts, bits: int, status: Status) -> None:
        self.drv, self.rc, self.bits, self.status = drv, rc, bits, status
        self.cs, self.cb = drv.cluster_size, drv.cb
        self.nrbe = self.cs * 8 // bits             # entries per new block
        self.old_size = len(rc.table)               # old table entries (the walks' unit)
        self.vals = [rc.get(c) for c in range(rc.end)]
        self.free_index = 0                         # QEMU's free_cluster_index after open
        self.table: list[int] = []                  # new table: block offsets
        self.table_off = 0
        self.table_clusters = 0
        self.walks = 0

    # -- the old refcounts, as QEMU's allocator sees them ----------------
    def _get(self, c: int) -> int:
        return self.vals[c] if c < len(self.vals) else 0

    def _set(self, c: int, v: int) -> None:
        if c >= len(self.vals):
            self.vals += [0] * (c + 1 - len(self.vals))
        self.vals[c] = v

    def _alloc(self, n: int) -> int:
        """First run of ``n`` free clusters from the free index (QEMU's
        alloc_clusters_noref), given refcount 1."""
        i, run = self.free_index, 0
        while run < n:
            run = run + 1 if self._get(i) == 0 else 0
            i += 1
        self.free_index = i
        for c in range(i - n, i):
            self._set(c, 1)
        return i - n

    def _free(self, first: int, n: int) -> None:
        for c in range(first, first + n):
            self._set(c, self._get(c) - 1)
            if self._get(c) == 0 and c < self.free_index:
                self.free_index = c

    # -- the walks -------------------------------------------------------
    def _report(self, index: int, total: int, upto: int | None = None) -> None:
        if self.status is None:
            return
        size = self.old_size
        for e in range(size if upto is None else upto + 1):
            self.status(index * size + e, total * size)
        if upto is None:
            self.status((index + 1) * size, total * size)

    def check_fit(self) -> None:
        """QEMU's walk stops at the first refcount too large for the new
        width, having reported the old table entries up to its own."""
        if self.bits >= 64:
            return
        for c, v in enumerate(self.vals):
            if v >> self.bits:
                self._report(0, 3, upto=c // self.rc.rbe)
                raise _Overflow(
                    f"Cannot decrease refcount entry width to {self.bits} bits: Cluster at "
                    f"offset 0x{c << self.cb:x} has a refcount of {v}")

    def allocate(self) -> None:
        per_cluster = self.cs // 8
        while True:
            self._report(self.walks, max(self.walks + 2, 3))
            self.walks += 1
            allocated = False
            j = 0
            while j * self.nrbe < len(self.vals):
                if any(self.vals[j * self.nrbe:(j + 1) * self.nrbe]):
                    if j >= len(self.table):
                        self.table += [0] * (-(-(j + 1) // per_cluster) * per_cluster
                                             - len(self.table))
                    if not self.table[j]:
                        self.table[j] = self._alloc(1)
                        allocated = True
                j += 1
            if not allocated:
                return
            if self.table_clusters:
                self._free(self.table_off, self.table_clusters)
            self.table_clusters = -(-len(self.table) * 8 // self.cs)
            self.table_off = self._alloc(self.table_clusters)

    def _new_block(self, j: int) -> bytes:
        part = self.vals[j * self.nrbe:(j + 1) * self.nrbe]
        part += [0] * (self.nrbe - len(part))
        return Refcounts._encode(SimpleNamespace(bits=self.bits), part)  # type: ignore[arg-type]

    def write(self) -> None:
        """The last walk (the new blocks), the old blocks with the walks'
        allocations (QEMU's refcount cache flush), the new table, the
        header; then the old structures freed in the new blocks."""
        drv, rc, cb = self.drv, self.rc, self.cb
        self._report(self.walks, self.walks + 1)
        for j, c in enumerate(self.table):
            if c:
                dio.pwrite(drv.fd, self._new_block(j), c << cb)
        for t in range(self.old_size):
            off = rc.block_offset(t)
            if off:
                part = self.vals[t * rc.rbe:(t + 1) * rc.rbe]
                dio.pwrite(drv.fd, rc._encode(part + [0] * (rc.rbe - len(part))), off)
        table = struct.pack(f">{len(self.table)}Q", *[c << cb for c in self.table])
        dio.pwrite(drv.fd, table.ljust(self.table_clusters * self.cs, b"\0"),
                  self.table_off << cb)
        drv._fsync()
        h = drv.header
        h.refcount_order = self.bits.bit_length() - 1
        h.refcount_table_offset = self.table_off << cb
        h.refcount_table_clusters = self.table_clusters
        drv._write_header()
        old = [rc.block_offset(t) >> cb for t in range(self.old_size) if rc.block_offset(t)]
        for c in old:
            self._free(c, 1)
        self._free(rc.table_offset >> cb, rc.table_clusters)
        touched = {c // self.nrbe for c in old} | {
            c // self.nrbe for c in range(rc.table_offset >> cb,
                                          (rc.table_offset >> cb) + rc.table_clusters)}
        for j in sorted(touched):
            if j < len(self.table) and self.table[j]:
                dio.pwrite(drv.fd, self._new_block(j), self.table[j] << cb)
        drv._fsync()
