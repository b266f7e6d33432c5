"""Creating qcow2 images (the layout ``qemu-img create`` uses).

Cluster 0 header, then the refcount table, the refcount block(s) and the L1
table, all refcounted 1; nothing else. ``preallocation='metadata'``
additionally allocates every L2 table and data cluster (reading as zeroes:
the file is extended sparsely); ``falloc`` and ``full`` also allocate the
file's blocks (see :func:`preallocate`).
"""
from __future__ import annotations

import os
import struct

from ...errors import ImageError, UsageError
from .header import (AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE, COMPAT_LAZY_REFCOUNTS, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION,
                     INCOMPAT_EXTL2, Header, feature_table_ext)
from ...native import dio


def create(path: str, size: int, cluster_size: int = 65536, extended_l2: bool = False,
           backing_file: str | None = None, backing_format: str | None = None,
           preallocation: str = "off", compat: str = "1.1", refcount_bits: int = 16,
           lazy_refcounts: bool = False, compression_type: str = "zlib",
           backing_format_optional: bool = False, data_file: str | None = None,
           data_file_raw: bool = False, sync: bool = True) -> None:
    """Create (or overwrite) a qcow2 image at ``path``. ``data_file``: the
    guest data goes to that external file, created (or truncated) first as
    qemu-img does, with the preallocation applied to it; ``data_file_raw``
    keeps it a valid raw image (metadata preallocated: a 1:1 mapping). ``lazy_refcounts``
    sets the compatible feature bit; ``compression_type`` ``zstd`` sets the
    header field and incompatible bit 3 (both need compat 1.1).
    ``backing_format_optional``: write a backing name without a format (as
    QEMU's blockdev-create without ``backing-fmt``) instead of refusing.
    ``sync=False``: the new file is not fsync'd (a convert with ``-t unsafe``
    creates its target so: nothing of it is made durable)."""
    if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
        raise UsageError(f"cluster size must be a power of two between 512 and 2M, not {cluster_size}")
    if size < 0 or size % 512:
        raise UsageError(f"image size must be a non-negative multiple of 512, not {size}")
    if compat not in ("1.1", "0.10", "v3", "v2"):
        raise UsageError(f"invalid compat level {compat!r} (1.1 or 0.10)")
    version = 3 if compat in ("1.1", "v3") else 2
    if extended_l2 and (version < 3 or cluster_size < 16384):
        raise UsageError("extended_l2 needs compat=1.1 and a cluster size of at least 16K")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (version < 3 and refcount_bits != 16):
        raise UsageError(f"invalid refcount_bits {refcount_bits}")
    if preallocation not in ("off", "metadata", "falloc", "full"):
        raise UsageError(f"unsupported preallocation mode {preallocation!r} "
                         "(off, metadata, falloc, full)")
    if (lazy_refcounts or compression_type != "zlib") and version < 3:
        raise UsageError("lazy refcounts and zstd compression need compat=1.1")
    if compression_type not in ("zlib", "zstd"):
        raise UsageError(f"unknown compression type {compression_type!r} (zlib, zstd)")
    _check_data_file(data_file, data_file_raw, bool(backing_file), version)
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"      # the tables must map 1:1 (QEMU)
    if backing_file and not backing_format and not backing_format_optional:
        raise UsageError("a backing file needs a backing format (probe it with open_image)")
    if preallocation in ("falloc", "full") and size and data_file is None and _grown(
            path, size, preallocation, dict(
                cluster_size=cluster_size, extended_l2=extended_l2,
                backing_file=backing_file, backing_format=backing_format, compat=compat,
                refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts,
                compression_type=compression_type,
                backing_format_optional=backing_format_optional)):
        return
    cb = cluster_size.bit_length() - 1
    h = Header(version=version, cluster_bits=cb, size=size,
               refcount_order=refcount_bits.bit_length() - 1,
               header_length=112 if version >= 3 else 72,
               incompatible=(INCOMPAT_EXTL2 if extended_l2 else 0)
               | (INCOMPAT_COMPRESSION if compression_type == "zstd" else 0),
               compatible=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
               compression_type=1 if compression_type == "zstd" else 0,
               backing_file=backing_file or None,
               backing_format=backing_format if backing_file else None)
    if version >= 3:
        h.tail = bytes(8)
        # QEMU 7.2 leaves the feature name table out of images with clusters
        # of 4 KiB and less (qemu-img create, blockdev-create)
        if cluster_size > 4096:
            h.extensions = [(EXT_FEATURE_TABLE, feature_table_ext())]
    lay = Layout(size, cluster_size, h.l2_entries, refcount_bits)
    h.l1_size = lay.l1_size
    h.refcount_table_offset = lay.rt_offset
    h.refcount_table_clusters = lay.rt
    h.l1_table_offset = lay.l1_offset if lay.l1_size else 0     # QEMU: none allocated
    if data_file is not None:
        h.incompatible |= INCOMPAT_DATA_FILE
        h.autoclear |= AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0
        h.data_file = data_file
    head = h.pack()      # raises when the backing name does not fit
    if data_file is not None:
        _create_data_file(data_file, size, preallocation)
    _write_new(path, head, lay, sync)
    if preallocation != "off" and size:
        preallocate(path, size, preallocation)
    if not os.path.exists(path):   # pragma: no cover
        raise ImageError(f"could not create '{path}'")


def _grown(path: str, size: int, mode: str, args: dict) -> bool:
    """QEMU creates the image empty, then grows it with the preallocation
    mode (qcow2_co_create, then truncate): prealloc.py lays it out so (every
    size, an L1 table that grows the refcount table included). False where
    prealloc.py refuses the empty image it is given (not expected): the
    caller makes its own valid layout instead."""
    from .prealloc import preallocate as grow
    # One descriptor stays open from the first write to the last, as in
    # QEMU: closing the last writable one drops the file system's
    # reservation for the file (ext4), and the data would be placed elsewhere.
    keep = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        create(path, 0, **args)
        try:
            grow(path, size, mode)
        except UsageError:      # its one refusal on a fresh empty image: that layout
            return False
    finally:
        os.close(keep)
    return True


