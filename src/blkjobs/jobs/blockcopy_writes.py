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
from ..native.extents import zero_blocks
from .ranges import intersect, merge, subtract

MiB = 1 << 20
#: bytes planned per hold of the I/O lock (and the zero scan's buffer size)
PLAN_CHUNK = 8 * MiB


class Stats:
    """What one :meth:`Mover.move` did, in guest bytes."""

    __slots__ = ("copied", "zeroed", "skipped")

    def __init__(self) -> None:
        self.copied = self.zeroed = self.skipped = 0


class TargetWrites:
    src: Node
    dst: Node
    threads: int
    _dst_raw: bool
    _dst_remote: bool
    may_unmap: bool
    _scan_buf: bytearray | None
    _deflater: Any

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
        hdr = getattr(self.dst.driver, "header", None)
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

    def _write_compressed(self, ranges: list[tuple[int, int]]) -> None:
        """Whole target clusters, read through the source's chain in chunks
        of up to 4 MiB; zlib targets compress each chunk on the C core's
        threads (:class:`~blkjobs.native.compress.Deflater`), zstd ones
        cluster by cluster. Stored in order."""
        src, dst = self.src, self.dst
        cs = dst.driver.cluster_size
        if not dst.driver.can_compress or not cs:
            raise UsageError(f"Compression is not supported for this drive {dst.name}")
        zlib = getattr(dst.driver, "ctype", 0) == 0
        chunk = max(cs, (4 * MiB) // cs * cs)
        for c0, c1 in self._cluster_spans(ranges, cs):
            pos = c0
            while pos < c1:
                ln = min(chunk, c1 - pos)
                buf = bytearray(ln)
                self._src(src.readinto, pos, buf)
                lens = self._deflate(buf, cs, chunk) if zlib else None
                for i, x in enumerate(range(0, ln, cs)):
                    c = memoryview(buf)[x:min(ln, x + cs)]
                    if (lens is not None and lens[i] == DEFLATE_ZERO) or \
                            (lens is None and not any(c)):
                        self._tgt(dst.write_zeroes, pos + x, len(c))
                    elif lens is not None:
                        z = bytes(self._deflater.out[x:x + lens[i]]) if lens[i] else bytes(cs)
                        dst.note_write(pos + x, len(c))
                        self._tgt(dst.driver.write_compressed, pos + x, c, z)
                    else:
                        dst.note_write(pos + x, len(c))
                        self._tgt(dst.driver.write_compressed, pos + x, c)
                pos += ln

    def _cluster_spans(self, ranges: list[tuple[int, int]], cs: int) -> list[tuple[int, int]]:
        """The (merged) runs of whole target clusters the ranges touch."""
        size = self.dst.size
        return [(s, s + n) for s, n in merge([
            (s - s % cs, min(-(-(s + n) // cs) * cs, size) - (s - s % cs)) for s, n in ranges])]

    def _deflate(self, buf: bytearray, cs: int, chunk: int) -> list[int]:
        if self._deflater is None:
            self._deflater = Deflater(cs, chunk // cs, self.threads, max(0, cs - 513))
        return self._deflater.run(buf)
