"""The ``raw`` format's ``offset`` and ``size`` options: a window of the
file under it as the whole disk (``json:{"driver": "raw", "offset": ...}``,
:mod:`blkjobs.graph.blockspec`)."""
from __future__ import annotations

from ..errors import ImageError
from ..units import sector_size
from .base import Driver, Mapping


class Slice(Driver):
    """``size`` bytes of ``inner`` from ``offset`` (None: to its end)."""

    format_name = "raw"
    cluster_size = 0

    def __init__(self, inner: Driver, offset: int, size: int | None):
        whole = sector_size(inner.size)      # QEMU sees a file in whole sectors
        if offset > whole:
            inner.close()
            raise ImageError(f"Offset ({offset}) cannot be greater than size of the containing "
                             f"file ({whole})")
        if size is None:
            size = max(0, inner.size - offset)
        elif offset + size > whole:
            inner.close()
            raise ImageError(f"The sum of offset ({offset}) and size ({size}) has to be smaller "
                             f"or equal to the  actual size of the containing file ({whole})")
        self.inner = inner
        self.offset = offset
        self._size = size
        self.filename = inner.filename
        self.read_only = inner.read_only
        self.host_file = inner.host_file
        self.protocol = inner.protocol

    @property
    def fd(self) -> int:
        return self.inner.fd

    @property
    def data_fd(self) -> int:
        return self.inner.data_fd

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OSError(22, f"request [{offset}, {offset + length}) beyond the end of "
                          f"'{self.filename}' ({self._size} bytes)")

    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        if offset < 0 or length <= 0 or offset + length > self._size:
            return None
        return self.inner.host_run(offset + self.offset, length, for_write)

    def map_host(self, offset: int, length: int) -> list[Mapping]:
        end = min(offset + length, self._size)
        if end <= offset:
            return []
        return [Mapping(m.start - self.offset, m.length, m.kind, m.host_offset)
                for m in self.inner.map_host(offset + self.offset, end - offset)]

    def readinto(self, offset: int, buf) -> None:
        self._check(offset, memoryview(buf).nbytes)
        self.inner.readinto(offset + self.offset, buf)

    def write(self, offset: int, data, fill=None) -> None:
        self._check(offset, memoryview(data).nbytes)
        self.inner.write(offset + self.offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill=None) -> None:
        self._check(offset, length)
        self.inner.write_zeroes(offset + self.offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.inner.discard(offset + self.offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
