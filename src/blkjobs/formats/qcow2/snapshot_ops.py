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
import sys
import time
from collections import Counter

from ...errors import ImageError
from .debug import event as _dbg_event, io as _dbg_io
from .snapshots import Snapshot, pack_table, read_table
from .tables import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK
from ...native import dio

MAX_SNAPSHOTS = 65536
MAX_TABLE_SIZE = 1024 * MAX_SNAPSHOTS
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_ENTRIES = 8 << 20     # QEMU compares the refblock count with 8 MiB


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
    raw = dio.pread(drv.fd, sn.l1_size * 8, sn.l1_table_offset)
    raw = raw.ljust(sn.l1_size * 8, b"\0")      # past the end: zeroes, as QEMU reads
    return list(struct.unpack(f">{sn.l1_size}Q", raw))


def _alloc_run(drv, nbytes: int) -> int:
    """Host offset of max(1, nbytes / cluster_size) contiguous free clusters:
    the first such run in the file, as QEMU's allocator takes them (so that
    a snapshot table or L1 copy lands where qemu-img puts it), else at the
    end of the file."""
    rc = drv._rc()
    n = max(1, -(-nbytes // drv.cluster_size))
    run = 0
    for c in range(1, rc.end):
        run = run + 1 if rc.get(c) == 0 and rc.block_offset(c // rc.rbe) else 0
        if run == n:
            for k in range(c - n + 1, c + 1):
                rc._set(k, 1)
                if k in rc.pool:
                    rc.pool.remove(k)
            return (c - n + 1) << drv.cb
    while True:
        runs = rc.alloc(n)
        if len(runs) == 1:
            return runs[0][0] << drv.cb
        for c0, k in runs:             # a refcount block landed in between
            for c in range(c0, c0 + k):
                rc._set(c, 0)
                rc.pool.append(c)


def _entry_clusters(drv, e: int) -> tuple[list[int], bool]:
    """The host clusters an L2 entry references, and whether it can carry
    COPIED (a normal or allocated-zero cluster; never a compressed one)."""
    cb = drv.cb
    if e & COMPRESSED:
        off = e & drv._coff_mask
        nsec = (e >> (62 - drv._csec_bits)) & ((1 << drv._csec_bits) - 1)
        last = off + (nsec + 1) * 512 - (off & 511) - 1
        return list(range(off >> cb, (last >> cb) + 1)), False
    h = e & OFFSET_MASK
    return ([h >> cb], True) if h else ([], False)


def _precheck(drv, l1: list[int], addend: int) -> None:
    """SnapshotError(EINVAL) before anything changes when a refcount would
    leave its range (QEMU's update_refcount fails with EINVAL); a cluster
    without a refcount block fails as in QEMU (:func:`_no_refblock`)."""
    rc = drv._rc()
    count: Counter[int] = Counter()
    step = 2 if drv.extended else 1
    for le in l1:
        off = le & L1_OFFSET_MASK
        if not off:
            continue
        t = drv._l2(off)
        for e in struct.unpack(f">{len(t) // 8}Q", t)[::step]:
            if e:
                cls = _entry_clusters(drv, e)[0]
                if addend > 0 and cls and rc.block_offset(cls[0] // rc.rbe) == 0:
                    _no_refblock(drv, cls[0])
                count.update(cls)
        count[off >> drv.cb] += 1
    for c, k in count.items():
        if not 0 <= rc.get(c) + addend * k <= rc.max_refcount:
            raise SnapshotError(errno.EINVAL)


def _no_refblock(drv, c: int) -> None:
    """QEMU's alloc_refcount_block for a cluster (``c``) whose refcount
    block is missing, in the middle of a snapshot's refcount update: a new
    block is taken (the first free cluster, refcount 1, zeroed); if the
    refcount table has its entry, the block is hooked up there and the
    update fails with EAGAIN (QEMU's "restart the search", which the
    snapshot code does not do); a table that would have to grow beyond
    QEMU's limit fails with EFBIG (the new block stays, leaked)."""
    rc = drv._rc()
    t = c // rc.rbe
    new = _alloc_run(drv, drv.cluster_size)
    dio.pwrite(drv.fd, bytes(drv.cluster_size), new)
    if t < len(rc.table):
        rc.table[t] = new
        dio.pwrite(drv.fd, struct.pack(">Q", new), rc.table_offset + t * 8)
        drv.flush()
        raise SnapshotError(errno.EAGAIN)
    drv.flush()
    if -(-max(c + 1, (new >> drv.cb) + 1) // rc.rbe) > MAX_REFTABLE_ENTRIES:
        raise SnapshotError(errno.EFBIG)
    # QEMU would grow the refcount table here (then EAGAIN); blkjobs fails
    # the same way without growing it
    raise SnapshotError(errno.EAGAIN)


def update_refs(drv, l1: list[int], addend: int) -> tuple[bool, list[int]]:
    """QEMU's qcow2_update_snapshot_refcount on the L1 table ``l1`` (changed
    in place): add ``addend`` to the refcount of every L2 table and cluster
    it reaches, and set COPIED on the L2 and L1 entries exactly where the
    refcount (after the change) is 1. In memory: the caller flushes. All or
    nothing (see :func:`_precheck`). Returns (L1 changed, the clusters
    whose refcount dropped to 0; their L2 tables leave the cache)."""
    if addend:
        _precheck(drv, l1, addend)
    rc, cb = drv._rc(), drv.cb
    step = 2 if drv.extended else 1
    zero: list[int] = []
    l1_changed = False
    for i, le in enumerate(l1):
        off = le & L1_OFFSET_MASK
        if not off:
            continue
        t = drv._l2(off)
        n = len(t) // 8
        vals = list(struct.unpack(f">{n}Q", t))
        changed = False
        for j in range(0, n, step):
            e = vals[j]
            ne = e & ~COPIED
            cls, flaggable = _entry_clusters(drv, ne)
            for c in cls if addend else ():
                rc._set(c, rc.get(c) + addend)
                if not rc.get(c):
                    zero.append(c)
            if flaggable and rc.get(cls[0]) == 1:
                ne |= COPIED
            if ne != e:
                vals[j] = ne
                changed = True
        if changed:
            struct.pack_into(f">{n}Q", t, 0, *vals)
            drv.l2dirty.add(off)
        if addend:
            rc._set(off >> cb, rc.get(off >> cb) + addend)
        r = rc.get(off >> cb)
        if not r:
            zero.append(off >> cb)
            drv.l2dirty.discard(off)
            drv.l2cache.pop(off, None)
        ne = off | COPIED if r == 1 else off
        if ne != le:
            l1[i] = ne
            l1_changed = True
    return l1_changed, zero


def _write_l1(drv, l1: list[int], offset: int) -> None:
    drv.flush()             # the refcounts and L2 tables it relies on first
    dio.pwrite(drv.fd, struct.pack(f">{len(l1)}Q", *l1), offset)
    drv._fsync()


def _free_now(drv, clusters: list[int]) -> None:
    """Clusters whose refcount reached 0 (already written): reusable, and
    their space given back to the file system (QEMU discards clusters that
    snapshot operations free: they read as zeroes afterwards)."""
    from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
    rc, cs = drv._rc(), drv.cluster_size
    for c in sorted(set(clusters)):
        if rc.get(c) == 0:
            if c not in rc.pool:
                rc.pool.append(c)
            _fallocate(drv.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, c * cs, cs)


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
        dio.pwrite(drv.fd, blob, new_off)
    drv.flush()
    drv._fsync()
    old_off = h.snapshots_offset
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    drv._write_header(whole_sectors=False)
    if old_off and old_size:
        rc = drv._rc()
        old = range(old_off >> drv.cb, ((old_off + old_size - 1) >> drv.cb) + 1)
        if not _free_hook(drv, rc, old[0]):
            return
        for c in old:
            rc.free_later(c)
        rc.apply_frees()
        _free_now(drv, list(old))


def _free_hook(drv, rc, first: int) -> bool:
    """blkdebug's ``cluster_free`` before clusters are counted down (QEMU's
    qcow2_free_clusters); False: an injected error failed the refcount
    update, reported on stderr as QEMU does, and the clusters stay leaked."""
    hook = drv.blkdebug
    if hook is None:
        return True
    _dbg_event(hook, "cluster_free")
    try:
        _dbg_io(hook, "write", rc.block_offset(first // rc.rbe), drv.cluster_size)
    except OSError as e:
        print(f"qcow2_free_clusters failed: {e.strerror}", file=sys.stderr, flush=True)
        return False
    return True


def create(drv, name: str, now_us: int | None = None) -> Snapshot:
    """``qemu-img snapshot -c NAME``: a disk-only snapshot of the active
    state (VM state 0, VM clock 0, icount 0, the date now)."""
    if drv.external:        # no refcounts in the data file: nothing to share
        raise SnapshotError(errno.ENOTSUP)
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
    dio.pwrite(drv.fd, struct.pack(f">{len(l1)}Q", *l1), l1_off)
    drv.flush()                     # the L1 copy's refcount, durable
    if update_refs(drv, drv.l1, 1)[0]:
        drv.l1_dirty = True
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
    try:
        _dbg_io(drv.blkdebug, "read", sn.l1_table_offset, sn.l1_size * 8)
    except OSError as e:
        raise SnapshotError(e.errno or errno.EIO, f"Failed to free the cluster and L1 table: "
                            f"{e.strerror}") from None
    zero = update_refs(drv, _read_l1(drv, sn), -1)[1]
    for c in range(sn.l1_table_offset >> drv.cb,
                   ((sn.l1_table_offset + max(1, sn.l1_size * 8) - 1) >> drv.cb) + 1):
        rc._set(c, rc.get(c) - 1)
        if rc.get(c) == 0:
            zero.append(c)
    drv.flush()            # the decrements, before any COPIED flag is set
    _free_now(drv, zero)
    if update_refs(drv, drv.l1, 0)[0]:
        drv.l1_dirty = True
    _drop_l2_cache(drv)


def apply(drv, key: str) -> None:
    """``qemu-img snapshot -a KEY`` (an ID, else a name): the active L1 table
    becomes a copy of the snapshot's (as it was on disk before this counted
    its references)."""
    snaps, _ = read_table(drv)
    idx = find_by_id_or_name(snaps, key)
    if idx < 0:
        raise SnapshotError(errno.ENOENT)
    sn = snaps[idx]
    _validate_l1(drv, sn)
    _prepare(drv)
    if sn.disk_size is not None and sn.disk_size != drv.size:
        from .resize import resize      # the image takes the snapshot's disk size first
        resize(drv, sn.disk_size)
    if sn.l1_size > len(drv.l1):
        raise SnapshotError(errno.ENOTSUP, "snapshot L1 table larger than its disk size "
                            "needs: not supported")
    drv.flush()
    sn_l1 = _read_l1(drv, sn)
    new_l1 = sn_l1 + [0] * (len(drv.l1) - sn.l1_size)
    copy = list(sn_l1)
    if update_refs(drv, copy, 1)[0]:
        _write_l1(drv, copy, sn.l1_table_offset)
    drv.flush()                     # the new references, durable
    _write_l1(drv, new_l1, drv.header.l1_table_offset)
    zero = update_refs(drv, drv.l1, -1)[1]
    drv.flush()
    _free_now(drv, zero)
    drv.l1 = new_l1
    update_refs(drv, drv.l1, 0)
    drv.l1_dirty = True
    _drop_l2_cache(drv)


def load_tmp(drv, snap_id: str | None, name: str | None) -> None:
    """Make a read-only driver read snapshot (ID and/or name; both given:
    both must match) instead of the active state: its L1 table and disk
    size (QEMU's qcow2_snapshot_load_tmp, for ``convert -l``)."""
    if not drv.read_only:
        raise SnapshotError(errno.EINVAL, "Device is not readonly")
    snaps, _ = read_table(drv)
    for sn in snaps:
        if (snap_id is None or sn.id == snap_id) and (name is None or sn.name == name):
            break
    else:
        raise SnapshotError(errno.ENOENT, "Can't find snapshot")
    _validate_l1(drv, sn)
    drv.l1 = _read_l1(drv, sn)
    drv.l2cache.clear()
    drv.header.size = sn.disk_size if sn.disk_size is not None else drv.size
