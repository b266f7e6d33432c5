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
#: a READ's flags word: its files cannot change until the client has read
#: the reply (BJ_NBDS_STABLE: it may be sent zero-copy)
STABLE = 1 << 32
#: a segment: (kind, fd, host offset, length)
Segment = tuple[int, int, int, int]
#: a request header: (magic, flags, type, handle, offset, length)
Header = tuple[int, int, int, int, int, int]

_BATCH = 256
#: :meth:`Session.drain` returns at most this many tokens a call: fewer,
#: and none is left
DRAIN_BATCH = _BATCH
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
        # (written by C before they are read: not cleared)
        self._reqs = _alloc("struct bj_nbds_req[]", _BATCH)
        self._done = _alloc("uint64_t[]", _BATCH)

    def next(self) -> list[Header]:
        """Request headers (at least one); EOFError at the client's EOF,
        OSError on a socket error."""
        n = lib.bj_nbds_next(self._s, self._reqs, _BATCH)
        if n < 0:
            _raise(n)
        r = self._reqs
        return [(q.magic, q.flags, q.type, q.handle, q.offset, q.length)
                for q in (r[i] for i in range(n))]

    def make_global(self) -> None:
        """Its tokens go to the process's reaper (:func:`reap`), before
        the first submit."""
        lib.bj_nbds_global(self._s)

    @property
    def key(self) -> int:
        """The session as :func:`reap` names it."""
        return int(ffi.cast("uintptr_t", self._s))

    def drain(self) -> list[int]:
        """At the session's end (after :meth:`wait_idle`): stop its
        threads, wait for the reaper's batch holding tokens of it, and
        return its tokens not taken yet (call again while it returns
        :data:`DRAIN_BATCH` of them)."""
        n = lib.bj_nbds_drain(self._s, self._done, _BATCH)
        return list(self._done[0:n])

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

    def serve_one(self, req: Sequence[int], segs: Any) -> int | None:
        """Serve one read or block status (``req``: its 6 ints, ``segs``: its
        segments, as :meth:`submit` takes them) in this thread, the GIL
        released: its token once the reply is out -- the caller ends it --
        or None when a wait for the socket handed it to the reaper."""
        if type(segs) is Segments:
            p, w = segs.words()
            sg = _alloc("uint64_t[]", w)
            ffi.memmove(sg, p, 8 * w)
        else:
            flat = [x for t in segs for x in t]
            w = len(flat)
            sg = ffi.new("uint64_t[]", flat)
        tok = self._done     # (its first word: drain uses it too, in this thread)
        rc = lib.bj_nbds_serve_one(self._s, ffi.new("uint64_t[]", req), sg, w // 4, tok)
        if rc < 0:
            _raise(rc)
        return int(tok[0]) if rc else None

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

    def zc_busy(self) -> bool:
        """Stable reads are queued or being sent, or the socket holds bytes
        the client has not read (csrc/nbdsrv.h, bj_nbds_zc_busy)."""
        rc = lib.bj_nbds_zc_busy(self._s)
        return rc > 0       # (an error: the socket is gone, and its bytes with it)

    def zc_revoke(self) -> None:
        """No zero-copy send any more on this session."""
        lib.bj_nbds_zc_revoke(self._s)

    def zc_stats(self) -> tuple[int, int]:
        """(data bytes, reads) sent zero-copy."""
        out = ffi.new("uint64_t[2]")
        lib.bj_nbds_zc_stats(self._s, out)
        return int(out[0]), int(out[1])

    def wait_idle(self) -> None:
        """Wait until every queued read is finished."""
        lib.bj_nbds_wait_idle(self._s)

    def close(self) -> None:
        s, self._s = getattr(self, "_s", None), None
        if s is not None:
            lib.bj_nbds_free(s)


_reap_keys = ffi.new("uint64_t[]", _BATCH)
_reap_counts = ffi.new("uint32_t[]", _BATCH)
_reap_done = ffi.new("uint64_t[]", _BATCH)


def reap() -> list[tuple[int, list[int]]]:
    """The process's reaper (one thread): per session (its key) the tokens
    of reads done in the sessions made global -- waits for some; [] once
    :func:`reap_stop` was called. Then :func:`reaped`, always."""
    runs = lib.bj_nbds_reap(_reap_keys, _reap_counts, _reap_done, _BATCH)
    out = []
    pos = 0
    for i in range(runs):
        k = _reap_counts[i]
        out.append((int(_reap_keys[i]), ffi.unpack(_reap_done + pos, k)))
        pos += k
    return out


def reaped() -> None:
    """The reads :func:`reap` returned last are ended (a session's
    ``drain`` waits for it)."""
    lib.bj_nbds_reaped()


def reap_stop(stop: bool = True) -> None:
    lib.bj_nbds_reap_stop(int(stop))


def outq(fd: int) -> int:
    """The bytes socket ``fd`` holds that its peer has not read
    (SIOCOUTQ); 0 on an error (a socket gone holds nothing)."""
    return max(0, int(lib.bj_nbds_outq(fd)))


def pool_idle() -> int:
    """The C workers parked in the process's pool (csrc/nbdsrv.c: a
    session takes its workers there and gives them back when it ends)."""
    return int(lib.bj_nbds_pool_idle())


def pool_trim(keep: int = 0) -> int:
    """End parked C workers until ``keep`` are left; how many are."""
    return int(lib.bj_nbds_pool_trim(keep))


#: bj_nbdh_step's results (csrc/nbdsrv.h)
HS_OPTION, HS_GO, HS_HANGUP, HS_INFO = 0, 1, 2, 3
#: struct bj_nbdh's state bits
HS_NO_ZEROES, HS_STRUCTURED, HS_BASE_ALLOC = 2, 4, 8


def set_timeouts(fd: int, seconds: float) -> None:
    """The handshake's limit on each receive and send of socket ``fd``
    (SO_RCVTIMEO, SO_SNDTIMEO; 0: none) in one call."""
    rc = lib.bj_nbdh_timeouts(fd, int(seconds * 1e6))
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


class ExportNames:
    """The exports' names as bj_nbdh_step takes them: per (name, has
    dirty-bitmap contexts), a 4-byte big-endian length, the name's bytes,
    a flags byte -- made once when the exports change, not per
    connection."""

    def __init__(self, exports: Sequence[tuple[str, bool]] = ()):
        #: the names the C handshake's indices refer to
        self.names = tuple(n for n, _ in exports)
        out = bytearray()
        for n, bitmaps in exports:
            b = n.encode()
            out += len(b).to_bytes(4, "big") + b + (b"\1" if bitmaps else b"\0")
        self._blob = bytes(out)
        self.c = ffi.from_buffer(self._blob)
        self.len = len(self._blob)


class Handshake:
    """The handshake's common options answered in C (csrc/nbdsrv.c
    ``bj_nbdh_step``) over socket ``fd``, reading into ``buf`` (the
    connection's read-ahead buffer: bytes ``[rpos, rlen)`` not taken)."""

    def __init__(self, fd: int, buf: bytearray, names: ExportNames):
        #: the exports' names the indices refer to
        self.names = names.names
        self._fd = fd
        self._h = ffi.new("struct bj_nbdh *")
        self._h.ctx_export = -1
        self._buf = ffi.from_buffer(buf)
        self._cap = len(buf)
        self._names = names.c
        self._nlen = names.len

    def step(self, rpos: int, rlen: int, structured: bool) -> tuple[int, int, int]:
        """Greet (the first call) and answer options until GO or one the
        caller must answer: (HS_*, rpos, rlen) -- EOFError at the client's
        EOF, OSError on a socket error or time-out. ``structured``: the
        connection negotiated structured replies (maybe in Python)."""
        h = self._h
        h.rpos, h.rlen = rpos, rlen
        h.state = h.state & ~HS_STRUCTURED | (HS_STRUCTURED if structured else 0)
        rc = lib.bj_nbdh_step(self._fd, h, self._buf, self._cap, self._names, self._nlen)
        if rc < 0:
            _raise(rc)
        return rc, h.rpos, h.rlen

    @property
    def state(self) -> int:
        return int(self._h.state)

    def take_ctx_export(self) -> int:
        """Index in the names of the export a SET_META_CONTEXT of
        base:allocation answered since the last call was for (-1: none)."""
        e = int(self._h.ctx_export)
        self._h.ctx_export = -1
        return e

    @property
    def go(self) -> tuple[int, int]:
        """The GO or INFO returned: (index of the export in the names,
        info types asked as bits)."""
        return int(self._h.go_export), int(self._h.go_info)
