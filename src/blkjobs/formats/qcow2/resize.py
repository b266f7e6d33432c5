"""Growing and shrinking a qcow2 image (what ``qemu-img resize`` does).

Grow: when the new size needs more L1 entries than the table has, a new L1
table is allocated through the refcount machinery (its refcounts written
first), written with the old entries and zeroes, made durable, the header
switched to it (with the new size) and only then the old table's clusters
freed: a crash leaves the old or the new table, at worst a leak. A cluster
that the old end cut through is zeroed past the old end when it holds data,
so everything past the old end reads as zeroes (without a backing file).
With a backing file longer than the old size (QEMU's bdrv_co_truncate), the
new area is zeroed instead so the backing file cannot show through: zero
(sub)clusters from the old end rounded up to a subcluster (no host clusters
allocated), explicit zeroes (copy-on-write through ``fill``) for the head
before that.

Shrink (QEMU 7.2's behaviour): the clusters past the new end are discarded
(entries cleared, then their refcounts dropped), L1 entries past the new end
cleared and their L2 tables freed (the L1 table keeps its size, as QEMU's
does), then the header takes the new size and the file is cut after its last
used cluster. Data past the new end is lost, as with qemu-img --shrink.
"""
from __future__ import annotations

import os
import struct

from ...errors import ImageError, UsageError
from ..base import Kind
from .bitmaps import BitmapError
from .tables import COMPRESSED, OFFSET_MASK, ZERO
from .header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, MAX_L1_BYTES
from ...native import dio

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def resize(img, new_size: int, backing_size: int | None = None, fill=None,
           prealloc: str = "off") -> None:
    """Resize the open, writable qcow2 driver ``img`` to ``new_size``.
    ``backing_size`` is the size of the opened backing node (None: none
    opened); ``fill`` reads the guest view below this image (copy-on-write).
    ``prealloc`` (growing only): ``metadata`` allocates the new clusters,
    ``falloc`` also their blocks in the file, ``full`` writes their zeroes."""
    if new_size % 512:
        raise UsageError("The new size must be a multiple of 512")
    if img.header.nb_snapshots and img.header.version < 3:
        # a v2 snapshot need not record its disk size (QEMU's reason)
        raise UsageError("Can't resize a v2 image which has snapshots")
    # Persistent bitmaps follow the disk, as in QEMU: loaded first (an
    # inconsistent one refuses the resize), then grown with clean granules
    # or cut, and stored with the new size.
    pbm = None
    if img.header.ext(EXT_BITMAPS) is not None and img.header.autoclear & AUTOCLEAR_BITMAPS:
        pbm = img.persistent_bitmaps
        try:
            for b in pbm:
                pbm.load(b)
        except BitmapError as e:
            raise UsageError(str(e)) from None
    old = img.size
    zero_new = new_size > old and backing_size is not None and backing_size > old
    if zero_new and img.header.version < 3:
        # v2 has no zero clusters: QEMU refuses (the image unchanged)
        raise UsageError("Failed to zero out new clusters: Operation not supported")
    img._check_writable(0, 0)          # prepares the image for writing
    if new_size > old:
        if img.external and img.header.data_file_raw:
            prealloc = "metadata" if prealloc == "off" else prealloc    # stays 1:1 (QEMU)
        _grow(img, old, new_size)
        # falloc/full: the new clusters (the cut one moved) read zeroes
        moved = prealloc in ("falloc", "full") and not img.external and not img.extended
        if zero_new and not moved:
            _zero_new_area(img, old, new_size, fill)
        elif not moved:
            _zero_cut_cluster(img, old)         # (img.size is the new size)
        if prealloc != "off":
            _preallocate(img, old, new_size, prealloc, fill)
    elif new_size < old:
        _shrink(img, old, new_size)
    if img.external and (prealloc == "off" and not img.header.data_file_raw):
        os.ftruncate(img.data_fd, new_size)     # the data file follows the disk (QEMU)
    if pbm is not None and new_size != old:
        for b in pbm:
            assert b.bitmap is not None        # loaded above
            b.bitmap.resize(new_size)
            b.dirty = True
        pbm.changed = True
        pbm.store()


