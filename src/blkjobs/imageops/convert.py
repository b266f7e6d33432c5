"""``convert``: copy an image into a new (or existing, ``-n``) image.

Python decides what to copy: it asks the source for its layout one work
range at a time and queues copy / zero items into the C engine, which
moves the bytes (holes stay holes, zero blocks become holes, copy_file_range
when no zero detection is asked for). The engine's queue is fed a work range
ahead so the workers never wait for Python.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import BlkjobsError, CopyError, UsageError
from ..native.copy import COPY, COPY_SPARSE, CopyEngine, RunResult
from ..native.ratelimit import TokenBucket
from .files import fd_size, open_source, same_file

WORK_RANGE = 1 << 30           # bytes queued per feed of the engine
MAX_SPARSE_SIZE = 16 << 20


@dataclass
class ConvertOptions:
    sparse_size: int = 4096        # -S: zero detection granularity, 0 = fully allocate
    no_create: bool = False        # -n: the target exists, do not create it
    target_is_zero: bool = False   # --target-is-zero (with -n)
    rate: int = 0                  # -r: bytes/s, 0 = unlimited
    threads: int = 4               # -m: worker threads
    request_size: int = 2 << 20
    flush: bool = True             # fsync the target at the end (-t writeback)


@dataclass
class ConvertResult:
    size: int
    data_bytes: int
    zero_bytes: int


def _check_options(o: ConvertOptions) -> None:
    if o.sparse_size < 0 or o.sparse_size > MAX_SPARSE_SIZE or o.sparse_size % 512:
        raise UsageError(f"invalid sparse size {o.sparse_size}: must be a multiple of 512 "
                         "up to 16 MiB (0 disables sparse output)")
    if o.target_is_zero and not o.no_create:
        raise UsageError("--target-is-zero requires -n (use an existing target)")
    if o.rate < 0:
        raise UsageError(f"invalid rate limit {o.rate}")
    if not 1 <= o.threads <= 16:
        raise UsageError(f"invalid number of coroutines/threads {o.threads}: must be 1..16")


def convert_raw(src: str, dst: str, opts: ConvertOptions | None = None,
                progress: Callable[[int, int], None] | None = None,
                check: Callable[[], None] | None = None) -> ConvertResult:
    """raw -> raw. Raises BlkjobsError subclasses; the source is only read.

    On failure a target created here is removed (and the error says so); an
    existing target (``-n``) is left partially written, and the error says so.
    """
    o = opts or ConvertOptions()
    _check_options(o)
    if same_file(src, dst):
        raise UsageError(f"source and target are the same file: '{src}'")
    sfd = open_source(src)
    dfd = -1
    created = False
    try:
        size = fd_size(sfd)
        if o.no_create:
            try:
                dfd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CopyError(e.errno, "Could not open target", path=dst) from None
            tsize = fd_size(dfd)
            if tsize < size:
                raise UsageError(f"target '{dst}' is smaller than the source "
                                 f"({tsize} < {size} bytes)")
        else:
            if os.path.isdir(dst):
                raise CopyError(errno.EISDIR, "Could not create target", path=dst)
            try:
                dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise CopyError(e.errno, "Could not create target", path=dst) from None
            created = True
            try:
                os.ftruncate(dfd, size)
            except OSError as e:
                raise CopyError(e.errno, "Could not resize target", path=dst) from None
        target_zero = created or o.target_is_zero
        bucket = TokenBucket(o.rate) if o.rate else None
        with CopyEngine(sfd, dfd, threads=o.threads, request_size=o.request_size,
                        zero_block=o.sparse_size, target_is_zero=target_zero,
                        may_unmap=o.sparse_size != 0, bucket=bucket,
                        src_path=src, dst_path=dst) as eng:
            kind = COPY_SPARSE if o.sparse_size else COPY
            fed = 0

            def feed():
                nonlocal fed
                n = min(WORK_RANGE, size - fed)
                if n > 0:
                    eng.add([(fed, fed, n, kind)])
                    fed += n

            feed()
            if progress:
                progress(0, size)
            try:
                while True:
                    res = eng.run(0.1, low_water=WORK_RANGE // 2 if fed < size else 0)
                    if progress:
                        progress(eng.status().done, size)
                    if res == RunResult.DONE and fed >= size:
                        break
                    if res != RunResult.TIMEOUT:
                        feed()
                    if check:
                        check()
            except BaseException:
                eng.cancel()
                eng.drain()
                raise
            st = eng.status()
        if o.flush:
            try:
                os.fsync(dfd)
            except OSError as e:
                raise CopyError(e.errno, "error flushing", path=dst, side="target") from None
        return ConvertResult(size, st.data_bytes, st.zero_bytes)
    except BaseException as e:
        if dfd >= 0:
            os.close(dfd)
            dfd = -1
        if created:
            try:
                os.unlink(dst)
                note = "the incomplete target was removed"
            except OSError:
                note = "the incomplete target could not be removed"
        else:
            note = "the target was left partially written" if o.no_create else ""
        if isinstance(e, BlkjobsError) and note and not isinstance(e, UsageError):
            e.args = (f"{e} ({note})",)
        raise
    finally:
        os.close(sfd)
        if dfd >= 0:
            os.close(dfd)
