"""The transmission phase with its data path in C (docs/nbd.md, "The data
path in C"): a :class:`~blkjobs.native.nbdserve.Session` reads the request
headers and serves READs from file descriptors with the GIL released; this
module decides, per batch of headers, what goes where.

* A READ that passes the checks (:func:`.transmission._check`'s) is mapped by
  the backend's ``plan_reads`` -- several in one hold of its lock, each
  tracked and pinned as an ordinary read is -- and handed to the session's
  threads, which ``pread`` its segments and send its reply (simple, or
  structured: OFFSET_DATA, and OFFSET_HOLE for zero runs and a raw file's
  holes unless the client set DF) as soon as it is ready, so replies go
  out of order.
* A BLOCK_STATUS when ``base:allocation`` is the only meta context is
  mapped the same way (a read of its range) and the session's threads
  send its extents (a raw file's holes found with SEEK_DATA/SEEK_HOLE).
* Everything else -- a READ or BLOCK_STATUS the backend cannot map to
  files (compressed clusters, encryption, blkdebug...), a request that
  fails its checks, a block status with dirty-bitmap contexts, WRITE,
  FLUSH, TRIM, WRITE_ZEROES, CACHE -- goes to the connection's Python
  workers as before (:class:`.transmission._Workers`, started with the
  first such request), whose replies are sent through the session (one
  send lock for both).
* No more reads are planned than the session has free workers
  (``wait_slots``, and what ``submit`` returns), so a planned read is read at once: none stays tracked
  behind workers stuck sending to a client that does not read.
* The process's reaper thread (one for every session: :func:`_reap`)
  ends the tracking of the reads read (``end_reads``), before their
  replies go out: the reader cannot, as it may wait for a free Python
  worker while that worker's write waits for such a read. At the
  session's end its thread ends those the reaper has not taken
  (``Session.drain``).

On ``DISC``, EOF or a bad magic the requests being served are finished
(their replies sent) before the connection closes, as on the Python path.

Zero-copy (docs/nbd.md, "Zero-copy reads"): on a UNIX socket, a batch's
READs are flagged stable when the backend registers the session as a
zero-copy reader of the export's nodes (``zero_copy``: none of them may
change now, and a grant that could change one first calls
:meth:`_ZeroCopy.stop`); the C threads then send their cached file bytes
with sendfile.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any, Protocol

from ..native import nbdserve
from ..native.nbdserve import ZERO, Session
from . import proto as P
from .handshake import Connection, Export
from . import transmission
from .transmission import _Workers

log = logging.getLogger(__name__)

#: the session's threads per Python worker: reads are planned in chunks of
#: the free ones (half of them at least), so more threads, larger chunks
C_WORKERS = 2
#: at most (csrc/nbdsrv.c's MAX_WORKERS)
MAX_THREADS = 64
#: a batch of one READ at most this long, or of one BLOCK_STATUS, is
#: served by the connection's thread (``Session.serve_one``: no worker
#: and no reaper woken); a longer read goes to the workers, so the next
#: headers are read while it is (docs/nbd.md, "The data path in C")
INLINE_MAX = 64 << 10
#: the flags a READ may carry (transmission._FLAGS)
_READ_FLAGS = P.CMD_FLAG_DF | P.CMD_FLAG_FUA
#: how long a grant that could change an exported node's files waits for
#: the clients to read the replies sent zero-copy from them before it
#: fails (docs/nbd.md, "Zero-copy reads")
ZC_WAIT = 30.0
_stats_lock = threading.Lock()


class FastBackend(Protocol):
    """What a backend offers for the C path (besides the Backend methods)."""

    def plan_reads(self, reqs: list[tuple[int, int]]) -> list[Any]:
        """Per (offset, length): ``(segments, token)`` -- segments as
        ``(kind, fd, host offset, length)``, kinds as in
        :mod:`blkjobs.native.nbdserve` -- or None (read it with readinto)."""
        ...

    def end_reads(self, tokens: list[Any]) -> None:
        """Those reads are done (sent or dropped)."""
        ...


def usable(conn: Connection, exp: Export) -> bool:
    """The C path serves this connection: the backend can map reads to
    files, the socket is plain (not TLS), requests are served concurrently
    (``workers`` > 1), no request was read with the handshake (a client
    that did not wait for the reply to its NBD_OPT_GO: those bytes are in
    the connection's buffer, not the socket's), and ``BLKJOBS_NBD_C=0`` is
    not set."""
    return (hasattr(exp.backend, "plan_reads") and not conn.tls_done
            and not conn.buffered()
            and conn.server.workers > 1 and conn.c_path)


def serve(conn: Connection, exp: Export) -> None:
    """Requests until DISC or EOF (raised as EOFError/OSError)."""
    try:
        sess = Session(conn.sock.fileno(), conn.structured,
                       min(MAX_THREADS, C_WORKERS * conn.server.workers))
    except OSError as e:        # no memory or threads for it: the Python path
        log.warning("NBD: serving a client without the C data path: %s", e)
        transmission.serve(conn, exp)
        return
    _reaper_running()
    side = _Side(conn, exp, sess)
    conn.sender = sess
    zc = None
    if (conn.sock.family == socket.AF_UNIX and hasattr(exp.backend, "zero_copy")
            and os.environ.get("BLKJOBS_NBD_ZEROCOPY", "1") != "0"):
        zc = _ZeroCopy(exp, sess)
    try:
        _loop(conn, exp, sess, side, zc)
    finally:
        side.close()
        conn.sender = None
        # every reply is out: the client sees the end now (after a DISC it
        # waits for it), not after the session is freed
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        if zc is not None:
            zc.detach(conn.sock)
        sess.close()


class _ZeroCopy:
    """A session as a zero-copy reader of the export's nodes
    (``graph.perm.add_zero_copy_reader``): ``stop`` (a grant that could change
    one of them) ends its zero-copy sends for good and waits until the
    client has read every byte sent (the stable reads sent, the socket's
    unread bytes zero: SIOCOUTQ), at most :data:`ZC_WAIT`. After the
    session (:meth:`detach`) it stays registered, watching a duplicate of
    the socket, while the client has not read everything."""

    def __init__(self, exp: Export, sess: Session):
        self.exp = exp
        #: the nodes it is registered on (added by the backend)
        self.nodes: set[Any] = set()
        self.revoked = False
        #: a batch's reads were flagged stable (else nothing was sent
        #: zero-copy: :meth:`detach` has no counters to take, no socket to watch)
        self.granted = False
        self._sess: Session | None = sess
        self._fd = -1
        self._lock = threading.Lock()

    def stable(self) -> bool:
        """The reads planned now may go out zero-copy."""
        if self.revoked or not self.exp.backend.zero_copy(self):
            return False
        self.granted = True
        return True

    def _busy(self) -> bool:
        with self._lock:
            if self._sess is not None:
                return self._sess.zc_busy()
            return self._fd >= 0 and nbdserve.outq(self._fd) > 0

    def stop(self) -> str | None:
        """No more zero-copy sends; None once what was sent is read, else
        why the grant must fail."""
        with self._lock:
            self.revoked = True
            if self._sess is not None:
                self._sess.zc_revoke()
        deadline = time.monotonic() + ZC_WAIT
        pause = 0.001
        # (management operations, rare: polling the socket is enough)
        while self._busy():
            if time.monotonic() >= deadline:
                return (f"a client of NBD export '{self.exp.name}' has not read, for "
                        f"{ZC_WAIT:g} s, replies sent from the node's files without "
                        "copying; try again once it reads, or disconnect it")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        if self._sess is None:
            self._retire()
        return None

    def detach(self, sock: socket.socket) -> None:
        """The session ends: its counters go to the export; unread bytes
        left in the socket are watched on a duplicate of it, else the
        reader is dropped."""
        sess = self._sess
        if sess is None:
            return
        if not self.granted:        # (sessions without reads: a C call and a lock less)
            with self._lock:
                self._sess = None
            self._retire()
            return
        nbytes, nreads = sess.zc_stats()
        with _stats_lock:
            self.exp.zero_copy_bytes += nbytes
            self.exp.zero_copy_reads += nreads
        keep = False
        with self._lock:
            self._sess = None
            if nbytes and nbdserve.outq(sock.fileno()) > 0:
                with contextlib.suppress(OSError):
                    self._fd = os.dup(sock.fileno())
                    keep = True
        if not keep:
            self._retire()

    def _retire(self) -> None:
        if self._fd < 0 and not self.nodes:
            return          # (never registered, nothing watched)
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        for n in list(self.nodes):
            self.exp.backend.drop_zero_copy(n, self)


class _Side:
    """The connection's Python side: its workers
    (:class:`.transmission._Workers`, started with the first request not
    for C: a client whose requests all go to C -- nbdcopy's reads and
    block status -- costs no Python thread), and its reads in C, whose
    tracking the process's reaper ends (:func:`_reap`)."""

    def __init__(self, conn: Connection, exp: Export, sess: Session):
        self.conn, self.exp, self.sess = conn, exp, sess
        self.tokens: dict[int, Any] = {}
        self.pool: _Workers | None = None
        sess.make_global()
        self.key = sess.key
        _sides[self.key] = self

    def submit(self, req: tuple[int, int, int, int, int, bytearray | None]) -> None:
        if self.pool is None:
            self.pool = _Workers(self.conn, self.exp, self.conn.server.workers)
        self.pool.submit(req)

    def close(self) -> None:
        """Finish what was handed out (the Python workers' requests, the
        reads in C) and end the tracking of the reads the reaper has not
        taken."""
        try:
            if self.pool is not None:
                self.pool.close()
            self.sess.wait_idle()
            while True:     # (fewer than a batch: none left -- no call more to see it)
                done = self.sess.drain()
                if done:
                    _end(self, done)
                if len(done) < nbdserve.DRAIN_BATCH:
                    break
        finally:
            del _sides[self.key]