def _l1_entries(img, size: int) -> int:
    span = img.cluster_size * img.l2e
    return -(-size // span)


def _grow(img, old: int, new: int) -> None:
    cs, cb = img.cluster_size, img.cb
    need = _l1_entries(img, new)
    if need * 8 > MAX_L1_BYTES:
        raise UsageError("Failed to grow the L1 table: File too large")
    h = img.header
    img.flush()
    if need > len(img.l1):
        rc = img._rc()
        n = -(-need * 8 // cs)
        c0, rbe = rc.end, rc.rbe
        if not rc.gaps and (c0 + n + n // rbe + 2) // rbe < len(rc.table):
            # QEMU's grow_l1_table: the run at the first free clusters, the
            # refcount blocks it lacks after it, in range order (each found
            # at the first free cluster after the run), the run kept
            rc.end = c0 + n
            for t in range(c0 // rbe, (c0 + n - 1) // rbe + 1):
                rc._ensure_block(max(c0, t * rbe))
            for c in range(c0, c0 + n):
                rc._set(c, 1)
            new_off = c0 << cb
        else:
            while True:             # refcount blocks for the run first, then the run
                c0 = rc.end
                for c in range(c0, c0 + n):
                    rc._ensure_block(c)
                if rc.end == c0:
                    break
            runs = rc.alloc(n)
            assert len(runs) == 1 and runs[0][1] == n, runs
            new_off = runs[0][0] << cb
        old_off, old_n = h.l1_table_offset, -(-len(img.l1) * 8 // cs)
        table = img.l1 + [0] * (need - len(img.l1))
        rc.flush_increments()
        # the table's bytes only, as QEMU writes them (the file may end
        # inside its last cluster)
        dio.pwrite(img.fd, struct.pack(f">{need}Q", *table), new_off)
        img._fsync()
        img.l1 = table
        h.l1_table_offset, h.l1_size, h.size = new_off, need, new
        img._write_header()
        if old_off and len(table):
            first = old_off >> cb
            for c in range(first, first + old_n):
                rc.free_later(c)
            rc.apply_frees()
            # taken first fit by the next allocations, passed over by a run
            # too long for them (QEMU's free cluster index), not kept for
            # single clusters as other frees are
            rc.pool = [c for c in rc.pool if not first <= c < first + old_n]
            rc._add_gap(first, first + old_n)
        img.file_size = max(img.file_size, os.fstat(img.fd).st_size)
    else:
        h.size = new
        img._write_header()


def _zero_new_area(img, old: int, new: int, fill) -> None:
    """Make ``[old, new)`` read as zeroes over a backing file (as QEMU's
    qcow2_co_truncate with BDRV_REQ_ZERO_WRITE)."""
    zs = -(-old // img.scs) * img.scs
    if new > zs:
        img.write_zeroes(zs, new - zs, may_unmap=False, fill=fill)
    if zs > old:
        img.write(old, bytes(min(zs, new) - old), fill=fill)
    img.flush()


def _preallocate(img, old: int, new: int, mode: str, fill) -> None:
    """Allocate the clusters of ``[old, new)`` (reading as zeroes): the
    cluster the old end cuts through by a write of its zeroes (its head
    copied from the backing file when unallocated), the rest through
    :meth:`allocate`; ``falloc``/``full`` allocate the blocks in the file."""
    if mode != "metadata" and not img.external and not img.extended:
        from .resize_falloc import grow          # QEMU's layout (the "moved" case)
        grow(img, old, new, mode, fill)
        return
    cs = img.cluster_size
    a = min(new, -(-old // cs) * cs)
    if a > old:
        img.write(old, bytes(a - old), fill=fill)
    if new > a and img.external:
        # the tables point at the guest offsets; the data file is extended
        # over them (falloc/full: preallocated), as QEMU's preallocate_co
        img.allocate(a, new - a)
        dfd = img.data_fd
        start = os.fstat(dfd).st_size
        if start < new:
            from ..raw import _ZEROES
            os.ftruncate(dfd, new)
            if mode == "falloc":
                os.posix_fallocate(dfd, start, new - start)
            elif mode == "full":
                pos = start
                while pos < new:
                    pos += dio.pwrite(dfd, _ZEROES[:min(len(_ZEROES), new - pos)], pos)
    elif new > a:
        fresh = img.alloc_end
        g0, g1 = a >> img.cb, -(-new // cs)
        # metadata: zero clusters (the zeroed area over a backing file) stay
        # zero, now with a host cluster (QEMU's preallocated zero clusters);
        # falloc/full: the file's new area reads zeroes, plain data clusters
        zeroed = [] if img.extended or mode != "metadata" else \
            [g for g in range(g0, g1) if img._entry(g)[2] & ZERO]
        runs = [(m.host_offset, m.length) for m in img.allocate(a, new - a)
                if m.host_offset is not None]
        for g in zeroed:
            _, _, e, bm = img._entry(g)
            img._set_entry(g, e | ZERO, bm)
        end = max(-(-(h + n) // cs) * cs for h, n in runs)
        if end > os.fstat(img.fd).st_size:
            os.ftruncate(img.fd, end)
        for h, n in runs:
            if mode == "full" or h < fresh:      # a reused cluster holds old bytes
                _write_zeroes(img.fd, h, -(-n // cs) * cs)
            elif mode == "falloc":
                os.posix_fallocate(img.fd, h, -(-n // cs) * cs)
    img.flush()
    img.file_size = max(img.file_size, os.fstat(img.fd).st_size)


def _write_zeroes(fd: int, pos: int, n: int) -> None:
    zero = bytes(min(n, 1 << 20))
    end = pos + n
    while pos < end:
        pos += dio.pwrite(fd, memoryview(zero)[:min(len(zero), end - pos)], pos)


def _zero_cut_cluster(img, old: int) -> None:
    """Without a backing file: zero the tail of the cluster the old end cut
    through when it holds data (up to the new end)."""
    cs = img.cluster_size
    tail = min(-(-old // cs) * cs, img.size)
    if old % cs and tail > old:
        kinds = {m.kind for m in img.map_host(old - 1, 1)}
        if kinds & {Kind.DATA, Kind.COMPRESSED}:
            img.write(old, bytes(tail - old))
            img.flush()


def _shrink(img, old: int, new: int) -> None:
    cs, cb, l2e = img.cluster_size, img.cb, img.l2e
    first = -(-new // cs)                 # first guest cluster dropped
    last = -(-old // cs)
    freed = []          # host clusters to give back to the file system
    for gc in range(first, last):
        l1i = gc // l2e
        if not img._l2_offset(l1i):
            continue
        _, _, e, bm = img._entry(gc)
        if e or bm:
            if e:
                img._release(e)
                if not e & COMPRESSED and e & OFFSET_MASK:
                    freed.append((e & OFFSET_MASK) >> cb)
            img._set_entry(gc, 0, 0)
    img.flush()                           # tables first, then the frees
    keep = _l1_entries(img, new)
    rc = img._rc()
    changed = False
    for i in range(keep, len(img.l1)):
        off = img.l1[i] & L1_OFFSET_MASK
        if img.l1[i]:
            img.l1[i] = 0
            changed = True
        if off:
            img.l2cache.pop(off, None)
            img.l2dirty.discard(off)
            rc.free_later(off >> cb)
            freed.append(off >> cb)
    if changed:
        img.l1_dirty = True
    img.flush()
    _discard(img, freed)
    img.header.size = new
    img._write_header()
    _drop_empty_refblocks(img)
    # cut the file after its last used cluster
    end = rc.end
    while end > 1 and rc.get(end - 1) == 0:
        end -= 1
    if end < rc.end or os.fstat(img.fd).st_size > end << cb:
        if os.fstat(img.fd).st_size > end << cb:
            os.ftruncate(img.fd, end << cb)
        rc.end = end
        img.file_size = os.fstat(img.fd).st_size
        if img.file_size < end << cb:
            raise ImageError(f"'{img.filename}': file shorter than its last cluster")


def _discard(img, freed: list[int]) -> None:
    """QEMU discards the clusters a shrink frees (QCOW2_DISCARD_ALWAYS):
    holes punched in the file, runs of adjacent clusters at once, in the
    order they were freed (as its discard queue)."""
    from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
    rc, cs = img._rc(), img.cluster_size
    runs: list[list[int]] = []
    for c in freed:
        if rc.get(c) != 0:
            continue
        if c not in rc.pool:
            rc.pool.append(c)
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    for c, n in runs:
        _fallocate(img.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, c * cs, n * cs)


def _drop_empty_refblocks(img) -> None:
    """Free the refcount blocks that count nothing but (maybe) themselves
    (QEMU's qcow2_shrink_reftable): table entries cleared on disk first,
    then the blocks' own refcounts dropped where another block holds them."""
    rc = img._rc()
    cb = img.cb
    dropped = []
    for t in range(len(rc.table)):
        off = rc.block_offset(t)
        if not off:
            continue
        b = rc._block(t)
        c = off >> cb
        own = c // rc.rbe == t
        if own:
            used = any(v for i, v in enumerate(b) if i != c % rc.rbe)
        else:
            used = any(b)
        if not used:
            dropped.append((t, c, own))
    if not dropped:
        return
    for t, _, _ in dropped:
        rc.table[t] = 0
        rc.blocks.pop(t, None)
        rc.dirty.discard(t)
    rc.table_dirty = True
    rc.flush_increments()
    gone = {t for t, _, _ in dropped}
    for _t, c, own in dropped:
        if not own and c // rc.rbe not in gone:
            rc.free_later(c)
    rc.apply_frees()
