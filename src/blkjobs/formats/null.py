"""QEMU's ``null-co`` driver: a disk of ``size`` bytes (1 GiB unless said)
that stores nothing. Writes are dropped; reads return zeroes. With
``read-zeroes`` the whole disk maps as zeroes (``"zero": true``), without it
as not allocated (``"present": false``), as ``qemu-img map`` shows them.
Named as ``json:{"driver": "null-co", ...}`` (:mod:`blkjobs.graph.blockspec`).
"""
from __future__ import annotations

from .base import Driver, Kind, Mapping

#: null-co's default size (QEMU: 1 << 30)
DEFAULT_SIZE = 1 << 30


class Null(Driver):
    format_name = "null-co"
    protocol = "null-co"
    host_file = False
    cluster_size = 0
    fd = -1

    def __init__(self, size: int = DEFAULT_SIZE, read_zeroes: bool = False,
                 filename: str = "null-co://", read_only: bool = True):
        self.filename = filename
        self.read_only = read_only
        self.read_zeroes = read_zeroes
        self._size = size
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def map_host(self, offset: int, length: int) -> list[Mapping]:
        end = min(offset + length, self._size)
        if end <= offset:
            return []
        return [Mapping(offset, end - offset, Kind.ZERO if self.read_zeroes else Kind.UNALLOCATED)]

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        mv[:] = bytes(len(mv))

    def write(self, offset: int, data, fill=None) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill=None) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._closed = True
