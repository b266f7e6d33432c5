"""qcow2 cluster allocation for bulk writes: :meth:`Allocation.allocate`
hands out host runs for a cluster-aligned guest range (convert and the C copy
engine write them), :meth:`Allocation.undo_allocate` puts back what was not
written.

Part of the :class:`.driver.Qcow2` class (a mixin); the design notes are in
:mod:`.driver`.
"""
from __future__ import annotations

import struct

from ...errors import UsageError
from ..base import Kind, Mapping
from .tables import ALL_ALLOC, COMPRESSED, COPIED, OFFSET_MASK, ZERO, L2Tables


class Allocation(L2Tables):
    """Cluster allocation of :class:`.driver.Qcow2`."""

    #: the end of the last data cluster allocated since the image was opened
    #: (a flush extends the file to it: QEMU writes a new data cluster whole,
    #: zeroes around a partial write, so its file ends on a cluster boundary)
    data_end = 0

    def _runs(self, job: _Pending) -> list[Mapping]:
        cs = self.cluster_size
        for _s, n, h in job.runs:
            self.data_end = max(self.data_end, -(-(h + n) // cs) * cs)
        return [Mapping(s, n, Kind.DATA, h) for s, n, h in job.runs]

    @property
    def alloc_end(self) -> int:
        """Host offset where fresh allocation starts: a cluster that
        :meth:`allocate` returns at or past this offset was never used before
        (it reads as zeroes); clusters below it may be reused ones. With an
        external data file none is known fresh (the file may be reused)."""
        if self.external:
            return 1 << 62
        return self._rc().end << self.cb

    def allocate(self, offset: int, length: int,
                 undo: list[tuple[int, int, int, int]] | None = None) -> list[Mapping]:
        """Allocate host clusters for the cluster-aligned guest range (the end
        may be the virtual size) and return DATA runs in guest order.

        The L2 entries point at the returned runs immediately (in memory).
        Without ``undo`` the caller must write every byte of every run to
        ``fd`` before the next :meth:`flush` (nothing else may flush the
        image meanwhile: a flush -- an L2 cache eviction inside this very
        call included -- would put the entries on disk before the data); with
        ``undo`` see below. Until the data is written those clusters read
        whatever the file holds there, so readers of this image must be held
        off them.
        Clusters already allocated with refcount 1 are reused in place;
        others get new clusters, taken as one contiguous run at the end of
        the file when possible.

        ``undo``: for every guest range whose content this makes undefined
        until written, (start, length, old L2 entry, old bitmap) is appended:
        :meth:`undo_allocate` puts it back (ranges that read through to the
        backing file, zero clusters, extended-L2 subclusters not allocated).
        With ``undo`` the clusters are also *held* (tables.py: what a flush
        may write): until :meth:`release_allocated` (the data landed) or
        :meth:`undo_allocate`, a flush writes their old entries, so the
        caller may let other threads flush meanwhile. A compressed or shared
        cluster replaced by a new one is recorded too (its old reference is
        dropped when it lands); without ``undo`` it is not, and its old
        reference is released at once."""
        self._check_writable(offset, length)
        cs, cb = self.cluster_size, self.cb
        if offset % cs or (length % cs and offset + length != self.size):
            raise UsageError(f"allocate: range {offset}+{length} is not cluster aligned")
        g0, g1 = offset >> cb, -(-(offset + length) // cs)
        job = _Pending(self, undo)
        gc = g0
        while gc < g1:
            span_end = min(g1, (gc // self.l2e + 1) * self.l2e)
            if span_end - gc >= 16 and self._alloc_fresh_span(job, gc, span_end):
                gc = span_end
                continue
            for c in range(gc, span_end):
                old = self._alloc_one_cluster(job, c)
                if old is not None:
                    job.note(c, 1, *old)
            gc = span_end
        job.flush_need()
        return self._runs(job)

    def allocate_many(self, ranges: list[tuple[int, int]],
                      undo: list[tuple[int, int, int, int]] | None = None) -> list[Mapping]:
        """:meth:`allocate` for many cluster-aligned guest ranges, in
        increasing guest order and not overlapping, in one call (an
        incremental backup's scattered changed clusters): the clusters that
        need new host clusters, over all the ranges, are taken in one
        refcount allocation (one contiguous run at the end of the file when
        possible) and their L2 entries set table by table. Returns the DATA
        runs in guest order (a run may span adjacent ranges). Same contract
        as :meth:`allocate` (every byte written before the next flush, or
        put back, or with ``undo`` held until released; the metadata reaches
        the disk only at a flush, after the data: the order data, refcounts,
        L2 is that of :meth:`flush`)."""
        cs, cb = self.cluster_size, self.cb
        job = _Pending(self, undo)
        end = 0
        for offset, length in ranges:
            if offset < end:
                raise UsageError(f"allocate: range {offset}+{length} is not after the "
                                 "previous one")
            end = offset + length
            self._check_writable(offset, length)
            if offset % cs or (length % cs and end != self.size):
                raise UsageError(f"allocate: range {offset}+{length} is not cluster aligned")
        try:
            if self.extended:
                for offset, length in ranges:
                    for c in range(offset >> cb, -(-(offset + length) // cs)):
                        old = self._alloc_one_cluster(job, c)
                        if old is not None:
                            job.note(c, 1, *old)
            else:
                self._alloc_many_std(job, ranges)
        finally:
            # clusters queued get their entries even when a later one failed
            # (their old references are released already)
            job.flush_need()
        return self._runs(job)

    def _alloc_many_std(self, job: _Pending, ranges: list[tuple[int, int]]) -> None:
        """allocate_many() with standard L2 entries: an unallocated cluster
        (entry 0, the usual case) is queued after one look at its table
        entry; any other goes through :meth:`_alloc_one_cluster`."""
        cs, cb, l2e = self.cluster_size, self.cb, self.l2e
        unpack, need, note = struct.unpack_from, job.need, job.note
        l1i, t = -1, None
        for offset, length in ranges:
            for c in range(offset >> cb, -(-(offset + length) // cs)):
                if c // l2e != l1i:
                    l1i = c // l2e
                    off = self._l2_offset(l1i)
                    t = self._l2(off) if off else None
                if t is None or not unpack(">Q", t, (c % l2e) << 3)[0]:
                    need.append(c)
                    note(c, 1)
                    continue
                old = self._alloc_one_cluster(job, c)
                if old is not None:
                    note(c, 1, *old)
                l1i = -1        # it may have replaced (copied) or added a table

    def _alloc_fresh_span(self, job: _Pending, a: int, b: int) -> bool:
        """allocate() for guest clusters [a, b), inside one L2 table, when all
        their entries are zero (a fresh convert target): in bulk, one
        pack_into per host run. False (nothing done) otherwise."""
        cb, esz = self.cb, self.esz
        off = self._l2_offset(a // self.l2e)
        i0 = (a % self.l2e) * esz
        if off:
            t = self._l2(off)
            if t[i0:i0 + (b - a) * esz].count(0) != (b - a) * esz:
                return False
        job.flush_need()
        t, off = self._l2_for_write(a)
        job.note(a, b - a)
        gc = a
        for c0, k in self._host_runs(a, b - a):
            if self.extended:
                vals = [v for c in range(c0, c0 + k) for v in ((c << cb) | COPIED, ALL_ALLOC)]
            else:
                vals = [(c << cb) | COPIED for c in range(c0, c0 + k)]
            struct.pack_into(f">{len(vals)}Q", t, i0 + (gc - a) * esz, *vals)
            job.add(gc << cb, c0 << cb, k)
            gc += k
        self.l2dirty.add(off)
        return True

    def _host_runs(self, gc: int, n: int) -> list[tuple[int, int]]:
        """Host clusters for n guest clusters from gc: (first, count) runs
        taken from the refcounts, or the guest clusters themselves in an
        external data file."""
        if self.external:
            return [(gc, n)]
        return self._rc().alloc(n)

    def _alloc_one_cluster(self, job: _Pending, gc: int) -> tuple[int, int] | None:
        """allocate() for one guest cluster: reuse it in place or queue it.
        The old (entry, bitmap) when what it read is now undefined until
        written and can be put back (see allocate's ``undo``)."""
        cb = self.cb
        _, _, e, bm = self._entry(gc)
        if e or bm:
            self._classify(gc, e, bm)
        h = e & OFFSET_MASK
        if (h or self._has_host(e)) and e & COPIED and not e & COMPRESSED:
            self._check_overlap(h)
            job.flush_need()
            changed = None
            if self.extended:
                if bm != ALL_ALLOC:
                    self._set_entry(gc, h | COPIED, ALL_ALLOC)
                    changed = (e, bm)
            elif e & ZERO:
                self._set_entry(gc, h | COPIED)
                changed = (e, bm)
            job.add(gc << cb, h, 1)
            return changed
        job.need.append(gc)
        if (h or e & COMPRESSED) and job.undo is not None and not self.external:
            # compressed, or shared with a snapshot: the old entry stays on
            # disk while held, so its reference is dropped only when the new
            # cluster lands (undo_allocate puts the entry back instead)
            self._held_refs[gc] = e
            return e, bm
        if e:
            self._release(e)
        # no host cluster was referenced (unallocated, zero): restorable
        return None if h or e & COMPRESSED else (e, bm)

    def undo_allocate(self, undo: list[tuple[int, int, int, int]]) -> None:
        """Put back what :meth:`allocate` recorded in ``undo``, for clusters
        that were not (all) written: they read as before again (through to
        the backing file, zeroes, ...). Host clusters it had newly taken are
        freed (reusable after the next flush) and punched now, so that the
        space a failed copy wrote returns to the file system at once (ENOSPC,
        then resume)."""
        from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
        cb, cs = self.cb, self.cluster_size
        for s, n, old_e, old_bm in undo:
            self._check_writable(s, n)
            for gc in range(s >> cb, -(-(s + n) >> cb)):
                _, _, e, bm = self._entry(gc)
                if e or bm:
                    self._classify(gc, e, bm)
                h = e & OFFSET_MASK
                if (self._has_host(e) and not self._has_host(old_e) if self.external
                        else h and h != old_e & OFFSET_MASK):      # a cluster allocate() took
                    self._release(e)
                    _fallocate(self.data_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, h, cs)
                self._set_entry(gc, old_e, old_bm)
                self._unhold(gc, False)


class _Pending:
    """The state of one :meth:`Allocation.allocate` call: the DATA runs
    handed out so far, the guest clusters queued for new host clusters
    (taken together, so that they are contiguous in the file), the caller's
    ``undo`` list."""

    def __init__(self, drv: Allocation, undo: list[tuple[int, int, int, int]] | None) -> None:
        self.drv = drv
        self.undo = undo
        self.runs: list[list[int]] = []    # [guest_start, length, host]
        self.need: list[int] = []          # guest clusters needing new host clusters

    def note(self, gc0: int, ncl: int, e: int = 0, bm: int = 0) -> None:
        """Record for ``undo``: clusters [gc0, gc0+ncl) had entry e, bitmap bm
        (unallocated ones merge into one range)."""
        undo = self.undo
        if undo is None:
            return
        cb = self.drv.cb
        self.drv._hold(gc0, ncl, e, bm)     # before the entries are set
        s, n = gc0 << cb, min(ncl << cb, self.drv.size - (gc0 << cb))
        last = undo[-1] if undo else None
        if last and not (e or bm or last[2] or last[3]) and last[0] + last[1] == s:
            undo[-1] = (last[0], last[1] + n, 0, 0)
        else:
            undo.append((s, n, e, bm))

    def add(self, gs: int, host: int, ncl: int) -> None:
        """Hand out ncl clusters at guest gs, host ``host``."""
        runs = self.runs
        ln = min(ncl * self.drv.cluster_size, self.drv.size - gs)
        if runs and runs[-1][0] + runs[-1][1] == gs and runs[-1][2] + runs[-1][1] == host:
            runs[-1][1] += ln
        else:
            runs.append([gs, ln, host])

    def flush_need(self) -> None:
        """Give the queued guest clusters their new host clusters."""
        if not self.need:
            return
        drv, cb, l2e, esz = self.drv, self.drv.cb, self.drv.l2e, self.drv.esz
        # table by table, as QEMU allocates: the L2 table first (allocated, or
        # copied when shared), then that table's data clusters in one run --
        # so a small image's first data cluster lands where qemu-img's does
        fmt, ext = (">QQ", True) if drv.extended else (">Q", False)
        pack, add, need = struct.pack_into, self.add, self.need
        i = 0
        while i < len(need):
            l1i = need[i] // l2e
            j = i + 1
            while j < len(need) and need[j] // l2e == l1i:
                j += 1
            t, toff = drv._l2_for_write(need[i])
            drv.l2dirty.add(toff)
            if drv.external:            # the data file: host offset == guest offset
                hosts = need[i:j]
            else:
                hosts = []
                for c0, k in drv._rc().alloc(j - i):
                    hosts += range(c0, c0 + k)
            for gc, hc in zip(need[i:j], hosts, strict=True):
                if ext:
                    pack(fmt, t, (gc % l2e) * esz, (hc << cb) | COPIED, ALL_ALLOC)
                else:
                    pack(fmt, t, (gc % l2e) * esz, (hc << cb) | COPIED)
                add(gc << cb, hc << cb, 1)
            i = j
        self.need.clear()
