"""Planning many small areas of a batch together (:class:`BatchPlanning`, a
mixin of :class:`~.blockcopy.Mover`): an incremental backup's or a mirror's
scattered granules, each of them a whole target cluster that the source's
top layer holds as plain data. The source lookups, one ``allocate_many`` of
the target driver for all of their clusters (new ones in one contiguous run,
the L2 entries table by table) and the engine items, with no block status
and no run arithmetic: a few microseconds of Python per area, where planning
them one by one (:meth:`~.blockcopy.Mover.plan`) took ~45."""
from __future__ import annotations

from ..graph import Node
from ..graph.io import BlockIO
from ..native.copy import COPY, COPY_SPARSE
from .blockcopy_writes import Stats
from .ranges import Select

MiB = 1 << 20
#: Ranges up to this size try :meth:`Mover._plan_fast` (and the batch) first.
FAST_MAX = 2 * MiB
#: What the fast path copies, as a block-status run for ``select``.
_TOP_DATA = {"depth": 0, "present": True, "data": True, "zero": False}
#: Small areas planned together, per hold of the I/O lock (~3-5 us each).
PLAN_BATCH = 256


class BatchPlanning:
    io: BlockIO
    src: Node
    dst: Node
    select: Select
    compress: bool
    detect_zeroes: bool
    _dst_raw: bool
    _dst_remote: bool

    def _batchable(self) -> bool:
        """Small areas may be planned together (:meth:`_plan_many`): what the
        fast path of :meth:`plan` needs, and no zero clusters to detect."""
        return (not self.compress and not self.detect_zeroes and not self._dst_remote
                and not self.src.driver.injects_faults
                and not self.dst.driver.injects_faults
                and self.select(_TOP_DATA) == "copy")

    def _plan_many(self, pieces: list[tuple[int, int]], stats: Stats,
                   undo: list[tuple[int, int, int, int]], items: list[tuple]) -> int:
        """The fast path of :meth:`plan` for a prefix of ``pieces`` at once
        (an incremental backup's or a mirror's scattered granules): small
        areas in increasing order that the source's top layer holds as plain
        data in one piece each, and that are whole target clusters (qcow2:
        allocated together, one ``allocate_many``) or raw. Appends their
        engine items; returns how many pieces it took (0: plan the next one
        alone). ``undo``: see ``Qcow2Driver.allocate``."""
        src, dst = self.src, self.dst
        sd, dd = src.driver, dst.driver
        size, dsize = min(src.size, dst.size), dst.size
        raw = self._dst_raw
        cs = dd.cluster_size or 1
        take: list[tuple[int, int]] = []
        end = -1
        for o, n in pieces:
            if (n <= 0 or n > FAST_MAX or o < end or o + n > size
                    or (not raw and (o % cs or (n % cs and o + n != dsize)))):
                break
            take.append((o, n))
            end = o + n
        if not take:
            return 0
        a = take[0][0] - take[0][0] % cs
        self.io.wait_filled(src, a, min(-(-end // cs) * cs, dsize) - a, exclude=dst)
        hs: list[int] = []
        for o, n in take:
            h = sd.host_run(o, n)
            if h is None:
                break
            hs.append(h)
        del take[len(hs):]
        if not take:
            return 0
        fd = sd.fd
        if raw:
            for j, ((o, n), h) in enumerate(zip(take, hs, strict=True)):
                hd = dd.host_run(o, n, for_write=True)
                if hd is None:
                    del take[j:]
                    break
                items.append((h, hd, n, COPY_SPARSE, fd))
        else:
            self._alloc_many_items(take, hs, undo, items)
        for o, n in take:
            dst.note_write(o, n)
            stats.copied += n
        return len(take)

    def _alloc_many_items(self, take: list[tuple[int, int]], hs: list[int],
                          undo: list[tuple[int, int, int, int]], items: list[tuple]) -> None:
        """Allocate the target clusters of ``take`` (whole clusters) in one
        driver call; the items that copy source host ``hs`` into them."""
        runs = self.dst.driver.allocate_many(take, undo)
        fd = self.src.driver.fd
        ri = 0
        for (o, n), h in zip(take, hs, strict=True):
            pos = o
            while pos < o + n:
                r = runs[ri]
                rend = r.start + r.length
                k = min(o + n, rend) - pos
                assert r.host_offset is not None and r.start <= pos
                items.append((h + pos - o, r.host_offset + pos - r.start, k, COPY, fd))
                pos += k
                if pos == rend:
                    ri += 1
