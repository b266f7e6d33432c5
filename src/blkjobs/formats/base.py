"""The format driver contract.

A driver presents one image file (raw, qcow2, ...) as a virtual disk of
``size`` bytes. Drivers know nothing of backing chains beyond the names
recorded in their headers: the graph layer (``blkjobs.graph``) stacks them and
answers "who provides this byte". Drivers must never copy bulk data in Python
loops: bulk moves go through ``blkjobs.native`` using the host extents that
``map_host`` reports.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class Kind(enum.IntEnum):
    """What a range of the virtual disk is, in this layer alone."""

    DATA = 0         # stored in this layer at host_offset of the driver's file
    ZERO = 1         # reads as zeroes, decided by this layer
    UNALLOCATED = 2  # not decided here: read from the backing file (or zeroes)
    COMPRESSED = 3   # stored compressed: read through the driver, not the host file


@dataclass(frozen=True)
class Mapping:
    """One run of the virtual disk, [start, start+length), all of one kind.

    ``host_offset`` is the offset in the driver's file for DATA (a contiguous
    run there), else None.
    """

    start: int
    length: int
    kind: Kind
    host_offset: int | None = None


class Driver(abc.ABC):
    """An open image. Subclasses set ``format_name``.

    Attributes every driver provides:

    * ``filename``: the path it was opened from;
    * ``fd``: the OS file descriptor of the (data) file, for the C core;
    * ``read_only``: opened without write access;
    * ``backing_filename`` / ``backing_format``: as recorded in the header,
      None when absent (raw: always None);
    * ``cluster_size``: allocation unit in bytes (raw: 0 = none).
    """

    format_name: str = "?"
    filename: str
    fd: int
    read_only: bool
    backing_filename: str | None = None
    backing_format: str | None = None
    cluster_size: int = 0

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    @abc.abstractmethod
    def map_host(self, offset: int, length: int) -> list[Mapping]:
        """Describe [offset, offset+length) in this layer alone, as adjacent
        Mappings in order that cover the whole range (clipped to ``size``).
        Must be cheap enough to call per work range (e.g. 64-128 MiB)."""

    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        """The file offset of guest [offset, offset+length) when this layer
        stores it as plain data in one piece -- for_write: data that may be
        overwritten in place -- else None (then ask :meth:`map_host`, or
        ``allocate``). The jobs' fast path for small ranges (a mirror copies
        thousands of scattered granules a second): one lookup, no runs."""
        return None

    @abc.abstractmethod
    def readinto(self, offset: int, buf) -> None:
        """Fill the writable buffer ``buf`` with this layer's view of
        [offset, offset+len(buf)). UNALLOCATED ranges read as zeroes here:
        the graph layer resolves them through the backing chain first."""

    @abc.abstractmethod
    def write(self, offset: int, data) -> None:
        """Write ``data`` (bytes-like) at ``offset``; allocates as needed."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        """Make the range read as zeroes (and no longer fall through to the
        backing file). qcow2 uses zero clusters where it can."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Drop the range: afterwards it may read from backing or as zeroes."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable (metadata, then fsync)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush (if writable) and release the file. Idempotent."""

    def info(self) -> dict:
        """Format-specific fields for ``info --output json``."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
