"""qcow2 zeroing and discard: zero clusters, zero subclusters (extended
L2), zero bytes for the partial rest; discard of whole clusters.

Part of the :class:`.driver.Qcow2` class (a mixin); the design notes are in
:mod:`.driver`.
"""
from __future__ import annotations

from .tables import ALL_ZERO, COMPRESSED, COPIED, OFFSET_MASK, ZERO, Fill, L2Tables
from ...native import dio
from ...native import qcow2 as _nq


class Zeroes(L2Tables):
    """write_zeroes and discard of :class:`.driver.Qcow2`."""

    #: discard as QEMU discards a guest's request (set by the daemon for its
    #: nodes); False: without a backing file every discarded cluster is
    #: unallocated (what blkjobs' own tools want, e.g. convert freeing
    #: clusters it did not write)
    qemu_discard = False
    #: host clusters whose refcount drops to 0 are punched from the file at
    #: the flush that frees them, as QEMU passes a freed cluster's discard
    #: down when the image is opened with discard=unmap (qemu-img convert's
    #: target, unless -S 0)
    unmap_freed = False

    def _full_clusters(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        end = offset + length
        a = -(-offset // cs) * cs
        b = end if end == self.size else end // cs * cs
        return a, max(a, b)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill: Fill = None) -> None:
        """Make the range read as zeroes. Whole clusters become zero clusters
        (v3; host clusters kept when ``may_unmap`` is False and the cluster is
        ours), whole subclusters get their zero bit (extended L2), the rest is
        written as zero bytes (``fill`` as in :meth:`write`). v2 images have no
        zero flag: whole clusters are unmapped when there is no backing file,
        else zeroes are written."""
        self._check_writable(offset, length)
        if self.header.data_file_raw:
            # the raw data file must read the same: zero it first (as QEMU)
            self._zero_data_file(offset, length)
        a, b = self._full_clusters(offset, length)
        v2 = self.header.version < 3
        if (v2 and self.backing_filename) or a >= b:
            self._zero_partial(offset, offset + length, fill)
            return
        self._zero_partial(offset, a, fill)
        cb = self.cb
        for gc in range(a >> cb, -(-b // self.cluster_size)):
            _, _, e, bm = self._entry(gc)
            if e or bm:
                self._classify(gc, e, bm)
            h = e & OFFSET_MASK
            keep = (not may_unmap) and (h or self._has_host(e)) and e & COPIED \
                and not e & COMPRESSED
            if v2:
                ne, nbm = 0, 0
            elif self.extended:
                ne, nbm = (h | COPIED, ALL_ZERO) if keep else (0, ALL_ZERO)
            else:
                ne, nbm = (h | COPIED | ZERO, 0) if keep else (ZERO, 0)
            if (ne, nbm) == (e, bm):
                continue
            if (v2 or not keep) and e:
                self._release(e)
            if e or bm or ne or nbm:
                self._set_entry(gc, ne, nbm)
        self._zero_partial(b, offset + length, fill)

    def _zero_data_file(self, offset: int, length: int) -> None:
        from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
        fd = self.data_fd
        if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            pos, end = offset, offset + length
            while pos < end:
                pos += dio.pwrite(fd, bytes(min(end - pos, 1 << 20)), pos)

    def _zero_partial(self, start: int, end: int, fill: Fill) -> None:
        if start >= end:
            return
        if self.extended:
            # whole subclusters inside a cluster we own: just flip bits
            scs = self.scs
            pos = start
            while pos < end:
                gc = pos >> self.cb
                cstart = gc << self.cb
                cend = min(cstart + self.cluster_size, end)
                sa = min(cend, -(-(pos - cstart) // scs) * scs + cstart)
                sb = (cend - cstart) // scs * scs + cstart
                if cend == self.size and cend > sb:
                    sb += scs            # the last, short subcluster of the image
                _, _, e, bm = self._entry(gc)
                if e or bm:
                    self._classify(gc, e, bm)
                if sa < sb and not e & COMPRESSED and (not e or e & COPIED):
                    self._zero_pieces(pos, sa, fill)
                    j0, j1 = (sa - cstart) // scs, (sb - cstart) // scs
                    bits = ((1 << j1) - 1) ^ ((1 << j0) - 1)
                    _, _, e, bm = self._entry(gc)
                    self._set_entry(gc, e, (bm & ~bits) | (bits << 32))
                    self._zero_pieces(min(sb, cend), cend, fill)
                else:
                    self._zero_pieces(pos, cend, fill)
                pos = cend
            return
        self._zero_pieces(start, end, fill)

    def _zero_pieces(self, start: int, end: int, fill: Fill) -> None:
        """Parts of (sub)clusters: as QEMU's qcow2_co_pwrite_zeroes, a
        (sub)cluster whose rest reads as zeroes becomes a zero (sub)cluster
        (v3): one already zero, or an unallocated one without a backing file
        (with one, the backing data may show: zero bytes are written, the
        rest copied up). Others get zero bytes written."""
        scs = self.scs
        pos, run = start, start         # run: start of the bytes still to write
        while pos < end:
            s0 = pos // scs * scs
            e_ = min(end, s0 + scs)
            if self._mark_zero_sub(s0, fill):
                self._write_zero_bytes(run, pos, fill)
                run = e_
            pos = e_
        self._write_zero_bytes(run, end, fill)     # one write: one allocation

    def _mark_zero_sub(self, s0: int, fill: Fill) -> bool:
        if self.header.version < 3:
            return False
        gc = s0 >> self.cb
        _, _, e, bm = self._entry(gc)
        if e & COMPRESSED:
            return False
        if self.extended:
            bit = 1 << ((s0 - (gc << self.cb)) // self.scs)
            if bm & (bit << 32):
                return True                      # already a zero subcluster
            if bm & bit or fill is not None or (e and not e & COPIED):
                return False
            self._set_entry(gc, e, bm | (bit << 32))
            return True
        if e & ZERO:
            return True
        if e or fill is not None:
            return False
        self._set_entry(gc, ZERO, 0)
        return True

    def _write_zero_bytes(self, start: int, end: int, fill: Fill) -> None:
        if start < end:
            self.write(start, bytes(end - start), fill=fill)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (partial ones are left alone, like QEMU).
        Afterwards they read as zeroes when the image is v3 or has no backing
        file (a zero cluster is used when there is a backing file), and from
        the backing file in a v2 image with one. With :attr:`qemu_discard`,
        as QEMU's qcow2 discard of a request: without a backing file too, a
        v3 cluster with a host cluster becomes a zero cluster, and one
        without is left as it is."""
        self._check_writable(offset, length)
        a, b = self._full_clusters(offset, length)
        if a >= b:
            return
        backing, qemu = bool(self.backing_filename), self.qemu_discard
        use_zero = self.header.version >= 3 and (backing or qemu)
        gc, gend = a >> self.cb, -(-b // self.cluster_size)
        if self.extended or self.external or qemu:
            for g in range(gc, gend):
                self._discard_one(g, backing, qemu, use_zero)
            return
        l2e = self.l2e
        while gc < gend:                # a table at a time
            stop = min(gend, (gc // l2e + 1) * l2e)
            gc = self._discard_table(gc, stop, ZERO if use_zero else 0)
            if gc < stop:
                # an entry the C decoder left to Python (compressed: in a
                # compressed image the rest are too, and a C call each would
                # cost more; or corrupt: it fails) and the rest of the table
                for g in range(gc, stop):
                    self._discard_one(g, backing, qemu, use_zero)
                gc = stop

    def _discard_one(self, gc: int, backing: bool, qemu: bool, use_zero: bool) -> None:
        _, _, e, bm = self._entry(gc)
        if qemu and not backing and not e & (OFFSET_MASK | COMPRESSED):
            return          # QEMU leaves a cluster without a host cluster alone
        if e or bm:
            self._classify(gc, e, bm)
        if self.extended:
            ne, nbm = (0, ALL_ZERO) if use_zero else (0, 0)
        else:
            ne, nbm = (ZERO, 0) if use_zero else (0, 0)
        if (e, bm) == (ne, nbm):
            return
        if e:
            self._release(e)
        self._set_entry(gc, ne, nbm)

    def _discard_table(self, gc: int, stop: int, ne: int) -> int:
        """discard of guest clusters [gc, stop), all in one standard L2 table,
        their entries becoming ``ne`` (0 or ZERO): the C decoder classifies
        the well-formed entries in runs (what :meth:`_discard_one` checks of
        each), their host clusters are released and the entries rewritten
        in one slice. Returns where it stopped: ``stop``, or an entry left to
        :meth:`_discard_one` (compressed, corrupt...)."""
        cb, l2e = self.cb, self.l2e
        want = ne.to_bytes(8, "big") * (stop - gc)
        i0, i1 = (gc % l2e) * 8, (stop - gc + gc % l2e) * 8
        off = self._l2_offset(gc // l2e)
        if not off:
            if not ne:
                return stop     # no table: unallocated already
            t, off = self._l2_for_write(gc)     # a new table, all zeroes
            t[i0:i1] = want
            self.l2dirty.add(off)
            return stop
        t = self._l2(off)
        if t[i0:i1] == want:
            return stop
        limit = self.file_size
        if self.rc is not None:
            limit = max(limit, self.rc.end << cb)
        runs, end = self._l2dec.runs(t, gc % l2e, stop - gc, cb, limit,
                                     self.header.version >= 3)
        done = gc - gc % l2e + end          # guest cluster where the decoder stopped
        if done == gc:
            return gc
        if not self.external:
            rc = self._rc()
            for _, count, kind, host in runs:
                if host and kind != _nq.UNALLOCATED:     # data, preallocated zero
                    rc.free_run_later(host >> cb, count)
        t, off = self._l2_for_write(gc)     # (a copy of a table a snapshot shares)
        t[i0:(done - gc + gc % l2e) * 8] = want[:(done - gc) * 8]
        self.l2dirty.add(off)
        return done
