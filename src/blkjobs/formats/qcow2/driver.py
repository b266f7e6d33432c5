"""The qcow2 driver: open, the write guard, flush, close, header changes.

The :class:`Qcow2` class is put together from one mixin per concept:

* :mod:`.tables` -- the L1/L2 tables: entry bits, the L2 cache, reading,
  classifying and setting one guest cluster's entry;
* :mod:`.mapping` -- :meth:`~Qcow2.map_host`, :meth:`~Qcow2.host_run` and
  the reads;
* :mod:`.writes` -- partial-cluster writes (copy-on-write), compressed
  clusters;
* :mod:`.allocate` -- :meth:`~Qcow2.allocate` / :meth:`~Qcow2.undo_allocate`
  for bulk writes;
* :mod:`.zeroes` -- :meth:`~Qcow2.write_zeroes` and :meth:`~Qcow2.discard`.

Structure (the format: docs/qcow2.md):

* the active L1 table is read whole at open (it is at most 32 MiB; 8 bytes
  per 512 MiB of disk with 64 KiB clusters);
* L2 tables are read on first use into ``bytearray``s keyed by host offset;
  dirty ones are written back by :meth:`flush`. When the cache grows past
  ``L2_CACHE_BYTES`` a full flush is done and clean tables are dropped;
  entries of clusters held for data in flight are written as they were
  (what a flush may write: ``tables.L2Tables._hold``);
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

Internal snapshots (:mod:`.snapshot_ops`) share L2 tables and data
clusters (refcount > 1, COPIED clear). A data cluster whose COPIED flag is
clear is copied to a new cluster before a write (``writes``), an L2 table
whose L1 entry has COPIED clear is copied before its first change
(``tables._l2_for_write``); the old copies keep serving the snapshots.

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
import sys

from ...errors import ImageError, UsageError
from ..base import FormatOpenError, open_file  # open_file: refuses FIFOs & co.
from .allocate import Allocation
from .debug import Hook
from .header import (AUTOCLEAR_KNOWN, check_opening, INCOMPAT_CORRUPT,
                     INCOMPAT_DIRTY, COMPAT_LAZY_REFCOUNTS, drop_stale_bitmaps, parse_header,
                     read_bitmap_directory, stale_bitmaps)
from .mapping import ReadPins, Reads
from .refcount import Refcounts
from .tables import L1_OFFSET_MASK, L1_RESERVED
from .writes import Writes
from .zeroes import Zeroes
from ...native import qcow2 as _nq
from ...native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable

    from .bitmaps import Bitmaps


#: images whose inconsistent bitmaps were reported (once per process)
_REPORTED: set[str] = set()


def _inconsistent_bitmaps(path: str, version: int) -> None:
    """qemu's warning for a bitmaps extension that a program without bitmap
    support may have left stale (the autoclear bit clear, or a v2 image)."""
    from ...errors import warn_report
    key = os.path.realpath(path)
    if key in _REPORTED:       # a command may open it more than once (qemu-img: once)
        return
    _REPORTED.add(key)
    warn_report("This qcow2 v2 image contains bitmaps, but they may have been modified by "
                "a program without persistent bitmap support; so now they must all be "
                "considered inconsistent" if version < 3 else
                "a program lacking bitmap support modified this file, so all bitmaps are "
                "now considered inconsistent",
                "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.")


class Qcow2(Reads, Writes, Allocation, Zeroes):
    """A qcow2 image. Open with ``Qcow2(path, read_only=True)``."""

    format_name = "qcow2"
    can_allocate = True
    can_compress = True
    can_set_backing = True
    can_check = True
    has_metadata = True
    has_debug_hook = True
    #: a blkdebug layer between the image and its file (:mod:`.debug`)
    blkdebug: Hook | None = None
    #: the external data file's name as opened (None: the data is in the image)
    data_path: str | None = None

    def __init__(self, path: str, read_only: bool = True, header_only: bool = False,
                 data_file: str | None = None) -> None:
        self.filename = path
        self.read_only = read_only
        # cache=unsafe (``convert -t unsafe``, qemu-img's default for convert):
        # metadata is still written in the safe order, but never fsync'd.
        self.unsafe = False
        self._fd = open_file(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._dfd: int | None = None
        self._closed = False
        self.read_pins = ReadPins()     # reads outside the graph's lock (mapping.py)
        try:
            self._open()
            self._open_data_file(header_only, data_file)
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

    @property
    def data_fd(self) -> int:
        """The descriptor of the file holding the guest data: the external
        data file's (docs/qcow2.md §12), else :attr:`fd`'s."""
        if self._dfd is not None and not self._closed:
            return self._dfd
        if self.external:
            raise ImageError(f"'{self.filename}': its data file '{self.data_path}' is not open")
        return self.fd

    # ------------------------------------------------------------------
    # open
    def _open_data_file(self, header_only: bool, given: str | None) -> None:
        """Open the external data file (incompatible bit 2): ``given`` (the
        ``data-file`` option), else the one the header extension names,
        relative to the working directory as QEMU opens it. ``header_only``
        (``info``): a missing one is no error."""
        h = self.header
        if not self.external:
            if given is not None:
                raise FormatOpenError(self.filename, "'data-file' can only be set for images "
                                      "with an external data file")
            if h.data_file_raw:
                raise FormatOpenError(self.filename, "data-file-raw requires a data file")
            return
        name = given if given is not None else h.data_file
        if name is None:
            if header_only:
                return
            raise FormatOpenError(self.filename, "'data-file' is required for this image")
        self.data_path = name
        self.can_compress = False
        try:
            self._dfd = open_file(name, os.O_RDONLY if self.read_only else os.O_RDWR)
        except OSError as e:
            if not header_only:
                raise FormatOpenError(self.filename,
                                      f"Could not open '{name}': {e.strerror}") from None

    def _open(self) -> None:
        st = os.fstat(self.fd)
        self.file_size = st.st_size
        from .header import read_cluster0
        buf = read_cluster0(self.fd)
        h = self.header = parse_header(buf, self.file_size, self.filename)
        if stale_bitmaps(h):
            _inconsistent_bitmaps(self.filename, h.version)
        if h.crypt_method and not self.encrypted:    # never ciphertext as data
            raise ImageError(f"'{self.filename}': encrypted qcow2 image: open it "
                             "with its key (formats.open_image(key_secret=))")
        self.cb = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.extended = h.extended_l2
        self.l2e = h.l2_entries
        self.esz = 16 if self.extended else 8
        self.scs = cs // 32 if self.extended else cs         # (sub)cluster size
        self.backing_filename = h.backing_file
        self.backing_format = h.backing_format
        #: an external data file holds the guest data, at host offset ==
        #: guest offset, with no refcounts (docs/qcow2.md §12)
        self.external = h.has_data_file
        self.data_path = None
        self.ctype = h.compression_type
        self._csec_bits = self.cb - 8
        self._coff_mask = (1 << (62 - self._csec_bits)) - 1
        # validated (and bounded) like qemu-img does at open
        self.bitmaps = read_bitmap_directory(self.fd, h, self.file_size, self.filename)
        if h.nb_snapshots and not check_opening():   # refused at open, as qemu-img does
            from .snapshots import load_table    # here: most images have none (start-up)
            load_table(self.fd, h, self.filename)
        self._pbm: Bitmaps | None = None     # loaded on first use
        raw = dio.pread(self.fd, h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
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
        self._l2map = _nq.L2Mapper()
        self.l2dirty: set[int] = set()
        self._held = {}
        self._held_refs = {}
        self._landed_unsynced = False
        self._header_dirty = False
        self._comp_cache = (None, b"")
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

    def _open_rw(self) -> None:
        h = self.header
        if h.incompatible & INCOMPAT_CORRUPT:
            raise ImageError(f"'{self.filename}': image is corrupt; cannot be opened read/write")
        self._write_prepared = False

    @property
    def persistent_bitmaps(self) -> Bitmaps:
        """The image's persistent dirty bitmaps (:class:`.bitmaps.Bitmaps`).
        Guest writes set the bits of the enabled ones; changes are stored at
        close."""
        if self._pbm is None:
            from .bitmaps import Bitmaps
            self._pbm = Bitmaps(self)
        return self._pbm

    @property
    def bitmaps_loaded(self) -> bool:
        return self._pbm is not None

    def watch_file_growth(self, cb: Callable[[int], None]) -> None:
        """The refcounts' ``grow_cb`` (the first one set stays), writable only."""
        if not self.read_only:
            refcounts = self._rc()
            if refcounts.grow_cb is None:
                refcounts.grow_cb = cb

    def activate_bitmaps(self) -> None:
        """Once the node holds its locks, read-write: the bitmaps flagged in
        use on disk, as QEMU's open does (:meth:`.bitmaps.Bitmaps.activate`)."""
        if self.bitmaps and not self.read_only:
            self.persistent_bitmaps.activate()

    def reopen_bitmaps_ro(self) -> None:
        """Before a reopen read-only: the bitmaps stored now (QEMU's
        qcow2_reopen_bitmaps_ro), not again at close."""
        if not self.read_only and (self.bitmaps or self._pbm is not None):
            self.persistent_bitmaps.store_read_only()

    def _prepare_write(self) -> None:
        """Before the first modification (not at open: opening never
        writes): rebuild refcounts of a dirty image, clear unknown autoclear
        bits."""
        self._write_prepared = True
        h = self.header
        if h.incompatible & INCOMPAT_DIRTY:
            # Refcounts may be stale (lazy refcounts): rebuild them first.
            from .check import check
            res = check(self, repair="all")
            for m in res.messages:      # qemu-img prints them as it repairs at open
                sys.stderr.write(m.lstrip("\x01") + "\n")
            if res.get("corruptions", 0) - res.get("corruptions-fixed", 0) > 0:
                raise ImageError(f"'{self.filename}': dirty image could not be repaired")
            h.incompatible &= ~INCOMPAT_DIRTY
            self._header_dirty = True
        if h.autoclear & ~AUTOCLEAR_KNOWN:
            h.autoclear &= AUTOCLEAR_KNOWN
            self._header_dirty = True
        if drop_stale_bitmaps(h):
            self._header_dirty = True
        if self._header_dirty:
            self._write_header()

    def _set_rt_location(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._write_header(whole_sectors=False)

    def _write_header(self, whole_sectors: bool = True) -> None:
        # the whole first cluster, zero-padded, as QEMU's qcow2_update_header:
        # nothing of a longer old backing name or extension is left behind;
        # and the size in whole sectors, as it writes total_sectors. Not so
        # (whole_sectors=False) where QEMU writes only some of the header's
        # fields (the snapshot table's, the refcount table's): its size stays
        if whole_sectors:
            self.header.size = self.size
        data = self.header.pack()
        dio.pwrite(self.fd, data.ljust(self.cluster_size, b"\0"), 0)
        self._fsync()
        self._header_dirty = False

    @property
    def size(self) -> int:
        """The virtual size as QEMU's block layer sees it: whole 512-byte
        sectors, so a header's size of 1600 is 1536 bytes (qcow2_do_open's
        ``total_sectors = size / 512``); the bytes past it are not the
        image's for any command, job or export."""
        return self.header.size // 512 * 512

    # ------------------------------------------------------------------
    # every modification starts here
    def _check_writable(self, offset: int, length: int) -> None:
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

    # ------------------------------------------------------------------
    # flush / close
    def flush(self) -> None:
        if self.read_only or self._closed:
            return
        rc = self.rc
        if self._dfd is not None and not self.unsafe:
            os.fsync(self._dfd)         # the data before the metadata naming it
            self._landed_unsynced = False
        if rc is not None:
            # Every allocated cluster must lie inside the file (qemu-img check
            # counts references past EOF as errors): extend sparsely; a
            # partial last cluster is rounded up only when it holds data (QEMU
            # writes a new data cluster whole, metadata only its own bytes)
            if rc.end > rc.opened_end:
                size = os.fstat(self.fd).st_size
                want = rc.end << self.cb if size <= (rc.end - 1) << self.cb else \
                    min(self.data_end, rc.end << self.cb)
                if size < want:
                    os.ftruncate(self.fd, want)
            if rc.flush_increments() and self._dfd is None:
                self._landed_unsynced = False   # fsync'd: the data too (same file)
        if self._write_l2_tables():     # held entries: their old value
            self._fsync()
        if self.l1_dirty:
            dio.pwrite(self.fd, struct.pack(f">{len(self.l1)}Q", *self.l1),
                      self.header.l1_table_offset)
            self.l1_dirty = False
            self._fsync()
        if rc is not None:
            if rc.pending:
                self.read_pins.drain()  # no freed cluster reused under a read
            rc.apply_frees(punch=self.unmap_freed)
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
            self.read_pins.drain()
            self._closed = True
            os.close(self._fd)
            if self._dfd is not None:
                os.close(self._dfd)

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
        return dio.pread(self.fd, self.cluster_size, 0)

    def set_unsafe(self, unsafe: bool) -> None:
        self.unsafe = unsafe

    @property
    def dirty_flag(self) -> bool:
        return bool(self.header.incompatible & INCOMPAT_DIRTY)

    def info(self) -> dict:
        h = self.header
        d: dict[str, object] = {"compat": "1.1" if h.version >= 3 else "0.10",
             "compression-type": "zstd" if h.compression_type == 1 else "zlib"}
        if h.version >= 3:
            d.update({"lazy-refcounts": bool(h.compatible & COMPAT_LAZY_REFCOUNTS),
                      "refcount-bits": h.refcount_bits})
            if self.external:
                if h.data_file is not None:
                    d["data-file"] = h.data_file
                d["data-file-raw"] = h.data_file_raw
            d.update({"corrupt": bool(h.incompatible & INCOMPAT_CORRUPT),
                      "extended-l2": self.extended})
        else:
            d["refcount-bits"] = h.refcount_bits
        if self.bitmaps:       # after lazy-refcounts, as qemu-img prints them
            rest: dict[str, object] = {k: d.pop(k) for k in ("refcount-bits", "data-file", "data-file-raw",
                                                   "corrupt", "extended-l2") if k in d}
            d["bitmaps"] = self.persistent_bitmaps.info()
            d.update(rest)
        return {"type": "qcow2", "data": d}

    def check(self, repair: str | None = None) -> dict:
        from .check import check
        return check(self, repair)
