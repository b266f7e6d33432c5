"""Refcounts: the table, the blocks, allocation and write ordering.

The refcount table is held in memory as a list of block offsets; refcount
blocks are decoded on first use into lists of ints and written back whole
when dirty. Nothing is written before :meth:`Refcounts.flush_increments`.

Write ordering (the invariant: on disk, no L2/L1 entry ever points at a
cluster whose refcount is 0):

* increments (allocations) are written by :meth:`flush_increments`, which the
  driver calls *before* it writes L2 tables and the L1 table;
* decrements (frees) are only queued by :meth:`free_later`; the driver applies
  them with :meth:`apply_frees` *after* the L2/L1 tables that stopped
  referencing the clusters are on disk. Until then a freed cluster keeps its
  refcount in memory too, so it cannot be reused. A crash in between leaves a
  leak, never a corruption.

Allocation takes clusters from the end of the file (``end``), which keeps the
runs of a sequential convert contiguous, or single clusters from the pool of
clusters freed in this session. Holes left by other writers are not reused
(a known, harmless waste). A missing refcount block is placed at the current
end of the file, which is inside its own range or inside an existing block's
range, so it can always record its own refcount. When the table is full it
grows as QEMU's alloc_refcount_block grows it (:meth:`Refcounts.refcount_area`):
the new block is placed as usual (describing itself), then from the start of
the next block's range a *refcount area*: the refcount blocks missing to cover
it, then a new, larger table (half as large again as needed), all counting
themselves; the header is switched to the new table (after the blocks and the
table are durable) and the old table freed. The clusters left free below the
area (the rest of the new block's range, the old table, the run whose
allocation ran into the full table) are taken first fit by the next
allocations that fit in them, as QEMU's free cluster index takes them
(:attr:`Refcounts.gaps`).
"""
from __future__ import annotations

import os
import struct

from ...errors import ImageError
from ...native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable    # (collections: not at start-up)

RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: struct's codes of the refcount widths of a whole byte or more
_STRUCT_CODE = {16: "H", 32: "I", 64: "Q"}


def metadata_blocks(clusters: int, cluster_size: int, refcount_bits: int,
                    generous: bool = False) -> int:
    """How many refcount blocks cover ``clusters`` clusters and the refcount
    blocks and table themselves (QEMU's qcow2_refcount_metadata_size, a
    fixed point). ``generous``: room for a table half as large again is
    counted too (once the fixed point is reached, half the table's clusters
    are added and the point sought again)."""
    per_table, per_block = cluster_size // 8, cluster_size * 8 // refcount_bits
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n, generous = 0, False
        elif n == last:
            return blocks