def _check_data_file(data_file: str | None, raw: bool, backing: bool, version: int) -> None:
    """qemu-img's refusals of the data file options."""
    if raw and data_file is None:
        raise UsageError("data-file-raw requires data-file")
    if raw and backing:
        raise UsageError("Backing file and data-file-raw cannot be used at the same time")
    if data_file is not None and version < 3:
        raise UsageError("External data files are only supported with compatibility level "
                         "1.1 and above (use version=v3 or greater)")


def _write_new(path: str, head: bytes, lay: Layout, sync: bool = True) -> None:
    """The new image's file: header, refcounts, L1 table. Every cluster is
    written whole, the L1 table too, as QEMU does: the same blocks allocated
    (qemu-img's metadata preallocation guess, and so its map, depend on
    them)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        dio.pwrite(fd, head.ljust(lay.cluster_size, b"\0"), 0)
        lay.write_refcounts(fd)
        if lay.l1_size:
            dio.pwrite(fd, bytes(lay.l1_size * 8), lay.l1_offset)
        os.ftruncate(fd, lay.end)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _create_data_file(name: str, size: int, preallocation: str) -> None:
    """The external data file as qemu-img creates it: a new raw file of the
    virtual size (its old content dropped), preallocated with ``falloc`` or
    ``full`` (``metadata`` concerns only the qcow2 tables)."""
    from ..raw import create as create_raw
    try:
        create_raw(name, size, preallocation if preallocation in ("falloc", "full") else "off")
    except OSError as e:
        raise UsageError(f"Could not create '{name}': {e.strerror}") from None


def preallocate(path: str, size: int, mode: str, start: int = 0) -> None:
    """Allocate every L2 table and data cluster of ``[start, size)`` (the
    data reading as zeroes) as QEMU's preallocate_co: ``metadata`` extends
    the file sparsely to the last data cluster, ``falloc`` allocates the
    file's blocks up to there (fallocate), ``full`` writes zeroes over the
    new data clusters."""
    from .driver import Qcow2
    with Qcow2(path, read_only=False) as img:
        old_len = os.fstat(img.fd).st_size
        runs = img.allocate(start, size - start)
        if img.extended:
            # QEMU links preallocated clusters without marking their
            # subclusters allocated (they read as zeroes, or the backing file)
            for gc in range(start // img.cluster_size, -(-size // img.cluster_size)):
                img._set_entry(gc, img._entry(gc)[2], 0)
        if img.external:        # the data file is preallocated when created
            img.flush()
            return
        # allocate() hands back DATA runs: each has its host offset
        hosts = [(m.host_offset, m.length) for m in runs if m.host_offset is not None]
        cs = img.cluster_size
        end = -(-max(h + n for h, n in hosts) // cs) * cs
        if end > os.fstat(img.fd).st_size:
            os.ftruncate(img.fd, end)
        if mode == "falloc" and end > old_len:
            os.posix_fallocate(img.fd, old_len, end - old_len)
        elif mode == "full":
            zero = bytes(min(1 << 20, max(n for _, n in hosts)))
            for h, n in hosts:
                pos = h
                while pos < h + n:
                    pos += dio.pwrite(img.fd, memoryview(zero)[:min(len(zero), h + n - pos)],
                                     pos)
        img.flush()


class Layout:
    """Where a fresh image keeps its metadata: cluster 0 the header, then
    the refcount table (``rt`` clusters), the refcount blocks (``rb``) and
    the L1 table (``l1_clusters``), all with refcount 1 and nothing else.
    ``end``: the file size (the L1 table's last byte)."""

    def __init__(self, size: int, cluster_size: int, l2_entries: int, refcount_bits: int):
        self.cluster_size = cs = cluster_size
        self.refcount_bits = refcount_bits
        self.l1_size = -(-size // (cs * l2_entries))
        self.l1_clusters = -(-self.l1_size * 8 // cs)
        self.rbe = rbe = cs * 8 // refcount_bits          # refcounts per block
        rt, rb = 1, 1
        while True:       # fixpoint: table and blocks must cover themselves
            total = 1 + rt + rb + self.l1_clusters
            nrb = -(-total // rbe)
            nrt = -(-nrb * 8 // cs)
            if (nrb, nrt) == (rb, rt):
                break
            rb, rt = nrb, nrt
        self.rt, self.rb = rt, rb
        self.clusters = 1 + rt + rb + self.l1_clusters
        self.rt_offset = cs
        self.rb_offset = (1 + rt) * cs
        self.l1_offset = (1 + rt + rb) * cs
        self.end = max(self.l1_offset + self.l1_size * 8, self.l1_offset)

    def write_refcounts(self, fd: int) -> None:
        """The refcount table and blocks: 1 for the layout's own clusters,
        0 for every other one."""
        cs, rb = self.cluster_size, self.rb
        table = struct.pack(f">{rb}Q", *[self.rb_offset + i * cs for i in range(rb)])
        dio.pwrite(fd, table.ljust(self.rt * cs, b"\0"), self.rt_offset)
        from .refcount import Refcounts
        enc = Refcounts.__new__(Refcounts)
        enc.bits = self.refcount_bits
        for i in range(rb):
            lo, hi = i * self.rbe, min(self.clusters, (i + 1) * self.rbe)
            vals = [1] * (hi - lo) + [0] * (self.rbe - (hi - lo))
            dio.pwrite(fd, enc._encode(vals), self.rb_offset + i * cs)
