"""qcow2 persistent dirty bitmaps (the bitmaps header extension): load,
change and store them as QEMU does.

Layout (docs/qcow2.md, "Bitmaps"): header extension 0x23852875 holds the
number of bitmaps and the offset/size of the *bitmap directory*; each
directory entry names one bitmap (table offset and size, flags, type,
granularity bits, name) and is padded to 8 bytes. A bitmap's *table* has one
8-byte entry per cluster of serialized bitmap: 0 = all zeroes, 1 = all ones,
else the offset of a data cluster. Serialized bits: byte k, bit j (least
significant first) is granule 8k+j; bit i covers guest bytes
[i*granularity, (i+1)*granularity). Autoclear bit 0 says the extension is
valid; a program that does not know bitmaps clears it on write, and the
extension is then ignored (and dropped on the next store).

Flags: ``in_use`` (bit 0) is set on disk while a writer tracks the bitmap;
found set at open (a crash, a SIGKILL) it makes the bitmap *inconsistent*:
listed, removable, never read or used. ``auto`` (bit 1) is "enabled": writes
through this driver set its bits. Bit 2 (extra_data_compatible) and any other
bit are refused at open as by qemu-img (header.read_bitmap_directory).

Store order (crash-safe, QEMU's): data clusters, tables and the new directory
go to newly allocated clusters, their refcounts are written and synced, then
the header extension is switched to the new directory, then the clusters of
the old directory and of replaced tables are freed. A crash at any point
leaves the old or the new set of bitmaps, plus leaked clusters at worst.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from ...errors import ImageError, UsageError
from ...native.bitmap import Bitmap
from .header import (AUTOCLEAR_BITMAPS, BME_FLAG_IN_USE, BME_MAX_GRANULARITY_BITS,
                     BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE,
                     BME_MIN_GRANULARITY_BITS, BT_DIRTY_TRACKING_BITMAP, EXT_BITMAPS,
                     MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS)
from ...native import dio

BME_FLAG_AUTO = 1 << 1
TABLE_RESERVED = 0xFF000000000001FE
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1
_ENTRY = struct.Struct(">QIIBBHI")
_EXT = struct.Struct(">IIQQ")


#: A refused bitmap operation raises UsageError with QEMU's text (which may
#: carry a second, hint line, as qemu-img prints it).
BitmapError = UsageError


def inconsistent_text(name: str) -> str:
    return (f"Bitmap '{name}' is inconsistent and cannot be used\n"
            "Try block-dirty-bitmap-remove to delete this bitmap from disk")


@dataclass
class PersistentBitmap:
    """One bitmap of the image. ``bitmap`` is the in-memory
    :class:`~blkjobs.native.bitmap.Bitmap` once loaded; ``dirty`` says its
    content differs from its table on disk (which is then rewritten)."""
    name: str
    granularity: int
    in_use: bool = False          # found in use at open: inconsistent
    enabled: bool = True          # the 'auto' flag
    table_offset: int = 0
    table_size: int = 0
    bitmap: Bitmap | None = None
    dirty: bool = False
    #: while a backup holds the bitmap (frozen), writes set bits here
    #: instead (the engine's hand-over then decides what the bitmap becomes)
    successor: Bitmap | None = None

    @property
    def inconsistent(self) -> bool:
        return self.in_use

    def flags(self) -> list[str]:
        """qemu-img info's flag names, in its order."""
        return (["in-use"] if self.in_use else []) + (["auto"] if self.enabled else [])


def default_granularity(cluster_size: int) -> int:
    """QEMU's default: the cluster size, at least 4 KiB."""
    return max(4096, cluster_size)