#: the sessions whose reads the process's reaper ends, by their key
_sides: dict[int, _Side] = {}
_reaper_lock = threading.Lock()
_reaper: threading.Thread | None = None


def _reaper_running() -> None:
    """The process's reaper runs (started with the first session: one
    thread for all, not one per session)."""
    global _reaper
    if _reaper is None:
        with _reaper_lock:
            if _reaper is None:
                t = threading.Thread(target=_reap, name="nbd-reaper", daemon=True)
                t.start()
                _reaper = t


def _reap() -> None:
    """The process's reaper: ends the tracking of the reads the C threads
    of every session have read (bj_nbds_reap), before their replies go
    out -- the reader cannot: it may wait for a free Python worker while
    that worker's write waits for such a read."""
    while True:
        got = nbdserve.reap()
        try:
            if not got:
                return
            for key, done in got:   # (per session: no Python step per token)
                side = _sides.get(key)
                if side is not None:        # (always: its drain waits for this batch)
                    _end(side, done)
        except Exception:       # a bug: log it, keep reaping
            log.exception("NBD: reaping failed")
        finally:
            nbdserve.reaped()


def _end(side: _Side, done: list[int]) -> None:
    try:
        # (a read wholly in the padding past the backend's end has no token)
        toks = side.tokens
        side.exp.backend.end_reads([toks.pop(t) for t in done if t in toks])
    except Exception:       # a bug: log it, keep ending the others
        log.exception("NBD: ending reads failed")


