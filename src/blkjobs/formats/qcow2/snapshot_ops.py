"""qcow2 internal snapshots: create, apply (goto) and delete, as QEMU 7.2's
qcow2 driver does them (the table itself: :mod:`.snapshots`).

Sharing. A snapshot is a copy of the active L1 table; every L2 table and
every data (or compressed) cluster it reaches gets one more reference per
L1 table that reaches it (a shared L2 table counts its data clusters once
per L1 table, as ``qemu-img check`` counts them). The COPIED flag (bit 63)
of an active L1/L2 entry says "refcount 1, writable in place"; after every
operation it is recomputed for the active tables. The write path then
copies a shared L2 table (``tables._l2_for_write``) or data cluster
(``writes``) before changing it.

Order on disk (a crash leaves leaks, never a snapshot or active table
pointing at a freed cluster):

* create: the L1 copy is written and its cluster's refcount made durable;
  the references are counted up and the active COPIED flags cleared (refcount
  blocks, then L2/L1 tables, each fsync'd); then the new snapshot table is
  written, fsync'd, and only then does the header point at it; the old table
  is freed last;
* delete: the new table and header first, then the references counted down
  (and the snapshot's L1 freed), then the COPIED flags set again;
* apply: the snapshot's references counted up, the active L1 overwritten,
  then the old active references counted down, then the flags.

A refcount that would overflow (refcount_bits=1 or 2, or a maximal 64-bit
one) fails the create with EINVAL, as QEMU does; the counting already done
is undone, so only the L1 copy is leaked (QEMU leaks it too).
"""
from __future__ import annotations

import errno
import os
import struct
import time

from ...errors import ImageError
from .snapshots import Snapshot, pack_table, read_table
from .tables import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK

MAX_SNAPSHOTS = 65536
MAX_TABLE_SIZE = 1024 * MAX_SNAPSHOTS
MAX_L1_BYTES = 32 << 20


class SnapshotError(ImageError):
    """A snapshot operation failed; ``errno`` is QEMU's return value (as a
    positive number), ``str(e)`` the error text (strerror by default)."""

    def __init__(self, err: int, text: str | None = None) -> None:
        super().__init__(text or os.strerror(err))
        self.errno = err


def _validate_l1(drv, sn: Snapshot) -> None:
    """qcow2_validate_table on a snapshot's L1 table."""
    if sn.l1_size > MAX_L1_BYTES // 8:
        raise SnapshotError(errno.EFBIG, "Snapshot L1 table too large")
    if sn.l1_table_offset % drv.cluster_size or (
            (1 << 63) - 1 - sn.l1_size * 8 < sn.l1_table_offset):
        raise SnapshotError(errno.EINVAL, "Snapshot L1 table offset invalid")


def _prepare(drv) -> None:
    """What the first modification of the image does (no bitmap tracking:
    no guest data changes here)."""
    if drv.read_only:
        raise ImageError(f"'{drv.filename}': image is opened read-only")
    if not drv._write_prepared:
        drv._prepare_write()


def _read_l1(drv, sn: Snapshot) -> list[int]:
    raw = os.pread(drv.fd, sn.l1_size * 8, sn.l1_table_offset)
    raw = raw.ljust(sn.l1_size * 8, b"\0")      # past the end: zeroes, as QEMU reads
    return list(struct.unpack(f">{sn.l1_size}Q", raw))


