"""The QMP server: asyncio monitors on UNIX (and loopback TCP) sockets.

One event loop thread owns every socket. Each connection is a *monitor*:
greeting, negotiation, then commands in order. Commands of all monitors run
one at a time in a single worker thread (QEMU's big lock, in effect), so a
command that waits on the Engine's locks never stalls the loop; the loop
keeps reading and writing for the other monitors meanwhile.

Events: the Engine calls our listener with its manager lock held, from
whatever thread changed the job (the worker running a command, a job's
runner thread). The listener only appends the event to a queue (so the
queue order is the emission order) and asks the loop, with
``call_soon_threadsafe``, to :meth:`Server._pump` it. The pump writes each
event to every negotiated monitor. Before a command's reply is written the
queue is pumped too, so an event a command caused (``created``) is never
overtaken by that command's reply, and events keep their order everywhere.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from ..jobmodel import Event
from .commands import Commands, version
from .protocol import (JsonStreamer, QMPError, check_request, encode, error_reply, greeting,
                       parse)
from .schema import COMMANDS, check_arguments

NEGOTIATE = "qmp_capabilities"
#: Each monitor logs to ``blkjobs.daemon.monitor.<n>`` (n counts connections).
MONITOR_LOGGER = __name__.rpartition(".")[0] + ".monitor"
#: Messages with more tokens than this are parsed in a thread, so that the
#: event loop keeps serving the other monitors meanwhile.
PARSE_IN_THREAD = 4096


_log = logging.getLogger(__name__)


def internal_error(what: str, e: BaseException, log: logging.Logger = _log) -> QMPError:
    """An unexpected exception (a bug) as an error reply; the connection
    stays up. ``log`` (the monitor's logger) gets it with its traceback, for
    whoever runs the daemon (stderr, as ``blkjobs serve`` sets logging up)."""
    desc = f"internal error in {what}: {type(e).__name__}: {e}"
    log.error("%s", desc, exc_info=e)
    return QMPError(desc)


def listen_unix(path: str) -> socket.socket:
    """A listening UNIX socket at ``path``, mode 0600 whatever the umask:
    QMP has no authentication, so only the daemon's user may connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)       # no window with a wider mode
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(100)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Monitor:
    """One connection (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 n: int = 0):
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.closed = False
        self.log = logging.getLogger(f"{MONITOR_LOGGER}.{n}")

    def send(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            try:
                data = encode(obj)
            except Exception as e:      # a result that is not JSON: a bug
                data = encode(error_reply(internal_error("reply", e, self.log)))
            self.writer.write(data)


class Server:
    """Serve QMP for ``engine`` until :meth:`request_stop` (``quit``,
    SIGTERM). Use :meth:`serve` from an event loop."""

    def __init__(self, engine, commands: Commands | None = None):
        self.eng = engine
        self.commands = commands or Commands(engine)
        self.commands.quit_cb = self._quit_requested
        self.monitors: list[Monitor] = []
        self._events: collections.deque[Event] = collections.deque()
        self._events_lock = threading.Lock()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "qmp-command")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._quit = False
        self._numbers = itertools.count()

    # -- events ----------------------------------------------------------
    def _listener(self, ev: Event) -> None:
        with self._events_lock:
            self._events.append(ev)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._pump)
            except RuntimeError:        # the loop is closing
                pass

    def _pump(self) -> None:
        while True:
            with self._events_lock:
                if not self._events:
                    return
                ev = self._events.popleft()
            msg = {"event": ev.name, "data": ev.data,
                   "timestamp": {"seconds": ev.seconds, "microseconds": ev.microseconds}}
            for mon in self.monitors:
                if mon.negotiated:
                    mon.send(msg)

    # -- lifecycle ---------------------------------------------------------
    async def start(self, unix_paths: Sequence[str] = (), tcp: Sequence[tuple[str, int]] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.eng.add_listener(self._listener)
        for path in unix_paths:
            self._servers.append(await asyncio.start_unix_server(self._connection,
                                                                 sock=listen_unix(path)))
        for host, port in tcp:
            self._servers.append(await asyncio.start_server(self._connection, host, port))

    def tcp_ports(self) -> list[int]:
        ports = []
        for srv in self._servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    ports.append(name[1])
        return ports

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _quit_requested(self) -> None:
        self._quit = True

    async def wait_stopped(self) -> None:
        assert self._stop is not None
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Stop accepting, cancel the jobs (their events still go out),
        close the images and the connections."""
        for srv in self._servers:
            srv.close()
        await self.commands.close_exports()
        loop = asyncio.get_running_loop()
        # the command worker may be blocked in x-blkjobs-blkdebug-wait-break
        # (up to its timeout): it gives up now, so the close below can run
        breaks = self.eng.io.breaks
        if breaks is not None:
            await asyncio.to_thread(breaks.interrupt)
        await loop.run_in_executor(self._worker, self.eng.close)
        self._pump()
        for mon in list(self.monitors):
            await self._close(mon)
        self.eng.remove_listener(self._listener)
        self._worker.shutdown(wait=True)

    async def _close(self, mon: Monitor) -> None:
        if mon in self.monitors:
            self.monitors.remove(mon)
        if mon.closed:
            return
        mon.closed = True
        try:
            await mon.writer.drain()
            mon.writer.close()
            await mon.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        mon.log.info("disconnected")
        # logging keeps every logger it made: forget this one, or a daemon
        # that serves many short connections grows without end
        logging.Logger.manager.loggerDict.pop(mon.log.name, None)

    # -- one monitor -------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        mon = Monitor(reader, writer, next(self._numbers))
        self.monitors.append(mon)
        mon.log.info("connected on %s", writer.get_extra_info("sockname") or "?")
        mon.send(greeting(version()))
        streamer = JsonStreamer()
        loop = asyncio.get_running_loop()
        try:
            while not mon.closed:
                data = await reader.read(65536)
                if not data:
                    break
                for tokens, err in streamer.feed(data):
                    value = None
                    if tokens is not None:
                        if len(tokens) > PARSE_IN_THREAD:
                            value, err = await loop.run_in_executor(None, parse, tokens)
                        else:
                            value, err = parse(tokens)
                    reply = await self._request(mon, value, err)
                    self._pump()
                    if reply is not None:
                        mon.send(reply)
                    await writer.drain()
                    if self._quit:
                        self.request_stop()
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            await self._close(mon)

    async def _request(self, mon: Monitor, value: Any, err: str | None) -> dict[str, Any]:
        if err is not None:
            mon.log.debug("-> error GenericError: %s", err)
            return error_reply(QMPError(err))
        has_id = isinstance(value, dict) and "id" in value
        req_id = value.get("id") if has_id else None
        if mon.log.isEnabledFor(logging.DEBUG):
            mon.log.debug("<- %s", encode(value).decode().rstrip() if isinstance(value, dict)
                          else repr(value))
        try:
            result = await self._dispatch(mon, value)
        except QMPError as e:
            mon.log.debug("-> error %s: %s", e.cls, e.desc)
            return error_reply(e, req_id, has_id)
        except Exception as e:          # a bug: answer, keep the connection
            name = value.get("execute") if isinstance(value, dict) else None
            return error_reply(internal_error(f"command '{name}'", e, mon.log), req_id,
                               has_id)
        out: dict[str, Any] = {"return": result}
        if has_id:
            out["id"] = req_id
        return out

    async def _dispatch(self, mon: Monitor, msg: Any) -> Any:
        name, args, oob = check_request(msg)
        if oob:
            raise QMPError(f"The command {name} does not support OOB")
        if not mon.negotiated:
            if name != NEGOTIATE:
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            check_arguments(name, args)
            for cap in args.get("enable", []):
                raise QMPError(f"Capability {cap} not available")
            mon.negotiated = True
            return {}
        if name not in COMMANDS:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        check_arguments(name, args)
        if name == NEGOTIATE:
            raise QMPError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.commands.run, name, args)


