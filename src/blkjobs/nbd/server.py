"""An NBD server on asyncio: fixed-newstyle handshake and transmission.

This module knows the protocol only. What it serves is an :class:`Backend`
per export (the daemon adapts a block-graph front end to it, see
``daemon/export_commands.py``); the backend's methods block, so they run in
the server's thread pool while the event loop keeps every connection going.

* **Handshake**: ``NBD_OPT_GO``/``INFO`` (export, name, description and
  block-size information), ``LIST``, ``ABORT``, ``STRUCTURED_REPLY``,
  ``LIST_META_CONTEXT``/``SET_META_CONTEXT`` (``base:allocation``,
  ``qemu:dirty-bitmap:NAME``), ``STARTTLS``, and the old
  ``EXPORT_NAME``. With TLS configured every option but ``STARTTLS`` and
  ``ABORT`` is refused (``NBD_REP_ERR_TLS_REQD``) until the connection is
  encrypted, and ``EXPORT_NAME`` closes it: nothing is readable in clear.
* **Transmission**: READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
  FAST_ZERO), BLOCK_STATUS (REQ_ONE), CACHE, DISC; simple or structured
  replies. Requests are served concurrently; each connection keeps at most
  :data:`INFLIGHT_BYTES` of request payloads in memory (reading the next
  request waits) and refuses a request larger than ``MAX_BUFFER_SIZE``
  (qemu-nbd's 32 MiB) as qemu-nbd does: ``EINVAL`` for a read, and a write
  too large to skip closes the connection.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable
from typing import Any, Protocol

from . import proto as P
from .handshake import negotiate
from .proto import NBDRequestError  # noqa: F401  (re-exported)
from .transmission import serve_request

log = logging.getLogger(__name__)

#: Bytes of request payloads (read buffers and write data) one connection
#: may hold at once; a larger request runs alone.
INFLIGHT_BYTES = 64 << 20
#: QEMU's default handshake-max-seconds
HANDSHAKE_SECONDS = 10.0


class Backend(Protocol):
    """What an export serves. Every method but the properties may block."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    def write(self, offset: int, data: bytes, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool,
                     fast: bool) -> None: ...

    def trim(self, offset: int, length: int, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents (length, NBD_STATE_* flags) from offset."""
        ...

    def bitmap_status(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """``qemu:dirty-bitmap:name`` extents (length, NBD_STATE_DIRTY or 0)."""
        ...


class Export:
    """One export of a server: a name, what it serves and how."""

    def __init__(self, name: str, backend: Backend, writable: bool = False,
                 description: str = "", bitmaps: tuple[str, ...] = (),
                 multi_conn: bool = True):
        self.name = name
        self.backend = backend
        self.writable = writable
        self.description = description
        self.bitmaps = tuple(bitmaps)
        self.multi_conn = multi_conn
        self.clients: set[Connection] = set()
        self.shutting_down = False
        #: called (in the loop) once the export is removed and its last
        #: client gone
        self.on_gone: Callable[[Export], None] | None = None

    def flags(self) -> int:
        f = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_DF
             | P.FLAG_SEND_CACHE)
        if self.writable:
            f |= P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_TRIM | P.FLAG_SEND_FAST_ZERO
        else:
            f |= P.FLAG_READ_ONLY
        if self.multi_conn:
            f |= P.FLAG_CAN_MULTI_CONN
        return f

    def contexts(self) -> list[str]:
        return [P.CONTEXT_BASE_ALLOCATION] + [P.CONTEXT_DIRTY_BITMAP + b for b in self.bitmaps]


class _Closed(Exception):
    """The client went away (or must be dropped)."""


class NBDServer:
    """Exports served on any number of listening sockets.

    ``tls``: a server-side :class:`ssl.SSLContext` (clients must STARTTLS);
    ``max_connections``: 0 for no limit. Use from the event loop."""

    def __init__(self, tls: ssl.SSLContext | None = None, max_connections: int = 0,
                 workers: int = 4, handshake_timeout: float = HANDSHAKE_SECONDS):
        self.tls = tls
        self.max_connections = max_connections
        #: a client still haggling after this many seconds is dropped (0: never)
        self.handshake_timeout = handshake_timeout
        self.exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "nbd-io")

    async def listen_unix(self, path: str) -> None:
        self._servers.append(await asyncio.start_unix_server(self._accept, path))

    async def listen_tcp(self, host: str, port: int) -> list[int]:
        srv = await asyncio.start_server(self._accept, host, port)
        self._servers.append(srv)
        return [s.getsockname()[1] for s in srv.sockets]

    def add_export(self, exp: Export) -> None:
        self.exports[exp.name] = exp

    def remove_export(self, exp: Export, hard: bool) -> None:
        """Stop serving ``exp`` to new clients; with ``hard`` drop its
        clients now. ``exp.on_gone`` runs once its last client left."""
        exp.shutting_down = True
        if self.exports.get(exp.name) is exp:
            del self.exports[exp.name]
        if hard:
            for c in list(exp.clients):
                c.abort()
        self._maybe_gone(exp)

    def _maybe_gone(self, exp: Export) -> None:
        if exp.shutting_down and not exp.clients and exp.on_gone is not None:
            cb, exp.on_gone = exp.on_gone, None
            cb(exp)

    async def close(self) -> None:
        """Stop listening and drop every client."""
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        conns = list(self.connections)
        for c in conns:
            c.abort()
        for c in conns:
            if c.task is not None:
                with contextlib.suppress(BaseException):
                    await c.task
        self._pool.shutdown(wait=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.max_connections and len(self.connections) >= self.max_connections:
            writer.close()
            return
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        conn.task = asyncio.current_task()
        try:
            await conn.run()
        except (_Closed, ConnectionError, OSError, asyncio.IncompleteReadError,
                ssl.SSLError):
            pass
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass
        except Exception:           # a bug: log it, drop this client only
            log.exception("NBD connection failed")
        finally:
            self.connections.discard(conn)
            await conn.finish()

    async def run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


class Connection:
    """One client: handshake, then transmission."""

    def __init__(self, server: NBDServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.export: Export | None = None
        self.structured = False
        self.no_zeroes = False
        self.tls_done = False
        #: meta context ids (index + 1) -> context name, of the last SET
        self.contexts: list[str] = []
        #: the export those contexts were negotiated for
        self.contexts_export: str | None = None
        self.task: asyncio.Task | None = None
        self._inflight = 0
        self._cond = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    def abort(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def finish(self) -> None:
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self.export is not None:
            self.export.clients.discard(self)
            self.server._maybe_gone(self.export)
        with contextlib.suppress(Exception):
            self.writer.close()

    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def run(self) -> None:
        self.writer.write(P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT,
                                           P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        await self.writer.drain()
        (cflags,) = struct.unpack(">I", await asyncio.wait_for(
            self._read(4), self.server.handshake_timeout or None))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise _Closed("unknown client flags")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        timeout = self.server.handshake_timeout or None
        try:
            exp = await asyncio.wait_for(negotiate(self), timeout)
        except asyncio.TimeoutError:
            log.info("NBD client dropped: no export chosen within %s s", timeout)
            return
        if exp is None:
            return
        self.export = exp
        exp.clients.add(self)
        await self.transmission(exp)

    # -- transmission --------------------------------------------------------
    async def transmission(self, exp: Export) -> None:
        while not self._closing:
            hdr = await self._read(P.REQUEST.size)
            magic, flags, cmd, handle, offset, length = P.REQUEST.unpack(hdr)
            if magic != P.REQUEST_MAGIC:
                raise _Closed("bad request magic")
            if cmd == P.CMD_DISC:
                break
            data = b""
            if cmd == P.CMD_WRITE:
                if length > P.MAX_BUFFER_SIZE:
                    raise _Closed("write request too large")
                data = await self._read(length)
            cost = length if cmd in (P.CMD_READ, P.CMD_WRITE) else 0
            await self._reserve(cost)
            t = asyncio.ensure_future(self._serve(exp, flags, cmd, handle, offset, length,
                                                  data, cost))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(Exception):
            await self.writer.drain()

    async def _reserve(self, cost: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._inflight == 0
                                      or self._inflight + cost <= INFLIGHT_BYTES)
            self._inflight += cost

    async def _serve(self, exp: Export, flags: int, cmd: int, handle: int, offset: int,
                     length: int, data: bytes, cost: int) -> None:
        try:
            await serve_request(self, exp, flags, cmd, handle, offset, length, data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.abort()
        finally:
            async with self._cond:
                self._inflight -= cost
                self._cond.notify_all()