class Refcounts:
    def __init__(self, fd: int, cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int, file_size: int,
                 set_table_location=None, path: str = ""):
        self.fd = fd
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max_refcount = (1 << self.bits) - 1
        self.rbe = self.cs * 8 // self.bits          # entries per block
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.file_size = file_size
        self.path = path
        self._set_table_location = set_table_location
        raw = dio.pread(fd, table_clusters * self.cs, table_offset)
        if len(raw) != table_clusters * self.cs:
            raise ImageError(f"'{path}': refcount table truncated")
        self.table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        self.table_dirty = False
        self.blocks: dict[int, list] = {}
        self.dirty: set[int] = set()
        self.pending: list[int] = []      # clusters to decrement after L2/L1 are durable
        self.pool: list[int] = []         # clusters freed this session, reusable
        #: free runs [start, stop) below ``end``, in file order, that QEMU's
        #: free cluster index visits before the end of the file (left by a
        #: table growth): an allocation takes the first that holds it whole,
        #: passing over (and dropping) those too short, as QEMU's does
        self.gaps: list[list[int]] = []
        self._grew = False                # a table growth happened (alloc retries)
        #: the free clusters the file held at open are gaps (found at the
        #: first allocation): QEMU's free cluster index starts at 0
        self._holes_found = False
        #: called with the new end (bytes) whenever allocation grows the
        #: file past it (the graph's write threshold on the image file)
        self.grow_cb: Callable[[int], None] | None = None
        self._end = -(-file_size // self.cs)
        self.opened_end = self._end       # clusters the file (partly) held at open
        self.unsafe = False               # cache=unsafe: keep the write order, skip fsync

    @property
    def end(self) -> int:
        """First cluster past the clusters in use (fresh allocation starts here)."""
        return self._end

    @end.setter
    def end(self, v: int) -> None:
        grew = v > self._end
        self._end = v
        if not grew and self.gaps:      # a shrink: no gap past the new end
            self.gaps = [[a, min(b, v)] for a, b in self.gaps if a < v]
        if grew and self.grow_cb is not None:
            self.grow_cb(v << self.cb)

    # -- blocks --------------------------------------------------------
    def _decode(self, raw: bytes) -> list:
        w = self.bits
        if w == 8:
            return list(raw)
        if w > 8:
            # As _encode: nearly every entry is below 256, each big-endian
            # entry its last byte after zeroes. Then the list is of those
            # bytes, converted in C (~0.2 ms a 64 KiB block of 16-bit
            # entries, as array's tolist, which would import collections at
            # start-up); any larger value: struct (~0.5 ms).
            step = w // 8
            low = raw[step - 1::step]
            high = bytearray(raw)
            high[step - 1::step] = bytes(len(low))
            if high == bytes(len(raw)):
                return list(low)
            return list(struct.unpack(f">{len(low)}{_STRUCT_CODE[w]}", raw))
        per = 8 // w
        mask = (1 << w) - 1
        return [(b >> (w * j)) & mask for b in raw for j in range(per)]

    def _encode(self, vals: list) -> bytes:
        w = self.bits
        if w == 8:
            return bytes(vals)
        if w > 8:
            # Nearly every refcount is below 256 (0 or 1 but for snapshots
            # and compressed clusters): then each big-endian entry is its
            # value in its last byte, zeroes before it -- bytearray()
            # converts the list in C (~0.08 ms for a 64 KiB block of 16-bit
            # entries, where struct.pack's per-int packing of *vals took
            # ~0.75: every flush of a qcow2's blocks, twice in a 1 MiB raw
            # -> qcow2 convert). Any larger value: struct, as before.
            try:
                low = bytearray(vals)
            except ValueError:
                return struct.pack(f">{len(vals)}{_STRUCT_CODE[w]}", *vals)
            step = w // 8
            out = bytearray(len(low) * step)
            out[step - 1::step] = low
            return bytes(out)
        per = 8 // w
        out = bytearray(len(vals) // per)
        for i, v in enumerate(vals):
            out[i // per] |= v << (w * (i % per))
        return bytes(out)

    def block_offset(self, t: int) -> int:
        if t >= len(self.table):
            return 0
        e = self.table[t]
        off = e & RT_OFFSET_MASK
        if e & 0x1FF or off % self.cs:
            raise ImageError(f"'{self.path}': refcount table entry {t} is corrupt (0x{e:x})")
        return off

    def _block(self, t: int):
        b = self.blocks.get(t)
        if b is not None:
            return b
        off = self.block_offset(t)
        if not off:
            return None
        if off + self.cs > max(self.file_size, os.fstat(self.fd).st_size):
            raise ImageError(f"'{self.path}': refcount block at 0x{off:x} is beyond the end of the file")
        raw = dio.pread(self.fd, self.cs, off)
        if len(raw) != self.cs:
            raise ImageError(f"'{self.path}': refcount block at 0x{off:x} is beyond the end of the file")
        b = self.blocks[t] = self._decode(raw)
        return b

    def get(self, c: int) -> int:
        b = self._block(c // self.rbe)
        return 0 if b is None else b[c % self.rbe]

    def _set(self, c: int, v: int) -> None:
        t = c // self.rbe
        b = self._block(t)
        if b is None:
            raise ImageError(f"'{self.path}': no refcount block for cluster {c}")
        if not 0 <= v <= self.max_refcount:
            raise ImageError(f"'{self.path}': refcount of cluster {c} out of range ({v})")
        b[c % self.rbe] = v
        self.dirty.add(t)

    def incref(self, c: int, n: int = 1) -> None:
        self._set(c, self.get(c) + n)

    def free_later(self, c: int) -> None:
        self.pending.append(c)

    def free_run_later(self, c: int, n: int) -> None:
        """:meth:`free_later` for the ``n`` clusters from ``c``."""
        self.pending.extend(range(c, c + n))

    # -- allocation ----------------------------------------------------
    def _ensure_block(self, c: int) -> None:
        """Make sure cluster ``c`` has a refcount block, placing a missing one
        at the end of the file (which records its own refcount, possibly
        after placing the block that covers it first). Past the end of a
        full table, QEMU's growth (:meth:`_grow_for`)."""
        t = c // self.rbe
        if t < len(self.table) and self.block_offset(t):
            return
        b = self.end
        self.end += 1
        if t >= len(self.table) and b // self.rbe == t:
            self._grow_for(t, b)
            return
        if t >= len(self.table):
            # the new block's own count first: its block grows the table
            # (QEMU recurses into alloc_refcount_block for it)
            self._ensure_block(b)
        self.table[t] = b << self.cb
        self.table_dirty = True
        self.blocks[t] = [0] * self.rbe
        self.dirty.add(t)
        self._ensure_block(b)
        self._set(b, 1)

    def _grow_for(self, t: int, b: int) -> None:
        """The table is full and block ``t`` is placed at cluster ``b`` (in
        its own range): QEMU's alloc_refcount_block grows the table with a
        refcount area from the start of the next block's range (the clusters
        in between stay free, a gap), entering ``b`` in the new table."""
        self.flush_increments()     # the old table as QEMU leaves it (entries written at once)
        blk = [0] * self.rbe
        blk[b % self.rbe] = 1
        self.blocks[t] = blk
        self.dirty.add(t)
        meta = (b // self.rbe + 1) * self.rbe
        self.refcount_area(meta, 0, exact=False, new_index=t, new_block=b)
        if b + 1 < meta:
            self._add_gap(b + 1, meta)
        self._grew = True

    def refcount_area(self, start: int, more: int, exact: bool = True,
                      new_index: int = -1, new_block: int = 0) -> int:
        """QEMU's qcow2_refcount_area: from cluster ``start`` (free up to the
        end of the file), the refcount blocks missing to cover everything up
        to ``start + more`` clusters and themselves, then a new refcount
        table (``exact``: as large as needed, else half as large again,
        rounded up to whole clusters), all with refcount 1; the old table's
        entries copied, ``new_block`` entered at ``new_index``. Written and
        synced, the header switched to the new table, the old table freed
        (its clusters a gap). Returns the first cluster after the area."""
        per, rbe, cb = self.cs // 8, self.rbe, self.cb
        total = metadata_blocks(start + more, self.cs, self.bits, generous=not exact)
        size = total if exact else total + -(-total // 2)
        size = -(-size // per) * per
        table = (self.table + [0] * size)[:size]
        if new_block:
            table[new_index] = new_block << cb
        missing = [i for i in range(start // rbe, total) if not table[i] & RT_OFFSET_MASK]
        for k, i in enumerate(missing):
            table[i] = (start + k) << cb
            self.blocks[i] = [0] * rbe
            self.dirty.add(i)
        t_off = start + len(missing)
        t_clusters = size // per
        old_off, old_n = self.table_offset >> cb, self.table_clusters
        self.table = table
        for c in range(start, t_off + t_clusters):
            self._set(c, 1)
        self.table_offset, self.table_clusters = t_off << cb, t_clusters
        self.table_dirty = True
        self.end = max(self.end, t_off + t_clusters)
        self.flush_increments()         # blocks and table before the header names them
        if self._set_table_location:
            self._set_table_location(self.table_offset, self.table_clusters)
        # the old table freed at once (QEMU's qcow2_free_clusters), first in
        # line for the next allocations
        for c in range(old_off, old_off + old_n):
            self._set(c, self.get(c) - 1)
        self._add_gap(old_off, old_off + old_n)
        self.flush_increments()
        return t_off + t_clusters

    def _add_gap(self, a: int, b: int) -> None:
        self.gaps.append([a, b])
        self.gaps.sort()

    def _from_gaps(self, n: int) -> int | None:
        """First fit of ``n`` contiguous free clusters in the gaps (QEMU's
        alloc_clusters_noref from its free index): the run with refcount 1
        and its blocks ensured, or None (every gap passed over)."""
        while self.gaps:
            g = self.gaps[0]
            c = g[0]
            while c + n <= g[1]:
                busy = next((i for i in range(c, c + n) if self.get(i)), None)
                if busy is None:
                    break
                c = busy + 1
            if c + n > g[1]:
                self.gaps.pop(0)
                if g[1] >= self._end and c < self._end \
                        and not any(self.get(i) for i in range(c, self._end)):
                    # free up to the end: QEMU's run starts here and goes on
                    # past the end (the end path takes it from here)
                    self._end = c
                    self.gaps.clear()
                    return None
                continue
            g[0] = c + n
            if g[0] >= g[1]:
                self.gaps.pop(0)
            for t in range(c // self.rbe, (c + n - 1) // self.rbe + 1):
                self._ensure_block(t * self.rbe)
            for i in range(c, c + n):
                self._set(i, 1)
            return c
        return None

    def alloc(self, n: int = 1) -> list[tuple[int, int]]:
        """Allocate ``n`` clusters with refcount 1; return runs
        [(first_cluster, count)] (one run unless a new refcount block had to
        be placed in between). A run that reaches into clusters no refcount
        block covers yet keeps its place, and the missing block goes right
        after it, as QEMU places it. After a table growth the free gaps it
        left below the end are tried first (:meth:`_from_gaps`)."""
        runs: list[tuple[int, int]] = []
        if not self._holes_found:
            self._find_holes()
        while n == 1 and self.pool:
            c = self.pool.pop()
            if not self.get(c):     # not taken meanwhile from a gap
                self._set(c, 1)
                return [(c, 1)]
        self._grew = False
        while n:
            g = self._from_gaps(n) if self.gaps else None
            if g is not None:       # first fit below the end (after a table growth)
                runs.append((g, n))
                break
            c = self.end
            # the run up to the end of the next block's reach; the blocks
            # it lacks are placed after it
            k = min(n, (c // self.rbe + 2) * self.rbe - c)
            self.end = c + k
            ts = range(c // self.rbe, (c + k - 1) // self.rbe + 1)
            for t in ts:
                self._ensure_block(t * self.rbe)
                if self._grew:
                    break
            if self._grew:
                # QEMU's -EAGAIN: the run is sought anew (first fit from the
                # lowest free cluster: the old table, this run, the rest of
                # the new block's range)
                self._grew = False
                self._add_gap(c, c + k)
                continue
            for t in ts:
                lo, hi = max(c, t * self.rbe), min(c + k, (t + 1) * self.rbe)
                b = self._block(t)
                b[lo - t * self.rbe:hi - t * self.rbe] = [1] * (hi - lo)
                self.dirty.add(t)
            if runs and runs[-1][0] + runs[-1][1] == c:
                runs[-1] = (runs[-1][0], runs[-1][1] + k)
            else:
                runs.append((c, k))
            n -= k
        return runs

    def _find_holes(self) -> None:
        """The runs of free clusters (refcount 0) below the end that the file
        held when it was opened become gaps: QEMU's free cluster index starts
        at cluster 0 in each session, so its first allocations fill them, the
        lowest first (e.g. clusters another session freed), before the file
        grows."""
        self._holes_found = True
        end = min(self._end, self.opened_end)
        holes: list[list[int]] = []
        for t in range(-(-end // self.rbe)):
            b = self._block(t)
            base = t * self.rbe
            stop = min(self.rbe, end - base)
            if b is None:
                self._hole(holes, base, base + stop)
                continue
            i = 0
            while i < stop:
                try:                # (the next free entry, found in C)
                    i = b.index(0, i, stop)
                except ValueError:
                    break
                j = i
                while j < stop and not b[j]:
                    j += 1
                self._hole(holes, base + i, base + j)
                i = j
        merged: list[list[int]] = []
        for a, z in sorted(holes + self.gaps):      # one pass: the union
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], z)
            else:
                merged.append([a, z])
        self.gaps = merged

    @staticmethod
    def _hole(holes: list[list[int]], a: int, z: int) -> None:
        if holes and holes[-1][1] == a:
            holes[-1][1] = z
        else:
            holes.append([a, z])

    def alloc_one(self) -> int:
        return self.alloc(1)[0][0]

    # -- writing -------------------------------------------------------
    def flush_increments(self) -> bool:
        """Write dirty blocks and the table (if changed). Returns True when
        something was written (the caller fsyncs)."""
        wrote = False
        for t in sorted(self.dirty):
            off = self.block_offset(t)
            dio.pwrite(self.fd, self._encode(self.blocks[t]), off)
            wrote = True
        self.dirty.clear()
        if self.table_dirty:
            table = struct.pack(f">{len(self.table)}Q", *self.table)
            dio.pwrite(self.fd, table, self.table_offset)
            self.table_dirty = False
            wrote = True
        if wrote and not self.unsafe:
            os.fsync(self.fd)
        return wrote

    def apply_frees(self, punch: bool = False) -> bool:
        """Apply queued decrements (call only after the L2/L1 tables that
        dropped the references are durable). ``punch``: the clusters whose
        refcount dropped to 0 are punched from the file once their counts
        are written (QEMU's discard of a freed cluster)."""
        if not self.pending:
            return False
        # one look-up of the block per run of clusters in it (a convert's
        # discard frees thousands: per cluster get() and _set() were most
        # of its finish)
        freed: list[int] = []
        rbe, dirty, pool = self.rbe, self.dirty, self.pool
        t, blk, base = -1, None, -rbe
        for c in self.pending:
            if not base <= c < base + rbe:
                t = c // rbe
                blk, base = self._block(t), t * rbe
            if blk is None or not (v := blk[c - base]):
                raise ImageError(f"'{self.path}': freeing cluster {c} whose refcount is already 0")
            blk[c - base] = v - 1
            dirty.add(t)
            if v == 1:
                pool.append(c)
                freed.append(c)
        self.pending.clear()
        wrote = self.flush_increments()
        if punch and freed:
            from ..raw import _FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _fallocate
            freed.sort()
            a = b = freed[0]
            for c in freed[1:] + [-1]:
                if c == b + 1:
                    b = c
                    continue
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           a << self.cb, (b - a + 1) << self.cb)
                a = b = c
        return wrote
