"""The transmission phase of an NBD connection (in the client's thread):
each request's checks, the backend call, the reply (simple or structured).

The checks and their errors follow qemu-nbd: a request past the end of the
export or larger than ``MAX_BUFFER_SIZE`` gets ``EINVAL``, and so do a
write, trim or zeroing on a read-only export (qemu-nbd answers EINVAL
there, not EPERM) and an unknown command or flag;
``BLOCK_STATUS`` needs structured replies and at least one meta context.
Backend errors are sent as their errno when the protocol has it, else EIO.

Concurrency: the connection's thread reads the requests (a write's payload
too) and hands each to a pool of ``server.workers`` threads of the
connection, which serve it and send its reply; replies go out in the order
they are ready, each whole under the connection's send lock (NBD matches
them by handle). At most ``workers`` requests are being served at once, so
a client holds at most that many payloads (each at most
``MAX_BUFFER_SIZE``) plus the one being read. On ``DISC`` or EOF the
requests being served are finished (their replies sent) before the
connection closes. ``workers=1`` and TLS connections (an ``ssl`` socket
cannot send and receive from two threads at once) serve one request at a
time in the connection's thread.
"""
from __future__ import annotations

import logging
import queue
import struct
import threading
from typing import Any

from . import proto as P
from .handshake import Connection, Export
from .proto import MAX_EXTENTS, NBDRequestError

log = logging.getLogger(__name__)

_WIRE_ERRNOS = {P.EPERM, P.EIO, P.ENOMEM, P.EINVAL, P.ENOSPC, P.EOVERFLOW, P.ENOTSUP,
                P.ESHUTDOWN}
#: the flags each command accepts
_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_DF | P.CMD_FLAG_FUA,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: 0,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: 0,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE,
}


#: a thread keeps its read buffer up to this size (larger reads get their own)
_KEEP_BUFFER = 4 << 20
_buffers = threading.local()


def _read_buffer(length: int) -> memoryview:
    """A buffer for a read's data, reused by the thread's next read (the
    reply is sent before it): a fresh 256 KiB bytearray per request costs
    page faults (malloc maps it) and zeroing."""
    if length > _KEEP_BUFFER:
        return memoryview(bytearray(length))
    b: bytearray | None = getattr(_buffers, "buf", None)
    if b is None or len(b) < length:
        b = _buffers.buf = bytearray(max(length, 256 << 10))
    return memoryview(b)[:length]


def _wire_errno(e: BaseException) -> tuple[int, str]:
    if isinstance(e, NBDRequestError):
        return e.errno, str(e)
    if isinstance(e, OSError) and e.errno in _WIRE_ERRNOS:
        return e.errno, e.strerror or str(e)
    if isinstance(e, OSError) and e.errno is not None:
        return P.EIO, e.strerror or str(e)
    log.debug("NBD request failed", exc_info=e)
    return P.EIO, str(e)


def _check(exp: Export, conn: Connection, flags: int, cmd: int, offset: int,
           length: int) -> None:
    allowed = _FLAGS.get(cmd)
    if allowed is None:
        raise NBDRequestError(P.EINVAL, f"unsupported command {cmd}")
    if flags & ~allowed:
        raise NBDRequestError(P.EINVAL, f"unsupported flags {flags:#x} for command {cmd}")
    if cmd in (P.CMD_READ, P.CMD_WRITE) and length > P.MAX_BUFFER_SIZE:
        raise NBDRequestError(P.EINVAL, f"len ({length}) is larger than max len "
                                        f"({P.MAX_BUFFER_SIZE})")
    if cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and not exp.writable:
        raise NBDRequestError(P.EINVAL, "export is read-only")
    if cmd != P.CMD_FLUSH and offset + length > exp.size:
        raise NBDRequestError(P.EINVAL, "operation past EOF")
    if cmd == P.CMD_BLOCK_STATUS and (not conn.structured or not conn.contexts):
        raise NBDRequestError(P.EINVAL, "need non-empty meta context list for block status")
    if cmd == P.CMD_READ and flags & P.CMD_FLAG_DF and not conn.structured:
        raise NBDRequestError(P.EINVAL, "DF flag needs structured replies")


def _send_error(conn: Connection, handle: int, err: int, msg: str) -> None:
    if conn.structured:
        conn.send(P.error_chunk(handle, err, msg))
    else:
        conn.send(P.simple_reply(handle, err))


#: a request as read: (flags, cmd, handle, offset, length, write payload)
_Req = tuple[int, int, int, int, int, "bytearray | None"]


def _read_request(conn: Connection, hdr: bytearray) -> _Req | None:
    """The next request (None: DISC, a bad magic, or a write too large to
    skip: the connection ends, as in qemu-nbd)."""
    conn.recv_into(memoryview(hdr))
    magic, flags, cmd, handle, offset, length = P.REQUEST.unpack(hdr)
    if magic != P.REQUEST_MAGIC or cmd == P.CMD_DISC:
        return None
    data = None
    if cmd == P.CMD_WRITE:
        if length > P.MAX_BUFFER_SIZE:
            return None
        data = bytearray(length)
        conn.recv_into(memoryview(data))
    return flags, cmd, handle, offset, length, data


def serve(conn: Connection, exp: Export) -> None:
    """Requests until DISC or EOF (raised as EOFError/OSError)."""
    hdr = bytearray(P.REQUEST.size)
    workers = conn.server.workers
    if workers <= 1 or conn.tls_done:
        while not conn.closing:
            req = _read_request(conn, hdr)
            if req is None:
                return
            _request(conn, exp, *req)
        return
    pool = _Workers(conn, exp, workers)
    try:
        while not conn.closing:
            req = _read_request(conn, hdr)
            if req is None:
                return
            pool.submit(req)
    finally:
        pool.close()


