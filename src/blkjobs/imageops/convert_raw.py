"""raw -> raw convert: one C copy engine over the two files, fed one work
range (1 GiB) ahead; holes are found by the engine (SEEK_DATA per range) and
zero blocks become holes (``-S``). See :mod:`.convert`."""
from __future__ import annotations

import errno
import os

from ..errors import CopyError, UsageError
from ..graph.lock import lock_fd, opening
from ..native.copy import COPY, COPY_SPARSE, CopyEngine, CopyStatus
from .convert_base import (RAW_REQUEST, WB_REQUEST, WORK_RANGE, ConvertOptions, ConvertResult,
                           check_options, drive)
from .convert_target import Target
from ..units import sector_size
from .files import fd_size, open_source, same_file

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable


def convert_raw(src: str, dst: str, opts: ConvertOptions | None = None,
                progress: Callable[[int, int], None] | None = None,
                check: Callable[[], None] | None = None) -> ConvertResult:
    """raw -> raw. Raises BlkjobsError subclasses; the source is only read.

    On failure a target created here is removed (and the error says so); an
    existing target (``-n``) is left partially written, and the error says so.
    """
    o = opts or ConvertOptions()
    check_options(o)
    if same_file(src, dst):
        raise UsageError(f"source and target are the same file: '{src}'")
    sfd = open_source(src)
    target = Target(dst, keep=o.keep_failed_target)
    try:
        with opening(src):      # the source: nobody else writes it meanwhile
            lock_fd(sfd, src, force_share=o.force_share)
        size = fd_size(sfd)
        target.lock("raw", o.no_create)
        if o.no_create:
            target.open_existing_raw(size)
        else:
            # QEMU sees the source in whole sectors (units.sector_size): a
            # file of 1000 bytes makes a target of 1024, its tail a hole
            target.create_raw(sector_size(size))
        st = _copy(sfd, target, size, o, src, progress, check)
        if o.flush:
            try:
                os.fsync(target.dfd)
            except OSError as e:
                raise CopyError(e.errno or errno.EIO, "error flushing", path=dst, side="target") from None
        return ConvertResult(size, st.data_bytes, st.zero_bytes)
    except BaseException as e:
        err = target.failed(e, lambda guest: _file_run(sfd, guest))
        if err is not e:
            raise err from None
        raise
    finally:
        os.close(sfd)
        target.close(failed=False)


def _copy(sfd: int, target: Target, size: int, o: ConvertOptions, src: str,
          progress: Callable[[int, int], None] | None,
          check: Callable[[], None] | None) -> CopyStatus:
    """Copy [0, size) of ``sfd`` into the target with the engine."""
    target_zero = target.ours is not None or o.target_is_zero
    bucket = None
    if o.rate:
        from ..native.ratelimit import TokenBucket     # -r only (start-up)
        bucket = TokenBucket(o.rate)
    with CopyEngine(sfd, target.dfd, threads=o.threads,
                    request_size=o.request_size or (WB_REQUEST if o.flush else RAW_REQUEST),
                    zero_block=o.sparse_size, target_is_zero=target_zero,
                    may_unmap=o.sparse_size != 0, bucket=bucket, write_behind=o.flush,
                    # a new file's data extents allocated as they are mapped
                    prealloc=target.sparse_new and o.sparse_size != 0,
                    src_path=src, dst_path=target.dst) as eng:
        kind = COPY_SPARSE if o.sparse_size else COPY
        fed = 0

        def feed() -> None:
            nonlocal fed
            n = min(WORK_RANGE, size - fed)
            if n > 0:
                eng.add([(fed, fed, n, kind)])
                fed += n

        target.written = True
        drive(eng, feed, lambda: fed < size, lambda: eng.status().done, size,
              WORK_RANGE // 2, progress, check)
        return eng.status()


def _file_run(fd: int, guest: int) -> tuple[int, int]:
    """(start, length) of the data or hole run of the source file up to
    ``guest`` (SEEK_DATA/SEEK_HOLE): where qemu-img's requests start."""
    from ..native.extents import extents
    last = extents(fd, 0, guest + 1)[-1]
    return last.offset, last.length
