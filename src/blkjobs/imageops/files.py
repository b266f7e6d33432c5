"""Opening image files with the checks every command needs, so each error
is one clear line (and never a truncated source)."""
from __future__ import annotations

import errno
import os
import stat

from ..errors import OSErrorWithContext, UsageError
from ..formats.cache import open_cached


def open_source(path: str) -> int:
    """Open ``path`` read-only; refuse directories and non-files clearly."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (refused below)
        fd = open_cached(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # -T
    except OSError as e:
        raise OSErrorWithContext(e.errno, "Could not open", path=path) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise OSErrorWithContext(errno.EISDIR, "Could not open", path=path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        os.close(fd)
        raise UsageError(f"Could not open '{path}': not a regular file or block device")
    os.set_blocking(fd, True)
    return fd


def fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def same_file(a: str, b: str) -> bool:
    """True when both paths name one existing file (links and hard links too)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
