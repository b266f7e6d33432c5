"""What every convert path shares: the options (:class:`ConvertOptions`, the
``qemu-img convert`` flags), the result, their checks, the request sizes, and
:func:`drive`, the loop that keeps the C copy engine fed until it is done
(see :mod:`.convert` for the whole picture)."""
from __future__ import annotations

from ..native.record import Record
from ..errors import BlkjobsError, UsageError, raise_pending_stop
from ..native.copy import CopyEngine, RunResult

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

WORK_RANGE = 1 << 30           # bytes queued per feed of the engine
RAW_REQUEST = 2 << 20          # engine request size, raw -> raw
# durable raw -> raw copies (write-behind): smaller requests keep the disk busier
WB_REQUEST = 1 << 20
# raw|qcow2|chain -> raw|qcow2: smaller requests measured 5-10% faster on the
# 4 GiB benchmark (page cache, 2 cores): the workers' buffers stay in CPU cache
CHAIN_REQUEST = 512 << 10
MAX_SPARSE_SIZE = 16 << 20


class ConvertOptions:
    """The ``qemu-img convert`` flags. (A plain class, not a dataclass:
    ``dataclasses`` imports ``inspect``, ~8 ms of every raw -> raw convert's
    start-up.)"""

    def __init__(self, *, sparse_size: int = 4096,
                 no_create: bool = False,
                 target_is_zero: bool = False,
                 rate: int = 0,
                 threads: int = 4,
                 request_size: int | None = None,
                 flush: bool = True,
                 src_fmt: str | None = None,
                 dst_fmt: str = "raw",
                 compress: bool = False,
                 backing: str | None = None,
                 backing_fmt: str | None = None,
                 create_opts: dict | None = None,
                 force_share: bool = False,
                 snapshot: tuple[str | None, str | None] | str | None = None,
                 salvage: bool = False,
                 on_salvage: Callable[[int, int], None] | None = None,
                 on_status_salvage: Callable[[int, int], None] | None = None,
                 coroutines: int = 8,
                 keep_failed_target: bool = False):
        self.sparse_size: int = sparse_size  # -S: zero detection granularity, 0 = fully allocate
        self.no_create: bool = no_create  # -n: the target exists, do not create it
        self.target_is_zero: bool = target_is_zero  # --target-is-zero (with -n)
        self.rate: int = rate  # -r: bytes/s, 0 = unlimited
        self.threads: int = threads  # -m: worker threads
        # bytes per engine request; None = per path default
        self.request_size: int | None = request_size
        self.flush: bool = flush  # fsync the target at the end (-t writeback)
        self.src_fmt: str | None = src_fmt  # -f: probed when None
        self.dst_fmt: str = dst_fmt  # -O: raw | qcow2
        self.compress: bool = compress  # -c: compressed qcow2 clusters
        self.backing: str | None = backing  # -B: backing file recorded in the target
        self.backing_fmt: str | None = backing_fmt  # -F: its format (probed when None)
        # -o (qcow2/raw creation options)
        self.create_opts: dict = {} if create_opts is None else create_opts
        self.force_share: bool = force_share  # -U: read a source another process is writing
        # -l: (id, name) or ID-or-name
        self.snapshot: tuple[str | None, str | None] | str | None = snapshot
        self.salvage: bool = salvage  # --salvage: unreadable sectors read as zeroes
        # with --salvage: told (offset, errno) of each sector that could not be read
        self.on_salvage: Callable[[int, int], None] | None = on_salvage
        # with --salvage: told (offset, errno) of each sector whose block status
        # could not be read (a source under fault injection: convert_faults)
        self.on_status_salvage: Callable[[int, int], None] | None = on_status_salvage
        # qemu-img's -m as given (default 8): its requests in flight, which a
        # source under fault injection copies as qemu-img would (convert_faults)
        self.coroutines: int = coroutines
        # a failed convert keeps the target, as qemu-img does (invoked as
        # qemu-img); else a target we created is removed and the error says so
        self.keep_failed_target: bool = keep_failed_target

    def __eq__(self, other: object) -> bool:
        return type(other) is ConvertOptions and vars(self) == vars(other)

    def __repr__(self) -> str:
        return "ConvertOptions(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"


class ConvertResult(Record):
    __slots__ = ("size", "data_bytes", "zero_bytes")

    def __init__(self, size: int, data_bytes: int, zero_bytes: int):
        self.size = size
        self.data_bytes = data_bytes
        self.zero_bytes = zero_bytes


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
            raise_pending_stop()        # a Ctrl-C that a finalizer dropped
    except BaseException:
        eng.cancel()
        eng.drain()
        raise


def encrypted(src: str, dst: str, o: ConvertOptions) -> bool:
    """An encrypted source or target: its bytes move through the drivers'
    ciphers, on the buffer path of :mod:`.convert_nbd` (the C engine copies
    host bytes); with :func:`injects_faults`, what picks the converter
    (:mod:`.convert_entry`)."""
    from ..formats import is_encrypted
    try:
        if is_encrypted(src, o.src_fmt):
            return True
        if o.no_create:
            return is_encrypted(dst, o.dst_fmt)
    except OSError:
        return False            # the converter says what is wrong with the file
    return o.dst_fmt == "luks" or any(k.startswith("encrypt") for k in o.create_opts)


def injects_faults(name: str) -> bool:
    """``name`` is an image name with a ``blkdebug`` layer in it."""
    from ..formats import is_spec
    if not is_spec(name):
        return False
    from ..graph.blockspec import FILTER_DRIVERS, parse     # (a spec only: start-up)
    try:
        layer: Any = parse(name).top
    except BlkjobsError:        # a bad name: opening it says what is wrong
        return False
    while layer is not None:
        if layer.driver in FILTER_DRIVERS:
            return True
        layer = layer.child
    return False