class _Workers:
    """The threads serving one connection's requests (see the module
    docstring). A worker whose reply cannot be sent drops the connection."""

    def __init__(self, conn: Connection, exp: Export, n: int):
        self.conn, self.exp = conn, exp
        self.slots = threading.Semaphore(n)
        self.todo: queue.SimpleQueue[_Req | None] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name="nbd-worker", daemon=True)
                        for _ in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, req: _Req) -> None:
        self.slots.acquire()        # at most n requests (and payloads) at once
        self.todo.put(req)

    def close(self) -> None:
        """Finish the requests handed out, then stop the threads."""
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()

    def _run(self) -> None:
        while (req := self.todo.get()) is not None:
            try:
                if not self.conn.closing:
                    _request(self.conn, self.exp, *req)
            except (EOFError, OSError):
                self.conn.abort()       # the reply cannot go out: the client is gone
            except Exception:
                log.exception("NBD request failed")
                self.conn.abort()
            finally:
                self.slots.release()


def _request(conn: Connection, exp: Export, flags: int, cmd: int, handle: int,
             offset: int, length: int, data: bytearray | None) -> None:
    be = exp.backend
    fua = bool(flags & P.CMD_FLAG_FUA)
    try:
        _check(exp, conn, flags, cmd, offset, length)
        if cmd == P.CMD_READ:
            buf = _read_buffer(length)
            if length:
                _readinto(be, offset, buf)
            if conn.structured:
                conn.send(P.chunk_header(handle, P.REPLY_TYPE_OFFSET_DATA, 8 + length)
                          + struct.pack(">Q", offset), buf)
            else:
                conn.send(P.simple_reply(handle), buf)
            return
        # (writes, zeroes and trims inside the export's size go to the
        # backend whole: what the padding past its end becomes -- a raw
        # file grows as QEMU's file driver grows it -- is the backend's)
        if cmd == P.CMD_WRITE:
            assert data is not None
            be.write(offset, data, fua)
        elif cmd == P.CMD_FLUSH:
            be.flush()
        elif cmd == P.CMD_TRIM:
            be.trim(offset, length, fua)
        elif cmd == P.CMD_WRITE_ZEROES:
            be.write_zeroes(offset, length, not flags & P.CMD_FLAG_NO_HOLE, fua,
                            bool(flags & P.CMD_FLAG_FAST_ZERO))
        elif cmd == P.CMD_CACHE:
            pass                    # advisory: nothing to prefetch into
        elif cmd == P.CMD_BLOCK_STATUS:
            _block_status(conn, exp, flags, handle, offset, length)
            return
    except (EOFError, ConnectionError):
        raise
    except Exception as e:
        err, msg = _wire_errno(e)
        _send_error(conn, handle, err, msg)
        return
    if conn.structured:
        conn.send(P.chunk(handle, P.REPLY_TYPE_NONE))
    else:
        conn.send(P.simple_reply(handle))


def _in_backend(be: Any, offset: int, length: int) -> int:
    """How much of ``length`` bytes from ``offset`` lies inside the backend
    (the rest is the padding of the export's last sector, server.Export.size)."""
    return max(0, min(length, be.size - offset))


def _readinto(be: Any, offset: int, buf: memoryview) -> None:
    """A read; the padding past the backend's end reads as zeroes (QEMU:
    the tail of an unaligned raw file's last sector)."""
    n = _in_backend(be, offset, len(buf))
    if n:
        be.readinto(offset, buf[:n] if n < len(buf) else buf)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)


def _block_status(conn: Connection, exp: Export, flags: int, handle: int,
                  offset: int, length: int) -> None:
    be = exp.backend
    out = []
    inside = _in_backend(be, offset, length)
    for i, ctx in enumerate(conn.contexts):
        ext = []
        if inside and ctx == P.CONTEXT_BASE_ALLOCATION:
            ext = be.block_status(offset, inside)
        elif inside:
            ext = be.bitmap_status(ctx[len(P.CONTEXT_DIRTY_BITMAP):], offset, inside)
        if inside < length:         # the padding: a hole of zeroes, clean
            ext = ext + [(length - inside, P.STATE_HOLE | P.STATE_ZERO
                          if ctx == P.CONTEXT_BASE_ALLOCATION else 0)]
        out.append((i + 1, _trim(ext, length, bool(flags & P.CMD_FLAG_REQ_ONE))))
    conn.send(b"".join(P.block_status_chunk(handle, cid, ext, done=k == len(out) - 1)
                       for k, (cid, ext) in enumerate(out)))


def _trim(ext: list[tuple[int, int]], length: int, one: bool) -> list[tuple[int, int]]:
    """Merge neighbours with equal flags, stop at ``length`` (and at one
    extent with REQ_ONE, or :data:`MAX_EXTENTS`)."""
    out: list[tuple[int, int]] = []
    total = 0
    for n, f in ext:
        n = min(n, length - total, 0xFFFFFFFF)
        if n <= 0:
            break
        if out and out[-1][1] == f and out[-1][0] + n <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + n, f)
        else:
            if len(out) == (1 if one else MAX_EXTENTS):
                break
            out.append((n, f))
        total += n
    if not out:
        out.append((max(1, min(length, 0xFFFFFFFF)), 0))
    return out
