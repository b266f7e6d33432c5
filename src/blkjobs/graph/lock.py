"""File locks compatible with QEMU's image locking (block/file-posix.c).

QEMU keeps one byte lock per permission bit *i* (0 consistent read, 1 write,
2 write unchanged, 3 resize) at two places in the image file, using
open-file-description (OFD) shared read locks:

* byte ``100 + i`` is locked while this process *uses* permission *i*;
* byte ``200 + i`` is locked while this process does *not share* it.

Before taking, a process tests (with a write lock probe, F_OFD_GETLK) that
nobody holds ``200 + i`` for each permission it wants, and nobody holds
``100 + i`` for each permission it refuses to share. Locks taken through one
file description do not conflict with themselves, so each node uses the fd of
its driver. Bytes past the end of the file can be locked (no I/O happens).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .perm import PERM_NAMES, Perm, PermissionConflict

PERM_BASE = 100
SHARED_BASE = 200
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"     # struct flock on Linux x86-64/aarch64: type, whence, start, len, pid


def _flock(ltype: int, start: int) -> bytes:
    return struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0)


def _set(fd: int, ltype: int, byte: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock(ltype, byte))


def _held_by_other(fd: int, byte: int) -> bool:
    r = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return struct.unpack_from("h", r)[0] != fcntl.F_UNLCK


class FileLock:
    """The lock bytes one file description holds."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        self.held: set[int] = set()

    def check(self, perm: int, unshared: int) -> None:
        for i in range(4):
            bit = 1 << i
            if perm & bit and _held_by_other(self.fd, SHARED_BASE + i):
                raise PermissionConflict(
                    f"Failed to get \"{PERM_NAMES[Perm(bit)]}\" lock on '{self.path}': "
                    "Is another process using the image?")
            if unshared & bit and _held_by_other(self.fd, PERM_BASE + i):
                raise PermissionConflict(
                    f"Failed to get shared \"{PERM_NAMES[Perm(bit)]}\" lock on '{self.path}': "
                    "Is another process using the image?")

    def apply(self, perm: int, unshared: int) -> None:
        """Check, then hold exactly the bytes for (perm, unshared)."""
        self.check(perm, unshared)
        want = {PERM_BASE + i for i in range(4) if perm >> i & 1}
        want |= {SHARED_BASE + i for i in range(4) if unshared >> i & 1}
        for b in sorted(want - self.held):
            try:
                _set(self.fd, fcntl.F_RDLCK, b)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise PermissionConflict(f"Failed to lock byte {b} of '{self.path}'") from None
                raise
            self.held.add(b)
        for b in sorted(self.held - want):
            _set(self.fd, fcntl.F_UNLCK, b)
            self.held.discard(b)

    def release(self) -> None:
        for b in sorted(self.held):
            try:
                _set(self.fd, fcntl.F_UNLCK, b)
            except OSError:
                pass
        self.held.clear()
