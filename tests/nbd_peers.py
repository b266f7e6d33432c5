"""Helpers for the NBD export tests: the real peers (qemu-nbd, nbdinfo,
nbdcopy, qemu-io, qemu-img) run as subprocesses against ``blkjobs serve``'s
exports. Every wait has a timeout; every server started is stopped."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from daemon_util import TIMEOUT, start_blkjobs

from blkjobs import Engine
from blkjobs.daemon.export_commands import NodeBackend
from blkjobs.nbd.server import Export, NBDServer


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (make deps): it is an NBD peer of the tests")
    return path


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                       timeout=120)
    if check:
        assert p.returncode == 0, (argv, p.stdout, p.stderr)
    return p


def nbd_map(u: str, context: str | None = None) -> str:
    """``nbdinfo --map[=CONTEXT]`` output."""
    return run("nbdinfo", f"--map={context}" if context else "--map", u).stdout


def qemu_io_nbd(u: str, *cmds: str, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, u)
    assert "error" not in p.stdout.lower() and "failed" not in p.stdout.lower(), p.stdout
    return p.stdout


def _wait_for(path: str, proc: subprocess.Popen) -> None:
    """Until the server accepts on ``path``: the socket file appears at
    bind(), before listen() (a client connecting in between is refused:
    test_protocol_edge_cases_answered_as_qemu_nbd failed so under load)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(path)
                    return
                except ConnectionRefusedError:
                    pass
        time.sleep(0.02)


@contextlib.contextmanager
def qemu_nbd(image: str, sock: str, name: str, fmt: str = "qcow2",
             *extra: str) -> Iterator[str]:
    """``qemu-nbd`` serving ``image`` (persistent); yields the URI."""
    proc = subprocess.Popen([tool("qemu-nbd"), "-t", "-f", fmt, f"--socket={sock}", "-x", name,
                             *extra, image], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock, proc)
        yield uri(sock, name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def blkjobs_export(tmp_path, image: str, name: str, writable: bool = False,
                   unmap: bool = False) -> Iterator[str]:
    """``blkjobs serve --export name=image[,writable][,discard=unmap]``;
    yields the URI."""
    sock = str(tmp_path / "blkjobs-nbd.sock")
    spec = f"{name}={image}" + (",writable" if writable else "") + (
        ",discard=unmap" if unmap else "")
    daemon = start_blkjobs(tmp_path, "--export", spec, "--nbd-socket", sock)
    try:
        yield uri(sock, name)
    finally:
        assert daemon.stop() == 0, daemon.stderr


# --------------------------------------------------------------------------
# a bare NBD handshake (to hold a connection open, or look at raw replies)


def handshake(addr: str | tuple[str, int]) -> socket.socket:
    """A bare fixed-newstyle handshake up to the option phase (``addr``: a
    UNIX socket path or (host, port))."""
    s = socket.socket(socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET)
    s.settimeout(15)
    s.connect(addr)
    hello = recv(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT" and struct.unpack(">H", hello[16:])[0] == 3
    s.sendall(struct.pack(">I", 3))
    return s


def recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        assert d, "server closed"
        buf += d
    return buf


def option(s: socket.socket, opt: int, data: bytes = b"") -> tuple[int, bytes]:
    s.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)
    magic, ropt, rtype, n = struct.unpack(">QIII", recv(s, 20))
    assert magic == 0x3E889045565A9 and ropt == opt
    return rtype, recv(s, n)


def go(s: socket.socket, name: bytes) -> tuple[int, int]:
    """NBD_OPT_GO: (size, flags) from NBD_INFO_EXPORT."""
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(name) + 6)
              + struct.pack(">I", len(name)) + name + b"\0\0")
    size = flags = -1
    while True:
        magic, _opt, rtype, n = struct.unpack(">QIII", recv(s, 20))
        data = recv(s, n)
        if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:])
        if rtype == 1:
            return size, flags
        assert rtype == 3, rtype


def simple(s: socket.socket, cmd: int, offset: int, length: int, data: bytes = b"",
            handle: int = 7) -> int:
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, handle, offset, length) + data)
    magic, err, h = struct.unpack(">IIQ", recv(s, 16))
    assert magic == 0x67446698 and h == handle
    if cmd == 0 and err == 0:
        recv(s, length)
    return err


def in_process_export(img: str, made: list, bitmaps: tuple[str, ...] = (), **kw) -> NBDServer:
    """An in-process NBDServer (``kw`` its arguments) exporting the raw image
    ``img`` read-only as ``d``; (server, engine) is appended to ``made`` for
    the caller's fixture to close."""
    eng = Engine()
    node = eng.open(img, "raw", node_name="d", read_only=True)
    with eng.io:
        fe = eng.io.attach(node, writable=False)
    srv = NBDServer(**kw)
    made.append((srv, eng))
    srv.add_export(Export("d", NodeBackend(eng.io, fe, {}), bitmaps=bitmaps))
    return srv


async def end_fleecing(s) -> None:
    """Take down the fleecing scenario of tests/test_nbd_jobs.py and
    tests/test_nbd_zerocopy.py on QMP session ``s``: the exports "fleece"
    and "vm", the backup job "fl", the NBD server."""
    for eid in ("fleece", "vm"):
        await s.x("block-export-del", id=eid)
        await s.until("BLOCK_EXPORT_DELETED", id=eid)
    await s.x("job-cancel", id="fl")
    await s.until("JOB_STATUS_CHANGE", id="fl", status="null")
    await s.x("nbd-server-stop")
