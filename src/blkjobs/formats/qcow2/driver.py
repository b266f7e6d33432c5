"""The qcow2 driver: L1/L2 translation, reads, allocating writes, flush.

Structure (the format: docs/qcow2.md):

* the active L1 table is read whole at open (it is at most 32 MiB; 8 bytes
  per 512 MiB of disk with 64 KiB clusters);
* L2 tables are read on first use into ``bytearray``s keyed by host offset;
  dirty ones are written back by :meth:`flush`. When the cache grows past
  ``L2_CACHE_BYTES`` a full flush is done and clean tables are dropped;
* refcounts live in :class:`.refcount.Refcounts`.

Copy-on-write from the backing file (the hook). At this level an
UNALLOCATED range reads as zeroes (``Driver`` contract). A write that covers
only part of a cluster (with extended L2: of a subcluster) that is not yet
allocated must fill the rest from what the guest saw there before: for
UNALLOCATED parts that is the backing chain, which only the graph knows. So
:meth:`Qcow2.write` and :meth:`Qcow2.write_zeroes` take ``fill``, a callable
``fill(guest_offset, buf)`` that fills the writable ``buf`` with the guest
view below this layer (the graph passes one that reads its backing child;
``None`` means zeroes). ``fill`` is called only for the uncovered head/tail
of newly allocated (sub)clusters and never beyond the virtual size.

Internal snapshots: images with snapshots open read-only only (writable
opens raise ImageError). Without snapshots every allocated cluster has
refcount 1; a normal cluster whose COPIED flag is clear is still treated
correctly (copied to a new cluster before a write), but a shared L2 table is
refused as corrupt.

Flush ordering: data is written in place or into freshly allocated clusters
before any metadata that references it; :meth:`flush` then writes refcount
blocks (+fsync), L2 tables (+fsync), the L1 table (+fsync) and only then the
refcount decrements of freed clusters (+fsync). See ``refcount.py``.

Bulk writes (convert): :meth:`allocate` hands out host runs for a
cluster-aligned guest range; the caller ``pwrite``s every byte of them to
``fd`` and calls :meth:`flush` (the entries already point at the runs).
"""
from __future__ import annotations

import os
import struct

from ...errors import ImageError, UsageError
from ..base import Driver, Kind, Mapping, open_file  # open_file: refuses FIFOs & co.
from .compress import compress as _compress
from .compress import decompress as _decompress
from .header import (AUTOCLEAR_KNOWN, INCOMPAT_CORRUPT,
                     INCOMPAT_DIRTY, COMPAT_LAZY_REFCOUNTS, parse_header,
                     read_bitmap_directory)
from .refcount import Refcounts
from ...native import qcow2 as _nq

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
OFFSET_MASK = 0x00FFFFFFFFFFFE00
STD_RESERVED = 0x3F000000000001FE
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
ALL_ALLOC = 0xFFFFFFFF
ALL_ZERO = 0xFFFFFFFF << 32
L2_CACHE_BYTES = 32 << 20
_ZEROES = bytes(1 << 20)


def _zero(mv, a, b):
    while a < b:
        n = min(b - a, len(_ZEROES))
        mv[a:a + n] = _ZEROES[:n]
        a += n


