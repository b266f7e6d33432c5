"""The ``nbd`` driver: a disk served by an NBD server (qemu-nbd, nbdkit,
qemu-storage-daemon, ``blkjobs serve``), named by an NBD URI wherever a file
name is accepted: ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``
and the TLS forms ``nbds://``, ``nbds+unix://``.

The URI is handed to libnbd as it is (``nbd_connect_uri``: libnbd parses
it); :func:`display_name` only spells it as QEMU prints it. The export holds
the guest bytes as they are, like a raw image, so the node's format is
``raw`` (as ``qemu-img`` reports an NBD export) and its protocol ``nbd``.

Capabilities: no backing file, no allocation (there is no host file: the
driver's ``host_file`` is False, ``fd`` is -1, and the copy paths move its
bytes through buffers), no compression, no checks; no QEMU lock bytes
either (the server decides who may use the export).

Several connections: where the server advertises multi-conn, up to
``connections`` (default: one per CPU, at most 4): one is opened with the
driver, the others when a caller (a copy worker) finds every open one busy;
each caller takes one for its request; big requests are split into pipelined
requests on that connection (see :mod:`blkjobs.native.nbd`).

Timeouts: a server that says nothing for ``timeout`` seconds (default 30,
``BLKJOBS_NBD_TIMEOUT``) fails the request with ETIMEDOUT. After any failure
the driver is broken: its connections are closed and every later request
raises the first error.

Reconnection (``reconnect_delay`` > 0, QEMU's ``reconnect-delay``): a request
whose connection was lost (reset, closed, broken pipe: not a server's error
reply, not a timeout) waits while the driver connects again -- a new
libnbd handle to the same URI, tried every ``RECONNECT_INTERVAL`` s -- and
is sent again on it; the new export must have the same size. When no
connection succeeds within ``reconnect_delay`` seconds the request fails
with EIO (as in QEMU: a job reports ``Input/output error``) and a text that
says so. The driver is not broken then: as QEMU, it goes on connecting in
the background (a thread, every ``RECONNECT_INTERVAL`` s) while every
request fails at once with EIO; once a connection succeeds, requests work
again.

``dirty_bitmap`` (QEMU's ``x-dirty-bitmap`` option: ``qemu:allocation-depth``,
``qemu:dirty-bitmap:NAME``): block status is asked in that meta context
instead of base:allocation and its bits are read as if they were
base:allocation's, QEMU's documented hack for reading them with ``qemu-img
map``: bit 0 (HOLE) clear is data, bit 1 set is zero, and a run with bit 0
set and bit 1 clear is neither (not present). Meant for ``map`` only: the
reads are still the export's bytes.
"""
from __future__ import annotations

import errno
import os
import threading
import time

from ..errors import ImageError, UsageError
from .base import Driver, Kind, Mapping
from .sniff import SCHEMES, is_nbd_uri  # noqa: F401  (re-exported)

DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECTIONS = 4
#: the time an extra connection (multi-conn) may take: a server limiting its
#: clients (qemu-nbd's default --shared=1) never answers it
EXTRA_CONNECT_TIMEOUT = 2.0
_ZEROES = bytes(1 << 20)
#: seconds between two connection attempts while reconnecting
RECONNECT_INTERVAL = 0.05
#: a request failed with these: its connection is gone (reconnection may help)
_LOST = {errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ESHUTDOWN,
         errno.ECONNABORTED}


