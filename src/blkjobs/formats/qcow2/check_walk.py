"""The reference count of every host cluster, counted as ``qemu-img check``
counts it (qemu's calculate_refcounts: the header, the active L1 with its L2
tables and data, every snapshot's L1/L2/data, the snapshot table, the
refcount table, the LUKS area, the bitmaps, and last the refcount blocks),
with qemu-img's diagnostics in qemu-img's order and words.

The counts live in ``refs`` (host cluster -> count), capped at the image's
largest refcount like qemu's in-memory refcount table: one more reference
is an ``overflow`` corruption. A region is counted from the start of its
first cluster to the end of its last, aligned or not (an unaligned L2 or
data offset is reported and still counted, as qemu-img does).
"""
from __future__ import annotations

import os
import struct

from .header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, read_bitmap_directory
from .tables import COMPRESSED, COPIED, L1_RESERVED, OFFSET_MASK, STD_RESERVED, ZERO, L2Tables
from ...native import dio

ALL_ALLOC = 0xFFFFFFFF
ALL_ZERO = ALL_ALLOC << 32
MAX_L1_BYTES = 32 << 20     # QCOW_MAX_L1_SIZE
REFT_RESERVED = 0x1FF


class Walker:
    """The counting half of one check pass (:class:`.check.Checker`)."""

    def __init__(self, img: L2Tables, repair: str | None) -> None:
        self.img = img
        self.repair = repair
        self.fd: int = img.fd
        self.cs: int = img.cluster_size
        self.cb: int = img.cb
        self.h = img.header
        self.file_size = os.fstat(self.fd).st_size
        self.nfile = -(-self.file_size // self.cs)      # clusters in the file
        self.esz = 16 if img.extended else 8
        self.max_ref = (1 << (1 << self.h.refcount_order)) - 1
        self.refs: dict[int, int] = {}    # (not a Counter: collections at start-up)
        self.msgs: list[str] = []
        self.corrupt = 0
        self.check_errors = 0
        self.leaks = 0
        self.allocated = self.fragmented = self.compressed = 0
        self.fixed_leaks = self.fixed_corruptions = 0
        self.rebuild = False        # the refcount structure must be rebuilt
        #: the snapshots' (id, name, L1 offset, L1 entries) and the table's size
        self.snaps: list[tuple[str, str, int, int]] = []
        self.snap_size = 0

    def error(self, msg: str) -> None:
        self.msgs.append(msg)
        self.corrupt += 1

    def ref_range(self, off: int, nbytes: int) -> None:
        """qcow2_inc_refcounts_imrt: count a reference to every cluster of
        [off, off+nbytes). A region ending a cluster or more past the end of
        the file is a corruption and is not counted (so hostile offsets
        cannot grow ``refs``)."""
        if nbytes <= 0:
            return
        if off + nbytes - self.file_size >= self.cs:
            self.error("ERROR: counting reference for region exceeding the end of the file "
                       f"by one cluster or more: offset 0x{off:x} size 0x{nbytes:x}")
            return
        refs = self.refs
        for c in range(off >> self.cb, ((off + nbytes - 1) >> self.cb) + 1):
            n = refs.get(c, 0)
            if n >= self.max_ref:
                self.error(f"ERROR: overflow cluster offset=0x{c << self.cb:x}")
                self.msgs.append("Use qemu-img amend to increase the refcount entry width or "
                                 "qemu-img convert to create a clean copy if the image cannot "
                                 "be opened for writing")
                continue
            refs[c] = n + 1

    def pread(self, off: int, n: int) -> bytes:
        """``n`` bytes at ``off``; zeroes past the end of the file (what a
        read of the file there gives qemu)."""
        d = dio.pread(self.fd, n, off) if off < self.file_size else b""
        return d + bytes(n - len(d))

    def walk_all(self) -> None:
        """Count the references of every structure (qemu's calculate_refcounts)."""
        h = self.h
        self.ref_range(0, self.cs)
        if not self.img.read_only:
            self.img.flush()
        self.walk_l1(h.l1_table_offset, h.l1_size, True)
        if self.img.external and self.snaps:
            self.error(f"ERROR {len(self.snaps)} snapshots in image with data file")
        for sid, name, l1_off, l1_n in self.snaps:
            if l1_off % self.cs:
                self.error(f"ERROR snapshot {sid} ({name}) l1_offset={l1_off:#x}: L1 table is "
                           "not cluster aligned; snapshot table entry corrupted")
            elif l1_n > MAX_L1_BYTES // 8:
                self.error(f"ERROR snapshot {sid} ({name}) l1_size={l1_n:#x}: L1 table is too "
                           "large; snapshot table entry corrupted")
            else:
                self.walk_l1(l1_off, l1_n, False)
        self.ref_range(h.snapshots_offset, self.snap_size)
        self.ref_range(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        crypt = h.ext(0x0537BE77)    # the LUKS area (qcow2/crypt.py)
        if crypt is not None and len(crypt) >= 16:
            self.ref_range(*struct.unpack(">QQ", crypt[:16]))
        self.walk_bitmaps()
        self.walk_refblocks()

    def walk_l1(self, l1_off: int, l1_size: int, active: bool) -> None:
        """check_refcounts_l1: an L1 table, its L2 tables and their data
        clusters (``active``: the image's own, else a snapshot's)."""
        if not l1_size:
            return
        self.ref_range(l1_off, l1_size * 8)
        for e in struct.unpack(f">{l1_size}Q", self.pread(l1_off, l1_size * 8)):
            if not e:
                continue
            if e & L1_RESERVED:
                self.error(f"ERROR found L1 entry with reserved bits set: {e:x}")
            off = e & OFFSET_MASK
            self.ref_range(off, self.cs)
            if off % self.cs:
                self.error(f"ERROR l2_offset={off:x}: Table is not cluster aligned; "
                           "L1 entry corrupted")
            self.walk_l2(off, active)

    # long because: one case per cluster type, in qemu's check_refcounts_l2 order
    def walk_l2(self, off: int, active: bool) -> None:
        """check_refcounts_l2: the entries of the L2 table at host ``off``."""
        ext = self.img.extended
        raw = self.pread(off, self.img.l2e * self.esz)
        vals = struct.unpack(f">{len(raw) // 8}Q", raw)
        next_host = 0
        for j in range(self.img.l2e):
            le = vals[j * self.esz // 8]
            bm = vals[j * 2 + 1] if ext else 0
            if not le & COMPRESSED and le & STD_RESERVED:
                self.error(f"ERROR found l2 entry with reserved bits set: {le:x}")
            if le & COMPRESSED:
                self.walk_compressed(j, le, bm, active)
                continue
            hoff = le & OFFSET_MASK
            data_file = self.img.external   # data clusters in a data file: no refcounts
            if le & ZERO and not ext and not hoff:
                continue                                    # zero, plain
            if not hoff and not (data_file and le & COPIED):    # unallocated
                if bm & ALL_ALLOC:
                    self.error("ERROR: Unallocated cluster has non-zero subcluster "
                               "allocation map")
                continue
            if (bm >> 32) & bm:
                self.error(f"ERROR offset={hoff:x}: Allocated cluster has corrupted "
                           "subcluster allocation bitmap")
            if hoff % self.cs:
                has_data = bool(bm & ALL_ALLOC) if ext else not le & ZERO
                if has_data:
                    self.error(f"ERROR offset={hoff:x}: Data cluster is not properly "
                               "aligned; L2 entry corrupted.")
                else:
                    fix = self.repair == "all"
                    self.error(f"{'Repairing' if fix else 'ERROR'} offset={hoff:x}: "
                               "Preallocated cluster is not properly aligned; L2 entry "
                               "corrupted.")
                    if fix and self.zero_entry(off, j, bm):
                        continue
            if active:
                self.allocated += 1
                if next_host and hoff != next_host:
                    self.fragmented += 1
                next_host = hoff + self.cs
            if not data_file:
                self.ref_range(hoff, self.cs)

    def zero_entry(self, l2_off: int, j: int, bm: int) -> bool:
        """fix_l2_entry_by_zero: the entry becomes a zero cluster (extended
        L2: its allocated subclusters zero); written through at once."""
        if self.img.extended:
            bm = (bm | (bm << 32)) & ALL_ZERO
            new = struct.pack(">QQ", 0, bm)
        else:
            new = struct.pack(">Q", ZERO)
        dio.pwrite(self.fd, new, l2_off + j * self.esz)
        os.fsync(self.fd)
        self.img.l2cache.pop(l2_off, None)
        self.corrupt -= 1
        self.fixed_corruptions += 1
        return True

    def walk_compressed(self, j: int, le: int, bm: int, active: bool) -> None:
        """A compressed cluster's L2 entry ``le`` (``bm``: its bitmap)."""
        img = self.img
        if le & COPIED:
            self.error(f"ERROR: coffset=0x{le & img._coff_mask:x}: copied flag "
                       "must never be set for compressed clusters")
        if img.external:
            self.error(f"ERROR compressed cluster {j} with data file, entry=0x{le & ~COPIED:x}")
            return
        if bm:
            self.error(f"ERROR compressed cluster {j} with non-zero subcluster allocation "
                       f"bitmap, entry=0x{le & ~COPIED:x}")
            return
        coff = le & img._coff_mask
        nsec = (le >> (62 - img._csec_bits)) & ((1 << img._csec_bits) - 1)
        self.ref_range(coff, (nsec + 1) * 512 - (coff & 511))
        if active:
            self.allocated += 1
            self.compressed += 1
            self.fragmented += 1

    def walk_bitmaps(self) -> None:
        """The bitmap directory, tables and data. The directory and its
        entries were validated (and bounded) at open; each table is at most
        BME_MAX_PHYS_SIZE / cluster_size entries."""
        h, cs = self.h, self.cs
        bext = h.ext(EXT_BITMAPS)
        if bext is None or not h.autoclear & AUTOCLEAR_BITMAPS:
            return
        _, _, dsize, doff = struct.unpack(">IIQQ", bext)
        self.ref_range(doff, dsize)
        for bm in read_bitmap_directory(self.fd, h, self.file_size, self.img.filename):
            self.ref_range(bm.table_offset, bm.table_size * 8)
            tab = self.pread(bm.table_offset, bm.table_size * 8)
            for i, (be,) in enumerate(struct.iter_unpack(">Q", tab)):
                if be & 0xFF000000000001FE or (be & OFFSET_MASK and (be & 1 or
                                                                   (be & OFFSET_MASK) % cs)):
                    self.error(f"ERROR bitmap table entry {i} of bitmap '{bm.name}' "
                               f"is corrupt: 0x{be:x}")
                elif be & OFFSET_MASK:
                    self.ref_range(be & OFFSET_MASK, cs)

    def reftable_entries(self) -> list[tuple[int, int]]:
        """(index, entry) of each non-zero refcount table entry, in order. A
        zero entry counts nothing and is no error, so the table is scanned a
        page at a time (one bytes comparison per page) and only the pages
        holding something are unpacked: a table of 8192 entries with 1 used
        costs a few microseconds, not one Python step per entry."""
        h = self.h
        raw = self.pread(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        out: list[tuple[int, int]] = []
        page = 4096
        zero = bytes(page)
        for base in range(0, len(raw), page):
            chunk = raw[base:base + page]
            if chunk == zero[:len(chunk)]:
                continue
            vals = struct.unpack(f">{len(chunk) // 8}Q", chunk)
            first = base // 8
            out.extend((first + i, e) for i, e in enumerate(vals) if e)
        return out

    def walk_refblocks(self) -> None:
        """check_refblocks: every refcount block, referenced exactly once."""
        # the clusters qemu's in-memory table covers: the file's, or up to
        # the last cluster counted past its end; grows only when a block
        # outside the image is repaired (the refs counted below are inside)
        limit = max(self.nfile, max(self.refs, default=-1) + 1)
        for t, e in self.reftable_entries():
            off = e & ~REFT_RESERVED
            c = off >> self.cb
            if e & REFT_RESERVED:
                self.error(f"ERROR refcount table entry {t} has reserved bits set")
                self.rebuild = True
                continue
            if off % self.cs:
                self.error(f"ERROR refcount block {t} is not cluster aligned; "
                           "refcount table entry corrupted")
                self.rebuild = True
                continue
            if c >= limit:
                fix = self.repair == "all"
                self.error(f"{'Repairing' if fix else 'ERROR'} refcount block {t} "
                           "is outside image")
                if fix:
                    os.ftruncate(self.fd, off + self.cs)
                    self.file_size = off + self.cs
                    self.nfile = c + 1
                    limit = max(limit, c + 1)
                    self.corrupt -= 1
                    self.fixed_corruptions += 1
                    self.ref_range(off, self.cs)
                continue
            if off:
                self.ref_range(off, self.cs)
                if self.refs.get(c, 0) != 1:
                    self.error(f"ERROR refcount block {t} refcount={self.refs.get(c, 0)}")
                    self.rebuild = True
