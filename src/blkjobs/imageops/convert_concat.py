"""``convert SRC1 SRC2 ... DST``: several source images, one after the other,
into one target (qemu-img's concatenation: the target's size is the sum of
the sources' sizes, source *i* starts where source *i-1* ends).

A plain path through the drivers, not the C engine (concatenation is rare
and its sources are usually small): the sources' block status says where
data lies; that data is read through each source's chain and written at
its place in the target, zero blocks of ``-S`` bytes left out (a fresh
target reads as zeroes; ``-n`` without ``--target-is-zero`` gets them
written as zeroes), ``-S 0`` writes everything. ``-c`` stores every target
cluster holding data compressed; a cluster may take bytes from two sources
when a source's size is not a multiple of the target's cluster size."""
from __future__ import annotations

import os

from ..errors import UsageError
from ..units import sector_size
from .convert_base import ConvertOptions, ConvertResult, check_options

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable    # (collections: not at start-up)

CHUNK = 1 << 20


class _Concat:
    """The sources, read as one image."""

    def __init__(self, tops: list) -> None:
        self.tops = tops
        self.bases: list[int] = []
        pos = 0
        for t in tops:
            self.bases.append(pos)
            pos += t.size
        self.size = pos

    def data_runs(self) -> list[tuple[int, int]]:
        """(offset, length) in the concatenation of what may hold data."""
        runs: list[tuple[int, int]] = []
        for base, t in zip(self.bases, self.tops, strict=True):
            for r in t.block_status(0, t.size):
                if r["data"] or not r["zero"]:
                    a, n = base + r["start"], r["length"]
                    if runs and runs[-1][0] + runs[-1][1] == a:
                        runs[-1] = (runs[-1][0], runs[-1][1] + n)
                    else:
                        runs.append((a, n))
        return runs

    def read(self, off: int, n: int) -> bytearray:
        out = bytearray(n)
        for base, t in zip(self.bases, self.tops, strict=True):
            a, b = max(off, base), min(off + n, base + t.size)
            if a < b:
                out[a - off:b - off] = t.read(a - base, b - a)
        return out


def check_concat(o: ConvertOptions) -> None:
    """qemu-img's refusal of a backing file when concatenating."""
    if o.backing:
        raise UsageError("Having a backing file for the target makes no sense when "
                         "concatenating multiple input images")


def convert_concat(srcs: list[str], dst: str, o: ConvertOptions,
                   progress: Callable[[int, int], None] | None = None,
                   check: Callable[[], None] | None = None) -> ConvertResult:
    """Convert the concatenation of ``srcs`` into ``dst``."""
    from .images import check_format, open_ro
    check_format(o.dst_fmt, "target")
    check_format(o.src_fmt, "source")
    check_options(o)
    check_concat(o)
    if o.dst_fmt == "raw" and o.compress:
        raise UsageError("Compression not supported for this file format (raw)")
    from .convert_target import lock_target
    tops: list = []
    created = False
    t = lock = None
    try:
        for s in srcs:
            tops.append(open_ro(s, o.src_fmt, force_share=o.force_share, stable=True))
        src = _Concat(tops)
        lock = lock_target(dst, o.dst_fmt, o.no_create)   # before the target is touched
        t, created = _target(dst, src.size, o)
        data = _copy(src, t, o, progress, check)
        t.flush()
        return ConvertResult(src.size, data, src.size - data)
    except BaseException:
        if t is not None:
            t.close()
            t = None
        if created:
            try:
                os.unlink(dst)
            except OSError:
                pass
        raise
    finally:
        if t is not None:
            t.close()
        if lock is not None:
            lock.release()
        for n in tops:
            n.close_chain()


def _target(dst: str, size: int, o: ConvertOptions):
    """The target's driver, open read/write (created unless ``-n``), and
    whether we created it."""
    from ..formats import create_image, open_image
    from .convert_target import check_target_size
    if o.no_create:
        t = open_image(dst, o.dst_fmt, read_only=False)
        check_target_size(dst, t.size, size)
        return t, False
    if o.dst_fmt == "qcow2":
        size = sector_size(size)
    create_image(dst, o.dst_fmt, size, **o.create_opts)
    return open_image(dst, o.dst_fmt, read_only=False), True


def _copy(src: _Concat, t, o: ConvertOptions, progress, check) -> int:
    """Write the data of ``src`` into the target ``t``; returns the bytes written."""
    size, written = src.size, 0
    fresh = not o.no_create or o.target_is_zero
    if o.compress:
        cs = t.cluster_size
        clusters = sorted({c for a, n in src.data_runs() for c in range(a // cs, -(-(a + n) // cs))})
        for i, c in enumerate(clusters):
            buf = src.read(c * cs, min(cs, size - c * cs))
            if any(buf):
                t.write_compressed(c * cs, buf)
                written += len(buf)
            if progress:
                progress((i + 1) * size // len(clusters), size)
            if check:
                check()
        return written
    runs = [(0, size)] if o.sparse_size == 0 or not fresh else src.data_runs()
    total = sum(n for _, n in runs) or 1
    done = 0
    blk = o.sparse_size or CHUNK
    for a, n in runs:
        pos = a
        while pos < a + n:
            end = min(a + n, (pos // CHUNK + 1) * CHUNK)
            buf = src.read(pos, end - pos)
            written += _write_nonzero(t, pos, buf, blk, o.sparse_size == 0, fresh)
            done += end - pos
            pos = end
            if progress:
                progress(done * size // total, size)
            if check:
                check()
    return written


def _write_nonzero(t, pos: int, buf: bytearray, blk: int, everything: bool,
                   fresh: bool) -> int:
    """Write ``buf`` at ``pos``, its all-zero blocks of ``blk`` bytes
    (aligned in the target) left out when the target is ``fresh``, else
    written as zeroes; ``everything``: all written as data. Returns the
    data bytes written."""
    if everything:
        t.write(pos, buf)
        return len(buf)
    mv, out, i = memoryview(buf), 0, 0
    runs: list[tuple[bool, int, int]] = []      # (data, start, end) in buf
    while i < len(buf):
        j = min(len(buf), (pos + i) // blk * blk + blk - pos)
        data = any(mv[i:j])
        if runs and runs[-1][0] == data:
            runs[-1] = (data, runs[-1][1], j)
        else:
            runs.append((data, i, j))
        i = j
    for data, a, b in runs:
        if data:
            t.write(pos + a, mv[a:b])
            out += b - a
        elif not fresh:
            t.write_zeroes(pos + a, b - a)
    return out