class Bitmaps:
    """The persistent bitmaps of an open :class:`~.driver.Qcow2` image.

    Changes are in memory until :meth:`store` (the driver calls it at close
    when anything changed). Loaded once per driver: ``drv.persistent_bitmaps``.
    """

    def __init__(self, drv):
        self.drv = drv
        h = drv.header
        self.items: list[PersistentBitmap] = []
        #: the extension is there but its autoclear bit is clear: a program
        #: without bitmap support wrote the image; the bitmaps are ignored
        self.stale = h.ext(EXT_BITMAPS) is not None and not h.autoclear & AUTOCLEAR_BITMAPS
        self.changed = False
        for e in getattr(drv, "bitmaps", None) or []:
            self.items.append(PersistentBitmap(
                e.name, 1 << e.granularity_bits, in_use=bool(e.flags & BME_FLAG_IN_USE),
                enabled=bool(e.flags & BME_FLAG_AUTO), table_offset=e.table_offset,
                table_size=e.table_size))
        ext = h.ext(EXT_BITMAPS) if not self.stale else None
        if ext is not None and len(ext) == _EXT.size:
            _, _, self.dir_size, self.dir_offset = _EXT.unpack(ext)
        else:
            self.dir_size = self.dir_offset = 0
        self.tracking = False     # enabled bitmaps marked in use on disk

    # -- lookup ----------------------------------------------------------
    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)

    def find(self, name: str) -> PersistentBitmap | None:
        for b in self.items:
            if b.name == name:
                return b
        return None

    def get(self, name: str) -> PersistentBitmap:
        b = self.find(name)
        if b is None:
            raise BitmapError(f"Dirty bitmap '{name}' not found")
        return b

    # -- reading ---------------------------------------------------------
    def load(self, b: PersistentBitmap) -> Bitmap:
        """The bitmap's bits (read from its table on first use). An
        inconsistent (in-use) bitmap is never read: BitmapError."""
        if b.in_use:
            raise BitmapError(inconsistent_text(b.name))
        if b.bitmap is None:
            b.bitmap = self._read(b) if b.table_offset else Bitmap(self.drv.size, b.granularity)
        return b.bitmap

    def _read(self, b: PersistentBitmap) -> Bitmap:
        drv = self.drv
        cs = drv.cluster_size
        bm = Bitmap(drv.size, b.granularity)
        nbytes = bm.serialized_size()
        need = -(-nbytes // cs)
        if b.table_size < need:
            raise ImageError(f"'{drv.filename}': Bitmap '{b.name}' doesn't satisfy the constraints")
        raw = dio.pread(drv.fd, b.table_size * 8, b.table_offset)
        if len(raw) != b.table_size * 8:
            raise ImageError(f"'{drv.filename}': Could not read bitmap '{b.name}' from image: "
                             "bitmap table truncated")
        table = struct.unpack(f">{b.table_size}Q", raw)
        buf = bytearray(need * cs)
        mv = memoryview(buf)
        ones = b"\xff" * cs
        for i in range(need):
            e = table[i]
            off = e & TABLE_OFFSET_MASK
            if e & TABLE_RESERVED or (off and (e & TABLE_ALL_ONES or off % cs)):
                raise ImageError(f"'{drv.filename}': Could not read bitmap '{b.name}' from "
                                 f"image: corrupt bitmap table entry {i} (0x{e:x})")
            if off:
                got = dio.preadinto(drv.fd, mv[i * cs:(i + 1) * cs], off)
                if got != cs:
                    raise ImageError(f"'{drv.filename}': Could not read bitmap '{b.name}' "
                                     f"from image: data cluster 0x{off:x} truncated")
            elif e & TABLE_ALL_ONES:
                mv[i * cs:(i + 1) * cs] = ones
        bm.load_bytes(mv[:nbytes])
        return bm

    # -- guest writes ----------------------------------------------------
    def start_tracking(self) -> None:
        """Before the first guest write: load the enabled bitmaps and mark
        them in use on disk (a crash from here on leaves them inconsistent,
        which is what they would be)."""
        if self.tracking:
            return
        live = [b for b in self.items if b.enabled and not b.in_use]
        for b in live:
            self.load(b)
        self.tracking = True
        if live:
            self._write(in_use={id(b) for b in live})
            self.changed = True

    def mark_dirty(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        for b in self.items:
            if not b.enabled or b.in_use:
                continue        # (a disabled bitmap's successor is disabled too)
            if b.successor is not None:
                b.successor.set(offset, length)
            elif b.bitmap is not None:
                b.bitmap.set(offset, length)
                b.dirty = True

    # -- operations (qemu-img bitmap's verbs; QEMU's texts) --------------
    def add(self, name: str, granularity: int | None = None, disabled: bool = False,
            node_name: str = "") -> PersistentBitmap:
        drv = self.drv
        if granularity is None or granularity == 0:
            granularity = default_granularity(drv.cluster_size)
        if granularity < 512 or granularity & (granularity - 1) or granularity >= 1 << 32:
            raise BitmapError("Granularity must be power of 2 and at least 512")
        if self.find(name) is not None:
            raise BitmapError(f"Bitmap already exists: {name}")
        if not name:
            raise BitmapError("Bitmap name cannot be empty")
        why = self._cannot_store(name, granularity)
        if why:
            raise BitmapError(f"Can't make bitmap '{name}' persistent in '{node_name}': {why}")
        b = PersistentBitmap(name, granularity, enabled=not disabled,
                             bitmap=Bitmap(drv.size, granularity), dirty=True)
        self.items.append(b)
        self.changed = True
        return b

    def _cannot_store(self, name: str, granularity: int) -> str | None:
        drv = self.drv
        if drv.header.version < 3:
            return "Cannot store dirty bitmaps in qcow2 v2 files"
        if len(name.encode()) > BME_MAX_NAME_SIZE:
            return f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)"
        gbits = granularity.bit_length() - 1
        if gbits > BME_MAX_GRANULARITY_BITS:
            return f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)"
        if gbits < BME_MIN_GRANULARITY_BITS:
            return f"Granularity is under minimum ({1 << BME_MIN_GRANULARITY_BITS} bytes)"
        nbytes = -(-(-(-drv.size // granularity)) // 8)
        tsize = -(-nbytes // drv.cluster_size)
        if tsize > BME_MAX_TABLE_SIZE or tsize * drv.cluster_size > BME_MAX_PHYS_SIZE:
            return "Too much space will be occupied by the bitmap. Use larger granularity"
        if len(self.items) >= MAX_BITMAPS:
            return "Maximum number of persistent bitmaps is already reached"
        dsize = sum(_entry_size(b.name) for b in self.items) + _entry_size(name)
        if dsize > MAX_BITMAP_DIRECTORY_SIZE:
            return "Not enough space in the bitmap directory"
        return None

    def remove(self, name: str) -> None:
        b = self.get(name)
        self.items.remove(b)
        self.changed = True

    def clear(self, name: str) -> None:
        b = self.get(name)
        self.load(b).clear()
        b.dirty = True
        self.changed = True

    def enable(self, name: str) -> None:
        b = self.get(name)
        if b.in_use:
            raise BitmapError(inconsistent_text(b.name))
        if not b.enabled:
            b.enabled = True
            self.changed = True
            if self.tracking:
                self.load(b)

    def disable(self, name: str) -> None:
        b = self.get(name)
        if b.in_use:
            raise BitmapError(inconsistent_text(b.name))
        if b.enabled:
            b.enabled = False
            self.changed = True

    def merge(self, dst_name: str, src_name: str, src: Bitmaps | None = None) -> None:
        """Merge bitmap ``src_name`` (of ``src``, default this image) into
        ``dst_name`` (QEMU's checks and texts, in its order)."""
        dst = self.get(dst_name)
        if dst.in_use:
            raise BitmapError(inconsistent_text(dst.name))
        sb = (src or self).get(src_name)
        if sb.in_use:
            raise BitmapError(inconsistent_text(sb.name))
        s_size, d_size = (src or self).drv.size, self.drv.size
        if s_size != d_size:
            raise BitmapError(f"Bitmaps are of different sizes (destination size is {d_size}, "
                              f"source size is {s_size}) and can't be merged")
        d = self.load(dst)
        sbm = (src or self).load(sb)
        if sbm.granularity == d.granularity:
            d.merge(sbm)
        else:                     # QEMU merges across granularities: by dirty runs
            for off, n in sbm.areas():
                d.set(off, n)
        dst.dirty = True
        self.changed = True

    # -- storing ---------------------------------------------------------
    def store(self) -> None:
        """Write every change (new/changed tables, flags, removed bitmaps) in
        the crash-safe order; the tracked bitmaps leave the in-use state."""
        if not self.changed and not self.stale:
            return
        self._write(in_use=set())
        for b in self.items:
            b.dirty = False
        self.changed = False
        self.stale = False
        self.tracking = False

    def _write(self, in_use: set) -> None:
        """Store the bitmaps: new data clusters and tables, a new directory,
        refcounts and data durable, then the header switch, then the old
        clusters freed (a crash at any point leaves a consistent image)."""
        drv = self.drv
        if not drv._write_prepared:
            drv._prepare_write()
        drv.flush()               # guest metadata first: refcounts in one state
        rc = drv._rc()
        cs = drv.cluster_size
        # 1. data clusters and tables of changed bitmaps
        for b in self.items:
            if (b.dirty or b.successor is not None) and b.bitmap is not None:
                self._write_table(b)
        # 2. the tables on disk no bitmap uses any more (replaced or removed)
        old = []                  # clusters to free after the header switch
        keep = {b.table_offset for b in self.items}
        for e in drv.bitmaps or []:
            if e.table_offset not in keep:
                old += self._table_clusters_of(e.table_offset, e.table_size)
        # 3. the new directory
        if self.dir_size:
            old += list(range(self.dir_offset >> drv.cb,
                              ((self.dir_offset + self.dir_size - 1) >> drv.cb) + 1))
        self._write_directory(in_use)
        # 4. refcounts and data durable, then the header switch
        if os.fstat(drv.fd).st_size < rc.end << drv.cb:
            os.ftruncate(drv.fd, rc.end << drv.cb)
        rc.flush_increments()
        drv._fsync()
        h = drv.header
        exts = [(t, x) for t, x in h.extensions if t != EXT_BITMAPS]
        if self.items:
            exts.append((EXT_BITMAPS, _EXT.pack(len(self.items), 0, self.dir_size,
                                                self.dir_offset)))
            h.autoclear |= AUTOCLEAR_BITMAPS
        else:
            h.autoclear &= ~AUTOCLEAR_BITMAPS
        h.extensions = exts
        drv._write_header()
        # 5. free what the old header referenced
        nfile = -(-os.fstat(drv.fd).st_size // cs)
        for c in sorted(set(old)):
            if c < nfile and rc.get(c) > 0:    # hostile tables: never underflow
                rc.free_later(c)
        rc.apply_frees()
        from .header import BitmapEntry
        drv.bitmaps = [BitmapEntry(b.name, b.table_offset, b.table_size,
                                   self._flags(b, in_use),
                                   b.granularity.bit_length() - 1) for b in self.items]
        drv.file_size = max(drv.file_size, os.fstat(drv.fd).st_size)

    @staticmethod
    def _flags(b: Any, in_use: set) -> int:
        return ((BME_FLAG_IN_USE if (b.in_use or id(b) in in_use) else 0)
                | (BME_FLAG_AUTO if b.enabled else 0))

    def _write_table(self, b: Any) -> None:
        """New data clusters (all-zero ones stay unallocated) and a new
        table for bitmap ``b``; stored while frozen, with its successor
        merged in, so nothing may be lost."""
        drv, rc, cs = self.drv, self.drv._rc(), self.drv.cluster_size
        bits = b.bitmap
        if b.successor is not None:
            bits = bits.copy()
            bits.merge(b.successor)
        data = bits.to_bytes()
        ncl = -(-len(data) // cs)
        table = [0] * ncl
        mv = memoryview(data)
        zero = bytes(cs)
        for i in range(ncl):
            chunk = mv[i * cs:(i + 1) * cs]
            if chunk == zero[:len(chunk)]:
                continue
            off = rc.alloc_one() << drv.cb
            dio.pwrite(drv.fd, bytes(chunk).ljust(cs, b"\0"), off)
            table[i] = off
        toff = self._alloc_contig(ncl * 8)
        dio.pwrite(drv.fd, struct.pack(f">{ncl}Q", *table).ljust(_round(ncl * 8, cs), b"\0"),
                  toff)
        b.table_offset, b.table_size = toff, ncl

    def _write_directory(self, in_use: set) -> None:
        """A new bitmap directory in new clusters (dir_offset/dir_size)."""
        drv, cs = self.drv, self.drv.cluster_size
        if not self.items:
            self.dir_offset = self.dir_size = 0
            return
        d = bytearray()
        for b in self.items:
            nm = b.name.encode()
            d += _ENTRY.pack(b.table_offset, b.table_size, self._flags(b, in_use),
                             BT_DIRTY_TRACKING_BITMAP, b.granularity.bit_length() - 1,
                             len(nm), 0) + nm
            d += bytes(-len(d) % 8)
        doff = self._alloc_contig(len(d))
        dio.pwrite(drv.fd, bytes(d).ljust(_round(len(d), cs), b"\0"), doff)
        self.dir_offset, self.dir_size = doff, len(d)

    def _alloc_contig(self, nbytes: int) -> int:
        """Offset of ceil(nbytes / cluster) newly allocated contiguous
        clusters (a refcount block placed in between makes alloc return two
        runs: those are given back and the allocation retried past it)."""
        rc = self.drv._rc()
        n = max(1, -(-nbytes // self.drv.cluster_size))
        while True:
            runs = rc.alloc(n)
            if len(runs) == 1:
                return runs[0][0] << self.drv.cb
            for c0, k in runs:
                for c in range(c0, c0 + k):
                    rc.free_later(c)
            rc.apply_frees()

    def _table_clusters_of(self, toff: int, tsize: int) -> list[int]:
        drv = self.drv
        cs = drv.cluster_size
        raw = dio.pread(drv.fd, tsize * 8, toff)
        out = [c for c in range(toff >> drv.cb, ((toff + tsize * 8 - 1) >> drv.cb) + 1)]
        for (e,) in struct.iter_unpack(">Q", raw):
            off = e & TABLE_OFFSET_MASK
            if off and not e & TABLE_RESERVED and off % cs == 0:
                out.append(off >> drv.cb)
        return out

    # -- info ------------------------------------------------------------
    def info(self) -> list[dict]:
        """``format-specific.data.bitmaps`` as qemu-img info prints it."""
        return [{"flags": b.flags(), "name": b.name, "granularity": b.granularity}
                for b in self.items]


def _entry_size(name: str) -> int:
    n = _ENTRY.size + len(name.encode())
    return n + (-n % 8)


def _round(n: int, cs: int) -> int:
    return -(-n // cs) * cs
