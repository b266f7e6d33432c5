"""Cache modes: qemu-img's ``-t CACHE`` / ``-T SRC_CACHE`` and the daemon's
``cache.direct``, as the open flags of the image files.

=============  ==========  ===========================  ======================
mode           O_DIRECT    each write durable (O_DSYNC)  flush at the end
=============  ==========  ===========================  ======================
writeback      no          no                            yes
unsafe         no          no                            no
none           yes         no                            yes
directsync     yes         yes                           yes
writethrough   no          yes                           yes
=============  ==========  ===========================  ======================

QEMU makes writethrough and directsync durable by flushing after each
write; blkjobs opens the file with O_DSYNC, the same guarantee (each write
is on disk when it returns) without the extra calls. On an O_DIRECT file the
drivers and the copy engine align their requests (``native.dio``).

The flags apply to the files :func:`open_file` and :func:`open_cached`
open (here, not in :mod:`.base`, the driver contract, which re-exports
them: a raw -> raw convert opens its files with them and imports no
driver contract). The CLI sets
them per side (:func:`set_cli_modes`: read-only opens take the source's
mode, writable ones the target's), the daemon per node
(:func:`opening`, a block of opens in one thread).
"""
from __future__ import annotations

import _thread
import errno
import os
import stat

from ..errors import ImageError, NotAnImageFile, UsageError

O_DIRECT = getattr(os, "O_DIRECT", 0)
O_DSYNC = getattr(os, "O_DSYNC", 0)

#: mode -> (extra open flags, flush at the end)
MODES: dict[str, tuple[int, bool]] = {
    "writeback": (0, True),
    "unsafe": (0, False),
    "none": (O_DIRECT, True),
    "off": (O_DIRECT, True),            # qemu-img's other spelling of none
    "directsync": (O_DIRECT | O_DSYNC, True),
    "writethrough": (O_DSYNC, True),
}
CHOICES = ("none", "writeback", "unsafe", "directsync", "writethrough")

#: extra flags of read-only and of writable opens (the CLI's -T and -t)
_cli = {False: 0, True: 0}
_local = _thread._local()   # threading.local, without importing threading (start-up)


def parse(mode: str) -> str:
    """A cache mode as qemu-img spells it, checked (qemu-img's text)."""
    if mode not in MODES:
        raise UsageError(f"Invalid cache option: {mode}")
    return "none" if mode == "off" else mode


def flags(mode: str) -> int:
    return MODES[parse(mode)][0]


def flushes(mode: str) -> bool:
    return MODES[parse(mode)][1]


def set_cli_modes(src: str | None = None, dst: str | None = None) -> None:
    """The CLI's ``-T`` (``src``: files opened read-only) and ``-t``
    (``dst``: files opened for writing); None leaves a side as it is."""
    if src is not None:
        _cli[False] = flags(src)
    if dst is not None:
        _cli[True] = flags(dst)


class opening:     # (lower case: used as a function, ``with opening(extra):``)
    """Files this thread opens in the block take ``extra`` flags (O_DIRECT,
    O_DSYNC), whatever the CLI set: a daemon node's ``cache``. (A class,
    not a contextlib generator: see graph.lock.opening.)"""
    __slots__ = ("extra", "old")

    def __init__(self, extra: int) -> None:
        self.extra = extra
        self.old: int | None = None

    def __enter__(self) -> None:
        self.old = getattr(_local, "extra", None)
        _local.extra = self.extra

    def __exit__(self, tp: object, e: BaseException | None, tb: object) -> None:
        _local.extra = self.old


def extra_flags(writable: bool) -> int:
    """The flags an image file opened now takes beyond its access mode."""
    extra = getattr(_local, "extra", None)
    return _cli[writable] if extra is None else extra


def fd_extra(fd: int) -> int:
    """The cache flags (O_DIRECT, O_DSYNC) an open fd has (-1: none)."""
    if fd < 0:
        return 0
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL) & (O_DIRECT | O_DSYNC)


def reopening(driver) -> opening:
    """Opens in the block take the cache flags ``driver``'s file has now
    (a node reopened read-only or read-write keeps its cache mode)."""
    return opening(fd_extra(driver.fd if driver.host_file else -1))


def open_cached(path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open`` with the cache mode's flags (O_DIRECT, O_DSYNC:
    :func:`extra_flags`) for a read-only or a writable open; a file system that
    refuses O_DIRECT gets QEMU's text (its qemu_open tells that EINVAL
    apart by opening again without O_DIRECT)."""
    extra = extra_flags((flags & os.O_ACCMODE) != os.O_RDONLY)
    try:
        return os.open(path, flags | extra, mode)
    except OSError as e:
        if e.errno == errno.EINVAL and extra & O_DIRECT:
            os.close(os.open(path, flags | (extra & ~O_DIRECT), mode))
            action = "create" if flags & os.O_CREAT else "open"
            raise ImageError(f"Could not {action} '{path}': filesystem does not support "
                             "O_DIRECT") from None
        raise


def open_file(path: str, flags: int = os.O_RDONLY, devices: bool = True) -> int:
    """Open ``path`` for an image driver and return the fd. It is opened
    with O_NONBLOCK (opening a FIFO then cannot hang) and checked with
    fstat on the fd (no race with a rename): a regular file, a block device
    or (``devices``, as qemu-img takes ``/dev/null`` as an image) a
    character device; anything else is refused with one line. Backing files
    pass ``devices=False``: a name in a hostile image must not reach
    ``/dev/tty`` or ``/dev/zero``. The fd is then made blocking. It takes
    the cache mode's flags (:func:`open_cached`); a file
    system that refuses O_DIRECT gets QEMU's text."""
    fd = open_cached(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or (devices and stat.S_ISCHR(mode))):
            what = "Is a directory" if stat.S_ISDIR(mode) else "not a regular file or block device"
            raise NotAnImageFile(f"Could not open '{path}': {what}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
