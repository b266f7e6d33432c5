"""The qcow2 header (cluster 0): parse, validate, serialise.

Everything here is pure data: :class:`Header` holds the fields of
docs/qcow2.md §2, the header extensions in their on-disk order
(unknown ones kept verbatim so a rewrite preserves them) and the backing file
name. :func:`parse_header` checks every field a later step would trust (sizes,
alignments, table extents against the file size) and raises
:class:`~blkjobs.errors.ImageError` with one line naming the field, so a
damaged header fails at open, before any table is read.
"""
from __future__ import annotations

import struct

from ...errors import ImageError
from ...native import dio
from ...native.record import Record

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias
    from contextvars import ContextVar

MAGIC = 0x514649FB

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# compatible / autoclear bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_V2 = struct.Struct(">IIQIIQIIQQIIQ")          # 72 bytes
_V3 = struct.Struct(">QQQII")                  # bytes 72..103
MAX_REFCOUNT_TABLE = 8 << 20
MAX_L1_BYTES = 32 << 20                        # QEMU's QCOW_MAX_L1_SIZE
# Persistent bitmaps: qemu-img's limits (QCOW2_MAX_BITMAPS, its directory
# size bound, and the per-entry BME_* constraints).
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_FLAG_IN_USE = 1 << 0
BME_RESERVED_FLAGS = 0xFFFFFFFC
BT_DIRTY_TRACKING_BITMAP = 1
_BITMAPS_EXT = struct.Struct(">IIQQ")          # nb_bitmaps, reserved, dir size, dir offset
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")      # 24 bytes, then extra data and the name

FEATURE_NAMES = [
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
]


