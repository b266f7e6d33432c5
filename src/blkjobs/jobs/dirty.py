"""A mirror's dirty set with sub-granule precision.

The job's :class:`~blkjobs.native.bitmap.Bitmap` says which granules (64 KiB
by default) differ from the target. A guest writing 4 KiB at random dirties
a whole granule per write, and copying whole granules would move 16x what
the guest wrote (at 50 MB/s of guest writes: 800 MB/s to copy and to flush).
:class:`PartlyDirty` remembers, for granules the guest only partly wrote
since they were last taken, which sub-blocks (granularity/64, at least
512 bytes) it wrote, so a pass copies just those.

Invariant: a granule set in the bitmap and absent from ``partial`` is dirty
as a whole; an entry of ``partial`` always belongs to a set granule (entries
are made when a clean granule is first partly written, grown by later
partial writes, and dropped when the granule is taken or marked whole).
Memory: one dict entry per partly written granule between two passes.
All methods need the engine's I/O lock, and every change of the bitmap
must go through them (a granule set behind their back while it has an entry
would be copied only in part).
"""
from __future__ import annotations

from ..native.bitmap import Bitmap


class PartlyDirty:
    def __init__(self, bitmap: Bitmap, size: int):
        self.bitmap = bitmap
        self.size = size
        self.granularity = bitmap.granularity
        self.sub = max(512, self.granularity // 64)
        #: granule index -> mask of written sub-blocks (bit i: [i*sub, (i+1)*sub))
        self.partial: dict[int, int] = {}

    def mark_written(self, offset: int, length: int) -> None:
        """The guest wrote [offset, offset+length)."""
        g = self.granularity
        gi = offset // g
        if length >= g or (offset + length - 1) // g != gi:
            self.mark_whole(offset, length)
            return
        base = gi * g
        sub = self.sub
        bits = (1 << -(-(offset + length - base) // sub)) - (1 << (offset - base) // sub)
        if not self.bitmap.test(base):
            self.bitmap.set(offset, length)      # rounds out to the granule
            self.partial[gi] = bits
        elif gi in self.partial:
            self.partial[gi] |= bits
        # else: dirty as a whole already

    def mark_whole(self, offset: int, length: int) -> None:
        """Every granule [offset, offset+length) touches is dirty as a whole."""
        self.bitmap.set(offset, length)
        part = self.partial
        if part and length > 0:
            g = self.granularity
            g0, g1 = offset // g, (offset + length - 1) // g
            if g1 - g0 < len(part):
                for gi in range(g0, g1 + 1):
                    part.pop(gi, None)
            else:
                for gi in [gi for gi in part if g0 <= gi <= g1]:
                    del part[gi]

    def split(self, a: int, n: int, out: list[tuple[int, int]]) -> None:
        """For an area [a, a+n) just taken from the bitmap, append to ``out``
        the ranges to copy, in order: whole granules as they are, only the
        written sub-blocks of partly written ones (forgotten here)."""
        part = self.partial
        if not part:
            out.append((a, n))
            return
        g, sub, end = self.granularity, self.sub, min(a + n, self.size)
        g0, g1 = a // g, (a + n - 1) // g
        if g1 - g0 < len(part):
            hit = [gi for gi in range(g0, g1 + 1) if gi in part]
        else:
            hit = sorted(gi for gi in part if g0 <= gi <= g1)
        pos = a
        for gi in hit:
            mask, base = part.pop(gi), gi * g
            if base > pos:
                out.append((pos, base - pos))
            while mask:
                lo = (mask & -mask).bit_length() - 1
                run = ((mask >> lo) ^ ((mask >> lo) + 1)).bit_length() - 1
                s = base + lo * sub
                out.append((s, min(run * sub, end - s)))
                mask &= ~(((1 << run) - 1) << lo)
            pos = base + g
        if pos < a + n:
            out.append((pos, a + n - pos))
