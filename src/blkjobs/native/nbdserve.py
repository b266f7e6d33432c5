"""The NBD export's data path in C (csrc/nbdsrv.c): one :class:`Session`
per client connection in transmission. It reads request headers and sends
READ replies from file descriptors with the GIL released, in its own
threads; Python checks and maps the reads (in batches) and serves every
other request (docs/nbd.md, "The data path in C").
"""
from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from ._lib import Owned, ffi, lib
from .qcow2 import Segments

#: segment kinds (csrc/nbdsrv.h): file bytes (a short read is an error),
#: file bytes read as zeroes past the end of the file, zeroes
DATA, DATA_PAD, ZERO = 0, 1, 2
#: a segment: (kind, fd, host offset, length)
Segment = tuple[int, int, int, int]
#: a request header: (magic, flags, type, handle, offset, length)
Header = tuple[int, int, int, int, int, int]

_BATCH = 256
#: the segment words of a submit are written before they are read
_alloc = ffi.new_allocator(should_clear_after_alloc=False)


def _raise(rc: int) -> None:
    if rc == -errno.ECONNRESET:
        raise EOFError("client closed the connection")
    raise OSError(-rc, os.strerror(-rc))


class Session(Owned):
    """A connection's C data path over socket ``fd`` (not closed here)."""

    def __init__(self, fd: int, structured: bool, workers: int):
        s = lib.bj_nbds_new(fd, int(structured), workers)
        if s == ffi.NULL:
            e = ffi.errno or errno.ENOMEM
            raise OSError(e, os.strerror(e))
        self._s = s
        self._reqs = ffi.new("struct bj_nbds_req[]", _BATCH)
        self._done = ffi.new("uint64_t[]", _BATCH)

    def next(self) -> list[Header]:
        """Request headers (at least one); EOFError at the client's EOF,
        OSError on a socket error."""
        n = lib.bj_nbds_next(self._s, self._reqs, _BATCH)
        if n < 0:
            _raise(n)
        r = self._reqs
        return [(q.magic, q.flags, q.type, q.handle, q.offset, q.length)
                for q in (r[i] for i in range(n))]

    def wait_done(self) -> list[int]:
        """Tokens of finished reads (waits for one); [] once :meth:`stop_done`
        was called and every token was handed out. One thread only."""
        n = lib.bj_nbds_wait_done(self._s, self._done, _BATCH)
        return list(self._done[0:n])

    def stop_done(self) -> None:
        lib.bj_nbds_stop_done(self._s)

    def recv_into(self, buf: bytearray) -> None:
        """The next len(buf) bytes of the stream (a WRITE's payload)."""
        if buf:
            rc = lib.bj_nbds_recv(self._s, ffi.from_buffer(buf), len(buf))
            if rc < 0:
                _raise(rc)

    def submit(self, reqs: Sequence[int], segs: Sequence[Any], wait: bool = True) -> int:
        """Queue reads: ``reqs`` 6 ints each (handle, offset, length, flags,
        token, number of segments), ``segs`` per read its segments: (kind,
        fd, host, length) tuples, or a :class:`.qcow2.Segments` (copied as
        they are, no Python int per segment); then wait until half the
        workers are free: how many are. ``wait=False``: no wait (the last
        reads of a batch: the next batch waits in :meth:`wait_slots`), how
        many are free now, maybe 0."""
        words = 4 * sum(len(s) for s in segs)
        sg = _alloc("uint64_t[]", words)
        pos = 0
        for s in segs:
            if type(s) is Segments:
                p, w = s.words()
                ffi.memmove(sg + pos, p, 8 * w)
            else:
                flat = [x for t in s for x in t]
                w = len(flat)
                sg[pos:pos + w] = flat
            pos += w
        rc = (lib.bj_nbds_submit if wait else lib.bj_nbds_queue)(
            self._s, ffi.new("uint64_t[]", reqs), len(reqs) // 6, sg, words // 4)
        if rc < 0:
            _raise(rc)
        return int(rc)

    def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """One reply, whole, between the C threads' replies."""
        keep = [ffi.from_buffer(p) for p in parts]
        rc = lib.bj_nbds_send(self._s, keep, [len(p) for p in keep], len(keep))
        if rc < 0:
            _raise(rc)

    def wait_slots(self, want: int = 1) -> int:
        """Wait until ``want`` workers are free, or half of them (at least
        one) if fewer; how many are free (submit no more)."""
        return int(lib.bj_nbds_wait_free(self._s, want))

    def wait_idle(self) -> None:
        """Wait until every queued read is finished."""
        lib.bj_nbds_wait_idle(self._s)

    def close(self) -> None:
        s, self._s = getattr(self, "_s", None), None
        if s is not None:
            lib.bj_nbds_free(s)


def pool_idle() -> int:
    """The C workers parked in the process's pool (csrc/nbdsrv.c: a
    session takes its workers there and gives them back when it ends)."""
    return int(lib.bj_nbds_pool_idle())


def pool_trim(keep: int = 0) -> int:
    """End parked C workers until ``keep`` are left; how many are."""
    return int(lib.bj_nbds_pool_trim(keep))
