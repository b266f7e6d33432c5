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

Where the bytes go is QEMU's too, so that the files are equal: opened
read-write (once the node holds its locks), the consistent bitmaps are
flagged in use in the directory in place; at close every consistent bitmap
is stored anew, in directory order then the new ones newest first, each in
clusters found first-fit as qcow2_alloc_clusters finds them, its table and
the directory written only as long as they are (the file may end inside
its last cluster); a removed bitmap leaves the image at once.
"""
from __future__ import annotations

import os
import struct

from ...errors import ImageError, UsageError
from ...native import dio
from ...native.bitmap import Bitmap
from ...native.record import Record
from .header import (AUTOCLEAR_BITMAPS, BitmapEntry, BME_FLAG_IN_USE, BME_MAX_GRANULARITY_BITS,
                     BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE,
                     BME_MIN_GRANULARITY_BITS, BT_DIRTY_TRACKING_BITMAP, EXT_BITMAPS,
                     MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS)

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


class PersistentBitmap(Record):
    """One bitmap of the image. ``bitmap`` is the in-memory
    :class:`~blkjobs.native.bitmap.Bitmap` once loaded; ``dirty`` says its
    content differs from its table on disk (which is then rewritten). A
    plain class, not a dataclass (``dataclasses`` imports ``inspect``: start-up);
    unhashable as the dataclass it was."""
    __slots__ = ("name", "granularity", "in_use", "enabled", "table_offset", "table_size",
                 "bitmap", "dirty", "successor")
    __hash__ = None     # type: ignore[assignment]  # mutable

    def __init__(self, name: str, granularity: int, in_use: bool = False,
                 enabled: bool = True, table_offset: int = 0, table_size: int = 0,
                 bitmap: Bitmap | None = None, dirty: bool = False,
                 successor: Bitmap | None = None) -> None:
        self.name = name
        self.granularity = granularity
        self.in_use = in_use            # found in use at open: inconsistent
        self.enabled = enabled          # the 'auto' flag
        self.table_offset = table_offset
        self.table_size = table_size
        self.bitmap = bitmap
        self.dirty = dirty
        #: while a backup holds the bitmap (frozen), writes set bits here
        #: instead (the engine's hand-over then decides what the bitmap becomes)
        self.successor = successor

    @property
    def inconsistent(self) -> bool:
        return self.in_use

    def flags(self) -> list[str]:
        """qemu-img info's flag names, in its order."""
        return (["in-use"] if self.in_use else []) + (["auto"] if self.enabled else [])


