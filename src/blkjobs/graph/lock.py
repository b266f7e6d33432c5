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
OFD locks of two descriptions conflict even inside one process, so an image
opened twice by one command (a convert whose target is in its source's
backing chain) is refused exactly as a second process would be.

What each command takes is what qemu-img 7.2 takes for the same command
(measured against qemu-storage-daemon and qemu-io holders; see
docs/locking.md): readers hold consistent read and do not share write or
resize; writers also hold write and resize; ``-U`` (force share, readers
only) shares everything. The error texts are qemu-img's.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .perm import ALL, PERM_NAMES, Perm, PermissionConflict

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


class LockConflict(PermissionConflict):
    """Another file description (another process, or another open of the same
    file in this one) holds a lock byte that conflicts. The text is
    qemu-img's; :meth:`opening` adds the ``Could not open ...`` prefix."""

    def __init__(self, msg: str, path: str):
        super().__init__(msg)
        self.path = path
        self.bare = msg         # without the 'Could not open' prefix
        self.prefixed = False

    def opening(self, path: str, what: str = "Could not open") -> LockConflict:
        """The error as qemu-img reports it for opening ``path``: the image
        itself, or (when the conflict is on another file) its backing chain."""
        if self.prefixed:
            return self
        if os.path.realpath(self.path) == os.path.realpath(path):
            msg = f"{what} '{path}': {self}"
        else:
            msg = f"{what} '{path}': Could not open backing file: {self}"
        e = LockConflict(msg, self.path)
        e.bare = self.bare
        e.prefixed = True
        return e


class opening:     # (lower case: used as a function, ``with opening(path):``)
    """Re-raise a lock conflict met while opening ``path`` (and its backing
    chain) with qemu-img's prefix. (A class, not a contextlib generator:
    contextlib is not otherwise imported by a convert, info or check:
    ~2.6 M instructions of their start-up.)"""
    __slots__ = ("path", "what")

    def __init__(self, path: str, what: str = "Could not open") -> None:
        self.path, self.what = path, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: object, e: BaseException | None, tb: object) -> None:
        if isinstance(e, LockConflict):
            raise e.opening(self.path, self.what) from None


#: what qemu-img's commands hold on an image (perm, unshared); readers with
#: ``-U`` unshare nothing
READER = Perm.CONSISTENT_READ
WRITER = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
NO_SHARE = Perm.WRITE | Perm.RESIZE


def conflict_text(perm_bit: int, shared: bool, path: str) -> str:
    name = PERM_NAMES[Perm(perm_bit)]
    return (f"Failed to get {'shared ' if shared else ''}\"{name}\" lock\n"
            f"Is another process using the image [{path}]?")


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
                self._conflict(SHARED_BASE + i, "does not share", bit)
                raise LockConflict(conflict_text(bit, False, self.path), self.path)
            if unshared & bit and _held_by_other(self.fd, PERM_BASE + i):
                self._conflict(PERM_BASE + i, "uses", bit)
                raise LockConflict(conflict_text(bit, True, self.path), self.path)

    def _conflict(self, byte: int, how: str, bit: int) -> None:
        """Say at debug level which byte conflicts (logging is imported on
        this error path only: every command opens images)."""
        import logging
        logging.getLogger(__name__).debug(
            "'%s': lock byte %d is held by another process: it %s \"%s\"", self.path, byte,
            how, PERM_NAMES[Perm(bit)])

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
                    raise LockConflict(f"Failed to lock byte {b}\n"
                                       f"Is another process using the image [{self.path}]?",
                                       self.path) from None
                raise
            self.held.add(b)
        for b in sorted(self.held - want):
            _set(self.fd, fcntl.F_UNLCK, b)
            self.held.discard(b)

    def drop_unwanted(self, perm: int, unshared: int) -> None:
        """Let go of the held bytes (perm, unshared) does not ask for; take
        none (a rollback after a failed :meth:`apply`)."""
        want = {PERM_BASE + i for i in range(4) if perm >> i & 1}
        want |= {SHARED_BASE + i for i in range(4) if unshared >> i & 1}
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


class ImageLock:
    """QEMU's lock bytes on ``path`` through a description of its own, for
    the commands that open an image without a graph node (a convert target, a
    check, a raw file read directly, a header rewrite). Held until
    :meth:`release` (or the end of a ``with``)."""

    def __init__(self, path: str, write: bool = False, force_share: bool = False):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.lock = FileLock(self.fd, path)
        if write:
            perm, unshared = WRITER, NO_SHARE
        else:
            perm, unshared = READER, (Perm(0) if force_share else NO_SHARE)
        try:
            self.lock.apply(perm, unshared & ALL)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def release(self) -> None:
        if self.fd >= 0:
            self.lock.release()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_fd(fd: int, path: str, write: bool = False, force_share: bool = False) -> FileLock:
    """Take what a reader (or writer) takes on an already open ``fd`` (it must
    be open for reading); the locks go when ``fd`` is closed."""
    lk = FileLock(fd, path)
    if write:
        lk.apply(WRITER, NO_SHARE)
    else:
        lk.apply(READER, Perm(0) if force_share else NO_SHARE)
    return lk
