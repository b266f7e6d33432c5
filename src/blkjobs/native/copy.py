"""The C copy engine (csrc/copy.c): worker threads moving queued ranges.

Python decides *what* to copy (ranges, kinds); C moves the bytes with the
GIL released. :meth:`CopyEngine.run` returns at least every ``timeout``
seconds so callers can report progress and honour pause/cancel.
"""
from __future__ import annotations

import struct

from .record import Record
from ..errors import Cancelled, CopyError, UsageError
from ._lib import Owned, ensure, ffi, lib

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .ratelimit import TokenBucket

COPY = 0
ZERO = 1
COPY_SPARSE = 2

_SIDES = {0: None, 1: "source", 2: "target"}
#: struct bj_range (copy.h), packed in Python: a batch of a thousand items
#: costs one pack_into each, not five cffi field stores
_RANGE = struct.Struct("=QQQIi")
assert _RANGE.size == ffi.sizeof("struct bj_range")


class RunResult(int):
    """What :meth:`CopyEngine.run` returns: one of the ints below. Not an
    ``enum.IntEnum``: building the enum class is ~1 M instructions of every
    convert's start-up, and nothing reads a member's name."""
    __slots__ = ()

    DONE = 0        # everything queued is done
    NEED_MORE = 1   # below the low-water mark: queue more work
    TIMEOUT = 2     # time slice over; workers keep going


class CopyStatus(Record):
    """The engine's counters (``bj_copy_status``). A plain class, not a
    dataclass: ``dataclasses`` imports ``inspect``, ~8 ms of every raw -> raw
    convert's start-up."""
    __slots__ = ("done", "queued", "data_bytes", "zero_bytes", "error", "error_side",
                 "error_offset", "in_flight", "throttled", "requests")

    def __init__(self, done: int, queued: int, data_bytes: int, zero_bytes: int, error: int,
                 error_side: str | None, error_offset: int, in_flight: int,
                 throttled: int = 0, requests: int = 0):
        self.done = done
        self.queued = queued
        self.data_bytes = data_bytes
        self.zero_bytes = zero_bytes
        self.error = error
        self.error_side = error_side
        self.error_offset = error_offset
        self.in_flight = in_flight
        self.throttled = throttled      # of in_flight: waiting in the rate limiter
        self.requests = requests        # requests completed (adjacent items merge into one)