def _alloc_run(drv, nbytes: int) -> int:
    """Host offset of max(1, nbytes / cluster_size) fresh contiguous clusters."""
    rc = drv._rc()
    n = max(1, -(-nbytes // drv.cluster_size))
    while True:
        runs = rc.alloc(n)
        if len(runs) == 1:
            return runs[0][0] << drv.cb
        for c0, k in runs:             # a refcount block landed in between
            for c in range(c0, c0 + k):
                rc._set(c, 0)
                rc.pool.append(c)


def _l2_clusters(drv, t: bytearray) -> list[int]:
    """The host clusters the entries of one L2 table reference (a cluster
    once per entry that references it)."""
    n = len(t) // 8
    vals = struct.unpack(f">{n}Q", t)
    if drv.extended:
        vals = vals[::2]
    out: list[int] = []
    cb = drv.cb
    for e in vals:
        if not e:
            continue
        if e & COMPRESSED:
            off = e & drv._coff_mask
            nsec = (e >> (62 - drv._csec_bits)) & ((1 << drv._csec_bits) - 1)
            last = off + (nsec + 1) * 512 - (off & 511) - 1
            out.extend(range(off >> cb, (last >> cb) + 1))
        elif e & OFFSET_MASK:
            out.append((e & OFFSET_MASK) >> cb)
    return out


def add_refs(drv, l1: list[int], addend: int) -> list[int]:
    """Add ``addend`` to the refcount of every L2 table and cluster the L1
    table ``l1`` reaches (in memory; :meth:`flush` or ``flush_increments``
    writes them). All or nothing: on an overflow (or a count below zero)
    what was added is taken back and SnapshotError(EINVAL) raised. Returns
    the clusters whose refcount dropped to 0."""
    rc = drv._rc()
    done: list[int] = []
    try:
        for le in l1:
            off = le & L1_OFFSET_MASK
            if not off:
                continue
            for c in _l2_clusters(drv, drv._l2(off)) + [off >> drv.cb]:
                v = rc.get(c) + addend
                if not 0 <= v <= rc.max_refcount:
                    raise SnapshotError(errno.EINVAL)
                rc._set(c, v)
                done.append(c)
    except BaseException:
        for c in reversed(done):
            rc._set(c, rc.get(c) - addend)
        raise
    return [c for c in dict.fromkeys(done) if rc.get(c) == 0]


def fix_copied(drv) -> None:
    """Recompute the COPIED flags of the active L1 table and its L2 tables
    from the refcounts (QEMU's update_snapshot_refcount with addend 0)."""
    rc, cb = drv._rc(), drv.cb
    step = 2 if drv.extended else 1
    for i, le in enumerate(drv.l1):
        off = le & L1_OFFSET_MASK
        if not off:
            continue
        t = drv._l2(off)
        n = len(t) // 8
        vals = list(struct.unpack(f">{n}Q", t))
        changed = False
        for j in range(0, n, step):
            e = vals[j]
            h = e & OFFSET_MASK
            if not h or e & COMPRESSED:
                continue
            ne = e | COPIED if rc.get(h >> cb) == 1 else e & ~COPIED
            if ne != e:
                vals[j] = ne
                changed = True
        if changed:
            struct.pack_into(f">{n}Q", t, 0, *vals)
            drv.l2dirty.add(off)
        ne = le | COPIED if rc.get(off >> cb) == 1 else le & ~COPIED
        if ne != le:
            drv.l1[i] = ne
            drv.l1_dirty = True


def _free_now(drv, clusters: list[int]) -> None:
    """Clusters whose refcount reached 0 (already written): reusable."""
    drv._rc().pool.extend(clusters)


def write_table(drv, snaps: list[Snapshot], old_size: int) -> None:
    """Replace the snapshot table: the new one written and flushed, then the
    header switched (fsync'd), then the old table's clusters freed."""
    blob = pack_table(snaps)
    if len(blob) > MAX_TABLE_SIZE:
        raise SnapshotError(errno.EFBIG)
    h = drv.header
    new_off = 0
    if snaps:
        new_off = _alloc_run(drv, len(blob))
        os.pwrite(drv.fd, blob, new_off)
    drv.flush()
    drv._fsync()
    old_off = h.snapshots_offset
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    drv._write_header()
    if old_off and old_size:
        rc = drv._rc()
        for c in range(old_off >> drv.cb, ((old_off + old_size - 1) >> drv.cb) + 1):
            rc.free_later(c)
        rc.apply_frees()


def create(drv, name: str, now_us: int | None = None) -> Snapshot:
    """``qemu-img snapshot -c NAME``: a disk-only snapshot of the active
    state (VM state 0, VM clock 0, icount 0, the date now)."""
    snaps, old_size = read_table(drv)
    if len(snaps) >= MAX_SNAPSHOTS:
        raise SnapshotError(errno.EFBIG)
    ids = [0]
    for s in snaps:
        digits = s.id.lstrip()
        k = len(digits) - len(digits.lstrip("0123456789"))
        ids.append(int(digits[:k]) if k else 0)
    rt = time.time_ns() // 1000 if now_us is None else now_us
    _prepare(drv)
    drv.flush()
    l1 = list(drv.l1)
    l1_off = _alloc_run(drv, len(l1) * 8)
    os.pwrite(drv.fd, struct.pack(f">{len(l1)}Q", *l1), l1_off)
    drv.flush()                     # the L1 copy's refcount, durable
    add_refs(drv, l1, 1)
    fix_copied(drv)
    drv.flush()
    sn = Snapshot(str(max(ids) + 1), name.encode()[:255].decode("utf-8", "ignore"),
                  l1_off, len(l1), rt // 1_000_000, rt % 1_000_000 * 1000, 0, 0,
                  drv.size, 0)
    write_table(drv, snaps + [sn], old_size)
    _drop_l2_cache(drv)
    return sn


def _drop_l2_cache(drv) -> None:
    """Flush, then forget cached L2 tables (some may have been freed)."""
    drv.flush()
    drv.l2cache.clear()


def find_by_id_or_name(snaps: list[Snapshot], key: str) -> int:
    for i, s in enumerate(snaps):
        if s.id == key:
            return i
    for i, s in enumerate(snaps):
        if s.name == key:
            return i
    return -1


def delete(drv, name: str) -> None:
    """``qemu-img snapshot -d NAME``: the first snapshot with that name
    (qemu-img looks up -d by name only). SnapshotError(ENOENT) when none."""
    snaps, old_size = read_table(drv)
    idx = next((i for i, s in enumerate(snaps) if s.name == name), -1)
    if idx < 0:
        raise SnapshotError(errno.ENOENT, "snapshot not found")
    sn = snaps[idx]
    _validate_l1(drv, sn)
    _prepare(drv)
    drv.flush()
    write_table(drv, snaps[:idx] + snaps[idx + 1:], old_size)
    rc = drv._rc()
    zero = add_refs(drv, _read_l1(drv, sn), -1)
    for c in range(sn.l1_table_offset >> drv.cb,
                   ((sn.l1_table_offset + max(1, sn.l1_size * 8) - 1) >> drv.cb) + 1):
        rc._set(c, rc.get(c) - 1)
        if rc.get(c) == 0:
            zero.append(c)
    rc.flush_increments()            # the decrements, before any COPIED flag is set
    _free_now(drv, zero)
    fix_copied(drv)
    _drop_l2_cache(drv)


def apply(drv, key: str) -> None:
    """``qemu-img snapshot -a KEY`` (an ID, else a name): the active L1 table
    becomes a copy of the snapshot's."""
    snaps, _ = read_table(drv)
    idx = find_by_id_or_name(snaps, key)
    if idx < 0:
        raise SnapshotError(errno.ENOENT)
    sn = snaps[idx]
    _validate_l1(drv, sn)
    if sn.disk_size != drv.size or sn.l1_size > len(drv.l1):
        raise SnapshotError(errno.ENOTSUP, "snapshot of another disk size: resizing "
                            "on apply is not supported")
    _prepare(drv)
    drv.flush()
    new_l1 = _read_l1(drv, sn) + [0] * (len(drv.l1) - sn.l1_size)
    add_refs(drv, new_l1, 1)
    drv.flush()                     # the new references, durable
    os.pwrite(drv.fd, struct.pack(f">{len(new_l1)}Q", *new_l1), drv.header.l1_table_offset)
    drv._fsync()
    old_l1 = drv.l1
    drv.l1 = new_l1
    drv.l1_dirty = True
    zero = add_refs(drv, old_l1, -1)
    drv._rc().flush_increments()
    _free_now(drv, zero)
    fix_copied(drv)
    _drop_l2_cache(drv)
