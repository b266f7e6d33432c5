"""The target side of the block-copy (:class:`~.blockcopy.Mover`): the
Python-side I/O of a batch and how its data lands on the target -- zero
runs, cluster allocation (with the rest of partly copied clusters filled),
whole zero clusters taken out of copied runs, compressed clusters.

:class:`TargetWrites` is a mixin of :class:`~.blockcopy.Mover`; the
attributes it uses are set by the Mover's constructor."""
from __future__ import annotations

from typing import Any

from ..errors import CopyError, UsageError
from ..graph import Node
from ..native import dio
from ..native.compress import ZERO as DEFLATE_ZERO
from ..native.compress import Deflater
from ..native.copy import COPY, ZERO
from ..native.extents import is_zero, zero_blocks
from .ranges import intersect, merge, subtract

MiB = 1 << 20
#: bytes planned per hold of the I/O lock (and the zero scan's buffer size)
PLAN_CHUNK = 8 * MiB
#: bytes compressed per call of the C core (compressed targets)
CHUNK = 4 * MiB


class Stats:
    """What one :meth:`Mover.move` did, in guest bytes."""

    __slots__ = ("copied", "zeroed", "skipped", "skips")

    def __init__(self) -> None:
        self.copied = self.zeroed = self.skipped = 0
        #: the runs skipped, (start, length): a backup's progress leaves out
        #: the clusters wholly skipped (QEMU's unallocated clusters of sync=top)
        self.skips: list[tuple[int, int]] = []


