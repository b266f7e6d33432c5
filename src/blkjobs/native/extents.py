"""Data/hole extents of a file (SEEK_DATA/SEEK_HOLE, csrc/extents.c)."""
from __future__ import annotations

from .record import Record
from ._lib import ensure, ffi, lib

_BATCH = 256


class Extent(Record):
    """[offset, offset+length) of the file, data or a hole. (A plain class,
    not a dataclass: ``dataclasses`` imports ``inspect``, ~8 ms of every
    raw -> raw convert's start-up.)"""
    __slots__ = ("offset", "length", "data")

    def __init__(self, offset: int, length: int, data: bool):
        self.offset = offset
        self.length = length
        self.data = data


def extents(fd: int, offset: int, length: int, path: str | None = None) -> list[Extent]:
    """Extents covering [offset, offset+length), adjacent and in order.
    Beyond the end of the file reads as a hole. Ask per work range."""
    out: list[Extent] = []
    buf = ffi.new("struct bj_extent[]", _BATCH)
    n = ffi.new("size_t *")
    nxt = ffi.new("uint64_t *")
    end = offset + length
    pos = offset
    while pos < end:
        ensure(lib.bj_extents(fd, pos, end - pos, buf, _BATCH, n, nxt), "seek data/hole",
               path=path)
        for i in range(n[0]):
            e = buf[i]
            data = bool(e.flags & lib.BJ_EXTENT_DATA)
            if out and out[-1].data == data and out[-1].offset + out[-1].length == e.offset:
                out[-1] = Extent(out[-1].offset, out[-1].length + e.length, data)
            else:
                out.append(Extent(int(e.offset), int(e.length), data))
        if nxt[0] <= pos:
            break
        pos = int(nxt[0])
    return out


def is_zero(buf) -> bool:
    """True when the bytes-like ``buf`` holds only zero bytes."""
    mv = memoryview(buf)
    return bool(lib.bj_is_zero(ffi.from_buffer(mv), mv.nbytes))


def zero_blocks(buf, block: int) -> list[tuple[int, int]]:
    """The runs (start, length) of whole ``block``-sized blocks of ``buf``
    that hold only zero bytes (a short last block counts as a block)."""
    mv = memoryview(buf)
    p = ffi.from_buffer(mv)
    size, pos, out = mv.nbytes, 0, []
    while pos < size:
        n = lib.bj_zero_run(p + pos, size - pos, block, 1)
        if n:
            out.append((pos, n))
            pos += n
        if pos < size:
            pos += lib.bj_zero_run(p + pos, size - pos, block, 0)
    return out


def zero_blocks_at(fd: int, offset: int, length: int, block: int,
                   path: str | None = None) -> bytes:
    """Per ``block``-sized block of [offset, offset+length) of the file
    ``fd`` (the last one may be shorter): 1 when it reads as zeroes, else 0
    (``csrc/extents.c`` ``bj_zero_blocks``: a block of data costs one 512-byte
    read). Past the end of the file reads as zeroes."""
    n = -(-length // block) if length else 0
    out = ffi.new("uint8_t[]", max(1, n))
    ensure(lib.bj_zero_blocks(fd, offset, length, block, out, n), "read", path=path)
    return bytes(ffi.buffer(out, n))
