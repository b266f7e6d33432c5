"""qcow2 writes: partial-cluster writes with copy-on-write (the ``fill``
hook), whole-cluster writes through :meth:`allocate`, compressed clusters.

Part of the :class:`.driver.Qcow2` class (a mixin); the design notes are in
:mod:`.driver`.
"""
from __future__ import annotations


from ...errors import UsageError
from .tables import ALL_ALLOC, COMPRESSED, COPIED, OFFSET_MASK, ZERO, Fill, L2Tables, _zero
from ...native import dio


class Writes(L2Tables):
    """The write path of :class:`.driver.Qcow2`."""

    def _fill(self, fill: Fill, guest: int, mv: memoryview) -> None:
        """Fill mv with the view below this layer at guest offset (zeroes past
        the virtual size or without a fill hook)."""
        n = max(0, min(len(mv), self.size - guest))
        if fill is not None and n:
            fill(guest, mv[:n])
        else:
            _zero(mv, 0, n)
        _zero(mv, n, len(mv))

    def _old_sub(self, gc: int, e: int, bm: int, j: int, mv: memoryview, a_in: int,
                 fill: Fill) -> None:
        """Fill mv with the current content of cluster gc at in-cluster offset
        a_in (all inside subcluster j)."""
        cstart = gc << self.cb
        if e & COMPRESSED:
            data = self._read_compressed(gc)
            mv[:] = data[a_in:a_in + len(mv)]
            return
        h = e & OFFSET_MASK
        if self.extended:
            if bm >> j & 1:
                self._pread_into(mv, h + a_in)
            elif bm >> (32 + j) & 1:
                _zero(mv, 0, len(mv))
            else:
                self._fill(fill, cstart + a_in, mv)
        else:
            if e & ZERO:
                _zero(mv, 0, len(mv))
            elif self._has_host(e):
                self._pread_into(mv, h + a_in)
            else:
                self._fill(fill, cstart + a_in, mv)

    def _write_cluster(self, gc: int, a: int, data: memoryview, fill: Fill) -> None:
        """Write data at in-cluster offset a of guest cluster gc (partial)."""
        cs, scs = self.cluster_size, self.scs
        _, _, e, bm = self._entry(gc)
        if e or bm:
            self._classify(gc, e, bm)
        h = e & OFFSET_MASK
        has = self._has_host(e) or (bool(h) and bool(e & ZERO))
        b = a + len(data)
        if e & COMPRESSED or (h and not e & COPIED and not self.external):
            # COW of the whole cluster into a fresh one
            buf = bytearray(cs)
            mv = memoryview(buf)
            for j in range(cs // scs):
                self._old_sub(gc, e, bm, j, mv[j * scs:(j + 1) * scs], j * scs, fill)
            buf[a:b] = data
            self._l2_for_write(gc)      # QEMU's order: the L2 table, then the data
            nh = self._rc().alloc_one() << self.cb
            dio.pwrite(self.fd, buf, nh)
            self._set_entry(gc, nh | COPIED, ALL_ALLOC if self.extended else 0)
            self._release(e)
            return
        if not has:
            self._l2_for_write(gc)      # QEMU's order: the L2 table, then the data
            h = self._new_host(gc)
            if not self.extended:
                bm = 0
        else:
            self._check_overlap(h)
            if not e & ZERO:
                bits = ((1 << ((b - 1) // scs + 1)) - 1) ^ ((1 << (a // scs)) - 1)
                if not self.extended or (bm & bits) == bits:
                    # Allocated in place (COPIED, data): write just these
                    # bytes; no read-modify-write of the rest of the cluster.
                    done, n = 0, len(data)
                    while done < n:
                        done += dio.pwrite(self.data_fd, data[done:], h + a + done)
                    return
        # (sub)cluster-aligned window [sa, sb) around [a, b)
        sa = a // scs * scs
        sb = -(-b // scs) * scs
        j0, j1 = sa // scs, sb // scs - 1
        buf = bytearray(sb - sa)
        mv = memoryview(buf)
        if a > sa:
            self._old_sub(gc, e, bm, j0, mv[:a - sa], sa, fill)
        if b < sb:
            self._old_sub(gc, e, bm, j1, mv[b - sa:], b, fill)
        buf[a - sa:b - sa] = data
        dio.pwrite(self.data_fd, buf, h + sa)
        if self.extended:
            bits = ((1 << (j1 + 1)) - 1) ^ ((1 << j0) - 1)
            bm = (bm | bits) & ~(bits << 32)
            self._set_entry(gc, h | COPIED, bm)
        elif (e & ~COPIED) != h or not e & COPIED:
            self._set_entry(gc, h | COPIED)

    def _new_host(self, gc: int) -> int:
        """The host offset of a new cluster for guest cluster gc: a fresh
        one, or in an external data file the guest offset itself."""
        if self.external:
            return gc << self.cb
        return self._rc().alloc_one() << self.cb

    def write(self, offset: int, data, fill: Fill = None) -> None:
        """Write ``data`` at ``offset``. ``fill(guest_offset, buf)`` provides
        the content below this layer for the unwritten parts of newly
        allocated (sub)clusters (see the module docstring); None = zeroes."""
        data = memoryview(data).cast("B")
        n = len(data)
        self._check_writable(offset, n)
        cs, cb = self.cluster_size, self.cb
        pos, end = offset, offset + n
        while pos < end:
            gc = pos >> cb
            cstart = gc << cb
            cend = min(cstart + cs, self.size)
            if pos == cstart and end >= cend:
                # whole clusters: allocate (or reuse) runs and pwrite them
                last = min(end, self.size)
                full_end = cstart + ((last - cstart) // cs) * cs
                if last == self.size:
                    full_end = self.size
                # held (an L2 cache eviction while allocating a range of many
                # tables flushes: the entries not before their data)
                undo: list[tuple[int, int, int, int]] = []
                try:
                    for m in self.allocate(cstart, full_end - cstart, undo):
                        d = data[m.start - offset:m.start - offset + m.length]
                        host = m.host_offset
                        assert host is not None         # allocate returns DATA runs
                        done = 0
                        while done < len(d):
                            done += dio.pwrite(self.data_fd, d[done:], host + done)
                finally:
                    self.release_allocated(undo)
                pos = full_end
                continue
            b = min(end, cend)
            self._write_cluster(gc, pos - cstart, data[pos - offset:b - offset], fill)
            pos = b
    def compress_cluster(self, cluster_data) -> bytes:
        """The compressed form of one cluster (padded with zeroes to
        cluster_size), for :meth:`write_compressed`. Touches no state of the
        image: threads may call it in parallel (zlib and zstd release the
        GIL)."""
        cs = self.cluster_size
        if len(cluster_data) < cs:
            cluster_data = bytes(cluster_data).ljust(cs, b"\0")
        from .compress import compress      # (zlib: not imported unless needed)
        return compress(self.ctype, cluster_data)

    def _comp_bytes(self, n: int) -> int:
        """Where the next ``n`` bytes of compressed data go (QEMU's
        qcow2_alloc_bytes): packed after the previous compressed cluster,
        running on into the next host cluster when that is the one allocated
        next (a stream may span two host clusters), else from a new cluster;
        every host cluster the bytes touch gets one more reference."""
        rc, cs, cb = self._rc(), self.cluster_size, self.cb
        off = self._comp_free
        if off and rc.get(off >> cb) >= rc.max_refcount:
            off = 0
        if off and off + n <= self._comp_limit:
            rc.incref(off >> cb)               # one more compressed cluster touches it
        elif off:
            new = rc.alloc_one() << cb
            if new == self._comp_limit:        # contiguous: the stream runs on into it
                rc.incref(off >> cb)
                self._comp_limit = new + cs
            else:
                off, self._comp_limit = new, new + cs
        else:
            off = rc.alloc_one() << cb
            self._comp_limit = off + cs
        self._comp_free = off + n
        if self._comp_free >= self._comp_limit:
            self._comp_free = self._comp_limit = 0
        return off

    def write_compressed(self, offset: int, cluster_data, compressed: bytes | None = None) -> None:
        """Store one whole guest cluster compressed (for convert -c).
        ``cluster_data`` is cluster_size bytes (the last cluster of the image
        may be shorter: it is padded with zeroes); ``compressed``: its
        :meth:`compress_cluster`, when done already. Falls back to a normal
        cluster when compression does not save space."""
        cs = self.cluster_size
        n = len(cluster_data)
        self._check_writable(offset, min(n, self.size - offset))
        if offset % cs or n > cs or (n < cs and offset + n != self.size):
            raise UsageError("write_compressed needs one whole, aligned cluster")
        if self.external:
            raise UsageError(f"'{self.filename}': compressed clusters are not supported "
                             "with an external data file")
        comp = compressed if compressed is not None else self.compress_cluster(cluster_data)
        if len(comp) >= cs:         # QEMU's rule: compressed when it fits in cs - 1
            self.write(offset, bytes(cluster_data)[:min(cs, self.size - offset)])
            return
        gc = offset >> self.cb
        _, _, e, bm = self._entry(gc)
        if e or bm:
            self._classify(gc, e, bm)
        n = len(comp)
        off = self._comp_bytes(n)
        dio.pwrite(self.fd, comp, off)
        nsec = ((off + n - 1) >> 9) - (off >> 9)
        entry = COMPRESSED | (nsec << (62 - self._csec_bits)) | off
        self._set_entry(gc, entry, 0)
        if e:
            self._release(e)