class TargetWrites:
    src: Node
    dst: Node
    threads: int
    _dst_raw: bool
    _dst_remote: bool
    may_unmap: bool
    _scan_buf: bytearray | None
    _deflater: Any
    _cpool: Any
    _tls: Any
    io: Any

    # -- Python-side I/O: an OSError becomes a CopyError of its side ---------
    def _src(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            raise CopyError(e.errno or 5, "error reading", path=self.src.filename,
                            side="source", offset=args[0] if args else None) from None

    def _tgt(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            raise CopyError(e.errno or 5, "error writing", path=self.dst.filename,
                            side="target", offset=args[0] if args else None) from None

    # -- how a batch lands on the target (I/O lock held) ---------------------
    def _dst_reads_zero(self, off: int, length: int) -> list[tuple[int, int]]:
        dst = self.dst
        return [(r["start"], r["length"]) for r in dst.block_status(off, length)
                if r["zero"] and (r["depth"] == 0 or dst.backing is None)]

    def _zero_clusters_ok(self) -> bool:
        """The target makes whole clusters read as zero without data (qcow2
        v3; v2 only without a backing file)."""
        hdr = self.dst.driver.header
        return getattr(hdr, "version", 3) >= 3 or self.dst.driver.backing_filename is None

    def _split_zeroes(self, copy, zero: list[tuple[int, int]], stats: Stats) -> list:
        """Take the whole target clusters of the ``copy`` runs whose source
        bytes are all zero out of them, into ``zero``. The bytes are read
        here (the engine reads them again: the page cache has them then)."""
        cs = self.dst.driver.cluster_size
        out = []
        for s, n, (fd, host) in copy:
            a, b = -(-s // cs) * cs, (s + n) // cs * cs
            if b <= a:
                out.append((s, n, (fd, host)))
                continue
            if self._scan_buf is None or len(self._scan_buf) < b - a:
                self._scan_buf = bytearray(max(b - a, PLAN_CHUNK))
            view = memoryview(self._scan_buf)[:b - a]
            got = self._src(lambda o, fd=fd, v=view, h=host - s: dio.preadinto(fd, v, h + o), a)
            pos = s
            for zs, zn in zero_blocks(view[:got - got % cs], cs):
                zs += a
                zn = min(zn, s + n - zs)
                if zs > pos:
                    out.append((pos, zs - pos, (fd, host + pos - s)))
                zero.append((zs, zn))
                stats.copied -= zn
                stats.zeroed += zn
                pos = zs + zn
            if pos < s + n:
                out.append((pos, s + n - pos, (fd, host + pos - s)))
        return out

    def _write_zeroes(self, zero, off: int, length: int, items: list[tuple]) -> None:
        if zero:
            already = self._dst_reads_zero(off, length)
            for s, n in subtract(merge(zero), already):
                if self._dst_raw and not self._dst_remote:
                    self.dst.note_write(s, n)
                    items.append((0, s, n, ZERO))
                else:
                    self._tgt(self.dst.write_zeroes, s, n, self.may_unmap)

    def _need(self, copy) -> list[tuple[int, int]]:
        """The target clusters the ``copy`` runs touch."""
        cs, size = self.dst.driver.cluster_size, self.dst.size
        return merge([(s - s % cs, min(-(-(s + n) // cs) * cs, size) - (s - s % cs))
                       for s, n, _ in copy])

    def _fill(self, copy, py) -> list[tuple[int, int, tuple[int, int] | None]]:
        """What the rest of the target clusters the ``copy`` runs touch must
        hold (the source's guest view): runs with a host (fd, offset), or
        None for zeroes; compressed runs go to ``py``. Before the allocation
        (see plan)."""
        src = self.src
        covered = [(s, n) for s, n, _ in copy] + py
        fill: list[tuple[int, int, tuple[int, int] | None]] = []
        for s, n in subtract(self._need(copy), covered):
            chain = src.chain()
            for r in src.block_status(s, n):
                if (r["data"] and "offset" in r and not r["compressed"]
                        and chain[r["depth"]].driver.host_file):
                    fill.append((r["start"], r["length"], (chain[r["depth"]].driver.data_fd,
                                                           r["offset"])))
                elif r["data"]:
                    py.append((r["start"], r["length"]))
                else:
                    fill.append((r["start"], r["length"], None))
        return fill

    def _alloc_items(self, copy, fill, undo) -> list[tuple]:
        """Allocate the target clusters of ``copy`` (see :meth:`_fill`);
        the engine items that fill them."""
        host: list[tuple[int, int, int]] = []
        for s, n in self._need(copy):
            host += [(m.start, m.length, m.host_offset)
                     for m in self.dst.driver.allocate(s, n, undo)]
        items: list[tuple] = []
        for _s, n, p, da, dh in intersect(sorted(copy + fill, key=lambda t: t[0]), host):
            if p is None:
                items.append((0, dh, n, ZERO))
            else:
                items.append((p[1] + da, dh, n, COPY, p[0]))
        return items

    def _read_compressed(self, ranges: list[tuple[int, int]]) -> None:
        """(I/O lock held) Read the whole target clusters the ranges touch
        through the source's chain, in chunks of up to 4 MiB, for
        :meth:`compress_pending`, which compresses them once the lock is let
        go and stores them in order."""
        src, dst = self.src, self.dst
        cs = dst.driver.cluster_size
        if not dst.driver.can_compress or not cs:
            raise UsageError(f"Compression is not supported for this drive {dst.name}")
        chunk = max(cs, CHUNK // cs * cs)
        work = self._cwork()
        for c0, c1 in self._cluster_spans(ranges, cs):
            for pos in range(c0, c1, chunk):
                buf = bytearray(min(chunk, c1 - pos))
                self._src(src.readinto, pos, buf)
                work.append((pos, buf))

    def _cwork(self) -> list[tuple[int, bytearray]]:
        """This thread's chunks read and not yet compressed (a backup's
        loop and its copy-before-write plan on different threads)."""
        w = getattr(self._tls, "cwork", None)
        if w is None:
            w = self._tls.cwork = []
        return w

    def drop_pending(self) -> None:
        """Forget the chunks read by a planning that failed."""
        self._tls.cwork = []

    def compress_pending(self) -> None:
        """Compress the chunks read by the planning (the I/O lock let go,
        unless the caller holds it: a copy-before-write) and store them in
        order: chunk k compresses on a worker (zlib: the C core's threads;
        zstd: one task per cluster) while chunk k-1 is stored under the
        lock."""
        work = self._cwork()
        if not work:
            return
        self._tls.cwork = []
        pending = None
        for j, (pos, buf) in enumerate(work):
            nxt = (pos, buf, self._compress_chunk(j & 1, buf))
            if pending is not None:
                self._store_chunk(*pending)
            pending = nxt
        if pending is not None:
            self._store_chunk(*pending)

    def _compress_chunk(self, k: int, buf: bytearray) -> Any:
        """Start compressing one chunk: (Deflater ``k``, a future of its
        lengths) for zlib, or a list of futures, one per cluster (None for
        an all-zero one), for zstd."""
        drv = self.dst.driver
        cs = drv.cluster_size
        if self._cpool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._cpool = ThreadPoolExecutor(max(1, self.threads),
                                             thread_name_prefix="compress")
        if drv.ctype == 0:
            if self._deflater is None:
                n = max(cs, CHUNK // cs * cs) // cs
                self._deflater = [Deflater(cs, n, self.threads, cs - 1) for _ in range(2)]
            return self._deflater[k], self._cpool.submit(self._deflater[k].run, buf)
        mv = memoryview(buf)
        return [None if is_zero(mv[x:x + cs]) else
                self._cpool.submit(drv.compress_cluster, mv[x:x + cs])
                for x in range(0, len(buf), cs)]

    def _store_chunk(self, pos: int, buf: bytearray, res: Any) -> None:
        """Store one compressed chunk, cluster by cluster, in order (I/O lock
        taken here): zero clusters as zeroes, the others compressed (plain
        when the stream does not fit in cs - 1 bytes)."""
        dst = self.dst
        cs = dst.driver.cluster_size
        ln = len(buf)
        mv = memoryview(buf)
        zs: list[bytes | None]
        if isinstance(res, list):           # zstd: one future per cluster
            zs = [None if f is None else f.result() for f in res]
        else:                               # zlib: (Deflater, future of the lengths)
            d, fut = res
            zs = [None if n == DEFLATE_ZERO else
                  bytes(d.out[i * cs:i * cs + n]) if n else bytes(cs)
                  for i, n in enumerate(fut.result())]
        with self.io:
            for i, x in enumerate(range(0, ln, cs)):
                c = mv[x:min(ln, x + cs)]
                if zs[i] is None:
                    self._tgt(dst.write_zeroes, pos + x, len(c))
                else:
                    dst.note_write(pos + x, len(c))
                    self._tgt(dst.driver.write_compressed, pos + x, c, zs[i])

    def _cluster_spans(self, ranges: list[tuple[int, int]], cs: int) -> list[tuple[int, int]]:
        """The (merged) runs of whole target clusters the ranges touch."""
        size = self.dst.size
        return [(s, s + n) for s, n in merge([
            (s - s % cs, min(-(-(s + n) // cs) * cs, size) - (s - s % cs)) for s, n in ranges])]
