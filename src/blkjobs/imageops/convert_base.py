"""What every convert path shares: the options (:class:`ConvertOptions`, the
``qemu-img convert`` flags), the result, their checks, the request sizes, and
:func:`drive`, the loop that keeps the C copy engine fed until it is done
(see :mod:`.convert` for the whole picture)."""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

from ..errors import UsageError
from ..native.copy import CopyEngine, RunResult

WORK_RANGE = 1 << 30           # bytes queued per feed of the engine
RAW_REQUEST = 2 << 20          # engine request size, raw -> raw
# durable raw -> raw copies (write-behind): smaller requests keep the disk busier
WB_REQUEST = 1 << 20
# raw|qcow2|chain -> raw|qcow2: smaller requests measured 5-10% faster on the
# 4 GiB benchmark (page cache, 2 cores): the workers' buffers stay in CPU cache
CHAIN_REQUEST = 512 << 10
MAX_SPARSE_SIZE = 16 << 20


@dataclass
class ConvertOptions:
    sparse_size: int = 4096        # -S: zero detection granularity, 0 = fully allocate
    no_create: bool = False        # -n: the target exists, do not create it
    target_is_zero: bool = False   # --target-is-zero (with -n)
    rate: int = 0                  # -r: bytes/s, 0 = unlimited
    threads: int = 4               # -m: worker threads
    request_size: int | None = None   # bytes per engine request; None = per path default
    flush: bool = True             # fsync the target at the end (-t writeback)
    src_fmt: str | None = None     # -f: probed when None
    dst_fmt: str = "raw"           # -O: raw | qcow2
    compress: bool = False         # -c: compressed qcow2 clusters
    backing: str | None = None     # -B: backing file recorded in the target
    backing_fmt: str | None = None  # -F: its format (probed when None)
    create_opts: dict = field(default_factory=dict)   # -o (qcow2/raw creation options)
    force_share: bool = False      # -U: read a source another process is writing
    snapshot: tuple[str | None, str | None] | str | None = None  # -l: (id, name) or ID-or-name
    salvage: bool = False          # --salvage: unreadable sectors read as zeroes
    #: with --salvage: told (offset, errno) of each sector that could not be read
    on_salvage: Callable[[int, int], None] | None = None
    #: with --salvage: told (offset, errno) of each sector whose block status
    #: could not be read (a source under fault injection: convert_faults)
    on_status_salvage: Callable[[int, int], None] | None = None
    #: qemu-img's -m as given (default 8): its requests in flight, which a
    #: source under fault injection copies as qemu-img would (convert_faults)
    coroutines: int = 8
    #: a failed convert keeps the target, as qemu-img does (invoked as
    #: qemu-img); else a target we created is removed and the error says so
    keep_failed_target: bool = False


@dataclass
class ConvertResult:
    size: int
    data_bytes: int
    zero_bytes: int


def check_options(o: ConvertOptions) -> None:
    if o.sparse_size < 0 or o.sparse_size > MAX_SPARSE_SIZE or o.sparse_size % 512:
        raise UsageError(f"invalid sparse size {o.sparse_size}: must be a multiple of 512 "
                         "up to 16 MiB (0 disables sparse output)")
    if o.target_is_zero and not o.no_create:
        raise UsageError("--target-is-zero requires -n (use an existing target)")
    if o.rate < 0:
        raise UsageError(f"invalid rate limit {o.rate}")
    if not 1 <= o.threads <= 16:
        raise UsageError(f"invalid number of coroutines/threads {o.threads}: must be 1..16")


def drive(eng: CopyEngine, feed: Callable[[], None], more: Callable[[], bool],
          done: Callable[[], int], size: int, low_water: int,
          progress: Callable[[int, int], None] | None,
          check: Callable[[], None] | None) -> None:
    """Run ``eng`` until it is done and ``more()`` is False: ``feed()`` queues
    the next work range (at once, then whenever the queue ran below
    ``low_water`` or a run ended); ``progress(done(), size)`` after each
    wait; ``check()`` (Ctrl-C, SIGTERM) may raise. On any exception the
    engine is cancelled and drained before it propagates."""
    if progress:
        progress(0, size)
    try:
        feed()
        while True:
            res = eng.run(0.1, low_water=low_water if more() else 0)
            if progress:
                progress(done(), size)
            if res == RunResult.DONE and not more():
                break
            if res != RunResult.TIMEOUT:
                feed()
            if check:
                check()
    except BaseException:
        eng.cancel()
        eng.drain()
        raise
