"""Reads and writes that work on any fd, O_DIRECT or not (csrc/dio.c).

The format drivers read and write their files through these: on a buffered
fd they are plain ``os.pread``/``os.pwrite`` (one ``fcntl`` to tell); on an
O_DIRECT fd (``-t none``, ``cache.direct=on``) C does the I/O with the GIL
released, through an aligned bounce buffer where the request is not aligned
to the device's block size (a qcow2 header field, an L2 entry, the tail of
a raw image whose size is not a multiple of 512). The copy engine (copy.c)
calls the same C functions.
"""
from __future__ import annotations

import errno
import fcntl
import os

# The extension (._lib) is imported on the O_DIRECT path only: a buffered
# command (info, map: start-up time) never pays for it here.

O_DIRECT = getattr(os, "O_DIRECT", 0)


def is_direct(fd: int) -> bool:
    """The fd was opened (or set) with O_DIRECT."""
    return bool(O_DIRECT) and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


def alignment(fd: int) -> int:
    """1 for a buffered fd, else the request alignment O_DIRECT needs on it
    (probed once per file as QEMU does: BLKSSZGET, else a read at offset 0)."""
    from ._lib import lib
    return int(lib.bj_dio_align(fd))


def set_direct(fd: int, direct: bool) -> None:
    """Switch O_DIRECT on or off on an open fd (``fcntl(F_SETFL)``, as
    QEMU's file driver reopens; EINVAL: the file system refuses it)."""
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = (fl | O_DIRECT) if direct else (fl & ~O_DIRECT)
    if want != fl:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


def _switched(e: OSError, fd: int) -> None:
    """A buffered request failed: re-raise ``e`` unless it is an EINVAL,
    which a buffered fd never gives for a request's shape: the fd was
    switched to O_DIRECT meanwhile (a blockdev-reopen's cache.direct). The
    caller then does the request again in C, which takes the fd as it is
    now (and retries so itself: csrc/dio.c)."""
    if e.errno != errno.EINVAL:
        raise e


def preadinto(fd: int, buf, offset: int) -> int:
    """Read into the writable buffer ``buf`` at ``offset``; the bytes read
    (fewer only at the end of the file)."""
    mv = memoryview(buf).cast("B")
    if not is_direct(fd):
        try:
            return os.preadv(fd, [mv], offset)
        except OSError as e:
            _switched(e, fd)
    from ._lib import ffi, lib
    got = lib.bj_dio_pread(fd, ffi.from_buffer(mv, require_writable=True), len(mv), offset)
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    return int(got)


def pread(fd: int, length: int, offset: int) -> bytes:
    """``os.pread`` on any fd."""
    if not is_direct(fd):
        try:
            return os.pread(fd, length, offset)
        except OSError as e:
            _switched(e, fd)
    b = bytearray(length)
    n = preadinto(fd, b, offset)
    return bytes(b) if n == length else bytes(b[:n])


def pwrite(fd: int, data, offset: int) -> int:
    """``os.pwrite`` on any fd, always all of ``data``; its length."""
    mv = memoryview(data).cast("B")
    if not is_direct(fd):
        try:
            done = 0
            while done < len(mv):
                done += os.pwrite(fd, mv[done:], offset + done)
            return done
        except OSError as e:
            _switched(e, fd)
    from ._lib import ffi, lib
    rc = lib.bj_dio_pwrite(fd, ffi.from_buffer(mv), len(mv), offset, ffi.NULL)
    if rc < 0:      # an OSError, as os.pwrite raises (callers catch it)
        raise OSError(-rc, os.strerror(-rc))
    return len(mv)
