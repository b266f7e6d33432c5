"""Client reconnection: a ``blockdev-add driver=nbd`` node with QEMU's
``reconnect-delay``. When qemu-nbd goes away and comes back on the same
socket within the delay, I/O on the node resumes (a read through an export
of the node waits, then returns the data); past the delay the request fails
with one error that says so, later requests fail at once while the node
keeps connecting in the background, and once the server is back they work
again (as in qemu-storage-daemon). Every step waits for an event (a socket
appearing, a connection accepted, a process's output), never for time."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import time

import pytest

from daemon_util import run_daemon, side_by_side, start_blkjobs
from test_nbd_client import Server, _need, qio

WAIT = 60.0
MiB = 1 << 20


def _image(tmp_path) -> str:
    img = str(tmp_path / "d.raw")
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    qio("raw", img, "write -P 0x5a 0 4M")
    return img


def _qemu_nbd(img: str, sock: str) -> Server:
    return Server([_need("qemu-nbd"), "-k", sock, "-f", "raw", "-t", "-e", "8", img], sock)


def _stop(s: Server, sock: str) -> None:
    s.stop()
    if os.path.exists(sock):
        os.unlink(sock)


def _qemu_io_read(uri: str) -> subprocess.Popen:
    return subprocess.Popen([_need("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0x5a 0 1M",
                             uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_io_resumes_when_the_server_comes_back_within_the_delay(tmp_path):
    img = _image(tmp_path)
    sock = str(tmp_path / "q.sock")
    exp = str(tmp_path / "e.sock")
    uri = f"nbd+unix:///r?socket={exp}"
    servers = [_qemu_nbd(img, sock)]

    async def scenario(q, d):
        await q.x("blockdev-add", driver="nbd", **{"node-name": "r", "reconnect-delay": 30},
                  server={"type": "unix", "path": sock})
        await q.x("nbd-server-start", addr={"type": "unix", "data": {"path": exp}})
        await q.x("block-export-add", type="nbd", id="e", **{"node-name": "r"})
        out = []
        first = await asyncio.to_thread(lambda: _qemu_io_read(uri).communicate(timeout=WAIT))
        out.append(first[0])
        _stop(servers.pop(), sock)

        def outage() -> str:
            # the server is gone; a stand-in listens on its socket, so the
            # daemon's reconnection attempt is seen (accepted, then dropped)
            stand_in = socket.socket(socket.AF_UNIX)
            stand_in.bind(sock)
            stand_in.listen(1)
            stand_in.settimeout(WAIT)
            reader = _qemu_io_read(uri)
            conn, _ = stand_in.accept()         # the read is waiting for a connection
            conn.close()
            stand_in.close()
            os.unlink(sock)
            servers.append(_qemu_nbd(img, sock))      # back on the same socket
            return reader.communicate(timeout=WAIT)[0]
        out.append(await asyncio.to_thread(outage))
        await q.x("block-export-del", id="e", mode="hard")
        await q.until("BLOCK_EXPORT_DELETED")
        await q.x("nbd-server-stop")
        await q.x("blockdev-del", **{"node-name": "r"})
        return out

    try:
        first, resumed = run_daemon(lambda d: start_blkjobs(d), tmp_path, scenario)
    finally:
        for s in servers:
            s.stop()
    assert "read 1048576/1048576 bytes at offset 0" in first, first
    assert "read 1048576/1048576 bytes at offset 0" in resumed, resumed
    assert "fail" not in resumed.lower(), resumed


async def past_the_delay(q, d) -> dict:
    """qemu-nbd stops; a backup reads the node: the job fails once the delay
    has passed."""
    img = _image(d)
    sock = str(d / "q.sock")
    tgt = str(d / "t.raw")
    with open(tgt, "wb") as f:
        f.truncate(4 * MiB)
    server = _qemu_nbd(img, sock)
    try:
        await q.x("blockdev-add", driver="nbd", **{"node-name": "r", "reconnect-delay": 1},
                  server={"type": "unix", "path": sock})
        await q.x("blockdev-add", driver="raw", **{"node-name": "t"},
                  file={"driver": "file", "filename": tgt})
        await asyncio.to_thread(_stop, server, sock)
        await q.x("blockdev-backup", device="r", target="t", sync="full", **{"job-id": "b"})
        ev = (await q.until("BLOCK_JOB_COMPLETED", device="b"))[-1]
        await q.x("blockdev-del", **{"node-name": "r"})
    finally:
        server.stop()
    return {k: ev["data"].get(k) for k in ("error", "len", "type")}


def test_past_the_delay_a_job_fails_as_in_qemu(tmp_path):
    ref, ours = side_by_side(tmp_path, past_the_delay)
    assert ours == ref
    assert ours["error"] == "Input/output error"


def test_past_the_delay_the_error_says_why(tmp_path):
    from blkjobs.formats.nbd import Nbd
    img = _image(tmp_path)
    sock = str(tmp_path / "q.sock")
    server = _qemu_nbd(img, sock)
    try:
        drv = Nbd(f"nbd+unix:///?socket={sock}", reconnect_delay=0.5)
        assert drv.read(0, 512) == b"\x5a" * 512
        _stop(server, sock)
        with pytest.raises(OSError) as e:
            drv.read(0, 512)
        drv.close()
    finally:
        server.stop()
    assert e.value.errno == errno.EIO
    assert "; no reconnection within reconnect-delay (0.5 s): Could not open" in str(e.value)


def test_past_the_delay_requests_fail_at_once_then_work_when_the_server_is_back(tmp_path):
    """The driver is not broken past the delay: it goes on connecting in the
    background, requests fail with EIO meanwhile, and once qemu-nbd is back
    on the same socket they work again (as QEMU's nbd node)."""
    from blkjobs.formats.nbd import Nbd
    img = _image(tmp_path)
    sock = str(tmp_path / "q.sock")
    servers = [_qemu_nbd(img, sock)]
    try:
        drv = Nbd(f"nbd+unix:///?socket={sock}", reconnect_delay=0.5)
        assert drv.read(0, 512) == b"\x5a" * 512
        _stop(servers.pop(), sock)
        errors = []
        for _ in range(2):
            with pytest.raises(OSError) as e:
                drv.read(0, 512)
            errors.append((e.value.errno, str(e.value)))
        # the second request failed with the first one's error: the node
        # stays down until the background connection succeeds
        assert errors[1] == errors[0]
        reconnector = drv._reconnector
        assert reconnector is not None
        servers.append(_qemu_nbd(img, sock))      # its socket appeared
        # the event: the background connection succeeds (its thread ends),
        # with no request asking for it
        reconnector.join(WAIT)
        assert not reconnector.is_alive(), "no reconnection"
        assert drv.read(1 * MiB, 4096) == b"\x5a" * 4096
        drv.close()
    finally:
        for s in servers:
            s.stop()
    assert errors[0][0] == errno.EIO
    assert "; no reconnection within reconnect-delay (0.5 s): Could not open" in errors[0][1]


async def past_the_delay_and_back(q, d) -> list:
    """qemu-nbd stops: a backup of the node fails once the delay has passed,
    the next one fails too (the server is still away); qemu-nbd comes back
    on the same socket: backups are retried until one succeeds (QEMU's
    background connection retries with a growing pause, up to 16 s), and it
    copies the data."""
    img = _image(d)
    sock = str(d / "q.sock")
    tgt = str(d / "t.raw")
    with open(tgt, "wb") as f:
        f.truncate(4 * MiB)
    servers = [_qemu_nbd(img, sock)]
    outcomes: list = []

    async def backup(job: str) -> dict:
        await q.x("blockdev-backup", device="r", target="t", sync="full", **{"job-id": job})
        ev = (await q.until("BLOCK_JOB_COMPLETED", device=job))[-1]
        return {k: ev["data"].get(k) for k in ("error", "len", "offset", "type")}
    try:
        await q.x("blockdev-add", driver="nbd", **{"node-name": "r", "reconnect-delay": 1},
                  server={"type": "unix", "path": sock})
        await q.x("blockdev-add", driver="raw", **{"node-name": "t"},
                  file={"driver": "file", "filename": tgt})
        await asyncio.to_thread(_stop, servers.pop(), sock)
        outcomes.append(await backup("b1"))
        outcomes.append(await backup("b2"))
        servers.append(await asyncio.to_thread(_qemu_nbd, img, sock))
        deadline = time.monotonic() + WAIT
        n = 3
        while True:
            r = await backup(f"b{n}")
            if r["error"] is None:
                break
            assert r == outcomes[1], r
            assert time.monotonic() < deadline, "no reconnection"
            n += 1
        outcomes.append(r)
        await q.x("blockdev-del", **{"node-name": "r"})
        await q.x("blockdev-del", **{"node-name": "t"})
    finally:
        for s in servers:
            await asyncio.to_thread(s.stop)
    with open(tgt, "rb") as f:
        outcomes.append(f.read() == b"\x5a" * 4 * MiB)
    return outcomes


def test_past_the_delay_the_node_works_again_when_the_server_is_back(tmp_path):
    ref, ours = side_by_side(tmp_path, past_the_delay_and_back)
    assert ours == ref
    assert ours[0]["error"] == ours[1]["error"] == "Input/output error"
    assert ours[2]["error"] is None and ours[3] is True
