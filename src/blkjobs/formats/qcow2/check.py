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
from .header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, read_bitmap_directory
from .refcount import Refcounts
from .tables import COMPRESSED, COPIED, L1_RESERVED, OFFSET_MASK, STD_RESERVED, L2Tables


class CheckResult(dict):
    """The ``qemu-img check --output json`` object; ``messages`` holds the
    per-cluster lines qemu-img prints on stderr."""

    messages: list[str]


def check(img: L2Tables, repair: str | None = None) -> CheckResult:
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    if repair and img.read_only:
        raise ImageError(f"'{img.filename}': repair needs the image opened read/write")
    if not img.read_only:
        img.flush()
    res = Checker(img, repair).run()
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
        self.result = CheckResult()

    def run(self) -> Checker:
        self.walk_header()
        # the active L1 (in memory when open read/write: flushed first)
        if not self.img.read_only:
            self.img.flush()
        self.walk_l1(self.h.l1_table_offset, self.h.l1_size, True)
        self.walk_snapshots()
        self.rc = self.img._rc()
        self.walk_refcounts()
        self.walk_bitmaps()
        self.compare_refcounts()
        self.check_copied_flags()
        self.result = self.report()
        return self

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
            if not hoff:
                continue
            if hoff % self.cs:
                self.error(f"ERROR offset={hoff:x}: Data cluster is not properly aligned; "
                           "L2 entry corrupted.")
                continue
            self.ref_range(hoff, self.cs)
            if active:
                self.allocated += 1
                if self.next_host and hoff != self.next_host:
                    self.fragmented += 1
                self.next_host = hoff + self.cs
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
        """Stored refcounts against the references counted: leaks (stored
        more) and corruptions (stored fewer), repaired as ``repair`` asks."""
        extra = sorted(c for c in self.refs if c >= self.nfile)
        if self.repair:
            # qemu-img compares once without fixing (its lines first), then again fixing
            for c in itertools.chain(range(self.nfile), extra):
                s, r = self.stored(c), self.refs.get(c, 0)
                if s != r:
                    self.msgs.append(f"{'Leaked' if s > r else 'ERROR'} cluster {c} "
                                     f"refcount={s} reference={r}")
        for c in itertools.chain(range(self.nfile), extra):
            s = self.stored(c)
            r = self.refs.get(c, 0)
            if s or r:
                self.end_cluster = max(self.end_cluster, c + 1)
            if s == r:
                continue
            if s > r:
                self.leaks += 1
                self.msgs.append(f"{'Repairing' if self.repair else 'Leaked'} cluster {c} "
                                 f"refcount={s} reference={r}")
                if self.repair:
                    self.rc._set(c, r)
                    self.fixed_leaks += 1
            else:
                self.error(f"{'Repairing' if self.repair == 'all' else 'ERROR'} cluster {c} "
                           f"refcount={s} reference={r}")
                if self.repair == "all":
                    self.rc._ensure_block(c)
                    self.rc._set(c, r)
                    self.fixed_corruptions += 1

    def check_copied_flags(self) -> None:
        """COPIED flags against the stored refcount (after any repair above):
        set exactly when the refcount is 1."""
        img = self.img
        for kind, where, e, c in self.copied_checks:
            want = self.stored(c) == 1
            if bool(e & COPIED) == want:
                continue
            ne = (e | COPIED) if want else (e & ~COPIED)
            if kind == "L2":
                self.error(f"ERROR OFLAG_COPIED L2 cluster: l1_index={where} l1_entry={e:x} "
                           f"refcount={self.stored(c)}")
                if self.repair == "all":
                    img.l1[where] = ne
                    img.l1_dirty = True
                    self.fixed_corruptions += 1
            else:
                self.error(f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} "
                           f"refcount={self.stored(c)}")
                if self.repair == "all":
                    l2off, j = where
                    struct.pack_into(">Q", img._l2(l2off), j * self.esz, ne)
                    img.l2dirty.add(l2off)
                    self.fixed_corruptions += 1

    def report(self) -> CheckResult:
        """The result, keys in qemu-img's order."""
        cs = self.cs
        out = CheckResult()
        out.messages = self.msgs
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
