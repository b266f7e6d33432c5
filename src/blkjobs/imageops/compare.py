"""``compare``: are two images' contents (guest views, any format) equal? Holes on both sides are
skipped without reading; other ranges are read in large chunks and compared
with memcmp (bytes equality); the first differing byte offset is reported.
With different sizes the longer image must read as zeroes past the shorter
one (qemu-img's rule, unless strict)."""
from __future__ import annotations

import os

from ..errors import BlkjobsError
from ..native import dio
from ..native.extents import extents, is_zero
from ..native.record import Record
from .files import fd_size, open_source

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable    # (collections: not at start-up)

CHUNK = 4 << 20
WORK = 256 << 20


class ReadFailed(BlkjobsError):
    """A read of one image failed: qemu-img compare's ``Error while reading
    offset N of NAME: WHY``, exit status 4 (``size_mismatch``: the images'
    sizes differ, which qemu-img says too)."""
    exit_code = 4

    def __init__(self, offset: int, name: str, e: OSError, size_mismatch: bool = False):
        super().__init__(f"Error while reading offset {offset} of {name}: "
                         f"{e.strerror or os.strerror(e.errno or 5)}")
        self.size_mismatch = size_mismatch


class CompareResult(Record):
    """A plain class, not a dataclass (``dataclasses`` imports ``inspect``:
    start-up); unhashable as the dataclass it was."""
    __slots__ = ("identical", "offset", "size_mismatch", "status_mismatch")
    __hash__ = None     # type: ignore[assignment]  # mutable

    def __init__(self, identical: bool, offset: int | None = None,
                 size_mismatch: bool = False, status_mismatch: bool = False) -> None:
        self.identical = identical
        self.offset = offset                # first differing byte
        self.size_mismatch = size_mismatch
        self.status_mismatch = status_mismatch  # strict: allocation status differs at offset


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


def _buffer_size(sa: int, sb: int) -> int:
    """The read buffers' size for images of sizes ``sa`` and ``sb``: CHUNK,
    or the larger image's size when less -- a bytearray is zeroed as it is
    made (two of 4 MiB: ~8 M instructions, most of comparing two 1 MiB
    images); every segment of such images is still read whole."""
    return min(CHUNK, max(sa, sb, 4096))


def compare_raw(path_a: str, path_b: str, strict: bool = False,
                progress: Callable[[int, int], None] | None = None) -> CompareResult:
    fa, fb = open_source(path_a), open_source(path_b)
    try:
        sa, sb = fd_size(fa), fd_size(fb)
        common = min(sa, sb)
        chunk = _buffer_size(sa, sb)
        buf_a, buf_b = bytearray(chunk), bytearray(chunk)
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
                    n = min(chunk, e - off)
                    ra = dio.preadinto(fa, mva[:n], off)
                    rb = dio.preadinto(fb, mvb[:n], off)
                    if ra < n:
                        mva[ra:n] = bytes(n - ra)
                    if rb < n:
                        mvb[rb:n] = bytes(n - rb)
                    if mva[:n] != mvb[:n]:
                        return CompareResult(False, off + _first_diff(mva[:n], mvb[:n]))
                    off += n
                    if progress:
                        progress(off, common)
            pos += wl
            if progress:
                progress(pos, common)
        if sa != sb:
            if strict:
                return CompareResult(False, common, size_mismatch=True)
            longer, lsize = (fa, sa) if sa > sb else (fb, sb)
            for s, n in _data_ranges(longer, common, lsize - common):
                off = s
                while off < s + n:
                    k = min(chunk, s + n - off)
                    r = dio.preadinto(longer, mva[:k], off)
                    if not is_zero(mva[:r]):
                        z = _first_diff(mva[:r], memoryview(bytes(r)))
                        return CompareResult(False, off + z, size_mismatch=True)
                    off += k
            return CompareResult(True, size_mismatch=True)
        return CompareResult(True)
    finally:
        os.close(fa)
        os.close(fb)


