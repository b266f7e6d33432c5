"""Helpers for the daemon tests: start ``blkjobs serve`` (or the reference,
``qemu-storage-daemon``) as a subprocess, talk to it with ``qemu.qmp`` or a
raw socket, collect events. Every wait has a timeout."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

#: a safety net (a wait that fails instead of hanging), generous for a loaded machine
TIMEOUT = 60.0


class Daemon:
    """A QMP daemon subprocess listening on ``sock``."""

    def __init__(self, argv: list[str], sock: str, ready_line: bool, ready_file: str = ""):
        self.sock = sock
        # (PYTHONFAULTHANDLER: a daemon of ours that hangs says where, at stop)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        self.argv = argv
        deadline = time.monotonic() + TIMEOUT
        if ready_line:
            line = self.proc.stdout.readline()
            assert line, f"daemon exited: {self.proc.stderr.read()}"
            self.ready = json.loads(line)
        while not (os.path.exists(sock) and (not ready_file or os.path.exists(ready_file))):
            assert self.proc.poll() is None, f"daemon exited: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, "daemon socket did not appear"
            time.sleep(0.02)
        if not ready_line and not ready_file:
            # qemu-storage-daemon binds the socket (the file appears) before
            # it listens: connecting in between is refused
            while True:
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(sock)
                    break
                except ConnectionRefusedError:
                    assert self.proc.poll() is None, f"daemon exited: {self.proc.stderr.read()}"
                    assert time.monotonic() < deadline, "daemon socket did not listen"
                    time.sleep(0.02)
                finally:
                    probe.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            # where it hangs: ours dumps its threads' stacks on SIGABRT
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            raise AssertionError(f"daemon {self.argv[0]} did not stop on SIGTERM; its stderr:\n"
                                 f"{self.proc.stderr.read()[-20000:]}") from None
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


def start_blkjobs(tmp_path, *extra: str) -> Daemon:
    sock = str(tmp_path / "blkjobs.sock")
    return Daemon([sys.executable, "-m", "blkjobs", "serve", "--socket", sock,
                   "--print-ready", *extra], sock, True)


def start_qsd(tmp_path) -> Daemon:
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        pytest.fail("qemu-storage-daemon is not installed (Debian qemu-system-common): "
                    "it is the reference of the comparison test")
    sock, pid = str(tmp_path / "qsd.sock"), str(tmp_path / "qsd.pid")
    for stale in (pid,):                # a killed qsd's, in the same directory
        if os.path.exists(stale):
            os.unlink(stale)
    # the pid file is written once every option was processed: the monitor
    # listens. (A probe connection instead raced with the test's own under
    # load: qsd's single-client monitor dropped one, "Failed to receive
    # Greeting: EOFError".)
    return Daemon([qsd, "--chardev", f"socket,path={sock},server=on,wait=off,id=m0",
                   "--monitor", "chardev=m0", "--pidfile", pid], sock, False, ready_file=pid)


# --------------------------------------------------------------------------
# qemu.qmp sessions


class Session:
    """A connected QMPClient with an event listener attached from the start."""

    def __init__(self, qmp: QMPClient, events: EventListener):
        self.qmp = qmp
        self.events = events

    async def x(self, cmd: str, **args: Any) -> Any:
        return await asyncio.wait_for(self.qmp.execute(cmd, args or None), TIMEOUT)

    async def err(self, cmd: str, **args: Any) -> tuple[str, str]:
        """Run a command that must fail; return (class, desc)."""
        try:
            await self.x(cmd, **args)
        except ExecuteError as e:
            return e.error_class, e.error.error.desc
        raise AssertionError(f"{cmd} {args} did not fail")

    async def event(self, name: str | None = None, **data: Any) -> dict:
        """The next event (skipping nothing): it must match."""
        ev = await asyncio.wait_for(self.events.get(), TIMEOUT)
        if name is not None:
            assert ev["event"] == name, ev
        for k, v in data.items():
            assert ev["data"].get(k) == v, ev
        return ev

    async def until(self, name: str, **data: Any) -> list[dict]:
        """Events up to and including the first match."""
        got = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            ev = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            got.append(ev)
            if ev["event"] == name and all(ev["data"].get(k) == v for k, v in data.items()):
                return got

    async def close(self) -> None:
        await asyncio.wait_for(self.qmp.disconnect(), TIMEOUT)

    async def has_break_points(self) -> bool:
        """blkjobs (x-blkjobs-blkdebug-break), not qemu-storage-daemon."""
        if not hasattr(self, "_breaks"):
            cmds = await self.x("query-commands")
            self._breaks = any(c["name"] == "x-blkjobs-blkdebug-break" for c in cmds)
        return self._breaks

    async def hold(self, node: str, tag: str) -> dict:
        """Keep the next job that writes ``node`` running until it is
        cancelled: blkjobs holds its first write to ``node`` at a break point
        (``tag``); qemu-storage-daemon has no break points over QMP, so its
        job gets a rate limit of 1 byte/s (one cluster, then a sleep of hours).
        Returns the job command's extra arguments; call :meth:`held` once the
        job is started and :meth:`cancel_held` to end it."""
        if await self.has_break_points():
            await self.x("x-blkjobs-blkdebug-break", node=node, event="write_aio", tag=tag)
            return {}
        return {"speed": 1}

    async def held(self, tag: str) -> None:
        """Wait until the job :meth:`hold` prepared is held (blkjobs)."""
        if await self.has_break_points():
            await self.x("x-blkjobs-blkdebug-wait-break", tag=tag)

    async def cancel_held(self, job: str, tag: str) -> None:
        """Cancel the held job, let go of its request, wait until it is gone."""
        await self.x("job-cancel", id=job)
        if await self.has_break_points():
            await self.x("x-blkjobs-blkdebug-remove-break", tag=tag)
        await self.until("JOB_STATUS_CHANGE", id=job, status="null")


async def connect(sock: str) -> Session:
    qmp = QMPClient("test")
    events = EventListener()
    qmp.register_listener(events)
    await asyncio.wait_for(qmp.connect(sock), TIMEOUT)
    return Session(qmp, events)


def brief(events: list[dict]) -> list[tuple[str, dict]]:
    """Events without timestamps, for comparison."""
    return [(e["event"], dict(e.get("data", {}))) for e in events]


def status_seq(job: str, events: list[dict]) -> list[str]:
    return [e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"]
            for e in events if e["data"].get("id", e["data"].get("device")) == job]


def drop_transient_pauses(events: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Remove the paused/running pairs QEMU emits while draining a job
    (docs/job-model.md §9: blkjobs does not produce them)."""
    out: list[tuple[str, dict]] = []
    i = 0
    while i < len(events):
        name, data = events[i]
        if name == "JOB_STATUS_CHANGE" and data["status"] == "paused" and i + 1 < len(events) \
                and events[i + 1] == ("JOB_STATUS_CHANGE", {"id": data["id"],
                                                            "status": "running"}):
            i += 2
            continue
        out.append(events[i])
        i += 1
    return out


