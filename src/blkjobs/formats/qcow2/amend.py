"""qcow2 ``amend``: changing the options of an existing image as QEMU 7.2's
qcow2_amend_options does -- compat (upgrade to 1.1, downgrade to 0.10),
lazy_refcounts, and the checks of backing_file/backing_fmt, data_file,
data_file_raw and refcount_bits. The size is changed by the caller (the
resize operation) between the header update and the downgrade, as QEMU does.

Upgrade (0.10 -> 1.1): a snapshot table whose entries lack the 64-bit VM
state size or the disk size is rewritten first (always in the 1.1 form),
then the header is written as version 3 with the feature name table.

Downgrade (1.1 -> 0.10): refused for refcount_bits other than 16, an
external data file, snapshots of another disk size, and incompatible
features (extended L2 entries...); a dirty image is made clean; compatible
and autoclear features are cleared; every zero cluster (active and snapshot
L2 tables) becomes a data cluster of zeroes, or -- a plain zero cluster of
an image without a backing file -- unallocated; then the header is written
as version 2. One deliberate difference from QEMU 7.2: a zero cluster whose
host cluster is also referenced from another L2 table (an internal snapshot
reading data there) gets a new cluster of zeroes; QEMU zeroes the shared
cluster in place, which changes the snapshot's data, and sets COPIED on
it (``qemu-img check`` then reports OFLAG_COPIED errors).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ...errors import ImageError
from .header import (COMPAT_LAZY_REFCOUNTS, EXT_FEATURE_TABLE, INCOMPAT_DIRTY,
                     feature_table_ext)
from .snapshots import read_table
from .tables import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK, ZERO
from ...native import dio

INCOMPAT_COMPRESSION = 1 << 3
Progress = Callable[[float], None] | None


class AmendError(ImageError):
    """An option that cannot be amended (qemu-img's text)."""


def upgrade(drv, progress: Progress = None) -> None:
    """compat=1.1 on a version 2 image."""
    from .snapshot_ops import write_table
    h = drv.header
    if progress:
        progress(0.0)
    if _short_extra(drv):
        snaps, size = read_table(drv)
        write_table(drv, snaps, size)
    if progress:
        progress(0.5)
    h.version = 3
    h.header_length = 112
    h.tail = b""
    h.compression_type = 0
    # QEMU 7.2 leaves the feature name table out of images with clusters of
    # 4 KiB and less (as create does)
    if h.ext(EXT_FEATURE_TABLE) is None and h.cluster_size > 4096:
        h.extensions.insert(0, (EXT_FEATURE_TABLE, feature_table_ext()))
    drv.flush()
    drv._write_header()
    if progress:
        progress(1.0)


def _short_extra(drv) -> bool:
    """Whether an entry of the snapshot table has less than 16 bytes of
    extra data (no 64-bit VM state size and disk size)."""
    h = drv.header
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        raw = dio.pread(drv.fd, 40, pos)
        id_len, name_len = struct.unpack_from(">HH", raw, 12)
        extra = struct.unpack_from(">I", raw, 36)[0]
        if extra < 16:
            return True
        pos += 40 + extra + id_len + name_len
        pos += -(pos - h.snapshots_offset) % 8
    return False


def set_lazy_refcounts(drv, on: bool) -> None:
    h = drv.header
    if on == bool(h.compatible & COMPAT_LAZY_REFCOUNTS):
        return
    if on:
        if h.version < 3:
            raise AmendError("Lazy refcounts only supported with compatibility level 1.1 "
                             "and above (use compat=1.1 or greater)")
        h.compatible |= COMPAT_LAZY_REFCOUNTS
    else:
        _mark_clean(drv)
        h.compatible &= ~COMPAT_LAZY_REFCOUNTS
    drv.flush()
    drv._write_header()


def _mark_clean(drv) -> None:
    """Clear the dirty flag (the refcounts were rebuilt when the image was
    prepared for writing)."""
    if not drv._write_prepared:
        drv._prepare_write()
    if drv.header.incompatible & INCOMPAT_DIRTY:
        drv.flush()
        drv.header.incompatible &= ~INCOMPAT_DIRTY
        drv._write_header()


def set_data_file(drv, name: str | None, raw: bool | None) -> None:
    """``data_file=`` / ``data_file_raw=off`` on an image with an external
    data file: the name in the header (empty: none; the image then needs
    the ``data-file`` option to open), the raw bit cleared (as QEMU)."""
    from .header import AUTOCLEAR_DATA_FILE_RAW
    h = drv.header
    if raw is not None:
        h.autoclear = (h.autoclear | AUTOCLEAR_DATA_FILE_RAW) if raw else \
            (h.autoclear & ~AUTOCLEAR_DATA_FILE_RAW)
    if name is not None:
        h.data_file = name or None
    drv.flush()
    drv._write_header()


def downgrade(drv, has_backing: bool, progress: Progress = None) -> None:
    """compat=0.10 on a version 3 image (see the module docstring)."""
    h = drv.header
    if h.refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if h.incompatible & 0x4:
        raise AmendError("Cannot downgrade an image with a data file")
    snaps, _ = read_table(drv)
    if any(s.vm_state_size > 0xFFFFFFFF or s.disk_size != drv.size for s in snaps):
        raise AmendError("Internal snapshots prevent downgrade of image")
    _mark_clean(drv)
    rest = h.incompatible & ~INCOMPAT_COMPRESSION
    if rest:
        raise AmendError(f"Cannot downgrade an image with incompatible features 0x{rest:x} set")
    h.compatible = 0
    h.autoclear = 0
    tables = [(drv.l1, True)]
    total = (len(drv.l1) + sum(s.l1_size for s in snaps)) or 1
    done = 0
    for k in range(len(snaps) + 1):
        if k == 1:  # qcow2_cache_empty: snapshots may share the active L2 tables
            drv.flush()
            drv.l2cache.clear()
        if k:       # a snapshot's L1 table, judged when its turn comes (as QEMU)
            _validate_snap_l1(drv, snaps[k - 1])
            tables.append((_snap_l1(drv, snaps[k - 1]), False))
        l1, active = tables[k]
        for le in l1:
            off = le & L1_OFFSET_MASK
            if off:
                _expand_l2(drv, off, active, has_backing)
            done += 1
            if progress:
                progress(done / total)
    drv.flush()
    if h.incompatible & INCOMPAT_COMPRESSION:
        if _has_compressed(drv, tables):
            raise AmendError("Cannot downgrade an image with zstd compression type and "
                             "existing compressed clusters")
        h.incompatible &= ~INCOMPAT_COMPRESSION
        h.compression_type = 0
    h.version = 2
    h.extensions = [(t, d) for t, d in h.extensions if t != EXT_FEATURE_TABLE]
    drv._write_header()


def _validate_snap_l1(drv, s) -> None:
    """qcow2_expand_zero_clusters' check of a snapshot's L1 table: its
    error reported, then the downgrade's failure."""
    from .snapshot_ops import SnapshotError, _validate_l1
    try:
        _validate_l1(drv, s)
    except SnapshotError as e:
        raise AmendError(f"{e}\nblkjobs: Failed to turn zero into data clusters: "
                         f"{os.strerror(e.errno)}") from None


def _snap_l1(drv, s) -> list[int]:
    raw = dio.pread(drv.fd, s.l1_size * 8, s.l1_table_offset).ljust(s.l1_size * 8, b"\0")
    return list(struct.unpack(f">{s.l1_size}Q", raw))


def _expand_l2(drv, off: int, active: bool, has_backing: bool) -> None:
    """Turn the zero clusters of the L2 table at ``off`` into data clusters
    of zeroes (plain ones without a backing file: unallocated)."""
    rc = drv._rc()
    cs = drv.cluster_size
    l2_ref = rc.get(off >> drv.cb)
    t = drv._l2(off) if active else bytearray(dio.pread(drv.fd, cs, off))
    n = cs // 8
    vals = list(struct.unpack(f">{n}Q", t))
    dirty = False
    for j, e in enumerate(vals):
        if e & COMPRESSED or not e & ZERO:
            continue
        h = e & OFFSET_MASK
        if h and rc.get(h >> drv.cb) != l2_ref:
            # Shared beyond this table (a snapshot reads its data or its own
            # zero flag): zeroing it in place would change what the other
            # table reads -- QEMU does that; a new cluster instead.
            for _ in range(l2_ref):
                rc.free_later(h >> drv.cb)
            h = 0
        elif not h and not has_backing:
            vals[j] = 0
            dirty = True
            continue
        if not h:
            c = rc.alloc_one()
            if l2_ref > 1:
                rc._set(c, l2_ref)
            h = c << drv.cb
        rc.flush_increments()       # the new cluster's refcount first
        dio.pwrite(drv.fd, bytes(cs), h)
        vals[j] = h | COPIED if l2_ref == 1 else h
        dirty = True
    if not dirty:
        return
    struct.pack_into(f">{n}Q", t, 0, *vals)
    if active:
        drv.l2dirty.add(off)
    else:
        rc.flush_increments()
        dio.pwrite(drv.fd, t, off)
        drv._fsync()
        drv.l2cache.pop(off, None)
        drv.flush()                 # then the references it dropped


def _has_compressed(drv, tables) -> bool:
    for l1, _ in tables:
        for le in l1:
            off = le & L1_OFFSET_MASK
            if off:
                t = drv._l2(off)
                if any(e & COMPRESSED for e in struct.unpack(f">{len(t) // 8}Q", t)):
                    return True
    return False


def change_refcount_bits(drv, bits: int, progress: Progress = None) -> None:
    """refcount_bits=N, as QEMU (:mod:`.refcount_order`); refused (nothing
    changed) when a refcount does not fit the new width."""
    from .refcount_order import _Overflow, change_refcount_order
    status = None if progress is None else (lambda off, total: progress(off / total))
    try:
        change_refcount_order(drv, bits, status)
    except _Overflow as e:
        raise AmendError(str(e)) from None