async def serve(engine, unix_paths: Sequence[str] = (), tcp: Sequence[tuple[str, int]] = (),
                ready=None, commands: Commands | None = None,
                exiting: bool = False, startup=None) -> None:
    """Run a server until it is asked to stop, then shut down cleanly.
    ``ready(server)`` is called once the sockets listen. SIGTERM, SIGINT and
    SIGHUP request the stop. With ``exiting`` (the process ends when this
    returns), SIGTERM and SIGHUP stay ignored afterwards: a second stop signal
    must not kill the process half-way through removing its socket and pid
    file (when the event loop closes it would otherwise restore their default
    action)."""
    import signal
    server = Server(engine, commands)
    await server.start(unix_paths, tcp)
    loop = asyncio.get_running_loop()
    if startup is not None:
        # ``startup(commands)`` (e.g. --export) runs in the command worker,
        # once the loop runs (the NBD server needs it); it may raise
        try:
            await loop.run_in_executor(server._worker, startup, server.commands)
        except BaseException:
            await server.shutdown()
            raise

    # Plain signal handlers, not loop.add_signal_handler: removing one of
    # those (as the loop does when it closes) puts back the default action
    # before anything else can be set, and a stop signal landing in that
    # window killed the daemon half-way through its shutdown. Here each
    # disposition is swapped in one step (to SIG_IGN when ``exiting``).
    def on_signal(signum, frame) -> None:
        loop.call_soon_threadsafe(server.request_stop)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:
            pass        # not the main thread: no signals here
    if ready is not None:
        ready(server)
    try:
        await server.wait_stopped()
    finally:
        await server.shutdown()
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_IGN if exiting and sig != signal.SIGINT else old)
