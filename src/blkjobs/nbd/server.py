"""An NBD server: fixed-newstyle handshake and transmission, one thread per
client with blocking sockets.

This module knows the protocol only. What it serves is a :class:`Backend`
per export (the daemon adapts a block-graph front end to it, see
``daemon/export_commands.py``). Its methods block (a write may wait for a
job's copy-before-write), so each client has its own thread: a slow client
or a waiting request holds up nobody else, and there is no hand-off between
an event loop and I/O threads on the data path (an asyncio version of this
server spent most of its time there and read 4x slower than qemu-nbd).

* **Handshake** (:mod:`.handshake`): ``NBD_OPT_GO``/``INFO`` (export, name,
  description and block-size information), ``LIST``, ``ABORT``,
  ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT``/``SET_META_CONTEXT``
  (``base:allocation``, ``qemu:dirty-bitmap:NAME``), ``STARTTLS``, and the
  old ``EXPORT_NAME``. With TLS configured every option but ``STARTTLS`` and
  ``ABORT`` is refused (``NBD_REP_ERR_TLS_REQD``) until the connection is
  encrypted, and ``EXPORT_NAME`` closes it: nothing is readable in clear. A
  client still haggling after ``handshake_timeout`` seconds is dropped.
* **Transmission** (:mod:`.transmission`): READ, WRITE (FUA), FLUSH, TRIM,
  WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS (REQ_ONE), CACHE, DISC;
  simple or structured replies. Up to ``workers`` requests of a client are
  served at once, by threads of its connection (replies in the order they
  are ready), so it holds at most that many payloads of at most
  ``MAX_BUFFER_SIZE`` (qemu-nbd's 32 MiB) -- a larger read gets ``EINVAL``,
  a larger write closes the connection, as in qemu-nbd. Several clients
  (multi-conn) are served in parallel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import proto as P
from .handshake import negotiate
from .proto import NBDRequestError  # noqa: F401  (re-exported)
from . import fastpath
from ..native import nbdserve
from .threads import Thread
from .transmission import serve

log = logging.getLogger(__name__)

#: what one ``recv`` of the handshake reads at most (server.Connection.recv_into)
_READ_AHEAD = 4096
#: QEMU's default handshake-max-seconds
HANDSHAKE_SECONDS = 10.0
#: requests of one connection served at once (benchmarks/README.md);
#: ``BLKJOBS_NBD_WORKERS=N`` in the environment overrides it
WORKERS = 4


def default_workers() -> int:
    v = os.environ.get("BLKJOBS_NBD_WORKERS", "")
    return int(v) if v.isdigit() and int(v) > 0 else WORKERS


class Backend(Protocol):
    """What an export serves. Every method but the properties may block.

    ``write``, ``write_zeroes`` and ``trim`` get any range inside the
    export's size (:attr:`Export.size`: ``size`` rounded up to a sector);
    what they make of the padding past ``size`` is the backend's (the
    daemon's grows a raw file there as qemu-nbd does). Reads and block
    status get ranges inside ``size`` only: the server pads the rest."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...

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
        #: called once the export is removed and its last client gone (in
        #: the thread that saw it go)
        self.on_gone: Callable[[Export], None] | None = None
        #: data bytes and READs its clients' sessions sent zero-copy
        #: (counted when a session ends: docs/nbd.md, "Zero-copy reads")
        self.zero_copy_bytes = 0
        self.zero_copy_reads = 0

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

    @property
    def size(self) -> int:
        """The size the export advertises: the backend's in whole 512-byte
        sectors, rounded up, as QEMU's block layer gives a node's length
        (qemu-nbd exports a raw file of 1000 bytes as 1024); the padding
        reads as zeroes and its block status is ``hole,zero``
        (:mod:`.transmission`)."""
        return -(-self.backend.size // P.SECTOR) * P.SECTOR

    def contexts(self) -> list[str]:
        return [P.CONTEXT_BASE_ALLOCATION] + [P.CONTEXT_DIRTY_BITMAP + b for b in self.bitmaps]


class NBDServer:
    """Exports served on any number of listening sockets.

    ``tls``: a server-side :class:`ssl.SSLContext` (clients must STARTTLS);
    ``max_connections``: 0 for no limit; at the limit the server stops
    accepting (as QEMU): more clients wait in the listen queue until one
    leaves. ``workers``: requests of one connection served at once (1: in
    order, in the connection's thread; TLS connections always)."""

    def __init__(self, tls: ssl.SSLContext | None = None, max_connections: int = 0,
                 handshake_timeout: float = HANDSHAKE_SECONDS, workers: int | None = None):
        self.tls = tls
        self.workers = default_workers() if workers is None else workers
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.lock = threading.Lock()        # exports, connections, export clients
        #: notified (under ``lock``) when a client leaves or the server closes
        self._slot_free = threading.Condition(self.lock)
        self.exports: dict[str, Export] = {}
        #: the exports' names, and as the C handshake takes them (a
        #: snapshot, replaced whenever an export comes or goes)
        self.names = nbdserve.ExportNames()
        self.connections: set[Connection] = set()
        self._listeners: list[tuple[socket.socket, threading.Thread]] = []
        self._closing = False

    # -- listening ------------------------------------------------------------
    def listen_unix(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(path) and not os.path.isdir(path):
                    os.unlink(path)     # a stale socket
            sock.bind(path)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._start_accepting(sock)

    def listen_tcp(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._start_accepting(sock)
        return int(sock.getsockname()[1])

    def ports(self) -> list[int]:
        return [int(s.getsockname()[1]) for s, _ in self._listeners
                if s.family in (socket.AF_INET, socket.AF_INET6)]

    def _start_accepting(self, sock: socket.socket) -> None:
        t = threading.Thread(target=self._accept_loop, args=(sock,), name="nbd-accept",
                             daemon=True)
        self._listeners.append((sock, t))
        t.start()

    def _full(self) -> bool:
        return bool(self.max_connections) and len(self.connections) >= self.max_connections

    def _wait_for_slot(self) -> bool:
        """Wait (the lock held) until a client may be added; False once the
        server closes."""
        while self._full() and not self._closing:
            self._slot_free.wait()
        return not self._closing

    def _accept_loop(self, sock: socket.socket) -> None:
        """Accept clients, each served by a thread of its own. A blocking
        ``accept`` (no ``select`` before it: :meth:`close` shuts the
        listening socket down, which ends the wait with EINVAL), and the
        connection's socket made without asking the kernel what it is."""
        family = sock.family
        # (fd, address): socket.accept's wrapper looks up family, type and
        # the default timeout per call
        accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        while not self._closing:
            with self.lock:         # at the limit: accept nobody (they queue)
                if not self._wait_for_slot():
                    return
            try:
                fd, _ = accept()
            except OSError:
                if self._closing:
                    return
                continue
            conn_sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            with self.lock:         # another listener may have taken the slot
                conn = Connection(self, conn_sock) if self._wait_for_slot() else None
                if conn is not None:
                    self.connections.add(conn)
            if conn is None:
                conn_sock.close()
                return
            conn.thread.start()

    # -- exports -----------------------------------------------------------------
    def add_export(self, exp: Export) -> None:
        with self.lock:
            self.exports[exp.name] = exp
            self._names_changed()

    def remove_export(self, exp: Export, hard: bool) -> None:
        """Stop serving ``exp`` to new clients; with ``hard`` drop its
        clients now. ``exp.on_gone`` runs once its last client left."""
        with self.lock:
            exp.shutting_down = True
            if self.exports.get(exp.name) is exp:
                del self.exports[exp.name]
                self._names_changed()
            clients = list(exp.clients) if hard else []
        for c in clients:
            c.abort()
        self.maybe_gone(exp)

    def _names_changed(self) -> None:
        self.names = nbdserve.ExportNames([(n, bool(e.bitmaps))
                                           for n, e in self.exports.items()])

    def settle(self, exp: Export, timeout: float = 10.0) -> None:
        """Let the clients of ``exp`` that already hung up finish leaving:
        their threads end the requests in flight and drop out of
        ``exp.clients``. A ``block-export-del`` sent right after a client
        exited (qemu-io, nbdcopy) must not find it still attached only
        because its thread had not run yet on a busy host. A client still
        connected, or one whose requests outlast ``timeout``, stays."""
        deadline = time.monotonic() + timeout
        with self.lock:
            # waits for what it promises -- out of exp.clients -- not for a
            # proxy of it: a connection leaving notifies _slot_free, under
            # this lock, once it has dropped out
            while any(c.peer_left() for c in exp.clients):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._slot_free.wait(left)

    def maybe_gone(self, exp: Export) -> None:
        with self.lock:
            cb = None
            if exp.shutting_down and not exp.clients and exp.on_gone is not None:
                cb, exp.on_gone = exp.on_gone, None
        if cb is not None:
            cb(exp)

    def close(self) -> None:
        """Stop listening, drop every client, wait for their threads."""
        with self.lock:
            self._closing = True
            self._slot_free.notify_all()
        for sock, _ in self._listeners:
            with contextlib.suppress(OSError):      # (wakes its accept: EINVAL)
                sock.shutdown(socket.SHUT_RDWR)
        for sock, t in self._listeners:
            t.join()
            sock.close()
        self._listeners.clear()
        with self.lock:
            conns = list(self.connections)
        for c in conns:
            c.abort()
        for c in conns:
            c.thread.join()


class Connection:
    """One client, in its own thread: handshake, then transmission."""

    def __init__(self, server: NBDServer, sock: socket.socket):
        self.server = server
        self.sock: socket.socket = sock
        self.export: Export | None = None
        self.structured = False
        self.no_zeroes = False
        self.tls_done = False
        #: meta contexts of the last SET_META_CONTEXT (id = index + 1)
        self.contexts: list[str] = []
        #: the export those contexts were negotiated for
        self.contexts_export: str | None = None
        self.closing = False
        #: C may serve this connection (``BLKJOBS_NBD_C`` is not 0: read
        #: once, as it starts)
        self.c_path = True
        #: the C data path's session while it serves (replies go through it)
        self.sender: Any = None
        #: a reply goes out whole (several workers send on one connection)
        self._send_lock = threading.Lock()
        #: the handshake's replies not sent yet (:meth:`send_later`)
        self._later: list[bytes] = []
        #: read ahead (:meth:`recv_into`): the bytes of _rbuf from _rpos to _rlen
        self._rbuf = bytearray(_READ_AHEAD)
        self._rpos = self._rlen = 0
        self.thread = Thread(self._run)

    def abort(self) -> None:
        """Drop the client (any thread): its thread sees EOF and ends."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def peer_left(self) -> bool:
        """The client closed its end (after DISC, or without): nothing more
        comes from it; only this connection's own clean-up is left."""
        try:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLRDHUP)
            return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                       for _, ev in p.poll(0))
        except (OSError, ValueError):       # closed here already
            return True

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_into(self, mv: memoryview) -> None:
        """The next ``len(mv)`` bytes of the stream. Small reads are
        buffered: one ``recv`` of up to :data:`_READ_AHEAD` bytes takes an
        option's header and its data (and a client's next options, if it
        sent them), not one system call each. Not before STARTTLS on a
        server with TLS: what follows the option may be the client's TLS
        handshake, which must stay in the socket. What is buffered when the
        handshake ends is the transmission phase's (:meth:`buffered`)."""
        if self._later:
            self.flush_later()      # the client waits for them before it says more
        n = len(mv)
        pos = self._rlen - self._rpos
        if pos:
            pos = min(pos, n)
            mv[:pos] = self._rbuf[self._rpos:self._rpos + pos]
            self._rpos += pos
        while pos < n:
            if n - pos < _READ_AHEAD and (self.tls_done or self.server.tls is None):
                k = self.sock.recv_into(self._rbuf)
                if not k:
                    raise EOFError("client closed the connection")
                take = min(k, n - pos)
                mv[pos:pos + take] = self._rbuf[:take]
                pos += take
                self._rpos, self._rlen = take, k
                continue
            k = self.sock.recv_into(mv[pos:])
            if not k:
                raise EOFError("client closed the connection")
            pos += k

    def c_handshake(self) -> nbdserve.Handshake | None:
        """The handshake's common options answered in C (csrc/nbdsrv.c
        ``bj_nbdh_step``, :meth:`c_step`), or None: a server with TLS (the
        options before STARTTLS are refused, those after it are inside
        TLS), or ``BLKJOBS_NBD_C=0`` (the Python path throughout)."""
        if self.server.tls is not None or not self.c_path:
            return None
        return nbdserve.Handshake(self.sock.fileno(), self._rbuf, self.server.names)

    def c_step(self, hs: nbdserve.Handshake) -> int:
        """Greet (the first time) and let C answer the options it can, on
        the read-ahead buffer; :data:`nbdserve.HS_OPTION`: the next option
        is Python's (in the buffer, or still in the socket), ``HS_GO``: a
        GO to answer (``hs.go``), ``HS_HANGUP``: close. The connection's
        negotiated state is C's and Python's alike."""
        self.flush_later()
        rc, self._rpos, self._rlen = hs.step(self._rpos, self._rlen, self.structured)
        st = hs.state
        self.no_zeroes = bool(st & nbdserve.HS_NO_ZEROES)
        self.structured = bool(st & nbdserve.HS_STRUCTURED)
        e = hs.take_ctx_export()
        if e >= 0:          # SET_META_CONTEXT base:allocation, answered in C
            self.contexts = [P.CONTEXT_BASE_ALLOCATION]
            self.contexts_export = hs.names[e]
        return rc

    def buffered(self) -> int:
        """Bytes read from the socket and not yet taken by :meth:`recv_into`
        (a client that sent requests before the reply to its NBD_OPT_GO:
        the C data path, which reads the socket, must not serve it)."""
        return self._rlen - self._rpos

    def _timeouts(self, seconds: float) -> None:
        """The handshake's limit on each receive and send (0: none) as the
        socket's SO_RCVTIMEO/SO_SNDTIMEO (both in one C call): the socket
        stays blocking, so a ``recv`` is one system call (with
        ``settimeout`` Python polls before each one); a receive or send
        timing out raises ``OSError(EAGAIN)``, and the client is dropped."""
        nbdserve.set_timeouts(self.sock.fileno(), seconds)

    def send_later(self, data: bytes) -> None:
        """Queue a handshake reply: those of one option go out in one
        ``sendmsg`` when the connection next reads or sends (qemu-nbd's
        replies to NBD_OPT_GO are 3 to 5 messages; each one's own send was
        a system call on both sides)."""
        self._later.append(data)

    def flush_later(self) -> None:
        if self._later:
            parts, self._later = self._later, []
            with self._send_lock:
                self._send(tuple(parts))

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        if self._later:
            self.flush_later()
        sender = self.sender
        if sender is not None:
            sender.send(parts)
            return
        with self._send_lock:
            self._send(parts)

    def _send(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        if len(parts) > 1 and not isinstance(self.sock, ssl.SSLSocket):
            total = sum(len(p) for p in parts)
            sent = self.sock.sendmsg(parts)
            if sent == total:
                return
            parts = (b"".join(bytes(p) for p in parts)[sent:],)
        for p in parts:
            self.sock.sendall(p)

    def attach(self, exp: Export) -> bool:
        """Become a client of ``exp`` (before the reply that says so: a
        ``block-export-del`` racing with the reply must see the client);
        False if it is being removed."""
        with self.server.lock:
            if exp.shutting_down or self.server.exports.get(exp.name) is not exp:
                return False
            self.export = exp
            exp.clients.add(self)
            return True

    def start_tls(self, ctx: ssl.SSLContext) -> None:
        self.flush_later()          # the ACK in clear
        # (Python's timeout, not only SO_RCVTIMEO: ssl retries a blocking
        # socket's EAGAIN, a client silent in the TLS handshake would stay)
        self.sock.settimeout(self.server.handshake_timeout or None)
        self.sock = ctx.wrap_socket(self.sock, server_side=True)
        self.tls_done = True

    def _run(self) -> None:
        try:
            self.c_path = os.environ.get("BLKJOBS_NBD_C", "1") != "0"
            if self.server.handshake_timeout:
                self._timeouts(self.server.handshake_timeout)
            exp = negotiate(self)
            if exp is None:
                return
            if self.server.handshake_timeout:
                self._timeouts(0)
            if self.tls_done:
                self.sock.settimeout(None)
            if fastpath.usable(self, exp):
                fastpath.serve(self, exp)
            else:
                serve(self, exp)
        except (EOFError, OSError, ssl.SSLError):
            pass            # the client left, or was dropped (timeouts included)
        except Exception:   # a bug: log it, drop this client only
            log.exception("NBD connection failed")
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            with self.server.lock:
                self.server.connections.discard(self)
                self.server._slot_free.notify_all()
                if self.export is not None:
                    self.export.clients.discard(self)
            if self.export is not None:
                self.server.maybe_gone(self.export)
