"""Consistency check and repair, judged like ``qemu-img check``.

Walks every structure that occupies the file (header, active L1/L2 and data,
snapshot table and snapshot L1/L2/data, refcount table and blocks, bitmap
directory/tables/data), counts the references of every host cluster, and
compares them with the stored refcounts (docs/qcow2.md §10). Leaks: stored >
references; corruptions: stored < references, malformed entries, COPIED
flags disagreeing with refcount 1.

``repair='leaks'`` lowers leaked refcounts; ``repair='all'`` also raises too
low refcounts (allocating a missing refcount block if needed) and fixes
COPIED flags. After a repair the image is checked again and the result is
that of the re-check plus ``leaks-fixed`` / ``corruptions-fixed`` (what
``qemu-img check -r`` reports).
"""
from __future__ import annotations

import itertools
import os
import struct
from collections import Counter
from typing import Any

from ...errors import ImageError
from .header import (AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
                     read_bitmap_directory)
from .refcount import Refcounts
from .tables import COMPRESSED, COPIED, L1_RESERVED, OFFSET_MASK, STD_RESERVED, L2Tables


class CheckResult(dict):
    """The ``qemu-img check --output json`` object; ``messages`` holds the
    per-cluster lines qemu-img prints on stderr."""

    messages: list[str]
    failed: str | None = None     # set: qemu-img's "Check failed: <failed>" (exit 1)


def check(img: L2Tables, repair: str | None = None) -> CheckResult:
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    if repair and img.read_only:
        raise ImageError(f"'{img.filename}': repair needs the image opened read/write")
    if not img.read_only:
        img.flush()
    h = img.header
    if repair and h.autoclear & ~AUTOCLEAR_KNOWN:     # as qemu-img's read/write open
        h.autoclear &= AUTOCLEAR_KNOWN
        img._write_header()
    res = Checker(img, repair).run()
    if repair and not (res.check_errors or res.corrupt):
        _mark_clean(img)
    if repair and (res.fixed_leaks or res.fixed_corruptions):
        img.flush()
        again = Checker(img, None).run()
        out = again.result
        if res.fixed_leaks:
            out["leaks-fixed"] = res.fixed_leaks
        if res.fixed_corruptions:
            out["corruptions-fixed"] = res.fixed_corruptions
        out.messages = res.result.messages + again.result.messages
        return out
    return res.result


def _mark_clean(img: L2Tables) -> None:
    """A repair that left no corruption clears the dirty and corrupt bits
    (qemu's qcow2_mark_clean and qcow2_mark_consistent)."""
    img.flush()
    h = img.header
    if h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
        h.incompatible &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        img._write_header()


