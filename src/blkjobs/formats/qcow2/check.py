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

import os
import struct

from ...errors import ImageError
from .check_walk import Walker
from .header import (AUTOCLEAR_KNOWN, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, drop_stale_bitmaps,
                     stale_bitmaps)
from .refcount import Refcounts
from .tables import COMPRESSED, COPIED, OFFSET_MASK, L2Tables
from ...native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from .check_snapshots import SnapshotCheck


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
    if repair and (h.autoclear & ~AUTOCLEAR_KNOWN or stale_bitmaps(h)):
        h.autoclear &= AUTOCLEAR_KNOWN      # as qemu-img's read/write open
        drop_stale_bitmaps(h)
        img._write_header()
    res = Checker(img, repair, _snapshot_check(img, repair)).run()
    if repair and not (res.check_errors or res.corrupt):
        _mark_clean(img)
    if repair and (res.fixed_leaks or res.fixed_corruptions) and not res.failed:
        img.flush()
        again = Checker(img, None, _snapshot_check(img, None)).run()
        out = again.result
        if res.fixed_leaks:
            out["leaks-fixed"] = res.fixed_leaks
        if res.fixed_corruptions:
            out["corruptions-fixed"] = res.fixed_corruptions
        out.messages = res.result.messages + again.result.messages
        return out
    return res.result


class _NoSnapshots:
    """What :class:`.check_snapshots.SnapshotCheck` finds in an image whose
    header names no snapshot and a valid table offset: nothing to read,
    walk or fix (so a check of such an image does not import the snapshot
    table's modules: start-up)."""

    failed: str | None = None
    corrupt = fixed = check_errors = size = old_size = 0
    snaps: tuple = ()

    def __init__(self) -> None:
        self.msgs: list[str] = []       # the checker appends to it: its own

    def fix_table(self) -> None:
        pass


def _snapshot_check(img: L2Tables, repair: str | None) -> SnapshotCheck | _NoSnapshots:
    """The snapshot table's check; without snapshots (and an offset the
    table check would accept: a multiple of the cluster size, below 2^63)
    :class:`_NoSnapshots`, the same outcome without the import."""
    h = img.header
    if not h.nb_snapshots and h.snapshots_offset < 1 << 63 \
            and not h.snapshots_offset % img.cluster_size:
        return _NoSnapshots()
    from .check_snapshots import SnapshotCheck     # here: most images have none (start-up)
    return SnapshotCheck(img, repair)


def _mark_clean(img: L2Tables) -> None:
    """A repair that left no corruption clears the dirty and corrupt bits
    (qemu's qcow2_mark_clean and qcow2_mark_consistent)."""
    img.flush()
    h = img.header
    if h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
        h.incompatible &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        img._write_header()