class CopyEngine(Owned):
    """Copies byte ranges from ``src_fd`` to ``dst_fd``.

    ``zero_block``: zero-detection granularity (bytes, blocks aligned to
    target offsets; 0 disables it
    and allows copy_file_range). ``target_is_zero``: the target already
    reads as zero, so zero runs are skipped instead of written.
    ``write_behind``: start writeback of each request as soon as it is
    written, so the final fsync of a durable copy has little left to do.
    ``prealloc``: the target (a buffered regular file reading as zero) gets
    the ranges of COPY items allocated as they are queued, and zero runs
    found in their data punched out again: its serial buffered writes then
    skip the file system's per-block delayed allocation.
    """

    def __init__(self, src_fd: int, dst_fd: int, *, threads: int = 4,
                 request_size: int = 2 << 20, max_in_flight: int = 64 << 20,
                 zero_block: int = 4096, target_is_zero: bool = False,
                 may_unmap: bool = True, allow_copy_range: bool = True,
                 write_behind: bool = False, prealloc: bool = False,
                 bucket: TokenBucket | None = None,
                 src_path: str | None = None, dst_path: str | None = None):
        if threads < 1 or threads > 256:
            raise UsageError(f"invalid number of threads {threads}: must be 1..256")
        if request_size < 512 or request_size > (1 << 30):
            raise UsageError(f"invalid request size {request_size}: must be 512 B..1 GiB")
        if zero_block < 0:
            raise UsageError(f"invalid zero block size {zero_block}")
        o = ffi.new("struct bj_copy_opts *")
        o.src_fd = src_fd
        o.dst_fd = dst_fd
        o.threads = threads
        o.request_size = request_size
        o.max_in_flight = max_in_flight
        o.zero_block = zero_block
        o.target_is_zero = int(target_is_zero)
        o.may_unmap = int(may_unmap)
        o.allow_copy_range = int(allow_copy_range)
        o.write_behind = int(write_behind)
        o.prealloc = int(prealloc)
        self._bucket = bucket  # keep it alive as long as the engine
        o.bucket = bucket._cptr() if bucket is not None else ffi.NULL
        p = ffi.new("struct bj_copy **")
        ensure(lib.bj_copy_new(p, o), "copy engine")
        self._c = p[0]
        self._paths = {"source": src_path, "target": dst_path}
        self._st = ffi.new("struct bj_copy_status *")

    # -- queueing --------------------------------------------------------
    def add(self, ranges: Iterable[tuple]) -> None:
        """Queue (src_off, dst_off, length, kind[, src_fd]) tuples, kind in
        COPY, ZERO, COPY_SPARSE; src_fd defaults to the engine's source. An
        item continuing the queue's last one in both files (same kind and
        source file) merges into it (one request for adjacent clusters)."""
        rs = list(ranges)
        if not rs:
            return
        size, pack = _RANGE.size, _RANGE.pack_into
        buf = bytearray(size * len(rs))
        pos = 0
        for r in rs:
            try:
                pack(buf, pos, *r) if len(r) > 4 else pack(buf, pos, *r, -1)
            except struct.error:
                s, d, n = r[:3]
                raise UsageError(f"invalid range ({s}, {d}, {n})") from None
            pos += size
        arr = ffi.from_buffer("struct bj_range[]", buf)
        ensure(lib.bj_copy_add(self._c, arr, len(rs)), "copy engine")

    def add_copy(self, src_off: int, dst_off: int, length: int, sparse: bool = False,
                 src_fd: int = -1) -> None:
        self.add([(src_off, dst_off, length, COPY_SPARSE if sparse else COPY, src_fd)])

    # -- running ---------------------------------------------------------
    def run(self, timeout: float = 0.1, low_water: int = 0) -> int:
        """Let the workers run for up to ``timeout`` s. Raises CopyError
        (side, offset, errno) or Cancelled."""
        rc = lib.bj_copy_run(self._c, max(0, int(timeout * 1000)), low_water)
        if rc < 0:
            self._raise(rc)
        return rc         # a RunResult

    def _raise(self, rc: int):
        st = self.status()
        if st.error == 0 or abs(st.error) == 125:  # ECANCELED
            raise Cancelled()
        side = st.error_side
        what = "error reading" if side == "source" else "error writing"
        raise CopyError(st.error, what, path=self._paths.get(side or ""), side=side,
                        offset=st.error_offset)

    def drain(self) -> None:
        """Stop claiming work and wait until nothing is in flight."""
        lib.bj_copy_drain(self._c)

    def cancel(self) -> None:
        lib.bj_copy_cancel(self._c)

    def status(self) -> CopyStatus:
        st = self._st
        lib.bj_copy_get_status(self._c, st)
        return CopyStatus(int(st.done), int(st.queued), int(st.data_bytes),
                          int(st.zero_bytes), int(st.error), _SIDES.get(st.error_side),
                          int(st.error_offset), int(st.in_flight), int(st.throttled),
                          int(st.requests))

    def run_to_end(self, progress: Callable[[int, int], None] | None = None,
                   slice_s: float = 0.1, check: Callable[[], None] | None = None) -> CopyStatus:
        """Run until everything queued is done, calling ``progress(done,
        queued)`` and ``check()`` (which may raise to stop) every slice."""
        try:
            while True:
                res = self.run(slice_s)
                if progress:
                    st = self.status()
                    progress(st.done, st.queued)
                if res == RunResult.DONE:
                    return self.status()
                if check:
                    check()
        except BaseException:
            self.cancel()
            self.drain()
            raise

    def close(self) -> None:
        # taken off the object before it is freed: a signal's exception
        # (SIGTERM, Ctrl-C) raised as the free returns must not leave it
        # there for __del__ to free again (a double free seen in CI)
        obj, self._c = self._c, None
        if obj is not None:
            lib.bj_copy_free(obj)