# --------------------------------------------------------------------------
# raw sockets (greeting, negotiation, malformed input)


class Raw:
    def __init__(self, sock_path: str):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(TIMEOUT)
        self.s.connect(sock_path)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def msg(self) -> dict:
        raw = self.line()
        raw.decode("ascii")           # the server writes ASCII only
        return json.loads(raw)

    def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.s.sendall(data)

    def ask(self, data: bytes | dict) -> dict:
        self.send(data)
        return self.msg()

    def close(self) -> None:
        self.s.close()


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("qemu-img")
    if not tool:
        pytest.fail("qemu-img is not installed (Debian qemu-utils): the oracle is required")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def qemu_io(path: str, cmd: str, fmt: str = "qcow2") -> None:
    tool = shutil.which("qemu-io")
    if not tool:
        pytest.fail("qemu-io is not installed (Debian qemu-utils): the oracle is required")
    subprocess.run([tool, "-f", fmt, "-c", cmd, path], check=True, capture_output=True,
                   timeout=60)


def make_images(tmp_path, size: str = "4M") -> tuple[str, str]:
    """src.qcow2 with data (1 MiB of 0xaa, 64 KiB of 0x55 at 2 MiB) and an
    empty tgt.qcow2 of the same size."""
    src, tgt = str(tmp_path / "src.qcow2"), str(tmp_path / "tgt.qcow2")
    assert qemu_img("create", "-f", "qcow2", src, size).returncode == 0
    qemu_io(src, "write -P 0xaa 0 1M")
    qemu_io(src, "write -P 0x55 2M 64k")
    assert qemu_img("create", "-f", "qcow2", tgt, size).returncode == 0
    return src, tgt


def qcow2_node(name: str, path: str, **extra: Any) -> dict:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": path}, **extra}


def compare(a: str, b: str) -> tuple[int, str]:
    p = qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b)
    return p.returncode, p.stdout + p.stderr


def run_daemon(start, d, scenario):
    """Start a daemon with ``start(d)``, run ``await scenario(session, d)``
    on one QMP session, stop the daemon (it must exit 0); the result."""
    import asyncio
    daemon = start(d)

    async def run():
        s = await connect(daemon.sock)
        try:
            return await scenario(s, d)
        finally:
            await s.close()
    try:
        return asyncio.run(run())
    finally:
        assert daemon.stop() == 0, daemon.stderr


def side_by_side(tmp_path, scenario) -> tuple:
    """Run ``scenario(session, dir)`` on qemu-storage-daemon and on ours,
    each in its own directory: (reference, ours)."""
    out = {}
    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        out[name] = run_daemon(start, d, scenario)
    return out["qsd"], out["blkjobs"]