class Checker(Walker):
    """One pass of the check over the open qcow2 image ``img``.

    :meth:`run` takes the steps in order: every structure that occupies the
    file adds its references to ``refs`` (:class:`.check_walk.Walker`) and
    its errors to ``msgs`` / ``corrupt``; then the counts are compared with
    the stored refcounts and, as ``repair`` asks, refcounts and COPIED flags
    are fixed (``fixed_leaks`` / ``fixed_corruptions``). ``result`` is the
    :class:`CheckResult`."""

    rc: Refcounts       # the image's, taken once the walk reaches them

    def __init__(self, img: L2Tables, repair: str | None,
                 snap: SnapshotCheck | _NoSnapshots) -> None:
        super().__init__(img, repair)
        self.snap = snap
        self.msgs = snap.msgs
        self.end_cluster = 0
        self.nb = 0                 # clusters the rebuild's counted references cover
        self.failed: str | None = None   # the check could not complete (why)
        self.result = CheckResult()
        self.snaps = [(s.id, s.name, s.l1_table_offset, s.l1_size) for s in snap.snaps]
        self.snap_size = snap.size

    def run(self) -> Checker:
        """The snapshot table was read (``snap``); the references counted
        and compared, then the COPIED flags and the snapshot table fixed."""
        if self.snap.failed:
            self.failed, self.check_errors = self.snap.failed, self.snap.check_errors
            self.result = self.report()
            return self
        self.walk_all()
        self.rc = self.img._rc()
        self.compare_refcounts()
        if self.failed:
            self.result = self.report()
            return self
        self.check_copied_flags()
        sc = self.snap
        sc.fix_table()
        self.corrupt += sc.corrupt
        self.check_errors += sc.check_errors
        self.fixed_corruptions += sc.fixed
        self.result = self.report()
        return self

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
        return list(range(max([self.nfile] + [c + 1 for c in self.refs])))

    def _compare(self, clusters: list[int], fix: str | None) -> None:
        """One comparison (qemu's compare_refcounts): ``fix`` 'leaks' lowers
        leaked refcounts, 'all' also raises too low ones (never a stored 0:
        that sets ``rebuild``)."""
        self.end_cluster = 1
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
        dio.pwrite(self.fd, struct.pack(f">{len(table)}Q", *table), rt << self.cb)
        if not self.rc.unsafe:      # the new structure durable before the header names it
            os.fsync(self.fd)
        img._set_rt_location(rt << self.cb, n)      # header written and synced
        img.rc = None
        self.rc = img._rc()
        # the references once more, through the new table (walk errors again)
        snap = self.snap
        again = Checker(img, None, _NoSnapshots() if isinstance(snap, _NoSnapshots)
                        else type(snap).of(snap))
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
            dio.pwrite(self.fd, self.rc._encode(vals), off)
            c = start + rbe
        return grown

    def check_copied_flags(self) -> None:
        """check_oflag_copied: the COPIED flags of the active L1 and of its
        L2 tables' entries (read again: a repair above may have changed
        them) against the stored refcount (after any repair above): set
        exactly when the refcount is 1. Repaired with ``-r all``, and with
        ``-r leaks`` when nothing else is left wrong (as qemu-img)."""
        img = self.img
        fix = self.repair == "all" or (self.repair == "leaks" and not (
            self.check_errors or self.corrupt or self.leaks))
        word = "Repairing" if fix else "ERROR"
        for i, e in enumerate(img.l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            n = self.stored(off >> self.cb)
            if (n == 1) != bool(e & COPIED):
                self.msgs.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} "
                                 f"l1_entry={e:x} refcount={n}")
                self._count_fix(fix)
                if fix:
                    img.l1[i] = (e | COPIED) if n == 1 else (e & ~COPIED)
                    img.l1_dirty = True
            t = img.l2cache.get(off)
            raw = bytes(t) if t is not None else self.pread(off, self.cs)
            for j in range(img.l2e):
                le = struct.unpack_from(">Q", raw, j * self.esz)[0]
                hoff = le & OFFSET_MASK
                if le & COMPRESSED or not (hoff or (img.external and le & COPIED)):
                    continue
                n = 1 if img.external else self.stored(hoff >> self.cb)
                if (n == 1) == bool(le & COPIED):
                    continue
                self.msgs.append(f"{word} OFLAG_COPIED data cluster: l2_entry={le:x} "
                                 f"refcount={n}")
                self._count_fix(fix)
                if fix:
                    ne = (le | COPIED) if n == 1 else (le & ~COPIED)
                    struct.pack_into(">Q", img._l2(off), j * self.esz, ne)
                    img.l2dirty.add(off)

    def _count_fix(self, fixed: bool) -> None:
        if fixed:
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
        out["total-clusters"] = -(-(self.h.size // 512 * 512) // cs)   # total_sectors, as QEMU
        if self.allocated:
            out["allocated-clusters"] = self.allocated
        if self.fragmented:
            out["fragmented-clusters"] = self.fragmented
        if self.compressed:
            out["compressed-clusters"] = self.compressed
        return out