# ---------------------------------------------------------------------------
# Any formats, through backing chains
def _segments(sa, sb, start, end):
    """Yield (a, b, st_a, st_b) over [start, end) where both statuses are constant."""
    i = j = 0
    pos = start
    while pos < end:
        while sa[i]["start"] + sa[i]["length"] <= pos:
            i += 1
        while sb[j]["start"] + sb[j]["length"] <= pos:
            j += 1
        e = min(end, sa[i]["start"] + sa[i]["length"], sb[j]["start"] + sb[j]["length"])
        yield pos, e, sa[i], sb[j]
        pos = e


def _status(r: dict) -> tuple[bool, bool, bool]:
    """What ``compare -s`` compares of a run's block status, as qemu-img
    compares the flags: allocated, zero, data (a hole and written zeroes
    differ)."""
    return r["present"], r["zero"], r["data"]


def _read_cmp(na, nb, a, b, za, zb, bufs):
    """First differing offset in [a, b) or None. A side whose status says
    zero is not read."""
    (va, vb), zero = bufs, memoryview(bytes(len(bufs[0])))
    off = a
    while off < b:
        n = min(len(va), b - off)
        x = zero[:n] if za else va[:n]
        y = zero[:n] if zb else vb[:n]
        for node, z, buf in ((na, za, x), (nb, zb, y)):
            if not z:
                try:
                    node.readinto(off, buf)
                except OSError as e:
                    raise ReadFailed(off, node.filename, e, na is nb) from None
        if x != y:
            return off + _first_diff(x, y)
        off += n
    return None


def compare_images(path_a: str, path_b: str, fmt_a: str | None = None,
                   fmt_b: str | None = None, strict: bool = False,
                   force_share: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> CompareResult:
    """Compare the guest views of two images (any format, with their backing
    chains). Runs that read as zeroes on both sides (by block status) are not
    read. ``strict``: sizes and block status (present, zero, data) must match too;
    a status mismatch is reported as ``status_mismatch``. Locks as qemu-img
    compare (a qcow2 image, or one in a backing chain, lets nobody write it
    meanwhile, unless ``force_share``; two raw files are read sharing
    everything, as qemu-img reads them). ``progress(done, total)``: bytes of
    the common size compared so far."""
    from ..formats import is_nbd_uri, is_spec
    from .images import open_ro, probe
    fa, fb = probe(path_a, fmt_a), probe(path_b, fmt_b)
    # two raw files: compared file to file; an NBD URI (raw over the NBD
    # protocol node, as in qemu-img) goes through the graph
    files = not any(is_spec(p) or is_nbd_uri(p) for p in (path_a, path_b))
    if fa == "raw" and fb == "raw" and not strict and files:
        return compare_raw(path_a, path_b, strict, progress)
    na = open_ro(path_a, fa, force_share)
    try:
        nb = open_ro(path_b, fb, force_share)
    except BaseException:
        na.close_chain()
        raise
    try:
        sa, sb = na.size, nb.size
        if strict and sa != sb:
            return CompareResult(False, min(sa, sb), size_mismatch=True)
        common = min(sa, sb)
        size = _buffer_size(sa, sb)
        bufs = (memoryview(bytearray(size)), memoryview(bytearray(size)))
        pos = 0
        while pos < common:
            n = min(WORK, common - pos)
            for a, b, x, y in _segments(na.block_status(pos, n), nb.block_status(pos, n),
                                        pos, pos + n):
                if strict and _status(x) != _status(y):
                    return CompareResult(False, a, status_mismatch=True)
                if x["zero"] and y["zero"]:
                    continue
                d = _read_cmp(na, nb, a, b, x["zero"], y["zero"], bufs)
                if d is not None:
                    return CompareResult(False, d)
                if progress:
                    progress(b, common)
            pos += n
            if progress:
                progress(pos, common)
        if sa != sb:
            longer, lsize = (na, sa) if sa > sb else (nb, sb)
            pos = common
            while pos < lsize:
                n = min(WORK, lsize - pos)
                for r in longer.block_status(pos, n):
                    if r["zero"]:
                        continue
                    d = _read_cmp(longer, longer, r["start"], r["start"] + r["length"],
                                  False, True, bufs)
                    if d is not None:
                        return CompareResult(False, d, size_mismatch=True)
                pos += n
            return CompareResult(True, size_mismatch=True)
        return CompareResult(True)
    finally:
        na.close_chain()
        nb.close_chain()