class Checker:
    """One pass of the check over the open qcow2 image ``img``.

    :meth:`run` takes the steps in order: every structure that occupies the
    file adds its references to ``refs`` (host cluster -> count) and its
    errors to ``msgs`` / ``corrupt``; then the counts are compared with the
    stored refcounts and, as ``repair`` asks, refcounts and COPIED flags are
    fixed (``fixed_leaks`` / ``fixed_corruptions``). ``result`` is the
    :class:`CheckResult`."""

    rc: Refcounts       # the image's, taken once the walk reaches them

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
        self.refs: Counter[int] = Counter()
        self.msgs: list[str] = []
        self.corrupt = 0
        self.check_errors = 0
        self.leaks = 0
        self.allocated = self.fragmented = self.compressed = 0
        self.next_host = 0          # active L1 walk: where a contiguous data cluster would be
        self.copied_checks: list[tuple[str, Any, int, int]] = []  # (kind, where, entry, cluster)
        self.fixed_leaks = self.fixed_corruptions = 0
        self.end_cluster = 0
        self.rebuild = False        # a stored refcount 0 under a reference
        self.nb = 0                 # clusters the rebuild's counted references cover
        self.failed: str | None = None   # the check could not complete (why)
        self.result = CheckResult()

    def run(self) -> Checker:
        self.walk_all()
        self.compare_refcounts()
        if self.failed:
            self.result = self.report()
            return self
        self.check_copied_flags()
        self.result = self.report()
        return self

    def walk_all(self) -> None:
        """Count the references of every structure (qemu's calculate_refcounts)."""
        self.walk_header()
        # the active L1 (in memory when open read/write: flushed first)
        if not self.img.read_only:
            self.img.flush()
        self.walk_l1(self.h.l1_table_offset, self.h.l1_size, True)
        self.walk_snapshots()
        self.rc = self.img._rc()
        self.walk_refcounts()
        self.walk_bitmaps()

    # ------------------------------------------------------------------
    # helpers
    def error(self, msg: str) -> None:
        self.msgs.append(msg)
        self.corrupt += 1

    def ref_range(self, off: int, nbytes: int) -> None:
        """Count a reference to [off, off+nbytes). Like qemu-img, a region
        ending a cluster or more past the end of the file is a corruption
        and is not counted (so hostile offsets cannot grow ``refs``)."""
        if nbytes <= 0:
            return
        if off + nbytes - self.file_size >= self.cs:
            self.error("ERROR: counting reference for region exceeding the end of the file "
                       f"by one cluster or more: offset 0x{off:x} size 0x{nbytes:x}")
            return
        for c in range(off >> self.cb, ((off + nbytes - 1) >> self.cb) + 1):
            self.refs[c] += 1

    def pread(self, off: int, n: int) -> bytes | None:
        if off < 0 or n < 0 or off + n > self.file_size:
            return None
        d = os.pread(self.fd, n, off)
        return d if len(d) == n else None

    # ------------------------------------------------------------------
    # the walk
    def walk_header(self) -> None:
        self.refs[0] += 1
        crypt = self.h.ext(0x0537BE77)    # the LUKS area (qcow2/crypt.py)
        if crypt is not None and len(crypt) >= 16:
            self.ref_range(*struct.unpack(">QQ", crypt[:16]))

    def walk_l1(self, l1_off: int, l1_size: int, active: bool) -> None:
        """An L1 table, its L2 tables and their data clusters (``active``:
        the image's own, else a snapshot's)."""
        self.ref_range(l1_off, l1_size * 8)
        raw = self.pread(l1_off, l1_size * 8)
        if raw is None:
            self.error(f"ERROR L1 table at 0x{l1_off:x} beyond the end of the file")
            return
        self.next_host = 0
        for i, e in enumerate(struct.unpack(f">{l1_size}Q", raw)):
            off = e & OFFSET_MASK
            if e & L1_RESERVED:
                self.error(f"ERROR L1 entry {i} has reserved bits set: 0x{e:x}")
                continue
            if not off:
                continue
            if off % self.cs:
                self.error(f"ERROR l2_offset={off:x}: Table is not cluster aligned; "
                           "L1 entry corrupted")
                continue
            self.ref_range(off, self.cs)
            if active:
                self.copied_checks.append(("L2", i, e, off >> self.cb))
            t: bytes | None
            if active and self.img.l2cache.get(off) is not None:
                t = bytes(self.img.l2cache[off])
            else:
                t = self.pread(off, self.cs)
            if t is None:
                self.error(f"ERROR L2 table at 0x{off:x} beyond the end of the file")
                continue
            self.walk_l2(off, t, active)

    def walk_l2(self, off: int, t: bytes, active: bool) -> None:
        """The entries of the L2 table at host ``off`` (its bytes: ``t``)."""
        extended = self.img.extended
        vals = struct.unpack(f">{self.cs // 8}Q", t)
        for j in range(self.img.l2e):
            le = vals[j * self.esz // 8]
            bm = vals[j * 2 + 1] if extended else 0
            if le == 0 and bm == 0:
                continue
            if le & COMPRESSED:
                self.walk_compressed(le, bm, active)
                continue
            if le & STD_RESERVED or (extended and le & 1):
                self.error(f"ERROR L2 entry has reserved bits set: 0x{le:x}")
                continue
            if extended and (bm & 0xFFFFFFFF) & (bm >> 32):
                self.error(f"ERROR subcluster both allocated and zero: bitmap 0x{bm:x}")
            hoff = le & OFFSET_MASK
            if extended and (bm & 0xFFFFFFFF) and not hoff:
                self.error("ERROR unallocated cluster with allocated subclusters")
            ext = self.img.external     # data file clusters: no refcounts (refcount 1)
            if not hoff and not (ext and le & COPIED):
                continue
            if hoff % self.cs:
                self.error(f"ERROR offset={hoff:x}: Data cluster is not properly aligned; "
                           "L2 entry corrupted.")
                continue
            if not ext:
                self.ref_range(hoff, self.cs)
            if active:
                self.allocated += 1
                if self.next_host and hoff != self.next_host:
                    self.fragmented += 1
                self.next_host = hoff + self.cs
                if not ext:
                    self.copied_checks.append(("data", (off, j), le, hoff >> self.cb))

    def walk_compressed(self, le: int, bm: int, active: bool) -> None:
        """A compressed cluster's L2 entry ``le`` (``bm``: its bitmap)."""
        img = self.img
        if le & COPIED:
            self.error(f"ERROR: coffset=0x{le & img._coff_mask:x}: copied flag "
                       "must never be set for compressed clusters")
        if bm:
            self.error("ERROR compressed cluster with a subcluster bitmap")
        coff = le & img._coff_mask
        nsec = (le >> (62 - img._csec_bits)) & ((1 << img._csec_bits) - 1)
        self.ref_range(coff, (nsec + 1) * 512 - (coff & 511))
        if active:
            self.allocated += 1
            self.compressed += 1
            self.fragmented += 1

    def walk_snapshots(self) -> None:
        """The snapshot table and every snapshot's L1 table."""
        h, cs = self.h, self.cs
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            hd = self.pread(pos, 40)
            if hd is None:
                self.error("ERROR snapshot table beyond the end of the file")
                break
            s_l1, s_l1n, idl, nml, _, _, _, _, extra = struct.unpack(">QIHHIIQII", hd)
            if s_l1 % cs or s_l1n * 8 > (32 << 20):
                self.error(f"ERROR snapshot L1 table at 0x{s_l1:x} is invalid")
            else:
                self.walk_l1(s_l1, s_l1n, False)
            ln = 40 + extra + idl + nml
            pos += ln + (-ln % 8)
        self.ref_range(h.snapshots_offset, pos - h.snapshots_offset)

    def walk_refcounts(self) -> None:
        """The refcount table and blocks."""
        h, cs, rc = self.h, self.cs, self.rc
        self.ref_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
        for t, e in enumerate(rc.table):
            if not e:
                continue
            off = e & 0xFFFFFFFFFFFFFE00
            if e & 0x1FF or off % cs:
                self.error(f"ERROR refcount block {t} is not cluster aligned; "
                           "refcount table corrupted")
                continue
            if off >= self.file_size and t not in rc.blocks:
                self.error(f"ERROR refcount block {t} is outside image")
                continue
            self.ref_range(off, cs)

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
            if tab is None:
                continue
            for i, (be,) in enumerate(struct.iter_unpack(">Q", tab)):
                if be & 0xFF000000000001FE or (be & OFFSET_MASK and (be & 1 or
                                                                   (be & OFFSET_MASK) % cs)):
                    self.error(f"ERROR bitmap table entry {i} of bitmap '{bm.name}' "
                               f"is corrupt: 0x{be:x}")
                elif be & OFFSET_MASK:
                    self.ref_range(be & OFFSET_MASK, cs)

    # ------------------------------------------------------------------
    # leaks, corruptions, repair
    def stored(self, c: int) -> int:
        """The stored refcount of cluster c (0 when its block is unreadable)."""
        try:
            return self.rc.get(c)
        except ImageError:
            return 0

    def compare_refcounts(self) -> None:
        """Stored refcounts against the references counted, as qemu-img's
        qcow2_check_refcounts: a first comparison only reports (leaks: stored
        more; corruptions: stored fewer; a stored 0 under a reference means
        the refcount structure must be rebuilt); then, as ``repair`` asks,
        either the structure is rebuilt (``-r all``) or the mismatches are
        compared again and fixed one by one."""
        clusters = self._clusters()
        before = (self.corrupt, self.leaks)
        self._compare(clusters, None)
        if not self.repair:
            return
        if self.rebuild and self.repair == "all":
            self.msgs.append("Rebuilding refcount structure")
            self.rebuild_refcounts()
        elif self.rebuild:
            self.msgs.append("ERROR need to rebuild refcount structures")
            self.check_errors += 1
            self.failed = "Input/output error"
        elif self.leaks or self.corrupt:
            self.corrupt, self.leaks = before
            self._compare(clusters, self.repair)

    def _clusters(self) -> list[int]:
        extra = sorted(c for c in self.refs if c >= self.nfile)
        return list(itertools.chain(range(self.nfile), extra))

    def _compare(self, clusters: list[int], fix: str | None) -> None:
        """One comparison (qemu's compare_refcounts): ``fix`` 'leaks' lowers
        leaked refcounts, 'all' also raises too low ones (never a stored 0:
        that sets ``rebuild``)."""
        self.end_cluster = 0
        for c in clusters:
            s, r = self.stored(c), self.refs.get(c, 0)
            if s or r:
                self.end_cluster = c + 1
            if s == r:
                continue
            fixing = False
            if s == 0:
                self.rebuild = True
            elif s > r and fix in ("leaks", "all"):
                fixing = True
            elif s < r and fix == "all":
                fixing = True
            word = "Repairing" if fixing else "ERROR" if s < r else "Leaked"
            self.msgs.append(f"{word} cluster {c} refcount={s} reference={r}")
            if fixing:
                if r > self.rc.max_refcount:
                    self.msgs.append(f"ERROR refcount of cluster {c} cannot hold {r}")
                else:
                    self.rc._set(c, r)
                    if r == 0:      # freed: discarded as qemu-img does (a hole)
                        from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
                        _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                   c << self.cb, self.cs)
                    if s > r:
                        self.fixed_leaks += 1
                    else:
                        self.fixed_corruptions += 1
                    continue
            if s < r:
                self.corrupt += 1
            else:
                self.leaks += 1

    def rebuild_refcounts(self) -> None:
        """Write a new refcount structure from the references counted (qemu's
        rebuild_refcount_structure: refcount blocks and then the table in
        the first free clusters, the header switched last), count the
        references again and free the old structure (its leaks)."""
        img = self.img
        old_corrupt, old_leaks = self.corrupt, self.leaks
        self.nb = max([self.nfile] + [c + 1 for c in self.refs])
        table: list[int] = []
        self._write_refblocks(0, self.nb, table)
        while True:
            n = -(-len(table) * 8 // self.cs)
            rt, _ = self._alloc_imrt(n, 0)
            if not self._write_refblocks(rt, rt + n, table):
                break
        os.pwrite(self.fd, struct.pack(f">{len(table)}Q", *table), rt << self.cb)
        if not self.rc.unsafe:      # the new structure durable before the header names it
            os.fsync(self.fd)
        img._set_rt_location(rt << self.cb, n)      # header written and synced
        img.rc = None
        self.rc = img._rc()
        # the references once more, through the new table (walk errors again)
        again = Checker(img, None)
        again.walk_all()
        self.msgs += again.msgs
        self.refs, self.file_size, self.nfile = again.refs, again.file_size, again.nfile
        counters = (self.fixed_leaks, self.fixed_corruptions)
        self.corrupt, self.leaks, self.rebuild = 0, 0, False
        # the old structure is leaked now: free it (these fixes are not counted)
        self._compare(self._clusters(), "leaks")
        if self.rebuild:
            self.msgs.append("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = self.leaks
        self.fixed_leaks, self.fixed_corruptions = counters
        self.corrupt, self.leaks = again.corrupt, 0
        self.fixed_corruptions += max(0, old_corrupt - self.corrupt)
        self.fixed_leaks += old_leaks
        self.leaks += fresh_leaks
        self.rc.flush_increments()

    def _alloc_imrt(self, n: int, first_free: int) -> tuple[int, int]:
        """``n`` contiguous clusters free in the counted references, from
        ``first_free`` on (the image grows when none are): marks them used;
        returns (first cluster, the new first free cluster)."""
        c, run, first_gap = first_free, 0, True
        while run < n:
            if c >= self.nb or not self.refs.get(c):
                if first_gap:
                    first_free, first_gap = c, False
                run += 1
            else:
                run = 0
            c += 1
        self.nb = max(self.nb, c)
        for i in range(c - n, c):
            self.refs[i] = 1
        return c - n, first_free

    def _write_refblocks(self, first: int, end: int, table: list[int]) -> bool:
        """Write the refcount blocks covering the used clusters of [first,
        end), allocating those ``table`` lacks; True when ``table`` grew."""
        rbe, cs, grown, first_free = self.rc.rbe, self.cs, False, 0
        c = first
        while c < end:
            if not self.refs.get(c):
                c += 1
                continue
            t = c // rbe
            start = t * rbe
            if t < len(table) and table[t]:
                off = table[t]
            else:
                first_free = max(first_free, start)
                bc, first_free = self._alloc_imrt(1, first_free)
                end = max(end, bc + 1)
                if len(table) <= t:
                    want = -(-(t + 1) * 8 // cs) * cs // 8
                    table.extend([0] * (want - len(table)))
                    grown = True
                table[t] = off = bc << self.cb
            vals = [min(self.refs.get(i, 0), self.rc.max_refcount)
                    for i in range(start, start + rbe)]
            os.pwrite(self.fd, self.rc._encode(vals), off)
            c = start + rbe
        return grown

    def check_copied_flags(self) -> None:
        """COPIED flags against the stored refcount (after any repair above):
        set exactly when the refcount is 1. Repaired with ``-r all``, and
        with ``-r leaks`` when nothing else is left wrong (as qemu-img)."""
        img = self.img
        fix = self.repair == "all" or (self.repair == "leaks" and not (
            self.check_errors or self.corrupt or self.leaks))
        word = "Repairing" if fix else "ERROR"
        for kind, where, e, c in self.copied_checks:
            want = self.stored(c) == 1
            if bool(e & COPIED) == want:
                continue
            ne = (e | COPIED) if want else (e & ~COPIED)
            if kind == "L2":
                self.msgs.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={where} "
                                 f"l1_entry={e:x} refcount={self.stored(c)}")
                if fix:
                    img.l1[where] = ne
                    img.l1_dirty = True
            else:
                self.msgs.append(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} "
                                 f"refcount={self.stored(c)}")
                if fix:
                    l2off, j = where
                    struct.pack_into(">Q", img._l2(l2off), j * self.esz, ne)
                    img.l2dirty.add(l2off)
            if fix:
                self.fixed_corruptions += 1
            else:
                self.corrupt += 1

    def report(self) -> CheckResult:
        """The result, keys in qemu-img's order."""
        cs = self.cs
        out = CheckResult()
        out.messages = self.msgs
        out.failed = self.failed
        out["filename"] = self.img.filename
        out["format"] = "qcow2"
        out["check-errors"] = self.check_errors
        out["image-end-offset"] = self.end_cluster * cs
        if self.corrupt:
            out["corruptions"] = self.corrupt
        if self.leaks:
            out["leaks"] = self.leaks
        out["total-clusters"] = -(-self.h.size // cs)
        if self.allocated:
            out["allocated-clusters"] = self.allocated
        if self.fragmented:
            out["fragmented-clusters"] = self.fragmented
        if self.compressed:
            out["compressed-clusters"] = self.compressed
        return out