def _loop(conn: Connection, exp: Export, sess: Session, side: _Side,
          zc: _ZeroCopy | None) -> None:
    serial = 0
    while not conn.closing:
        reads: list[tuple[int, int, int, int]] = []
        status: list[tuple[int, int, int, int]] = []
        other: list[tuple[int, int, int, int, int, bytearray | None]] = []
        stop = False
        hdrs = sess.next()
        if hdrs[0][2] == P.CMD_DISC and hdrs[0][0] == P.REQUEST_MAGIC:
            return      # (a batch of DISC alone: the end of most sessions)
        # the backend's size (a raw file's: an fstat) once a batch, once
        # its headers are in; the export's is it rounded up to a sector:
        # see _submit
        bsize = exp.backend.size
        size = -(-bsize // P.SECTOR) * P.SECTOR
        alloc = _allocation_context(conn)
        for magic, flags, cmd, handle, offset, length in hdrs:
            if magic != P.REQUEST_MAGIC or cmd == P.CMD_DISC:
                stop = True
                break
            if (cmd == P.CMD_READ and length and not flags & ~_READ_FLAGS
                    and length <= P.MAX_BUFFER_SIZE and offset + length <= size
                    and (conn.structured or not flags & P.CMD_FLAG_DF)):
                reads.append((flags, handle, offset, length))
                continue
            if (cmd == P.CMD_BLOCK_STATUS and alloc and length and offset + length <= size
                    and not flags & ~P.CMD_FLAG_REQ_ONE):
                # base:allocation alone: the C threads answer from the mapping
                status.append((flags | P.CMD_BLOCK_STATUS << 16 | alloc << 32, handle, offset,
                               length))
                continue
            # anything else, a READ failing _check's tests included (a
            # Python worker sends its error)
            data = None
            if cmd == P.CMD_WRITE:
                if length > P.MAX_BUFFER_SIZE:
                    stop = True     # too large to skip: the connection ends
                    break
                data = bytearray(length)
                sess.recv_into(data)
            # at once (a BLOCK_STATUS the client waits for before its next
            # reads must not wait for this batch's reads); no read of this
            # batch is planned yet, and those planned before are in C
            side.submit((flags, cmd, handle, offset, length, data))
        # block status first: a client waits for it before the reads it
        # plans (nbdcopy asks for the next range while reads of the last
        # are in flight), the reads before it in the batch need not wait
        reads = status + reads
        # (before the planning: a grant after it stops the session first)
        stable = zc is not None and len(reads) > len(status) and zc.stable()
        if len(reads) == 1 and (status or reads[0][3] <= INLINE_MAX):
            # one request (a client waiting for each reply): served here
            serial, _ = _submit(sess, exp, bsize, reads, side.tokens, serial, other, 1,
                                stable=stable, here=True)
            for req in other:
                side.submit(req)
            other.clear()
            if stop:
                return
            continue
        # (free workers for the whole batch, or half of them: fewer, larger
        # chunks -- each is one planning and one submit)
        i, free = 0, sess.wait_slots(len(reads)) if reads else 0
        while i < len(reads):       # no more planned than free workers read at once
            chunk = reads[i:i + free]
            i += free
            # (the batch's last chunk: no wait for free workers -- the next
            # batch waits in wait_slots before it plans -- a wake-up less)
            serial, free = _submit(sess, exp, bsize, chunk, side.tokens, serial, other, free,
                                   i < len(reads), stable)
            for req in other:       # after the chunk is in C: a worker's write may wait for it
                side.submit(req)
            other.clear()
        if stop:
            return


def _allocation_context(conn: Connection) -> int:
    """The id of ``base:allocation`` when it is the connection's only meta
    context (0: block status stays Python's: none negotiated, or dirty
    bitmaps with it)."""
    if conn.structured and conn.contexts == [P.CONTEXT_BASE_ALLOCATION]:
        return 1
    return 0


def _submit(sess: Session, exp: Export, bsize: int, reads: list[tuple[int, int, int, int]],
            tokens: dict[int, Any], serial: int,
            other: list[tuple[int, int, int, int, int, bytearray | None]],
            free: int, wait: bool = True, stable: bool = False,
            here: bool = False) -> tuple[int, int]:
    """Plan and queue ``reads`` (at most ``free``; ``bsize``: the backend's
    size when they were checked); (last token, free workers now: once half
    are, or without ``wait`` at once). ``stable``: the READs may be sent
    zero-copy. ``here``: one read, served in this thread and its tracking
    ended here (unless a wait for the client handed it to the reaper)."""
    be: Any = exp.backend
    inside = [(off, min(n, bsize - off)) for _, _, off, n in reads if off < bsize]
    plans = be.plan_reads(inside) if inside else []
    if len(inside) < len(reads) or any(off + n > bsize for _, _, off, n in reads):
        plans = _pad(reads, plans, bsize)
    rq: list[int] = []
    sg: list[Any] = []          # per read its segments (tuples, or the C mapper's)
    mine: list[int] = []
    for (flags, handle, off, n), pl in zip(reads, plans, strict=True):
        if pl is None:      # (a block status's command is in bits 16-31 of its flags)
            other.append((flags & 0xFFFF, flags >> 16 & 0xFFFF, handle, off, n, None))
            continue
        segs, tok = pl
        serial += 1
        if tok is not None:
            tokens[serial] = tok
        mine.append(serial)
        if stable and not flags >> 16:     # (a READ: command 0)
            flags |= nbdserve.STABLE
        rq += (handle, off, n, flags, serial, len(segs))
        sg.append(segs)
    if rq:
        try:
            if here:
                t = sess.serve_one(rq, sg[0])
                if t is not None and t in tokens:
                    be.end_reads([tokens.pop(t)])
            else:
                free = sess.submit(rq, sg, wait)
        except BaseException:
            be.end_reads([tokens.pop(t) for t in mine if t in tokens])
            raise
    return serial, free


def _pad(reads: list[tuple[int, int, int, int]], plans: list[Any],
         bsize: int) -> list[Any]:
    """The plans of ``reads`` from those of their parts inside the backend
    (``plans``, in order): the padding of the export's last sector past the
    backend's end (server.Export.size) is a zero segment -- a hole in a
    structured reply and in block status, as qemu-nbd answers there. A read
    wholly in it has no token (nothing tracked)."""
    it = iter(plans)
    out: list[Any] = []
    for _, _, off, n in reads:
        if off >= bsize:
            out.append(([(ZERO, 0, 0, n)], None))
            continue
        pl = next(it)
        if pl is not None and off + n > bsize:
            segs, tok = pl
            pl = (list(segs) + [(ZERO, 0, 0, off + n - bsize)], tok)
        out.append(pl)
    return out
