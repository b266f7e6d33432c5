"""Measured I/O loops (csrc/ioloop.c): sequential or random, read or write,
N threads over one open file, with the GIL released.

:meth:`IOLoop.run` returns a :class:`LoopResult` once the byte or time budget
is spent; it wakes every ``slice_s`` to call ``progress(bytes, ops)`` so the
caller can draw a live line and Ctrl-C is honoured (the loop is cancelled,
its threads joined, and the KeyboardInterrupt propagates).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

from ..errors import UsageError
from ._lib import Owned, ensure, ffi, lib


@dataclass(frozen=True)
class LoopResult:
    bytes: int          # bytes whose requests completed
    ops: int            # requests completed
    elapsed_ns: int     # first request issued .. last completed (+ fsync)
    fsync_ns: int       # part of elapsed_ns spent in the final fsync


def release_buffers() -> None:
    """Free the request buffers that closed loops left for the next one
    (csrc/ioloop.c keeps them, so that the runs of a process use the same
    pages, as one fio process does; up to 256 MiB)."""
    lib.bj_ioloop_release_buffers()


class IOLoop(Owned):
    """One measured loop. Buffers are taken (those a closed loop of the same
    ``bs`` left, else new ones) and touched, and threads started, here,
    outside the timed region; the clock starts in run()."""

    def __init__(self, fd: int, *, write: bool, random: bool, bs: int, size: int,
                 threads: int = 1, nbytes: int = 0, runtime_s: float = 0.0,
                 fsync: bool = True, seed: int = 1, path: str | None = None):
        if threads < 1 or threads > 256:
            raise UsageError(f"invalid number of threads {threads}: must be 1..256")
        if bs < 512 or bs > (1 << 30):
            raise UsageError(f"invalid request size {bs}: must be 512 B..1 GiB")
        if size < bs:
            raise UsageError(f"region of {size} bytes is smaller than one request ({bs})")
        o = ffi.new("struct bj_ioloop_opts *")
        o.fd = fd
        o.write = int(write)
        o.random = int(random)
        o.threads = threads
        o.bs = bs
        o.size = size
        o.bytes = nbytes
        o.runtime_ns = int(runtime_s * 1e9)
        o.fsync_end = int(fsync)
        o.seed = seed & (2**64 - 1)
        self._path = path
        self._wr = bool(write)
        self._b = None
        p = ffi.new("struct bj_ioloop **")
        ensure(lib.bj_ioloop_new(p, o), "bench", path=path)
        self._b = p[0]
        self._r = ffi.new("struct bj_ioloop_result *")

    def result(self) -> LoopResult:
        r = self._r
        lib.bj_ioloop_get_result(self._b, r)
        return LoopResult(int(r.bytes), int(r.ops), int(r.elapsed_ns), int(r.fsync_ns))

    def latency(self) -> tuple[int, ...]:
        """Requests counted per latency bucket (bj_lat_bucket_low() gives the
        bounds, in ns), all threads summed; only once the loop finished."""
        counts = ffi.new("uint64_t[]", int(lib.BJ_LAT_BUCKETS))
        ensure(lib.bj_ioloop_get_latency(self._b, counts), "bench latency", path=self._path)
        return tuple(int(x) for x in ffi.unpack(counts, int(lib.BJ_LAT_BUCKETS)))

    def run(self, progress: Callable[[int, int], None] | None = None,
            slice_s: float = 0.2) -> LoopResult:
        """Run to the end of the budget. Raises OSErrorWithContext (with the
        failing offset) on an I/O error, Cancelled after cancel()."""
        try:
            while True:
                rc = lib.bj_ioloop_run(self._b, max(1, int(slice_s * 1000)))
                if rc == 2:
                    if progress:
                        r = self.result()
                        progress(r.bytes, r.ops)
                    continue
                if rc < 0:
                    lib.bj_ioloop_get_result(self._b, self._r)
                    off = int(self._r.error_offset) if self._r.error else None
                    op = "write" if self._wr else "read"
                    ensure(rc, f"benchmark {op}", path=self._path, side="file" if off is not None
                           else None, offset=off)
                return self.result()
        except BaseException:
            self.cancel()
            lib.bj_ioloop_run(self._b, 60_000)  # wait for in-flight requests
            raise

    def cancel(self) -> None:
        if self._b is not None:
            lib.bj_ioloop_cancel(self._b)

    def close(self) -> None:
        # taken off the object before it is freed: a signal's exception
        # (SIGTERM, Ctrl-C) raised as the free returns must not leave it
        # there for __del__ to free again (a double free seen in CI)
        obj, self._b = self._b, None
        if obj is not None:
            lib.bj_ioloop_free(obj)
