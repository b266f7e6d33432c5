"""qcow2 L1/L2 tables: the entry bits, the L2 table cache, reading and
setting one guest cluster's entry, classifying (and diagnosing) entries, and
the refcount side of an entry (:meth:`L2Tables._release`).

Part of the :class:`.driver.Qcow2` class (a mixin); the design notes are in
:mod:`.driver`.
"""
from __future__ import annotations

import os
import struct

from ...errors import ImageError
from ...native import qcow2 as _nq
from ..base import Driver, Kind
from .header import Header
from .refcount import Refcounts
from ...native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias
    from typing import Any

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

# ``fill(guest_offset, buf)``: fills ``buf`` with the guest view below this
# layer (the backing chain); None: zeroes (see the notes in driver.py)
Fill: TypeAlias = "Callable[[int, memoryview], None] | None"


def _zero(mv: memoryview, a: int, b: int) -> None:
    while a < b:
        n = min(b - a, len(_ZEROES))
        mv[a:a + n] = _ZEROES[:n]
        a += n


class L2Tables(Driver):
    """L1/L2 lookup for :class:`.driver.Qcow2`.

    The state below is set up by ``Qcow2._open`` (driver.py); every mixin of
    the class derives from this one and shares it."""

    header: Header
    file_size: int          # the file's size as last seen (grows with writes)
    cb: int                 # cluster_bits
    extended: bool          # extended L2 entries (subclusters)
    l2e: int                # entries per L2 table
    esz: int                # bytes per L2 entry (8 or 16)
    scs: int                # (sub)cluster size: the allocation unit of a write
    ctype: int              # compression type
    _csec_bits: int         # compressed entry: bits of the sector count
    _coff_mask: int         # compressed entry: the host offset's bits
    l1: list[int]           # the active L1 table, whole
    l1_dirty: bool
    l2cache: dict[int, bytearray]   # L2 tables by host offset
    l2dirty: set[int]               # ... of which changed since the last flush
    #: held guest clusters (see _hold) by L1 index: {gc: (entry, bitmap) on disk}
    _held: dict[int, dict[int, tuple[int, int]]]
    #: held clusters whose old entry's reference is dropped when they land
    _held_refs: dict[int, int]
    _landed_unsynced: bool  # released since the last fsync of the data
    unsafe: bool            # cache=unsafe: no fsync
    _l2dec: _nq.L2Decoder
    _l2map: _nq.L2Mapper
    rc: Refcounts | None    # loaded on first use (see _rc)
    _closed: bool
    _write_prepared: bool
    _comp_cache: tuple[int | None, bytes]   # (guest cluster, its data) last decompressed
    _comp_free: int         # next free byte for compressed data (this session)
    _comp_limit: int
    external: bool          # an external data file holds the data (host == guest offset)

    if TYPE_CHECKING:
        # What the mixins use of each other (driver.py, mapping.py, writes.py).
        def _rc(self) -> Refcounts: ...
        def _check_writable(self, offset: int, length: int) -> None: ...
        def _read_compressed(self, gc: int) -> bytes: ...
        def _pread_into(self, mv: memoryview, host: int) -> None: ...
        def write(self, offset: int, data, fill: Fill = None) -> None: ...
        def _write_header(self) -> None: ...
        @property
        def data_fd(self) -> int: ...
        def _set_rt_location(self, offset: int, clusters: int) -> None: ...

    # ------------------------------------------------------------------
    # L2 cache
    def _l2(self, off: int) -> bytearray:
        t = self.l2cache.get(off)
        if t is None:
            if len(self.l2cache) * self.cluster_size > L2_CACHE_BYTES:
                self._evict()
            raw = dio.pread(self.fd, self.cluster_size, off)
            if len(raw) != self.cluster_size:
                raise ImageError(f"'{self.filename}': L2 table at 0x{off:x} truncated")
            t = self.l2cache[off] = bytearray(raw)
        return t

    def _evict(self) -> None:
        """Make room in the L2 cache: write what may be written
        (:meth:`flush`) and drop the clean tables. A table with held entries
        stays dirty after the flush, so it stays cached: those are bounded by
        the allocations in flight."""
        if self.l2dirty:
            self.flush()
        dirty = self.l2dirty
        for off in [o for o in self.l2cache if o not in dirty]:
            del self.l2cache[off]

    # ------------------------------------------------------------------
    # Held clusters: what a flush may write.
    #
    # allocate() with an ``undo`` list (the copy machinery: the C engine
    # writes the data later, without the I/O lock) *holds* every guest
    # cluster whose entry it points at a host cluster not yet written: the
    # entry in the cache is the new one (readers are kept off by the graph),
    # but what reaches the disk is the old one until the caller says the data
    # landed (:meth:`release_allocated`) or puts the old entry back
    # (:meth:`undo_allocate`). So no flush -- an eviction, a front end's, a
    # second job's, a bitmap store -- ever writes an L2 entry naming data that
    # is not on disk. The refcounts of held clusters may reach the disk
    # first: after a crash that is a leak, never a wrong read. When an old
    # entry named a host cluster that the allocation stops using (compressed,
    # or shared with a snapshot), its reference is dropped only on release.

    def _hold(self, gc0: int, ncl: int, e: int, bm: int) -> None:
        """Hold guest clusters [gc0, gc0+ncl), whose entry on disk must stay
        (e, bm) (the first hold of a cluster wins)."""
        held, l2e, v = self._held, self.l2e, (e, bm)
        a, end = gc0, gc0 + ncl
        while a < end:
            b = min(end, (a // l2e + 1) * l2e)     # one table at a time
            tab = held.get(a // l2e)
            if tab is None:
                held[a // l2e] = dict.fromkeys(range(a, b), v)
            else:
                for gc in range(a, b):
                    tab.setdefault(gc, v)
            a = b

    def _unhold(self, gc: int, land: bool) -> None:
        """Let guest cluster gc's entry reach the disk (``land``: its data is
        written; the reference its old entry held is dropped) or forget the
        hold (its old entry was put back)."""
        tab = self._held.get(gc // self.l2e)
        if tab is not None and tab.pop(gc, None) is not None and not tab:
            del self._held[gc // self.l2e]
        old = self._held_refs.pop(gc, None)
        if old is not None and land:
            self._release(old)

    def release_allocated(self, undo: list[tuple[int, int, int, int]]) -> None:
        """The data of the clusters :meth:`allocate` recorded in ``undo``
        landed: their new entries may reach the disk (at the next flush)."""
        cb, l2e, held = self.cb, self.l2e, self._held
        for s, n, _, _ in undo:
            a, end = s >> cb, -(-(s + n) >> cb)
            if self._held_refs:
                for gc in range(a, end):
                    self._unhold(gc, True)
                continue
            while a < end:                  # one table at a time
                b = min(end, (a // l2e + 1) * l2e)
                tab = held.get(a // l2e)
                if tab is not None:
                    for gc in range(a, b):
                        tab.pop(gc, None)
                    if not tab:
                        del held[a // l2e]
                a = b
        self._landed_unsynced = True    # flush: the data durable before the entries

    def _write_l2_tables(self) -> bool:
        """Write the dirty L2 tables (flush): with the old entry of every
        held cluster, and those tables stay dirty. True when something was
        written (the caller fsyncs)."""
        if not self.l2dirty:
            return False
        if self._landed_unsynced:
            # data the C engine wrote (no fsync of its own) before the entries
            # released for it: they may be in this write
            self._landed_unsynced = False
            if not self.unsafe:
                os.fsync(self.data_fd)
        patch: dict[int, dict[int, tuple[int, int]]] = {}
        for l1i, ents in self._held.items():
            off = self._l2_offset(l1i)
            if off in self.l2dirty:
                patch[off] = ents
        esz, l2e = self.esz, self.l2e
        for off in sorted(self.l2dirty):
            t = self.l2cache[off]
            if off in patch:
                ents = patch[off]
                t = bytearray(t)
                for gc, (e, bm) in ents.items():
                    if esz == 16:
                        struct.pack_into(">QQ", t, (gc % l2e) * 16, e, bm)
                    else:
                        struct.pack_into(">Q", t, (gc % l2e) * 8, e)
            dio.pwrite(self.fd, t, off)
        self.l2dirty.clear()
        self.l2dirty.update(patch)
        return True

    def _l2_offset(self, l1i: int) -> int:
        return self.l1[l1i] & L1_OFFSET_MASK if l1i < len(self.l1) else 0

    def _entry(self, gc: int) -> tuple[bytearray | None, int, int, int]:
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

    def _l2_for_write(self, gc: int) -> tuple[bytearray, int]:
        l1i = gc // self.l2e
        if l1i >= len(self.l1):
            raise ImageError(f"'{self.filename}': write beyond the L1 table")
        e = self.l1[l1i]
        off = e & L1_OFFSET_MASK
        if off and not e & COPIED:
            off = self._cow_l2(l1i, off)
        if not off:
            c = self._rc().alloc_one()
            off = c << self.cb
            self.l2cache[off] = bytearray(self.cluster_size)
            self.l2dirty.add(off)
            self.l1[l1i] = off | COPIED
            self.l1_dirty = True
        return self._l2(off), off

    def _cow_l2(self, l1i: int, off: int) -> int:
        """Copy the shared L2 table at ``off`` (an internal snapshot uses it
        too) to a new cluster for L1 entry l1i; the old one loses a
        reference once the new L1 entry is on disk (flush order). Entries of
        the copy keep COPIED only where the data cluster's refcount is 1."""
        rc = self._rc()
        t = bytearray(self._l2(off))
        n = len(t) // 8
        vals = list(struct.unpack(f">{n}Q", t))
        for j in range(0, n, 2 if self.extended else 1):
            e = vals[j]
            if e & COPIED and rc.get((e & OFFSET_MASK) >> self.cb) != 1:
                vals[j] = e & ~COPIED
        struct.pack_into(f">{n}Q", t, 0, *vals)
        noff = rc.alloc_one() << self.cb
        self.l2cache[noff] = t
        self.l2dirty.add(noff)
        self.l1[l1i] = noff | COPIED
        self.l1_dirty = True
        rc.free_later(off >> self.cb)
        return noff

    def _set_entry(self, gc: int, e: int, bm: int = 0) -> None:
        t, off = self._l2_for_write(gc)
        i = (gc % self.l2e) * self.esz
        if self.extended:
            struct.pack_into(">QQ", t, i, e, bm)
        else:
            struct.pack_into(">Q", t, i, e)
        self.l2dirty.add(off)

    # ------------------------------------------------------------------
    # entry decoding
    def _bad_entry(self, gc: int, e: int, why: str) -> ImageError:
        return ImageError(f"'{self.filename}': L2 entry for guest offset "
                          f"0x{gc << self.cb:x} is corrupt (0x{e:016x}): {why}")

    def _has_host(self, e: int) -> bool:
        """A standard entry (or extended L2 entry's first word) that names a
        host cluster: a non-zero offset, or -- with an external data file,
        where guest cluster 0 lives at host offset 0 -- COPIED (QEMU's
        qcow2_get_cluster_type)."""
        return bool(e & OFFSET_MASK) or (self.external and bool(e & COPIED)
                                         and not e & (COMPRESSED | ZERO))

    def _compressed_span(self, gc: int, e: int) -> tuple[int, int]:
        off = e & self._coff_mask
        nsec = (e >> (62 - self._csec_bits)) & ((1 << self._csec_bits) - 1)
        nbytes = (nsec + 1) * 512 - (off & 511)
        if off == 0 or (off + nbytes > self.file_size + 512 and
                        off + nbytes > self._refresh_size() + 512):
            raise self._bad_entry(gc, e, "compressed data outside the file")
        return off, nbytes

    def _classify(self, gc: int, e: int, bm: int) -> tuple[Kind | str, Any]:
        """Return ('c', None) compressed, or a list of 32 (or 1) subcluster
        states: (Kind, host_offset_of_cluster)."""
        if e & COMPRESSED:
            if self.external:
                raise self._bad_entry(gc, e, "compressed cluster in an image with an "
                                      "external data file")
            if e & COPIED or bm:
                raise self._bad_entry(gc, e, "invalid compressed entry")
            self._compressed_span(gc, e)
            return Kind.COMPRESSED, 0
        if e & STD_RESERVED:
            raise self._bad_entry(gc, e, "reserved bits set")
        h = e & OFFSET_MASK
        if h & (self.cluster_size - 1):
            raise self._bad_entry(gc, e, "data cluster not aligned")
        if self.external:
            if h and h != gc << self.cb:
                raise self._bad_entry(gc, e, "external data file host cluster offset does "
                                      "not match the guest cluster offset")
        elif h and h >= self.file_size and not self._may_extend(h) and h >= self._refresh_size():
            raise self._bad_entry(gc, e, "data cluster beyond the end of the file")
        if not self.extended:
            if e & ZERO:
                if self.header.version < 3:
                    raise self._bad_entry(gc, e, "zero flag in a version 2 image")
                return Kind.ZERO, h
            return (Kind.DATA, h) if self._has_host(e) else (Kind.UNALLOCATED, 0)
        if e & ZERO:
            raise self._bad_entry(gc, e, "zero flag set in an extended L2 entry")
        alloc, zero = bm & ALL_ALLOC, bm >> 32
        if alloc & zero:
            raise self._bad_entry(gc, e, "subcluster both allocated and zero")
        if alloc and not self._has_host(e):
            raise self._bad_entry(gc, e, "allocated subclusters without a host cluster")
        return "ext", (h, alloc, zero)

    def _refresh_size(self) -> int:
        self.file_size = os.fstat(self.fd).st_size
        return self.file_size

    def _may_extend(self, h: int) -> bool:
        # data clusters allocated this session may be past the stat'd size
        return self.rc is not None and (h >> self.cb) < self.rc.end
    # ------------------------------------------------------------------
    # the host clusters an entry uses
    def _release(self, e: int) -> None:
        """Queue the refcount decrements for the host clusters an entry used
        (none in an external data file: its clusters have no refcounts)."""
        if self.external:
            return
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

    def _check_overlap(self, h: int) -> None:
        """Cheap guard: never write guest data over the header, L1 or
        refcount table (QEMU would mark the image corrupt)."""
        if self.external:
            return          # the data file holds no metadata
        c = h >> self.cb
        hd = self.header
        l1a = hd.l1_table_offset >> self.cb
        l1b = (hd.l1_table_offset + len(self.l1) * 8 - 1) >> self.cb
        rta = hd.refcount_table_offset >> self.cb
        if c == 0 or (self.l1 and l1a <= c <= l1b) or rta <= c < rta + hd.refcount_table_clusters:
            raise ImageError(f"'{self.filename}': L2 entry points at metadata (host 0x{h:x}); "
                             "image is corrupt")
