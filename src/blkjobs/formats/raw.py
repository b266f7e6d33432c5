"""The raw driver: the guest disk is the file, byte for byte.

Holes (SEEK_DATA/SEEK_HOLE) are reported as ZERO, data as DATA, both at
host_offset == guest offset (``qemu-img map`` prints an offset for raw holes). ``write_zeroes`` walks nbdcopy's ladder: punch a
hole (when ``may_unmap``), else ZERO_RANGE, else write zeroes; a method that
answers EOPNOTSUPP/EINVAL is remembered per driver object and not tried again.
"""
from __future__ import annotations

import errno
import os

from ..errors import ImageError, OSErrorWithContext, UsageError
from .base import Driver, Kind, Mapping, open_file
from ..native import dio
from ..units import sector_size

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """0 or an errno (os.posix_fallocate has no mode argument)."""
    import ctypes       # here: ctypes.util costs every command ~20 ms of start-up
    import ctypes.util
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


_ZEROES = bytes(1 << 20)


class Raw(Driver):
    format_name = "raw"
    cluster_size = 0
    parallel_reads = True

    def __init__(self, path: str, read_only: bool = True):
        self.filename = path
        self.read_only = read_only
        self._fd = open_file(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._closed = False
        self._can_punch = True
        self._can_zero_range = True
        self._can_seek_data = True

    @property
    def fd(self) -> int:
        """The open file's descriptor; after :meth:`close` an error, never
        the number (the OS gives it to the next file opened)."""
        if self._closed:
            raise ImageError(f"'{self.filename}': image is closed")
        return self._fd

    @property
    def size(self) -> int:
        """The file's length as QEMU's block layer gives it: whole 512-byte
        sectors, rounded up (bdrv_getlength: a file of 1000 bytes is 1024);
        the part past the end of the file reads as zeroes."""
        return sector_size(self.file_length)

    @property
    def file_length(self) -> int:
        """The file's length in bytes."""
        return os.fstat(self.fd).st_size

    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        # Guest offset = file offset. A hole is read as data (zeroes); the
        # engine's zero detection still keeps a raw target sparse.
        if (self._closed or (for_write and self.read_only) or offset < 0 or length <= 0
                or offset + length > self.file_length):
            return None
        return offset

    def map_host(self, offset: int, length: int) -> list[Mapping]:
        fsize = self.file_length
        end = min(offset + length, sector_size(fsize))
        out: list[Mapping] = []
        self._map_file(offset, min(end, fsize), out)
        start = max(offset, fsize)
        if end > start:         # the last sector's part past the end of the file: a hole
            if out and out[-1].kind == Kind.ZERO:
                last = out.pop()
                out.append(Mapping(last.start, end - last.start, Kind.ZERO, last.start))
            else:
                out.append(Mapping(start, end - start, Kind.ZERO, start))
        return out

    def _map_file(self, pos: int, end: int, out: list[Mapping]) -> None:
        while pos < end:
            if not self._can_seek_data:
                out.append(Mapping(pos, end - pos, Kind.DATA, pos))
                break
            try:
                d = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:          # only a hole up to EOF
                    out.append(Mapping(pos, end - pos, Kind.ZERO, pos))
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    self._can_seek_data = False
                    continue
                raise OSErrorWithContext(e.errno or errno.EIO, "SEEK_DATA",
                                         path=self.filename) from None
            if d > pos:
                out.append(Mapping(pos, min(d, end) - pos, Kind.ZERO, pos))
                pos = min(d, end)
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            e_ = min(hole, end)
            out.append(Mapping(pos, e_ - pos, Kind.DATA, pos))
            pos = e_

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):
            n = dio.preadinto(self.fd, mv[done:], offset + done)
            if n <= 0:
                if offset + len(mv) > self.size:
                    raise UsageError(f"read beyond the end of '{self.filename}'")
                mv[done:] = bytes(len(mv) - done)      # the last sector's tail
                return
            done += n

    def read(self, offset: int, length: int) -> bytes:
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)

    def _writable(self):
        if self.read_only:
            raise ImageError(f"'{self.filename}': image is opened read-only")

    def write(self, offset: int, data, fill=None) -> None:
        self._writable()
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += dio.pwrite(self.fd, mv[done:], offset + done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True, fill=None) -> None:
        self._writable()
        end = min(offset + length, self.file_length)   # never grow the file here
        # a hole is punched up to the request's end in the last sector, as
        # QEMU's file driver punches (the length is kept; a punch from a
        # block's start to past the end of the file frees that block)
        pend = min(offset + length, self.size)
        if pend <= offset:
            return
        if may_unmap and self._can_punch:
            err = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset,
                             pend - offset)
            if not err:
                return
            if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._can_punch = False
            else:
                raise OSErrorWithContext(err, "punch hole", path=self.filename)
        if end <= offset:
            return
        n = end - offset
        if self._can_zero_range:
            err = _fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, n)
            if not err:
                return
            if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._can_zero_range = False
            else:
                raise OSErrorWithContext(err, "zero range", path=self.filename)
        pos = offset
        while pos < end:
            k = min(end - pos, len(_ZEROES))
            dio.pwrite(self.fd, _ZEROES[:k], pos)
            pos += k

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole when the file system can (reads as zeroes after)."""
        self._writable()
        end = min(offset + length, self.file_length)
        if end > offset and self._can_punch:
            err = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                             offset, end - offset)
            if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._can_punch = False

    def truncate(self, size: int) -> None:
        self._writable()
        os.ftruncate(self.fd, size)

    def flush(self) -> None:
        if not self.read_only and not self._closed:
            os.fsync(self.fd)

    def close(self) -> None:
        """Flush and close. The file is closed (and the driver unusable)
        even when the flush fails; its error is raised afterwards."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            os.close(self._fd)

    def allocate(self, offset: int, length: int, undo: list | None = None) -> list[Mapping]:
        """Raw needs no allocation: the guest range is the host range."""
        self._writable()
        return [Mapping(offset, length, Kind.DATA, offset)]

    def info(self) -> dict:
        return {}


def create(path: str, size: int, preallocation: str = "off") -> None:
    if size < 0:
        raise UsageError(f"invalid size {size}")
    if preallocation not in ("off", "falloc", "full"):
        raise UsageError(f"unsupported preallocation mode {preallocation!r} for raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        if preallocation == "off" and size:
            # QEMU's file driver allocates the first block of a new file (for
            # its alignment probing): qemu-img map shows it as data, 512
            # bytes of zeroes below 4 KiB, else 4 KiB
            dio.pwrite(fd, bytes(512 if size < 4096 else 4096), 0)
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif preallocation == "full":       # zeroes written: every block allocated
            zero = bytes(min(size, 1 << 20))
            pos = 0
            while pos < size:
                pos += dio.pwrite(fd, memoryview(zero)[:min(len(zero), size - pos)], pos)
    finally:
        os.close(fd)