def default_granularity(cluster_size: int) -> int:
    """QEMU's default: the cluster size, at least 4 KiB and at most 64 KiB."""
    return min(65536, max(4096, cluster_size))


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
        for e in drv.bitmaps or []:
            self.items.append(PersistentBitmap(
                e.name, 1 << e.granularity_bits, in_use=bool(e.flags & BME_FLAG_IN_USE),
                enabled=bool(e.flags & BME_FLAG_AUTO), table_offset=e.table_offset,
                table_size=e.table_size))
        ext = h.ext(EXT_BITMAPS) if not self.stale else None
        if ext is not None and len(ext) == _EXT.size:
            _, _, self.dir_size, self.dir_offset = _EXT.unpack(ext)
        else:
            self.dir_size = self.dir_offset = 0
        self.tracking = False     # enabled bitmaps loaded for guest writes
        #: the consistent bitmaps are flagged in use on disk (activate): they
        #: are stored anew at close
        self.active = False
        #: stored before a reopen read-only: nothing is stored any more
        self.readonly = False
        self._hint = 0            # QEMU's free_cluster_index (see _alloc)

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
        """Before the first guest write: the bitmaps flagged in use on disk
        (if they are not yet: a crash from here on leaves them inconsistent,
        which is what they would be) and the enabled ones loaded."""
        if self.tracking:
            return
        self.activate()
        for b in self.items:
            if b.enabled and not b.in_use:
                self.load(b)
        self.tracking = True

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
        """Out of memory and, as QEMU does it at once, out of the image (its
        bits stay with ``b``: a transaction rolled back adds it again)."""
        b = self.get(name)
        if not b.in_use:
            self.load(b)
        self.items.remove(b)
        self._remove_on_disk(name)

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

    # -- storing (QEMU's qcow2-bitmap.c, step for step) -------------------
    def activate(self) -> None:
        """What QEMU does when it opens the image read-write: every
        consistent bitmap of the directory gets the in-use flag, written in
        place (the autoclear bit dropped around the write), and from then on
        all of them are stored anew at close. Called once the node holds its
        locks, and before anything changes the bitmaps on disk."""
        drv = self.drv
        if self.active or self.readonly or drv.read_only or self.stale:
            return
        entries = drv.bitmaps or []
        todo = [e for e in entries if not e.flags & BME_FLAG_IN_USE]
        if not todo:
            return
        self.active = True
        h = drv.header
        h.autoclear &= ~AUTOCLEAR_BITMAPS
        drv._write_header()
        for e in todo:
            e.flags |= BME_FLAG_IN_USE
        dio.pwrite(drv.fd, _pack_directory(entries), self.dir_offset)
        drv._fsync()
        h.autoclear |= AUTOCLEAR_BITMAPS
        drv._write_header()

    def store(self) -> None:
        """QEMU's store at close: every consistent bitmap gets new data
        clusters and a new table (in directory order, then the new ones,
        newest first), a new directory follows, the header is switched,
        then the old directory and the old tables are freed. The in-use
        flags are cleared; the next guest write sets them again."""
        if self.readonly or self.drv.read_only:
            return
        if not (self.changed or self.stale or self.active):
            return
        self.activate()
        if self.stale or any(not b.in_use for b in self.items):
            self._store_all()
        for b in self.items:
            b.dirty = False
        self.changed = self.stale = self.tracking = self.active = False

    def store_read_only(self) -> None:
        """Before the node is reopened read-only (QEMU's
        qcow2_reopen_bitmaps_ro): stored now, nothing stored after."""
        self.store()
        self.readonly = True

    def _store_all(self) -> None:
        drv = self.drv
        if not drv._write_prepared:
            drv._prepare_write()
        drv.flush()               # guest metadata first: refcounts in one state
        byname = {b.name: b for b in self.items}
        entries: list[BitmapEntry] = []
        drop: list[tuple[int, int]] = []
        for e in drv.bitmaps or []:
            b = byname.get(e.name)
            if b is None or b.in_use:
                entries.append(e)         # kept as it is (inconsistent)
                continue
            drop.append((e.table_offset, e.table_size))
            entries.append(self._store_bitmap(b))
        on_disk = {e.name for e in entries}
        for b in reversed(self.items):    # QEMU's list of bitmaps: newest first
            if b.name not in on_disk and not b.in_use:
                entries.append(self._store_bitmap(b))
        self._switch_directory(entries, drop)

    def _store_bitmap(self, b: PersistentBitmap) -> BitmapEntry:
        """New data clusters (one per cluster of serialized bitmap holding a
        set bit, written whole) and a new table (written as long as it is)
        for bitmap ``b``; stored while frozen, with its successor merged in,
        so nothing may be lost."""
        drv, cs = self.drv, self.drv.cluster_size
        bits = self.load(b)
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
            off = self._alloc(cs)
            dio.pwrite(drv.fd, bytes(chunk).ljust(cs, b"\0"), off)
            table[i] = off
        toff = self._alloc(ncl * 8)
        dio.pwrite(drv.fd, struct.pack(f">{ncl}Q", *table), toff)
        b.table_offset, b.table_size = toff, ncl
        return BitmapEntry(b.name, toff, ncl, BME_FLAG_AUTO if b.enabled else 0,
                           b.granularity.bit_length() - 1)

    def _switch_directory(self, entries: list[BitmapEntry],
                          drop: list[tuple[int, int]]) -> None:
        """QEMU's update_ext_header_and_dir, then the dropped tables freed:
        the new directory (none for no bitmaps) in new clusters, refcounts
        and data durable, the header switched, then the old directory's
        clusters freed, then each dropped table's data clusters and its own."""
        drv, rc = self.drv, self.drv._rc()
        old_dir = (self.dir_offset, self.dir_size)
        if entries:
            d = _pack_directory(entries)
            self.dir_offset = self._alloc(len(d))
            self.dir_size = len(d)
            dio.pwrite(drv.fd, d, self.dir_offset)
        else:
            self.dir_offset = self.dir_size = 0
        rc.flush_increments()
        drv._fsync()
        h = drv.header
        h.extensions = [(t, x) for t, x in h.extensions if t != EXT_BITMAPS]
        if entries:
            h.extensions.append((EXT_BITMAPS, _EXT.pack(len(entries), 0, self.dir_size,
                                                        self.dir_offset)))
            h.autoclear |= AUTOCLEAR_BITMAPS
        else:
            h.autoclear &= ~AUTOCLEAR_BITMAPS
        drv._write_header()
        drv.bitmaps = entries
        free: list[int] = []
        data: list[int] = []
        if old_dir[1]:
            free += _clusters(old_dir[0], old_dir[1], drv.cb)
        for toff, tsize in drop:
            dc = self._data_clusters_of(toff, tsize)
            data += dc
            free += dc + _clusters(toff, tsize * 8, drv.cb)
        nfile = -(-os.fstat(drv.fd).st_size // drv.cluster_size)
        freed = [c for c in free if c < nfile and rc.get(c) > 0]   # hostile tables
        for c in freed:
            rc.free_later(c)
        rc.apply_frees()
        if freed:
            self._hint = min(self._hint, min(freed))
        # QEMU frees a bitmap's data clusters with a discard passed down to
        # the file (QCOW2_DISCARD_ALWAYS): they read as zeroes
        from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
        for c in sorted(set(data) & set(freed)):
            if rc.get(c) == 0:
                _fallocate(drv.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           c << drv.cb, drv.cluster_size)
        # the file holds (part of) every cluster in use: QEMU writes a table
        # or directory only as long as it is, so the file may end inside the
        # last cluster, and a flush must not round it up
        if os.fstat(drv.fd).st_size > (rc.end - 1) << drv.cb:
            rc.opened_end = max(rc.opened_end, rc.end)
        drv.file_size = max(drv.file_size, os.fstat(drv.fd).st_size)

    def _remove_on_disk(self, name: str) -> None:
        """QEMU removes a persistent bitmap from the image at once: a new
        directory without it, the header switched, then the old directory
        and the bitmap's table and data clusters freed."""
        drv = self.drv
        if drv.read_only or self.readonly:
            return
        e = next((x for x in drv.bitmaps or [] if x.name == name), None)
        if e is None:
            return
        self.activate()
        if not drv._write_prepared:
            drv._prepare_write()
        drv.flush()
        self._switch_directory([x for x in drv.bitmaps if x is not e],
                               [(e.table_offset, e.table_size)])

    def _alloc(self, nbytes: int) -> int:
        """QEMU's qcow2_alloc_clusters: the first run of free clusters from
        the session's hint (lowered by the clusters freed here), past the
        end of the file if none is free before."""
        rc = self.drv._rc()
        n = max(1, -(-nbytes // self.drv.cluster_size))
        c = self._hint
        while True:
            busy = next((i for i in range(n) if c + i < rc.end and rc.get(c + i)), None)
            if busy is None:
                break
            c += busy + 1
        inside = max(0, min(n, rc.end - c))
        for i in range(inside):
            rc._set(c + i, 1)
            if c + i in rc.pool:
                rc.pool.remove(c + i)
        if inside < n:
            runs = rc.alloc(n - inside)
            if runs != [(c + inside, n - inside)]:
                # a refcount block placed in between: all given back, and
                # the run taken past it (rare: QEMU would place it alike)
                for x in [c + i for i in range(inside)] + [
                        y for c0, k in runs for y in range(c0, c0 + k)]:
                    rc.free_later(x)
                rc.apply_frees()
                while True:
                    runs = rc.alloc(n)
                    if len(runs) == 1:
                        break
                    for c0, k in runs:
                        for y in range(c0, c0 + k):
                            rc.free_later(y)
                    rc.apply_frees()
                c = runs[0][0]
        self._hint = c + n
        return c << self.drv.cb

    def _data_clusters_of(self, toff: int, tsize: int) -> list[int]:
        """The data clusters a bitmap table names, in its order."""
        drv = self.drv
        out = []
        for (e,) in struct.iter_unpack(">Q", dio.pread(drv.fd, tsize * 8, toff)):
            off = e & TABLE_OFFSET_MASK
            if off and not e & TABLE_RESERVED and off % drv.cluster_size == 0:
                out.append(off >> drv.cb)
        return out

    # -- info ------------------------------------------------------------
    def info(self) -> list[dict]:
        """``format-specific.data.bitmaps`` as QEMU shows it: the directory
        on disk, with its flags (in use while an image is open read-write)."""
        return [{"flags": (["in-use"] if e.flags & BME_FLAG_IN_USE else [])
                 + (["auto"] if e.flags & BME_FLAG_AUTO else []),
                 "name": e.name, "granularity": 1 << e.granularity_bits}
                for e in self.drv.bitmaps or []]


def _pack_directory(entries: list[BitmapEntry]) -> bytes:
    d = bytearray()
    for e in entries:
        nm = e.name.encode()
        d += _ENTRY.pack(e.table_offset, e.table_size, e.flags, BT_DIRTY_TRACKING_BITMAP,
                         e.granularity_bits, len(nm), 0) + nm
        d += bytes(-len(d) % 8)
    return bytes(d)


def _clusters(off: int, nbytes: int, cb: int) -> list[int]:
    return list(range(off >> cb, ((off + max(nbytes, 1) - 1) >> cb) + 1))


def _entry_size(name: str) -> int:
    n = _ENTRY.size + len(name.encode())
    return n + (-n % 8)