class Header(Record):
    """The header fields (plain class, not a dataclass: ``dataclasses``
    imports ``inspect``, ~8 ms of every qcow2 command's start-up; the same
    constructor, equality and repr, and unhashable as it was)."""
    __slots__ = ("version", "cluster_bits", "size", "crypt_method", "l1_size",
                 "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
                 "nb_snapshots", "snapshots_offset", "incompatible", "compatible",
                 "autoclear", "refcount_order", "header_length", "compression_type",
                 "tail", "extensions", "backing_file", "backing_format")
    __hash__ = None     # type: ignore[assignment]  # mutable

    def __init__(self, version: int = 3, cluster_bits: int = 16, size: int = 0,
                 crypt_method: int = 0, l1_size: int = 0, l1_table_offset: int = 0,
                 refcount_table_offset: int = 0, refcount_table_clusters: int = 0,
                 nb_snapshots: int = 0, snapshots_offset: int = 0, incompatible: int = 0,
                 compatible: int = 0, autoclear: int = 0, refcount_order: int = 4,
                 header_length: int = 112, compression_type: int = 0,
                 tail: bytes = b"", extensions: list | None = None,
                 backing_file: str | None = None, backing_format: str | None = None) -> None:
        self.version = version
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible = incompatible
        self.compatible = compatible
        self.autoclear = autoclear
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        #: header bytes after 104 (compression type + unknown), preserved
        self.tail = tail
        #: [(type, bytes)] except END/backing format (a new list when not given)
        self.extensions: list = [] if extensions is None else extensions
        self.backing_file = backing_file
        self.backing_format = backing_format

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def data_file(self) -> str | None:
        """The external data file's name (extension 0x44415441), or None."""
        d = self.ext(EXT_DATA_FILE)
        return None if d is None else d.split(b"\0", 1)[0].decode("utf-8", "replace")

    @data_file.setter
    def data_file(self, name: str | None) -> None:
        """Set (or with None drop) the data file name; a new one goes where
        QEMU writes it: after the backing format, before the other extensions."""
        if name is None:
            self.extensions = [(t, d) for t, d in self.extensions if t != EXT_DATA_FILE]
        elif self.ext(EXT_DATA_FILE) is not None:
            self.extensions = [(t, name.encode() if t == EXT_DATA_FILE else d)
                               for t, d in self.extensions]
        else:
            self.extensions.insert(0, (EXT_DATA_FILE, name.encode()))

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear & AUTOCLEAR_DATA_FILE_RAW)

    def ext(self, etype: int) -> bytes | None:
        for t, d in self.extensions:
            if t == etype:
                return d
        return None

    def unsupported_features(self, mask: int) -> str:
        """qemu-img's list of the incompatible features in ``mask``: the
        names the feature table gives them (in the table's order; a name is
        a C string of at most 46 bytes), then the rest as a hex mask."""
        table = self.ext(EXT_FEATURE_TABLE) or b""
        table += bytes(-len(table) % 48 + 48)      # read zero-padded, as qemu-img
        names = []
        for i in range(0, len(table), 48):
            bit, name = table[i + 1], table[i + 2:i + 48].split(b"\0", 1)[0]
            if not name:        # an empty name ends the table
                break
            if table[i] == 0 and bit < 64 and mask >> bit & 1:
                names.append(name.decode("utf-8", "replace"))
                mask &= ~(1 << bit)
        if mask:
            names.append(f"Unknown incompatible feature: {mask:x}")
        return ", ".join(names)

    # -- serialisation -------------------------------------------------
    def pack(self) -> bytes:
        """Return cluster 0's meaningful bytes (header, extensions, end
        marker, backing name). The optional feature name table is dropped
        when it does not fit (512-byte clusters with a backing file); raises
        ImageError when the rest exceeds a cluster."""
        out = self._pack()
        if len(out) > self.cluster_size and self.ext(EXT_FEATURE_TABLE) is not None:
            self.extensions = [(t, d) for t, d in self.extensions if t != EXT_FEATURE_TABLE]
            out = self._pack()
        if len(out) > self.cluster_size:
            raise ImageError(f"header, extensions and backing name need {len(out)} bytes, "
                             f"more than one cluster ({self.cluster_size})")
        return out

    def _pack(self) -> bytes:
        out = bytearray(_V2.pack(
            MAGIC, self.version,
            0, 0,  # backing offset/size patched below
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            out += _V3.pack(self.incompatible, self.compatible, self.autoclear,
                            self.refcount_order, self.header_length)
            tail = bytearray(self.tail.ljust(self.header_length - 104, b"\0"))
            if len(tail):
                tail[0] = self.compression_type
            out += tail
        exts = []
        if self.backing_format:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        exts += [(t, d) for t, d in self.extensions if t != EXT_BACKING_FORMAT]
        for t, d in exts:
            out += struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8)
        out += struct.pack(">II", EXT_END, 0)
        if self.backing_file:
            name = self.backing_file.encode()
            if len(name) > 1023:
                raise ImageError("backing file name too long (max 1023 bytes)")
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        return bytes(out)


def feature_table_ext() -> bytes:
    out = bytearray()
    for kind, bit, name in FEATURE_NAMES:
        out += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    return bytes(out)


def read_cluster0(fd: int) -> bytes:
    """Cluster 0 of the qcow2 file ``fd`` (fewer bytes at the end of a
    shorter file): all :func:`parse_header` reads of it. One 64 KiB read
    holds it for clusters up to 64 KiB (the default); a larger cluster
    (up to 2 MiB) takes a second read of its rest. (A 2 MiB read at every
    open -- the largest cluster, whatever the image's -- was ~1.1 ms of
    each qcow2 open on the shared VM, a copy into fresh pages: 2.5 ms of
    a 3-deep chain convert's start, benchmarks/README.md, stop 23.)"""
    probe = 64 << 10
    buf = dio.pread(fd, probe, 0)
    if len(buf) == probe:
        bits = int.from_bytes(buf[20:24], "big")
        if 16 < bits <= 21:           # a larger cluster (else refused by parse_header)
            buf += dio.pread(fd, (1 << bits) - probe, probe)
    return buf


def parse_header(buf: bytes, file_size: int, path: str = "") -> Header:
    """Parse and validate cluster 0 (``buf`` holds at least its first bytes,
    up to a cluster). ``file_size`` bounds every table offset.

    The parts are checked in a fixed order (the first problem found is the
    one reported): the fixed fields, the version 3 fields, the header
    extensions, unknown incompatible features, the backing file name, the
    features blkjobs supports, the tables' places and sizes, the bitmaps
    extension."""
    who = f"'{path}': " if path else ""

    def bad(msg: str) -> ImageError:
        return ImageError(f"{who}{msg}")

    def refused(msg: str) -> ImageError:      # qemu-img's words: the file it could not open
        return ImageError(f"Could not open '{path}': {msg}" if path else msg)

    h, bf_off, bf_size = _parse_fixed_fields(buf, bad)
    _parse_v3_fields(h, buf, bad)
    # Extensions first: the feature table names unknown features.
    ext_end = _parse_extensions(h, buf, bad)
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        raise refused(f"Unsupported qcow2 feature(s): {h.unsupported_features(unknown)}")
    if bf_off:
        _parse_backing_name(h, buf, bf_off, bf_size, ext_end, bad)
    _check_features(h, bad)
    # Tables: aligned, inside the file, of sane size.
    _check_l1_table(h, file_size, bad, refused)
    _check_refcount_table(h, file_size, bad)
    _check_snapshot_table(h, file_size, refused)
    bitmaps_ext = h.ext(EXT_BITMAPS)
    if bitmaps_ext is not None and h.autoclear & AUTOCLEAR_BITMAPS:
        _check_bitmaps_ext(bitmaps_ext, h.cluster_size, bad)
    return h


def stale_bitmaps(h: Header) -> bool:
    """A bitmaps extension that a program without bitmap support may have
    left stale: the autoclear bit clear (always, in a v2 image)."""
    return h.ext(EXT_BITMAPS) is not None and not h.autoclear & AUTOCLEAR_BITMAPS


def drop_stale_bitmaps(h: Header) -> bool:
    """Drop such an extension (its clusters leak), as QEMU does when it
    opens the image read/write; True when there was one."""
    if not stale_bitmaps(h):
        return False
    h.extensions = [(t, d) for t, d in h.extensions if t != EXT_BITMAPS]
    return True


_Bad: TypeAlias = "Callable[[str], ImageError]"      # makes the one-line error for a problem

#: the flag set while ``check`` opens an image (qemu's BDRV_O_CHECK): the
#: snapshot table is neither validated nor read at open. Made on first use
#: (:func:`check_open_flag`): ``contextvars`` is 0.7 M instructions of the
#: start-up of every other command on a qcow2 image
_CHECK_OPEN: dict[str, ContextVar[bool]] = {}


def check_open_flag() -> ContextVar[bool]:
    """The flag ``check`` sets (``set(True)``, then ``reset``) while it
    opens an image."""
    flag = _CHECK_OPEN.get("flag")
    if flag is None:
        from contextvars import ContextVar
        # setdefault: two threads making it at once keep the same one
        flag = _CHECK_OPEN.setdefault("flag", ContextVar("qcow2_check_open", default=False))
    return flag


def check_opening() -> bool:
    """``check`` is opening the image (see :func:`check_open_flag`)."""
    flag = _CHECK_OPEN.get("flag")
    return flag is not None and flag.get()


def _parse_fixed_fields(buf: bytes, bad: _Bad) -> tuple[Header, int, int]:
    """The version 2 fields (bytes 0..71): the Header, and the backing file
    name's offset and size."""
    if len(buf) < 72:
        raise bad("file too short for a qcow2 header")
    (magic, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise bad("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise bad(f"unsupported qcow2 version {version}")
    if not 9 <= cluster_bits <= 21:
        raise bad(f"unsupported cluster size: cluster_bits={cluster_bits} (must be 9..21)")
    h = Header(version=version, cluster_bits=cluster_bits, size=size, crypt_method=crypt,
               l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
               refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
               snapshots_offset=snap_off)
    return h, bf_off, bf_size


def _parse_v3_fields(h: Header, buf: bytes, bad: _Bad) -> None:
    """The version 3 fields (bytes 72..103) and the header's tail up to
    header_length (the compression type); version 2's fixed values."""
    if h.version != 3:
        h.refcount_order, h.header_length, h.tail = 4, 72, b""
        return
    if len(buf) < 104:
        raise bad("file too short for a version 3 header")
    (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
     h.header_length) = _V3.unpack_from(buf, 72)
    if h.header_length < 104 or h.header_length % 8 or h.header_length > h.cluster_size \
            or h.header_length > len(buf):
        raise bad(f"invalid header_length {h.header_length}")
    h.tail = bytes(buf[104:h.header_length])
    h.compression_type = h.tail[0] if h.tail else 0


# may appear once only (a repeated backing format: the last one counts, as qemu-img)
_SINGLE_EXTENSIONS = (EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE)


def _parse_extensions(h: Header, buf: bytes, bad: _Bad) -> int:
    """The header extensions after header_length, up to the end marker.
    Returns the offset after the end marker."""
    limit = min(h.cluster_size, len(buf))
    off = h.header_length
    seen = set()
    while True:
        if off + 8 > limit:
            raise bad("header extensions run past the first cluster")
        etype, elen = struct.unpack_from(">II", buf, off)
        off += 8
        if etype == EXT_END:
            return off
        if off + elen > limit:
            raise bad(f"header extension 0x{etype:08x} runs past the first cluster")
        if etype in seen and etype in _SINGLE_EXTENSIONS:
            raise bad(f"duplicate header extension 0x{etype:08x}")
        seen.add(etype)
        data = bytes(buf[off:off + elen])
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("utf-8", "replace")
        else:
            h.extensions.append((etype, data))
        off += elen + (-elen % 8)


def _parse_backing_name(h: Header, buf: bytes, bf_off: int, bf_size: int, ext_end: int,
                        bad: _Bad) -> None:
    """The backing file name: after the extensions, inside the first cluster."""
    if bf_size > 1023 or bf_off + bf_size > min(h.cluster_size, len(buf)) or bf_off < ext_end:
        raise bad(f"invalid backing file name location (offset {bf_off}, size {bf_size})")
    # a C string, as qemu-img reads it: a NUL ends the name
    name = bytes(buf[bf_off:bf_off + bf_size]).split(b"\0", 1)[0]
    h.backing_file = name.decode("utf-8", "replace") or None


def _check_features(h: Header, bad: _Bad) -> None:
    """Features blkjobs refuses, and feature fields that disagree."""
    if h.crypt_method not in (0, 1, 2):     # 1 AES, 2 LUKS: formats/qcow2/crypt.py
        raise bad(f"Unsupported encryption method: {h.crypt_method}")
    if h.refcount_order > 6:
        raise bad(f"invalid refcount_order {h.refcount_order}")
    if h.extended_l2 and h.cluster_bits < 14:
        raise bad("extended L2 entries need a cluster size of at least 16 KiB")
    if bool(h.incompatible & INCOMPAT_COMPRESSION) != bool(h.compression_type):
        raise bad("compression type field and incompatible feature bit 3 disagree")
    if h.compression_type not in (0, 1):
        raise bad(f"unknown compression type {h.compression_type}")
    if h.version == 2 and (h.incompatible or h.compatible or h.autoclear):
        raise bad("feature bits in a version 2 header")


def _check_l1_table(h: Header, file_size: int, bad: _Bad, refused: _Bad) -> None:
    """The virtual size, and an L1 table that covers it, aligned, inside the file
    (``refused``: an error in qemu-img's words)."""
    size, l1_size, l1_off, cs = h.size, h.l1_size, h.l1_table_offset, h.cluster_size
    need_l1 = -(-size // (cs * h.l2_entries))
    if need_l1 > 0x7FFFFFFF:        # qemu-img's words (the file it could not open)
        raise refused("Image is too big")
    if size >= 1 << 62:
        raise bad(f"virtual size {size} too large")
    if l1_size < need_l1:
        raise refused("L1 table is too small")
    if l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table too large (l1_size={l1_size})")
    if l1_size and (l1_off % cs or l1_off == 0 or l1_off + l1_size * 8 > file_size):
        raise bad(f"invalid L1 table offset 0x{l1_off:x} (file size {file_size})")


def _check_refcount_table(h: Header, file_size: int, bad: _Bad) -> None:
    """The refcount table: aligned, not empty, of sane size, inside the file."""
    rt_off, rt_clusters, cs = h.refcount_table_offset, h.refcount_table_clusters, h.cluster_size
    if rt_off % cs or rt_off == 0 or rt_clusters == 0:
        raise bad(f"invalid refcount table (offset 0x{rt_off:x}, {rt_clusters} clusters)")
    if rt_clusters * cs > MAX_REFCOUNT_TABLE or rt_off + rt_clusters * cs > file_size:
        raise bad(f"refcount table (offset 0x{rt_off:x}, {rt_clusters} clusters) "
                  f"outside the file (size {file_size})")


def _check_snapshot_table(h: Header, file_size: int, bad: _Bad) -> None:
    """The snapshot table's place and count, as qemu's qcow2_validate_table
    judges them at open (the entries are read and judged after the header:
    snapshots.load_table; an image opened for ``check`` skips both, the
    check reads the table itself)."""
    if check_opening():
        return
    nb_snap, snap_off = h.nb_snapshots, h.snapshots_offset
    if nb_snap > 65536:
        raise bad("Snapshot table too large")
    if (1 << 63) - 1 - nb_snap * 40 < snap_off or snap_off % h.cluster_size:
        raise bad("Snapshot table offset invalid")


class BitmapEntry(Record):
    """One bitmap directory entry (spec: the bitmaps extension). A plain
    class (see Header), unhashable as the dataclass it was."""
    __slots__ = ("name", "table_offset", "table_size", "flags", "granularity_bits")
    __hash__ = None     # type: ignore[assignment]  # mutable

    def __init__(self, name: str, table_offset: int, table_size: int, flags: int,
                 granularity_bits: int) -> None:
        self.name = name
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.granularity_bits = granularity_bits


def _check_bitmaps_ext(data: bytes, cs: int, bad: _Bad) -> None:
    """The checks qemu-img makes on the bitmaps extension at open (same texts)."""
    if len(data) != _BITMAPS_EXT.size:
        raise bad("bitmaps_ext: Invalid extension length")
    nb, reserved, dsize, doff = _BITMAPS_EXT.unpack(data)
    if reserved:
        raise bad("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise bad(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported "
                  f"maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise bad("found bitmaps extension with zero bitmaps")
    if doff % cs:
        raise bad("bitmaps_ext: invalid bitmap directory offset")
    if dsize > MAX_BITMAP_DIRECTORY_SIZE:
        raise bad(f"bitmaps_ext: bitmap directory size ({dsize}) exceeds the maximum "
                  f"supported size ({MAX_BITMAP_DIRECTORY_SIZE})")


def read_bitmap_directory(fd: int, h: Header, file_size: int, path: str = "") -> list:
    """The bitmap directory as :class:`BitmapEntry` objects ([] when the
    image has no valid bitmaps extension), validated as qemu-img does when
    it opens an image; ImageError with qemu-img's text otherwise. Every size
    is bounded before anything is allocated from it: the directory by
    :data:`MAX_BITMAP_DIRECTORY_SIZE` (checked by :func:`parse_header`),
    each table by ``BME_MAX_TABLE_SIZE`` and ``BME_MAX_PHYS_SIZE``."""
    who = f"'{path}': " if path else ""
    data = h.ext(EXT_BITMAPS)
    if data is None or not h.autoclear & AUTOCLEAR_BITMAPS:
        return []
    nb, _, dsize, doff = _BITMAPS_EXT.unpack(data)
    if dsize == 0:
        raise ImageError(f"{who}Requested bitmap directory size is zero")
    # what lies past the end of the file reads as zeroes (as in qemu-img)
    have = max(0, min(dsize, file_size - doff))
    d = dio.pread(fd, have, doff) if have else b""
    d = d + bytes(dsize - len(d))
    out: list[BitmapEntry] = []
    p = 0
    while p < dsize:
        if p + _BITMAP_ENTRY.size > dsize:
            raise ImageError(f"{who}Broken bitmap directory")
        if len(out) + 1 > nb:
            raise ImageError(f"{who}More bitmaps found than specified in header extension")
        toff, tsize, flags, btype, gbits, nml, extra = _BITMAP_ENTRY.unpack_from(d, p)
        ln = _BITMAP_ENTRY.size + extra + nml
        nxt = p + ln + (-ln % 8)
        if nxt > dsize:
            raise ImageError(f"{who}Broken bitmap directory")
        if extra:
            raise ImageError(f"{who}Bitmap extra data is not supported")
        raw_name = d[p + _BITMAP_ENTRY.size:p + _BITMAP_ENTRY.size + nml]
        # printed as qemu-img prints it ("%.*s": up to a NUL), control
        # characters escaped so that an error stays on one line
        name = "".join(c if c.isprintable() else f"\\x{ord(c):02x}"
                       for c in raw_name.split(b"\0", 1)[0].decode("utf-8", "replace"))
        phys = tsize * h.cluster_size
        if (tsize == 0 or toff == 0 or toff % h.cluster_size or tsize > BME_MAX_TABLE_SIZE
                or not BME_MIN_GRANULARITY_BITS <= gbits <= BME_MAX_GRANULARITY_BITS
                or flags & BME_RESERVED_FLAGS or nml > BME_MAX_NAME_SIZE
                or btype != BT_DIRTY_TRACKING_BITMAP or phys > BME_MAX_PHYS_SIZE
                or (not flags & BME_FLAG_IN_USE and h.size > (phys * 8) << gbits)):
            raise ImageError(f"{who}Bitmap '{name}' doesn't satisfy the constraints")
        out.append(BitmapEntry(name, toff, tsize, flags, gbits))
        p = nxt
    if len(out) != nb:
        raise ImageError(f"{who}Less bitmaps found than specified in header extension")
    return out
