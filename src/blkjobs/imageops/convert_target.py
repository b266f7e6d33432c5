"""The target of a convert: locking it as qemu-img does before touching it,
creating or opening it (:class:`Target`), and, when the copy fails, removing
the file we created -- only while its path still names it -- and saying in
the error what became of the target (invoked as qemu-img: kept and not said,
as qemu-img does)."""
from __future__ import annotations

import errno
import os

from ..errors import BlkjobsError, CopyError, OSErrorWithContext, UsageError
from ..graph.lock import ImageLock, LockConflict
from ..formats.cache import O_DIRECT, extra_flags, open_cached
from ..native import dio
from .files import fd_size, same_file

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _wr() -> int:
    """The access mode of a raw target: O_WRONLY, but O_RDWR with O_DIRECT
    (a partial block is read before it is written; qemu-img opens O_RDWR)."""
    return os.O_RDWR if extra_flags(True) & O_DIRECT else os.O_WRONLY


class Target:
    """The target file of one convert and what we know of it: ``dfd`` its
    descriptor (-1: none open), ``t`` its qcow2 driver (None for raw),
    ``ours`` its identity when we created it (None: it existed, or nothing
    was created yet), ``tlock`` the writer's locks, ``written`` whether the
    copy into it began, ``keep``: a failed copy keeps the target and says
    nothing of it (qemu-img's way)."""

    def __init__(self, dst: str, keep: bool = False):
        self.dst = dst
        self.keep = keep
        self.dfd = -1
        #: the target's driver once open (raw or qcow2: the chain path uses
        #: qcow2's allocation calls), None before and after
        self.t: Any = None
        self.ours: tuple[int, int] | None = None
        #: created by us without preallocation: holes but its first block (the
        #: copy engine's prealloc may allocate its data ranges ahead)
        self.sparse_new = False
        self.tlock: ImageLock | None = None
        self.written = False

    def lock(self, fmt: str, no_create: bool) -> None:
        self.tlock = lock_target(self.dst, fmt, no_create)

    def open_existing_raw(self, size: int) -> int:
        """``-n``: open the raw target for writing; its size (at least ``size``)."""
        try:
            self.dfd = open_cached(self.dst, _wr() | os.O_CLOEXEC)
            tsize = fd_size(self.dfd)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "Could not open target", path=self.dst) from None
        check_target_size(self.dst, tsize, size)
        return tsize

    def create_raw(self, size: int, falloc: bool = False) -> None:
        """Create (or truncate) the raw target with ``size`` bytes; ``falloc``:
        allocate them (``-o preallocation=falloc``)."""
        dst = self.dst
        if os.path.isdir(dst):
            raise CopyError(errno.EISDIR, "Could not create target", path=dst)
        try:
            self.dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            if extra_flags(True):       # -t none|directsync|writethrough: reopened so
                fd, self.dfd = self.dfd, -1
                try:
                    self.dfd = open_cached(dst, _wr() | os.O_CLOEXEC)
                finally:
                    os.close(fd)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "Could not create target", path=dst) from None
        self.ours = identity(self.dfd)
        self.sparse_new = not falloc
        if self.tlock is None:
            self.tlock = ImageLock(dst, write=True)
        try:
            os.ftruncate(self.dfd, size)
            if falloc and size:
                os.posix_fallocate(self.dfd, 0, size)
            elif size:      # QEMU's file driver allocates a new file's first block
                dio.pwrite(self.dfd, bytes(min(size, 512 if size < 4096 else 4096)), 0)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "Could not resize target", path=dst) from None

    def close(self, failed: bool) -> None:
        """Close the target (``failed``: without flushing a qcow2 target's
        half-made metadata, and keeping the locks until the file is dealt
        with); the locks go with the call that is not ``failed``."""
        if self.t is not None:
            t, self.t = self.t, None
            if failed:
                t.read_only = True       # do not flush half-made metadata
            try:
                t.close()
            except OSError:
                pass
            self.dfd = -1
        elif self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.tlock is not None and not failed:
            self.tlock.release()
            self.tlock = None

    def failed(self, e: BaseException,
               run_at: Callable[[int], tuple[int, int]] | None = None) -> BaseException:
        """After ``e``: close the target, remove it if we made it, and
        return the exception to raise (it says what became of the target).
        A failed write's offset is a guest offset (the convert translated a
        qcow2 target's host offset); ``run_at(guest)``: the source's block
        status run holding it, for qemu-img's text (see qemu_img_text)."""
        buf = QEMU_BUF
        if self.t is not None and self.t.format_name != "raw":
            # qemu-img's buffer grows to the target's discard alignment (a qcow2 cluster)
            buf = min(16 << 20, max(QEMU_BUF, self.t.cluster_size))
        self.close(failed=True)
        if self.keep:
            return qemu_img_text(e, run_at, buf)
        return say_what_happened_to_target(e, self.dst, self.ours, self.written)