def default_connections() -> int:
    """Connections of a multi-conn export: one per CPU this process may run
    on, at most DEFAULT_CONNECTIONS (nbdcopy's rule: its threads are the
    CPUs, its connections at most its threads). On the 2-core test machine
    2 connections copied faster than 4, with less system time
    (benchmarks/README.md, "NBD client")."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_CONNECTIONS, cpus))


def timeout_from_env() -> float:
    """``BLKJOBS_NBD_TIMEOUT`` (seconds), else the default."""
    v = os.environ.get("BLKJOBS_NBD_TIMEOUT")
    if not v:
        return DEFAULT_TIMEOUT
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise UsageError(f"BLKJOBS_NBD_TIMEOUT: invalid timeout '{v}' (seconds, > 0)")
    return t


def _split(uri: str) -> tuple[str, str | None, int | None, str, dict[str, list[str]]]:
    """(scheme, host, port, export, query) of an NBD URI. The plain forms are
    split here: urllib.parse (with ipaddress) costs ~10 ms of start-up, a
    tenth of a small copy's CPU; escapes, IPv6 hosts and '+' in the query
    go through it."""
    scheme, _, rest = uri.partition("://")
    if "%" in uri or "[" in rest or "#" in rest or "+" in rest.partition("?")[2]:
        from urllib.parse import parse_qs, unquote, urlsplit
        u = urlsplit(uri)
        export = unquote(u.path[1:]) if u.path.startswith("/") else unquote(u.path)
        return u.scheme, u.hostname, u.port, export, parse_qs(u.query)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    path, _, query = tail.partition("?")
    hostport = netloc.rpartition("@")[2]
    host, colon, port = hostport.partition(":")
    if port and not (port.isdigit() and port.isascii() and int(port) <= 65535):
        raise ValueError(f"bad port in '{uri}'")
    qs: dict[str, list[str]] = {}
    for kv in query.split("&"):
        k, eq, v = kv.partition("=")
        if k and eq and v:
            qs.setdefault(k, []).append(v)
    return (scheme.lower(), host.lower() or None, int(port) if port else None,
            path[1:] if path.startswith("/") else path, qs)


def display_name(uri: str) -> str:
    """The URI as QEMU spells an NBD node's file name: ``nbd://HOST:PORT[/EXPORT]``
    or ``nbd+unix://[/EXPORT]?socket=PATH`` (for display only: libnbd parses the
    URI that connects)."""
    try:
        scheme, hostname, port, export, query = _split(uri)
        if "unix" in scheme:
            sock = query.get("socket", [""])[0]
            return f"nbd+unix://{'/' + export if export else ''}?socket={sock}"
        if "+" in scheme and "tcp" not in scheme:
            return uri
        host = hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        port = port or 10809
        return f"nbd://{host}:{port}{'/' + export if export else ''}"
    except ValueError:
        return uri


def qmp_uri(server: dict, export: str | None) -> str:
    """The URI of QEMU's blockdev-add ``nbd`` arguments (``server``:
    ``{type: unix, path}`` or ``{type: inet, host, port}``)."""
    from urllib.parse import quote
    exp = quote(export or "", safe="")
    kind = server.get("type")
    if kind == "unix":
        return f"nbd+unix:///{exp}?socket={quote(str(server.get('path', '')), safe='/')}"
    if kind == "inet":
        host = str(server.get("host", ""))
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{server.get('port', 10809)}/{exp}"
    raise UsageError(f"NBD server address type '{kind}' is not supported (unix, inet)")


class ZeroData(Mapping):
    """A ZERO run that is data too (HOLE clear, ZERO set): qemu-img map
    prints ``"zero": true, "data": true``."""
    __slots__ = ()
    zero_data = True


class _Outage(OSError):
    """No reconnection within the reconnect delay (EIO)."""


class Nbd(Driver):
    """An open NBD export (see the module docstring)."""

    format_name = "raw"
    protocol = "nbd"
    host_file = False
    cluster_size = 0
    fd = -1
    #: readinto takes a connection of the pool: several threads may read
    parallel_reads = True

    def __init__(self, uri: str, read_only: bool = True, timeout: float | None = None,
                 tls_certificates: str | None = None,
                 connections: int | None = None, reconnect_delay: float = 0.0,
                 dirty_bitmap: str | None = None):
        from ..native.nbd import BASE_ALLOCATION, Connection
        self.uri = uri
        self.filename = display_name(uri)
        self.read_only = read_only
        self._timeout = timeout_from_env() if timeout is None else timeout
        if tls_certificates is None:
            tls_certificates = os.environ.get("BLKJOBS_NBD_TLS_CERTIFICATES") or None
        self._tls = tls_certificates
        self._context = dirty_bitmap.encode() if dirty_bitmap else BASE_ALLOCATION
        self.read_zeroes = dirty_bitmap is None     # the hack's "not present" is no zero
        c0 = Connection(uri, self._timeout, tls_certificates, meta_context=self._context)
        if dirty_bitmap is not None and not c0.has_allocation:
            c0.close()
            raise ImageError("Could not open image: Invalid argument")     # qemu-img's
        if not read_only and c0.read_only:
            c0.close()
            raise ImageError(f"Could not open '{self.filename}': the NBD export is read-only")
        self._c0 = c0
        self._size = c0.size
        self._free = [c0]
        self._all = [c0]
        self._cond = threading.Condition()
        self._broken: OSError | None = None
        #: past the reconnect delay: requests fail at once with this while
        #: a background thread connects again (:meth:`_outage`)
        self._down: OSError | None = None
        self._reconnector: threading.Thread | None = None
        self._closed = False
        self._unsafe = False
        self.reconnect_delay = reconnect_delay
        if connections is None:
            connections = default_connections()
        #: connections the pool may open: the others (multi-conn) are opened
        #: when a caller finds none free (:meth:`_take`), so a small copy
        #: that never has two requests at once opens one, and the server
        #: serves one session, not 2-4 (each a handshake on both sides)
        self._want = max(1, connections) if c0.can_multi_conn else 1
        self._opening = 0

    @property
    def connections(self) -> int:
        """Connections of the pool: those open, and those it may still
        open (one fewer than asked each time one cannot be)."""
        return self._want

    @property
    def size(self) -> int:
        return self._size

    # -- the connection pool ---------------------------------------------------
    def _take(self):
        while True:
            with self._cond:
                while True:
                    if self._broken is not None:
                        raise OSError(self._broken.errno, self._broken.strerror)
                    if self._closed:
                        raise OSError(errno.ENOTCONN, f"'{self.filename}' is closed")
                    if self._down is not None:
                        raise OSError(self._down.errno, self._down.strerror)
                    if self._free:
                        return self._free.pop()
                    if len(self._all) + self._opening < self._want:
                        self._opening += 1
                        break           # open one more, outside the lock
                    self._cond.wait()
            c = self._extra()
            if c is not None:
                return c

    def _extra(self):
        """Open one more connection of the pool for the caller (None: it
        could not be -- fewer connections, not an error -- or the driver
        was closed or broken meanwhile; the caller looks again)."""
        from ..native.nbd import Connection
        c = None
        try:
            c = Connection(self.uri, min(self._timeout, EXTRA_CONNECT_TIMEOUT), self._tls,
                           meta_context=self._context)
            c.timeout_ms = self._c0.timeout_ms
        except ImageError:
            pass
        finally:
            with self._cond:
                self._opening -= 1
                if c is None:
                    self._want = max(1, len(self._all) + self._opening)
                elif (self._closed or self._broken is not None
                      or self._down is not None):
                    c.close()
                    c = None
                else:
                    self._all.append(c)
                self._cond.notify_all()
        return c

    def _run(self, fn, *args):
        """``fn(connection, *args)`` on a free connection. A failure breaks
        the driver: later calls raise it -- except a connection lost with a
        reconnect delay (:meth:`_reconnect`, :meth:`_outage`). A connection
        is closed only by the thread using it (or idle): another thread may
        be inside libnbd with it."""
        c = self._take()
        try:
            while True:
                try:
                    return fn(c, *args)
                except OSError as e:
                    if not self.reconnect_delay or e.errno not in _LOST or self._closed:
                        raise
                    lost, c = c, None           # closed by _reconnect
                    c = self._reconnect(lost, e)
        except _Outage as e:        # past the delay: not broken, see _outage
            self._outage(e)
            raise OSError(e.errno, e.strerror) from None
        except OSError as e:
            with self._cond:
                if self._broken is None:
                    self._broken = e
            raise
        finally:
            with self._cond:
                if c is None:
                    pass
                elif self._broken is not None or self._closed:
                    c.close()
                    self._close_idle()
                else:
                    self._free.append(c)
                self._cond.notify_all()

    def _connect(self):
        """A new connection to the same URI and export size (ImageError:
        none)."""
        from ..native.nbd import Connection
        c = Connection(self.uri, self._timeout, self._tls, meta_context=self._context)
        if c.size != self._size:
            c.close()
            raise ImageError(f"the export reconnected to has another size ({c.size} "
                             f"bytes, was {self._size})")
        return c

    def _reconnect(self, lost, why: OSError):
        """A new connection in place of ``lost`` (whose request failed with
        ``why``), tried until ``reconnect_delay`` seconds have passed; then
        :class:`_Outage` says what happened."""
        lost.close()
        with self._cond:
            if lost in self._all:
                self._all.remove(lost)
        deadline = time.monotonic() + self.reconnect_delay
        while True:
            try:
                c = self._connect()
            except ImageError as e:
                left = deadline - time.monotonic()
                if left <= 0 or self._down is not None or self._closed:
                    # EIO, as QEMU fails the delayed requests
                    raise _Outage(errno.EIO, f"{why.strerror}; no reconnection within "
                                             f"reconnect-delay ({self.reconnect_delay:g} s): "
                                             f"{e}") from None
                time.sleep(min(RECONNECT_INTERVAL, left))
                continue
            with self._cond:
                self._all.append(c)
            return c

    def _outage(self, e: OSError) -> None:
        """Past the reconnect delay: requests fail at once with ``e`` while
        a background thread connects again, as QEMU does; its connection
        ends the outage."""
        with self._cond:
            if self._down is None:
                self._down = OSError(e.errno, e.strerror)
            if self._reconnector is None and not self._closed:
                t = threading.Thread(target=self._reconnect_loop, daemon=True,
                                     name="nbd-reconnect")
                self._reconnector = t
                t.start()
            self._cond.notify_all()

    def _reconnect_loop(self) -> None:
        while True:
            try:
                c = self._connect()
            except ImageError:
                with self._cond:
                    if not self._closed:
                        self._cond.wait(RECONNECT_INTERVAL)
                    if self._closed:
                        self._reconnector = None
                        return
                continue
            with self._cond:
                self._reconnector = None
                if self._closed:
                    c.close()
                    return
                self._all.append(c)
                self._free.append(c)
                self._down = None
                self._cond.notify_all()
                return

    def _close_idle(self) -> None:
        """Close the connections nobody uses (the lock held)."""
        for f in self._free:
            f.close()
        self._free.clear()

    def _writable(self) -> None:
        if self.read_only:
            raise ImageError(f"'{self.filename}': image is opened read-only")

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise UsageError(f"request [{offset}, {offset + length}) beyond the end of "
                             f"'{self.filename}' ({self._size} bytes)")

    # -- the Driver contract ---------------------------------------------------
    def map_host(self, offset: int, length: int) -> list[Mapping]:
        end = min(offset + length, self._size)
        if end <= offset:
            return []
        if not self._c0.has_allocation:
            return [Mapping(offset, end - offset, Kind.DATA, offset)]
        out: list[Mapping] = []
        pos = offset
        while pos < end:
            at = pos
            for n, flags in self._run(lambda c, at=at: c.extents(at, end - at)):
                n = min(n, end - pos)
                m = self._mapping(pos, n, flags)
                if out and (out[-1].kind, type(out[-1])) == (m.kind, type(m)):
                    m = type(m)(out[-1].start, out[-1].length + n, m.kind,
                                out[-1].host_offset)
                    out[-1] = m
                else:
                    out.append(m)
                pos += n
                if pos >= end:
                    break
        return out

    def _mapping(self, pos: int, n: int, flags: int) -> Mapping:
        """A run of (NBD) flags: HOLE 0x1, ZERO 0x2."""
        if flags & 0x2:
            if self._context != b"base:allocation" and not flags & 0x1:
                return ZeroData(pos, n, Kind.ZERO, pos)
            return Mapping(pos, n, Kind.ZERO, pos)
        if flags & 0x1 and self._context != b"base:allocation":
            return Mapping(pos, n, Kind.UNALLOCATED, None)
        return Mapping(pos, n, Kind.DATA, pos)

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        self._check(offset, len(mv))
        self._run(lambda c: c.pread(offset, mv))

    def read(self, offset: int, length: int) -> bytes:
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)

    def write(self, offset: int, data, fill=None) -> None:
        self._writable()
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv))
        self._run(lambda c: c.pwrite(offset, mv))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fill=None) -> None:
        self._writable()
        length = min(length, self._size - offset)
        if length <= 0:
            return
        if self._c0.can_zero:
            self._run(lambda c: c.zero(offset, length, may_unmap))
            return
        pos = offset
        while pos < offset + length:
            k = min(len(_ZEROES), offset + length - pos)
            self.write(pos, memoryview(_ZEROES)[:k])
            pos += k

    def discard(self, offset: int, length: int) -> None:
        """Trim where the server can (advisory: nothing otherwise)."""
        self._writable()
        length = min(length, self._size - offset)
        if length > 0 and self._c0.can_trim:
            self._run(lambda c: c.trim(offset, length))

    def flush(self) -> None:
        if self.read_only or self._closed or not self._c0.can_flush:
            return
        # multi-conn (several connections) promises that a flush on one
        # covers the writes completed on all of them
        self._run(lambda c: c.flush())

    def copy_fd(self, fd: int, to_nbd: bool, offset: int, length: int, skip_zero: bool,
                may_unmap: bool = True) -> tuple[int, int]:
        """A local raw file <-> this export, on one connection, in C (see
        :meth:`blkjobs.native.nbd.Connection.copy_fd`)."""
        if to_nbd:
            self._writable()
        self._check(offset, length)
        return self._run(lambda c: c.copy_fd(fd, to_nbd, offset, length, skip_zero, may_unmap))

    def set_unsafe(self, unsafe: bool) -> None:
        """cache=unsafe: no flush when closed (explicit flushes still go)."""
        self._unsafe = unsafe

    def close(self) -> None:
        """Flush (if writable, unless cache=unsafe) and disconnect.
        Idempotent; the connections are closed even when the flush fails
        (its error is raised after)."""
        if self._closed:
            return
        try:
            if self._broken is None and self._down is None and not self._unsafe:
                self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._close_idle()      # those in use: by their thread, when done
                self._cond.notify_all()

    def info(self) -> dict:
        return {}
