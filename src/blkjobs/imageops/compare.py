"""``compare``: are two images' contents equal? Holes on both sides are
skipped without reading; other ranges are read in large chunks and compared
with memcmp (bytes equality); the first differing byte offset is reported.
With different sizes the longer image must read as zeroes past the shorter
one (qemu-img's rule, unless strict)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..native.extents import extents, is_zero
from .files import fd_size, open_source

CHUNK = 4 << 20
WORK = 256 << 20


@dataclass
class CompareResult:
    identical: bool
    offset: int | None = None      # first differing byte
    size_mismatch: bool = False


def _first_diff(a: memoryview, b: memoryview) -> int:
    lo, n = 0, len(a)
    step = 4096
    while lo < n:
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            for i in range(lo, hi):
                if a[i] != b[i]:
                    return i
        lo = hi
    return n


def _data_ranges(fd: int, start: int, length: int):
    return [(e.offset, e.length) for e in extents(fd, start, length) if e.data]


def compare_raw(path_a: str, path_b: str, strict: bool = False) -> CompareResult:
    fa, fb = open_source(path_a), open_source(path_b)
    try:
        sa, sb = fd_size(fa), fd_size(fb)
        common = min(sa, sb)
        buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
        mva, mvb = memoryview(buf_a), memoryview(buf_b)
        pos = 0
        while pos < common:
            wl = min(WORK, common - pos)
            # bytes that are data in either file need reading; the rest is hole/hole
            ranges = sorted(_data_ranges(fa, pos, wl) + _data_ranges(fb, pos, wl))
            merged: list[list[int]] = []
            for s, n in ranges:
                if merged and s <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], s + n)
                else:
                    merged.append([s, s + n])
            for s, e in merged:
                off = s
                while off < e:
                    n = min(CHUNK, e - off)
                    ra = os.preadv(fa, [mva[:n]], off)
                    rb = os.preadv(fb, [mvb[:n]], off)
                    if ra < n:
                        mva[ra:n] = bytes(n - ra)
                    if rb < n:
                        mvb[rb:n] = bytes(n - rb)
                    if mva[:n] != mvb[:n]:
                        return CompareResult(False, off + _first_diff(mva[:n], mvb[:n]))
                    off += n
            pos += wl
        if sa != sb:
            if strict:
                return CompareResult(False, common, size_mismatch=True)
            longer, lsize = (fa, sa) if sa > sb else (fb, sb)
            for s, n in _data_ranges(longer, common, lsize - common):
                off = s
                while off < s + n:
                    k = min(CHUNK, s + n - off)
                    r = os.preadv(longer, [mva[:k]], off)
                    if not is_zero(mva[:r]):
                        z = _first_diff(mva[:r], memoryview(bytes(r)))
                        return CompareResult(False, off + z, size_mismatch=True)
                    off += k
            return CompareResult(True, size_mismatch=True)
        return CompareResult(True)
    finally:
        os.close(fa)
        os.close(fb)