#: qemu-img convert's requests (IO_BUF_SIZE): where a failed write is said to begin
QEMU_BUF = 2 << 20
#: the longest block status qemu-img convert asks for (BDRV_REQUEST_MAX_SECTORS)
QEMU_MAX_STATUS = ((1 << 31) - 1) >> 9 << 9


def qemu_request_start(guest: int, run: tuple[int, int] | None, buf: int = QEMU_BUF) -> int:
    """Where qemu-img convert's request holding ``guest`` begins: it asks
    the source's block status from each run's start (at most
    QEMU_MAX_STATUS bytes at a time) and copies a data run ``buf`` bytes per
    request from there. ``run``: (start, length) of the source's block
    status run holding ``guest``; None: runs from 0."""
    s = run[0] if run is not None else 0
    s += (guest - s) // QEMU_MAX_STATUS * QEMU_MAX_STATUS
    return s + (guest - s) // buf * buf


def qemu_img_text(e: BaseException, run_at: Callable[[int], tuple[int, int]] | None = None,
                  buf: int = QEMU_BUF) -> BaseException:
    """A failed write into the target in qemu-img's words: ``error while
    writing at byte N``, N the guest offset where qemu-img's request that
    holds the failed write begins (qemu_request_start)."""
    if isinstance(e, CopyError) and e.side == "target" and e.what == "error writing" \
            and e.offset is not None:
        run = None
        if run_at is not None:
            try:
                run = run_at(e.offset)
            except (OSError, BlkjobsError):
                run = None          # no block status now: a request from 0
        err = CopyError(e.errno, "error while writing at byte "
                        f"{qemu_request_start(e.offset, run, buf)}")
        err.path, err.side, err.offset = e.path, e.side, e.offset
        return err
    return e


def check_target_size(dst: str, tsize: int, size: int) -> None:
    if tsize < size:
        raise UsageError(f"target '{dst}' is smaller than the source ({tsize} < {size} bytes)")


def lock_target(dst: str, fmt: str, no_create: bool) -> ImageLock | None:
    """Take the writer's locks on an existing target before it is touched,
    with qemu-img's error texts (``-n``: ``Could not open 'DST': Failed to get
    "write" lock``; a file convert would overwrite: ``DST: error while
    converting FMT: ...``). None when there is no file yet."""
    if not no_create and not os.path.exists(dst):
        return None
    try:
        return ImageLock(dst, write=True)
    except LockConflict as e:
        if no_create:
            raise e.opening(dst) from None
        raise LockConflict(f"{dst}: error while converting {fmt}: {e}", e.path) from None
    except OSError as e:
        if no_create:
            raise CopyError(e.errno or errno.EIO, "Could not open target", path=dst) from None
        return None         # not a readable file: creating it says what is wrong


def refuse_target_in_chain(dst: str, src: str, chain) -> None:
    """A target in the source's own backing chain: qemu-img's lock error,
    with the reason in place of 'Is another process using the image'."""
    for n in chain[1:]:
        if same_file(n.filename, dst):
            raise LockConflict(f"Could not open '{dst}': Failed to get \"write\" lock\n"
                               f"'{dst}' is in the backing chain of the source '{src}' "
                               "(writing it would change what the source reads)", n.filename)


def identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of an open file: which file our target is."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _remove_ours(dst: str, ours: tuple[int, int]) -> str:
    """Remove the target file we created -- only if ``dst`` still names it
    (``ours``: its identity from our fd): a path replaced meanwhile names
    someone else's file. Returns what happened, for the error message."""
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        return f"the incomplete target was not removed: '{dst}' was removed or renamed meanwhile"
    except OSError as e:
        return f"the incomplete target could not be removed: {e.strerror}"
    if (st.st_dev, st.st_ino) != ours:
        return (f"the incomplete target was not removed: '{dst}' was replaced by another "
                "file meanwhile")
    try:
        os.unlink(dst)
    except OSError as e:
        return f"the incomplete target could not be removed: {e.strerror}"
    return "the incomplete target was removed"


def say_what_happened_to_target(e: BaseException, dst: str, ours: tuple[int, int] | None,
                                 written: bool) -> BaseException:
    """After a failed convert: remove the target file we created (``ours``:
    its identity, None when we created none), and append to the error what
    became of the target (the user must never have to guess). ``written``:
    an existing (-n) target was opened and the copy into it had begun.
    Returns the exception to raise (a bare OSError gets the note too)."""
    if ours is not None:
        note = _remove_ours(dst, ours)
    else:
        note = "the target was left partially written" if written else ""
    if isinstance(e, OSError) and not isinstance(e, BlkjobsError):
        e = OSErrorWithContext(e.errno or errno.EIO, path=e.filename)
    if isinstance(e, BlkjobsError) and note and not isinstance(e, UsageError):
        e.args = (f"{e} ({note})",)
    elif isinstance(e, KeyboardInterrupt) and note:     # Ctrl-C, SIGTERM
        e.args = (note,)
    return e