class Qcow2(Driver):
    """A qcow2 image. Open with ``Qcow2(path, read_only=True)``."""

    format_name = "qcow2"
    can_allocate = True
    can_compress = True
    can_set_backing = True
    can_check = True
    has_metadata = True

    def __init__(self, path: str, read_only: bool = True):
        self.filename = path
        self.read_only = read_only
        # cache=unsafe (``convert -t unsafe``, qemu-img's default for convert):
        # metadata is still written in the safe order, but never fsync'd.
        self.unsafe = False
        self._fd = open_file(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._closed = False
        try:
            self._open()
        except BaseException:
            self._closed = True
            os.close(self._fd)
            raise

    @property
    def fd(self) -> int:
        """The open file's descriptor; after :meth:`close` an error, never
        the number (the OS gives it to the next file opened)."""
        if self._closed:
            raise ImageError(f"'{self.filename}': image is closed")
        return self._fd

    # ------------------------------------------------------------------
    # open
    def _open(self):
        st = os.fstat(self.fd)
        self.file_size = st.st_size
        buf = os.pread(self.fd, 2 << 20, 0)
        h = self.header = parse_header(buf, self.file_size, self.filename)
        self.cb = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.extended = h.extended_l2
        self.l2e = h.l2_entries
        self.esz = 16 if self.extended else 8
        self.scs = cs // 32 if self.extended else cs         # (sub)cluster size
        self.backing_filename = h.backing_file
        self.backing_format = h.backing_format
        self.ctype = h.compression_type
        self._csec_bits = self.cb - 8
        self._coff_mask = (1 << (62 - self._csec_bits)) - 1
        # validated (and bounded) like qemu-img does at open
        self.bitmaps = read_bitmap_directory(self.fd, h, self.file_size, self.filename)
        self._pbm = None          # bitmaps.Bitmaps, loaded on first use
        raw = os.pread(self.fd, h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        if len(raw) != h.l1_size * 8:
            raise ImageError(f"'{self.filename}': L1 table truncated")
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        for i, e in enumerate(self.l1):
            if e & L1_RESERVED:
                raise ImageError(f"'{self.filename}': L1 entry {i} has reserved bits set (0x{e:x})")
            off = e & L1_OFFSET_MASK
            if off and off + cs > self.file_size:
                raise ImageError(f"'{self.filename}': L1 entry {i} points beyond the end "
                                 f"of the file (0x{off:x})")
        self.l1_dirty = False
        self.l2cache: dict[int, bytearray] = {}
        self._l2dec = _nq.L2Decoder()
        self.l2dirty: set[int] = set()
        self._header_dirty = False
        self._comp_cache = (None, None)
        self._comp_free = 0       # next free byte for compressed data (this session)
        self._comp_limit = 0
        self.rc = None
        self._write_prepared = False
        if not self.read_only:
            self._open_rw()

    def _rc(self) -> Refcounts:
        if self.rc is None:
            h = self.header
            self.rc = Refcounts(self.fd, self.cb, h.refcount_order, h.refcount_table_offset,
                                h.refcount_table_clusters, self.file_size,
                                self._set_rt_location, self.filename)
        self.rc.unsafe = self.unsafe
        return self.rc

    def _open_rw(self):
        h = self.header
        if h.incompatible & INCOMPAT_CORRUPT:
            raise ImageError(f"'{self.filename}': image is corrupt; cannot be opened read/write")
        if h.nb_snapshots:
            raise ImageError(f"'{self.filename}': image has internal snapshots; blkjobs "
                             "opens such images read-only only")
        self._write_prepared = False

    @property
    def persistent_bitmaps(self):
        """The image's persistent dirty bitmaps (:class:`.bitmaps.Bitmaps`).
        Guest writes set the bits of the enabled ones; changes are stored at
        close."""
        if self._pbm is None:
            from .bitmaps import Bitmaps
            self._pbm = Bitmaps(self)
        return self._pbm

    def _prepare_write(self):
        """Before the first modification (not at open: opening never
        writes): rebuild refcounts of a dirty image, clear unknown autoclear
        bits."""
        self._write_prepared = True
        h = self.header
        if h.incompatible & INCOMPAT_DIRTY:
            # Refcounts may be stale (lazy refcounts): rebuild them first.
            from .check import check
            res = check(self, repair="all")
            if res.get("corruptions", 0) - res.get("corruptions-fixed", 0) > 0:
                raise ImageError(f"'{self.filename}': dirty image could not be repaired")
            h.incompatible &= ~INCOMPAT_DIRTY
            self._header_dirty = True
        if h.autoclear & ~AUTOCLEAR_KNOWN:
            h.autoclear &= AUTOCLEAR_KNOWN
            self._header_dirty = True
        if self._header_dirty:
            self._write_header()

    def _set_rt_location(self, offset, clusters):
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._write_header()

    def _write_header(self):
        data = self.header.pack()
        old = getattr(self, "_header_len", 0)
        os.pwrite(self.fd, data.ljust(max(old, len(data)), b"\0"), 0)
        self._header_len = len(data)
        self._fsync()
        self._header_dirty = False

    @property
    def size(self) -> int:
        return self.header.size

    # ------------------------------------------------------------------
    # L2 cache
    def _l2(self, off: int) -> bytearray:
        t = self.l2cache.get(off)
        if t is None:
            if len(self.l2cache) * self.cluster_size > L2_CACHE_BYTES:
                if self.l2dirty:
                    self.flush()
                self.l2cache.clear()
            raw = os.pread(self.fd, self.cluster_size, off)
            if len(raw) != self.cluster_size:
                raise ImageError(f"'{self.filename}': L2 table at 0x{off:x} truncated")
            t = self.l2cache[off] = bytearray(raw)
        return t

    def _l2_offset(self, l1i: int) -> int:
        return self.l1[l1i] & L1_OFFSET_MASK if l1i < len(self.l1) else 0

    def _entry(self, gc: int):
        """(table or None, byte index, entry, bitmap) for guest cluster gc."""
        l1i, l2i = divmod(gc, self.l2e)
        off = self._l2_offset(l1i)
        if not off:
            return None, 0, 0, 0
        t = self._l2(off)
        i = l2i * self.esz
        if self.extended:
            e, bm = struct.unpack_from(">QQ", t, i)
        else:
            e, bm = struct.unpack_from(">Q", t, i)[0], 0
        return t, i, e, bm

    def _l2_for_write(self, gc: int):
        l1i = gc // self.l2e
        if l1i >= len(self.l1):
            raise ImageError(f"'{self.filename}': write beyond the L1 table")
        e = self.l1[l1i]
        off = e & L1_OFFSET_MASK
        if off and not e & COPIED:
            raise ImageError(f"'{self.filename}': L2 table 0x{off:x} is shared "
                             "(COPIED clear); refusing to write")
        if not off:
            c = self._rc().alloc_one()
            off = c << self.cb
            self.l2cache[off] = bytearray(self.cluster_size)
            self.l2dirty.add(off)
            self.l1[l1i] = off | COPIED
            self.l1_dirty = True
        return self._l2(off), off

    def _set_entry(self, gc: int, e: int, bm: int = 0):
        t, off = self._l2_for_write(gc)
        i = (gc % self.l2e) * self.esz
        if self.extended:
            struct.pack_into(">QQ", t, i, e, bm)
        else:
            struct.pack_into(">Q", t, i, e)
        self.l2dirty.add(off)

    # ------------------------------------------------------------------
    # entry decoding
    def _bad_entry(self, gc, e, why):
        return ImageError(f"'{self.filename}': L2 entry for guest offset "
                          f"0x{gc << self.cb:x} is corrupt (0x{e:016x}): {why}")

    def _compressed_span(self, gc, e):
        off = e & self._coff_mask
        nsec = (e >> (62 - self._csec_bits)) & ((1 << self._csec_bits) - 1)
        nbytes = (nsec + 1) * 512 - (off & 511)
        if off == 0 or (off + nbytes > self.file_size + 512 and
                        off + nbytes > self._refresh_size() + 512):
            raise self._bad_entry(gc, e, "compressed data outside the file")
        return off, nbytes

    def _classify(self, gc: int, e: int, bm: int):
        """Return ('c', None) compressed, or a list of 32 (or 1) subcluster
        states: (Kind, host_offset_of_cluster)."""
        if e & COMPRESSED:
            if e & COPIED or bm:
                raise self._bad_entry(gc, e, "invalid compressed entry")
            self._compressed_span(gc, e)
            return Kind.COMPRESSED, 0
        if e & STD_RESERVED:
            raise self._bad_entry(gc, e, "reserved bits set")
        h = e & OFFSET_MASK
        if h & (self.cluster_size - 1):
            raise self._bad_entry(gc, e, "data cluster not aligned")
        if h and h >= self.file_size and not self._may_extend(h) and h >= self._refresh_size():
            raise self._bad_entry(gc, e, "data cluster beyond the end of the file")
        if not self.extended:
            if e & ZERO:
                if self.header.version < 3:
                    raise self._bad_entry(gc, e, "zero flag in a version 2 image")
                return Kind.ZERO, h
            return (Kind.DATA, h) if h else (Kind.UNALLOCATED, 0)
        if e & ZERO:
            raise self._bad_entry(gc, e, "zero flag set in an extended L2 entry")
        alloc, zero = bm & ALL_ALLOC, bm >> 32
        if alloc & zero:
            raise self._bad_entry(gc, e, "subcluster both allocated and zero")
        if alloc and not h:
            raise self._bad_entry(gc, e, "allocated subclusters without a host cluster")
        return "ext", (h, alloc, zero)

    def _refresh_size(self) -> int:
        self.file_size = os.fstat(self.fd).st_size
        return self.file_size

    def _may_extend(self, h):
        # data clusters allocated this session may be past the stat'd size
        return self.rc is not None and (h >> self.cb) < self.rc.end

    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        """Inside one plain data cluster (standard L2 entries only); for_write:
        with COPIED set (refcount 1, overwritable in place). Anything else --
        compressed, zero, unallocated, suspicious -- is None: the general path
        classifies (and diagnoses) it."""
        cb = self.cb
        if (self.extended or length <= 0 or offset < 0 or offset + length > self.size
                or offset >> cb != (offset + length - 1) >> cb or self._closed):
            return None
        if for_write and (self.read_only or not self._write_prepared):
            return None
        _, _, e, _ = self._entry(offset >> cb)
        h = e & OFFSET_MASK
        if (not h or e & (COMPRESSED | ZERO | STD_RESERVED) or h & (self.cluster_size - 1)
                or (for_write and not e & COPIED)
                or (h >= self.file_size and not self._may_extend(h))):
            return None
        if for_write:
            self._check_overlap(h)
            # the caller writes there (past this driver): the persistent
            # bitmaps must see it as every other write does
            self._check_writable(offset, length)
        return h + (offset & (self.cluster_size - 1))

    # ------------------------------------------------------------------
    # map_host
    def map_host(self, offset: int, length: int) -> list[Mapping]:
        """Runs of this layer, coalesced (DATA runs contiguous in the file).
        ZERO runs carry the host offset of a preallocated zero cluster
        (``qemu-img map`` prints it); the C copy engine uses DATA runs only."""
        if self._closed:        # every read starts here: no stale answers
            raise ImageError(f"'{self.filename}': image is closed")
        end = min(offset + length, self.size)
        out: list = []   # [start, length, kind, host]

        def emit(s, n, kind, host=None):
            if out:
                p = out[-1]
                if p[2] == kind and p[0] + p[1] == s and (
                        (host is None and p[3] is None)
                        or (host is not None and p[3] is not None and p[3] + p[1] == host)):
                    p[1] += n
                    return
            out.append([s, n, kind, host])

        cs, cb, l2e = self.cluster_size, self.cb, self.l2e
        pos = offset
        while pos < end:
            gc0 = pos >> cb
            l1i = gc0 // l2e
            span_end = min(end, (l1i + 1) * l2e * cs)
            l2off = self._l2_offset(l1i)
            if not l2off:
                emit(pos, span_end - pos, Kind.UNALLOCATED)
                pos = span_end
                continue
            t = self._l2(l2off)
            gc1 = (span_end - 1) >> cb
            i0 = (gc0 % l2e) * self.esz
            i1 = (gc1 % l2e + 1) * self.esz
            if t[i0:i1].count(0) == i1 - i0:
                emit(pos, span_end - pos, Kind.UNALLOCATED)
                pos = span_end
                continue
            n = gc1 - gc0 + 1
            k0 = 0
            if not self.extended:
                # The C hot loop decodes the well-formed entries into runs;
                # it stops at anything unusual, which the loop below handles.
                limit = self.file_size
                if self.rc is not None:
                    limit = max(limit, self.rc.end << cb)
                runs, stop = self._l2dec.runs(t, gc0 % l2e, n, cb, limit,
                                              self.header.version >= 3)
                base = l1i * l2e
                for first, count, kind, host in runs:
                    cstart = (base + first) << cb
                    s = max(pos, cstart)
                    e_ = min(span_end, (base + first + count) << cb)
                    if kind == _nq.DATA:
                        emit(s, e_ - s, Kind.DATA, host + s - cstart)
                    elif kind == _nq.ZERO:
                        emit(s, e_ - s, Kind.ZERO, (host + s - cstart) if host else None)
                    else:
                        emit(s, e_ - s, Kind.UNALLOCATED)
                k0 = stop - gc0 % l2e
                if k0 >= n:
                    pos = span_end
                    continue
            if self.extended:
                vals = struct.unpack_from(f">{2 * n}Q", t, i0)
            else:
                vals = struct.unpack_from(f">{n}Q", t, i0)
            for k in range(k0, n):
                gc = gc0 + k
                cstart = gc << cb
                s = max(pos, cstart)
                e_ = min(span_end, cstart + cs)
                if self.extended:
                    e, bm = vals[2 * k], vals[2 * k + 1]
                else:
                    e, bm = vals[k], 0
                if e == 0 and bm == 0:
                    emit(s, e_ - s, Kind.UNALLOCATED)
                    continue
                kind, h = self._classify(gc, e, bm)
                if kind != "ext":
                    emit(s, e_ - s, kind, (h + s - cstart) if h else None)
                    continue
                h, alloc, zero = h
                if alloc == ALL_ALLOC:
                    emit(s, e_ - s, Kind.DATA, h + s - cstart)
                    continue
                if zero == ALL_ALLOC:
                    emit(s, e_ - s, Kind.ZERO, (h + s - cstart) if h else None)
                    continue
                scs = self.scs
                for j in range((s - cstart) // scs, (e_ - 1 - cstart) // scs + 1):
                    a = max(s, cstart + j * scs)
                    b = min(e_, cstart + (j + 1) * scs)
                    if alloc >> j & 1:
                        emit(a, b - a, Kind.DATA, h + a - cstart)
                    elif zero >> j & 1:
                        emit(a, b - a, Kind.ZERO, (h + a - cstart) if h else None)
                    else:   # QEMU reports the host cluster of such subclusters too
                        emit(a, b - a, Kind.UNALLOCATED, (h + a - cstart) if h else None)
            pos = span_end
        return [Mapping(s, n, k, h) for s, n, k, h in out]

    # ------------------------------------------------------------------
    # reads
    def _read_compressed(self, gc: int) -> bytes:
        if self._comp_cache[0] == gc:
            return self._comp_cache[1]
        _, _, e, bm = self._entry(gc)
        off, nbytes = self._compressed_span(gc, e)
        raw = os.pread(self.fd, nbytes, off)
        data = _decompress(self.ctype, raw, self.cluster_size)
        self._comp_cache = (gc, data)
        return data

    def _pread_into(self, mv, host):
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], host + done)
            if n <= 0:
                _zero(mv, done, len(mv))   # preallocated clusters past EOF read as zeroes
                return
            done += n

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if offset + n > self.size:
            raise UsageError(f"read beyond the end of the image ({offset}+{n} > {self.size})")
        for m in self.map_host(offset, n):
            a, b = m.start - offset, m.start - offset + m.length
            if m.kind == Kind.DATA:
                self._pread_into(mv[a:b], m.host_offset)
            elif m.kind == Kind.COMPRESSED:
                pos = m.start
                while pos < m.start + m.length:
                    gc = pos >> self.cb
                    cend = min((gc + 1) << self.cb, m.start + m.length)
                    data = self._read_compressed(gc)
                    ci = pos - (gc << self.cb)
                    mv[pos - offset:cend - offset] = data[ci:ci + cend - pos]
                    pos = cend
            else:
                _zero(mv, a, b)

    def read(self, offset: int, length: int) -> bytes:
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)

    # ------------------------------------------------------------------
    # writes
    def _check_writable(self, offset, length):
        if self.read_only:
            raise ImageError(f"'{self.filename}': image is opened read-only")
        if self._closed:
            raise ImageError(f"'{self.filename}': image is closed")
        if not self._write_prepared:
            self._prepare_write()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"write beyond the end of the image ({offset}+{length} > {self.size})")
        if self.bitmaps or self._pbm is not None:
            pbm = self.persistent_bitmaps
            pbm.start_tracking()
            pbm.mark_dirty(offset, length)

    def _release(self, e: int):
        """Queue the refcount decrements for the host clusters an entry used."""
        rc = self._rc()
        if e & COMPRESSED:
            off = e & self._coff_mask
            nsec = (e >> (62 - self._csec_bits)) & ((1 << self._csec_bits) - 1)
            last = off + (nsec + 1) * 512 - (off & 511) - 1
            for c in range(off >> self.cb, (last >> self.cb) + 1):
                rc.free_later(c)
        else:
            h = e & OFFSET_MASK
            if h:
                rc.free_later(h >> self.cb)

    def _check_overlap(self, h: int):
        """Cheap guard: never write guest data over the header, L1 or
        refcount table (QEMU would mark the image corrupt)."""
        c = h >> self.cb
        hd = self.header
        l1a = hd.l1_table_offset >> self.cb
        l1b = (hd.l1_table_offset + len(self.l1) * 8 - 1) >> self.cb
        rta = hd.refcount_table_offset >> self.cb
        if c == 0 or (self.l1 and l1a <= c <= l1b) or rta <= c < rta + hd.refcount_table_clusters:
            raise ImageError(f"'{self.filename}': L2 entry points at metadata (host 0x{h:x}); "
                             "image is corrupt")

    def _fill(self, fill, guest, mv):
        """Fill mv with the view below this layer at guest offset (zeroes past
        the virtual size or without a fill hook)."""
        n = max(0, min(len(mv), self.size - guest))
        if fill is not None and n:
            fill(guest, mv[:n])
        else:
            _zero(mv, 0, n)
        _zero(mv, n, len(mv))

    def _old_sub(self, gc, e, bm, j, mv, a_in, fill):
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
            elif h:
                self._pread_into(mv, h + a_in)
            else:
                self._fill(fill, cstart + a_in, mv)

    def _write_cluster(self, gc: int, a: int, data, fill):
        """Write data at in-cluster offset a of guest cluster gc (partial)."""
        cs, scs = self.cluster_size, self.scs
        _, _, e, bm = self._entry(gc)
        if e or bm:
            self._classify(gc, e, bm)
        h = e & OFFSET_MASK
        b = a + len(data)
        if e & COMPRESSED or (h and not e & COPIED):
            # COW of the whole cluster into a fresh one
            buf = bytearray(cs)
            mv = memoryview(buf)
            for j in range(cs // scs):
                self._old_sub(gc, e, bm, j, mv[j * scs:(j + 1) * scs], j * scs, fill)
            buf[a:b] = data
            nh = self._rc().alloc_one() << self.cb
            os.pwrite(self.fd, buf, nh)
            self._set_entry(gc, nh | COPIED, ALL_ALLOC if self.extended else 0)
            self._release(e)
            return
        if not h:
            h = self._rc().alloc_one() << self.cb
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
                        done += os.pwrite(self.fd, data[done:], h + a + done)
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
        os.pwrite(self.fd, buf, h + sa)
        if self.extended:
            bits = ((1 << (j1 + 1)) - 1) ^ ((1 << j0) - 1)
            bm = (bm | bits) & ~(bits << 32)
            self._set_entry(gc, h | COPIED, bm)
        elif (e & ~COPIED) != h or not e & COPIED:
            self._set_entry(gc, h | COPIED)

    def write(self, offset: int, data, fill=None) -> None:
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
                for m in self.allocate(cstart, full_end - cstart):
                    d = data[m.start - offset:m.start - offset + m.length]
                    done = 0
                    while done < len(d):
                        done += os.pwrite(self.fd, d[done:], m.host_offset + done)
                pos = full_end
                continue
            b = min(end, cend)
            self._write_cluster(gc, pos - cstart, data[pos - offset:b - offset], fill)
            pos = b

    @property
    def alloc_end(self) -> int:
        """Host offset where fresh allocation starts: a cluster that
        :meth:`allocate` returns at or past this offset was never used before
        (it reads as zeroes); clusters below it may be reused ones."""
        return self._rc().end << self.cb

    def allocate(self, offset: int, length: int,
                 undo: list[tuple[int, int, int, int]] | None = None) -> list[Mapping]:
        """Allocate host clusters for the cluster-aligned guest range (the end
        may be the virtual size) and return DATA runs in guest order.

        The L2 entries point at the returned runs immediately (in memory):
        the caller must write every byte of every run to ``fd`` before the
        next :meth:`flush` (a crash before the flush loses nothing: the
        metadata is not on disk yet), or put back what it could not fill with
        :meth:`undo_allocate`. Until then those clusters read whatever the
        file holds there, so readers of this image must be held off them.
        Clusters already allocated with refcount 1 are reused in place;
        others get new clusters, taken as one contiguous run at the end of
        the file when possible.

        ``undo``: for every guest range whose content this makes undefined
        until written, (start, length, old L2 entry, old bitmap) is appended:
        :meth:`undo_allocate` puts it back (ranges that read through to the
        backing file, zero clusters, extended-L2 subclusters not allocated).
        A compressed or shared cluster replaced by a new one is not recorded:
        its old reference is already released."""
        self._check_writable(offset, length)
        cs, cb = self.cluster_size, self.cb
        if offset % cs or (length % cs and offset + length != self.size):
            raise UsageError(f"allocate: range {offset}+{length} is not cluster aligned")
        g0, g1 = offset >> cb, -(-(offset + length) // cs)
        runs: list = []   # [guest_start, length, host]

        def note(gc0, ncl, e=0, bm=0):
            if undo is None:
                return
            s, n = gc0 << cb, min(ncl << cb, self.size - (gc0 << cb))
            last = undo[-1] if undo else None
            if last and not (e or bm or last[2] or last[3]) and last[0] + last[1] == s:
                undo[-1] = (last[0], last[1] + n, 0, 0)
            else:
                undo.append((s, n, e, bm))

        def add(gs, host, ncl):
            ln = min(ncl * cs, self.size - gs)
            if runs and runs[-1][0] + runs[-1][1] == gs and runs[-1][2] + runs[-1][1] == host:
                runs[-1][1] += ln
            else:
                runs.append([gs, ln, host])

        need: list = []   # guest clusters needing new host clusters

        def flush_need():
            if not need:
                return
            rc = self._rc()
            it = iter(need)
            for c0, k in rc.alloc(len(need)):
                for i in range(k):
                    gc = next(it)
                    self._set_entry(gc, ((c0 + i) << cb) | COPIED,
                                    ALL_ALLOC if self.extended else 0)
                    add(gc << cb, (c0 + i) << cb, 1)
            need.clear()

        def fast_span(a, b) -> bool:
            # [a, b) inside one L2 table, all entries zero (a fresh convert
            # target): allocate in bulk, one pack_into per host run
            esz = self.esz
            off = self._l2_offset(a // self.l2e)
            i0 = (a % self.l2e) * esz
            if off:
                t = self._l2(off)
                if t[i0:i0 + (b - a) * esz].count(0) != (b - a) * esz:
                    return False
            flush_need()
            t, off = self._l2_for_write(a)
            note(a, b - a)
            gc = a
            for c0, k in self._rc().alloc(b - a):
                if self.extended:
                    vals = [v for c in range(c0, c0 + k) for v in ((c << cb) | COPIED, ALL_ALLOC)]
                else:
                    vals = [(c << cb) | COPIED for c in range(c0, c0 + k)]
                struct.pack_into(f">{len(vals)}Q", t, i0 + (gc - a) * esz, *vals)
                add(gc << cb, c0 << cb, k)
                gc += k
            self.l2dirty.add(off)
            return True

        gc = g0
        while gc < g1:
            span_end = min(g1, (gc // self.l2e + 1) * self.l2e)
            if span_end - gc >= 16 and fast_span(gc, span_end):
                gc = span_end
                continue
            for gc in range(gc, span_end):
                old = self._alloc_one_cluster(gc, need, flush_need, add)
                if old is not None:
                    note(gc, 1, *old)
            gc = span_end
        flush_need()
        return [Mapping(s, n, Kind.DATA, h) for s, n, h in runs]

    def _alloc_one_cluster(self, gc, need, flush_need, add) -> tuple[int, int] | None:
        """allocate() for one guest cluster: reuse it in place or queue it.
        The old (entry, bitmap) when what it read is now undefined until
        written and can be put back (see allocate's ``undo``)."""
        cb = self.cb
        _, _, e, bm = self._entry(gc)
        if e or bm:
            self._classify(gc, e, bm)
        h = e & OFFSET_MASK
        if h and e & COPIED and not e & COMPRESSED:
            self._check_overlap(h)
            flush_need()
            changed = None
            if self.extended:
                if bm != ALL_ALLOC:
                    self._set_entry(gc, h | COPIED, ALL_ALLOC)
                    changed = (e, bm)
            elif e & ZERO:
                self._set_entry(gc, h | COPIED)
                changed = (e, bm)
            add(gc << cb, h, 1)
            return changed
        if e:
            self._release(e)
        need.append(gc)
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
                if h and h != old_e & OFFSET_MASK:      # a cluster allocate() took
                    self._release(e)
                    _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, h, cs)
                self._set_entry(gc, old_e, old_bm)

    def write_compressed(self, offset: int, cluster_data) -> None:
        """Store one whole guest cluster compressed (for convert -c).
        ``cluster_data`` is cluster_size bytes (the last cluster of the image
        may be shorter: it is padded with zeroes). Falls back to a normal
        cluster when compression does not save space."""
        cs = self.cluster_size
        data = bytes(cluster_data)
        self._check_writable(offset, min(len(data), self.size - offset))
        if offset % cs or len(data) > cs or (len(data) < cs and offset + len(data) != self.size):
            raise UsageError("write_compressed needs one whole, aligned cluster")
        data = data.ljust(cs, b"\0")
        comp = _compress(self.ctype, data)
        if len(comp) >= cs - 512:
            self.write(offset, data[:min(cs, self.size - offset)])
            return
        gc = offset >> self.cb
        _, _, e, bm = self._entry(gc)
        if e or bm:
            self._classify(gc, e, bm)
        rc = self._rc()
        n = len(comp)       # < cluster_size - 512: never spans two host clusters
        if self._comp_free and self._comp_free + n <= self._comp_limit:
            off = self._comp_free
            rc.incref(off >> self.cb)          # one more compressed cluster touches it
        else:
            off = rc.alloc_one() << self.cb
            self._comp_limit = off + cs
        os.pwrite(self.fd, comp, off)
        self._comp_free = off + n
        if self._comp_free >= self._comp_limit:
            self._comp_free = self._comp_limit = 0
        nsec = ((off + n - 1) >> 9) - (off >> 9)
        entry = COMPRESSED | (nsec << (62 - self._csec_bits)) | off
        self._set_entry(gc, entry, 0)
        if e:
            self._release(e)

    def _full_clusters(self, offset, length):
        cs = self.cluster_size
        end = offset + length
        a = -(-offset // cs) * cs
        b = end if end == self.size else end // cs * cs
        return a, max(a, b)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True, fill=None) -> None:
        """Make the range read as zeroes. Whole clusters become zero clusters
        (v3; host clusters kept when ``may_unmap`` is False and the cluster is
        ours), whole subclusters get their zero bit (extended L2), the rest is
        written as zero bytes (``fill`` as in :meth:`write`). v2 images have no
        zero flag: whole clusters are unmapped when there is no backing file,
        else zeroes are written."""
        self._check_writable(offset, length)
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
            keep = (not may_unmap) and h and e & COPIED and not e & COMPRESSED
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

    def _zero_partial(self, start, end, fill):
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
                    self._write_zero_bytes(pos, sa, fill)
                    j0, j1 = (sa - cstart) // scs, (sb - cstart) // scs
                    bits = ((1 << j1) - 1) ^ ((1 << j0) - 1)
                    _, _, e, bm = self._entry(gc)
                    self._set_entry(gc, e, (bm & ~bits) | (bits << 32))
                    self._write_zero_bytes(min(sb, cend), cend, fill)
                else:
                    self._write_zero_bytes(pos, cend, fill)
                pos = cend
            return
        self._write_zero_bytes(start, end, fill)

    def _write_zero_bytes(self, start, end, fill):
        if start < end:
            self.write(start, bytes(end - start), fill=fill)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (partial ones are left alone, like QEMU).
        Afterwards they read as zeroes when the image is v3 or has no backing
        file (a zero cluster is used when there is a backing file), and from
        the backing file in a v2 image with one."""
        self._check_writable(offset, length)
        a, b = self._full_clusters(offset, length)
        if a >= b:
            return
        use_zero = bool(self.backing_filename) and self.header.version >= 3
        for gc in range(a >> self.cb, -(-b // self.cluster_size)):
            _, _, e, bm = self._entry(gc)
            if e or bm:
                self._classify(gc, e, bm)
            if self.extended:
                ne, nbm = (0, ALL_ZERO) if use_zero else (0, 0)
            else:
                ne, nbm = (ZERO, 0) if use_zero else (0, 0)
            if (e, bm) == (ne, nbm):
                continue
            if e:
                self._release(e)
            self._set_entry(gc, ne, nbm)

    # ------------------------------------------------------------------
    # flush / close
    def flush(self) -> None:
        if self.read_only or self._closed:
            return
        rc = self.rc
        if rc is not None:
            # Every allocated cluster must lie inside the file (qemu-img check
            # counts references past EOF as errors): extend sparsely.
            if os.fstat(self.fd).st_size < rc.end << self.cb:
                os.ftruncate(self.fd, rc.end << self.cb)
            rc.flush_increments()
        if self.l2dirty:
            for off in sorted(self.l2dirty):
                os.pwrite(self.fd, self.l2cache[off], off)
            self.l2dirty.clear()
            self._fsync()
        if self.l1_dirty:
            os.pwrite(self.fd, struct.pack(f">{len(self.l1)}Q", *self.l1),
                      self.header.l1_table_offset)
            self.l1_dirty = False
            self._fsync()
        if rc is not None:
            rc.apply_frees()
        if self._header_dirty:
            self._write_header()
        self.file_size = max(self.file_size, os.fstat(self.fd).st_size)

    def _fsync(self) -> None:
        if not self.unsafe:
            os.fsync(self.fd)

    def close(self) -> None:
        """Flush and close. The file is closed (and the driver unusable)
        even when the flush fails; its error is raised afterwards."""
        if self._closed:
            return
        try:
            if not self.read_only:
                if self._pbm is not None:
                    self._pbm.store()
                self.flush()
        finally:
            self._closed = True
            os.close(self._fd)

    # ------------------------------------------------------------------
    # header changes
    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name and format in the header (what
        ``qemu-img rebase -u`` does). Does not open anything."""
        if self.read_only:
            raise ImageError(f"'{self.filename}': image is opened read-only")
        if not self._write_prepared:
            self._prepare_write()
        self.flush()
        h = self.header
        old = (h.backing_file, h.backing_format)
        h.backing_file, h.backing_format = filename or None, (fmt if filename else None)
        try:
            h.pack()
        except ImageError:
            h.backing_file, h.backing_format = old
            raise
        self._write_header()
        self.backing_filename, self.backing_format = h.backing_file, h.backing_format

    def header_bytes(self) -> bytes:
        return os.pread(self.fd, self.cluster_size, 0)

    def set_unsafe(self, unsafe: bool) -> None:
        self.unsafe = unsafe

    @property
    def dirty_flag(self) -> bool:
        return bool(self.header.incompatible & INCOMPAT_DIRTY)

    def info(self) -> dict:
        h = self.header
        d = {"compat": "1.1" if h.version >= 3 else "0.10",
             "compression-type": "zstd" if h.compression_type == 1 else "zlib"}
        if h.version >= 3:
            d.update({"lazy-refcounts": bool(h.compatible & COMPAT_LAZY_REFCOUNTS),
                      "refcount-bits": h.refcount_bits,
                      "corrupt": bool(h.incompatible & INCOMPAT_CORRUPT),
                      "extended-l2": self.extended})
        else:
            d["refcount-bits"] = h.refcount_bits
        if self.bitmaps:       # after lazy-refcounts, as qemu-img prints them
            rest = {k: d.pop(k) for k in ("refcount-bits", "corrupt", "extended-l2") if k in d}
            d["bitmaps"] = self.persistent_bitmaps.info()
            d.update(rest)
        return {"type": "qcow2", "data": d}

    def check(self, repair: str | None = None) -> dict:
        from .check import check
        return check(self, repair)
