"""Zero-copy READ replies of the NBD export's C data path (docs/nbd.md,
"Zero-copy reads"): the bytes a client receives are the bytes of the read
even when it reads its replies only after the file could have changed.

* A client sends READs of a node exported read-only and does not read the
  replies (sent zero-copy: the socket holds the file's page-cache pages);
  something in the same process then takes write on the node: the grant
  waits for the client to read them, or fails with the documented error
  naming the export -- the client never gets the bytes written after.
* The same for a permission updated to write-unchanged and a reopen
  read-write.
* A fleecing export (backup sync=none) read while the guest writes the
  source keeps its point-in-time bytes.
* Zero-copy is used where it may be (a UNIX socket, a node no one in the
  process may write -- qcow2, and raw, whose file other processes may
  write -- cached data: the export's counter) and not on TCP, a writable
  node, O_DIRECT, uncached data, nor with BLKJOBS_NBD_ZEROCOPY=0 -- and
  every copy equals the image.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from blkjobs import Engine
from blkjobs.daemon.export_commands import NodeBackend
from blkjobs.formats import cache
from blkjobs.graph.perm import Perm, PermissionConflict
from blkjobs.nbd import fastpath
from blkjobs.nbd.server import Export, NBDServer
from daemon_util import qcow2_node, qemu_img, qemu_io, run_daemon, start_blkjobs
from nbd_peers import end_fleecing, go, handshake, qemu_io_nbd, recv, run, uri

WAIT = 30
REQ = 0x25609513
SIMPLE = 0x67446698
KiB, MiB = 1 << 10, 1 << 20
#: two reads of 64 KiB: their replies fit in the socket's buffer
N, LEN = 2, 64 * KiB


def _image(tmp_path, fmt: str = "qcow2", name: str = "d") -> str:
    """4 MiB of 0x11, in the page cache."""
    img = str(tmp_path / f"{name}.{fmt}")
    assert qemu_img("create", "-f", fmt, img, "4M").returncode == 0
    qemu_io(img, "write -P 0x11 0 4M", fmt=fmt)
    with open(img, "rb") as f:
        while f.read(MiB):
            pass
    return img


@pytest.fixture
def serve(tmp_path) -> Iterator:
    """serve(image, fmt, writable=False, read_only=False, tcp=False,
    direct=False) -> (address, Engine, node, server, export): the node
    opened read-write (unless ``read_only``; O_DIRECT with ``direct``),
    exported read-only unless ``writable``."""
    made: list[tuple[NBDServer, Engine]] = []

    def start(image: str, fmt: str, writable: bool = False, read_only: bool = False,
              tcp: bool = False, direct: bool = False):
        eng = Engine()
        with cache.opening(os.O_DIRECT if direct else 0):
            node = eng.open(image, fmt, node_name="d", read_only=read_only)
        with eng.io:
            fe = eng.io.attach(node, writable=writable)
        srv = NBDServer(workers=4)
        made.append((srv, eng))
        exp = Export("d", NodeBackend(eng.io, fe, {}), writable=writable)
        srv.add_export(exp)
        if tcp:
            addr: str | tuple[str, int] = ("127.0.0.1", srv.listen_tcp("127.0.0.1", 0))
        else:
            addr = str(tmp_path / f"z{len(made)}.sock")
            srv.listen_unix(addr)
        return addr, eng, node, srv, exp
    yield start
    for srv, eng in made:
        srv.close()
        eng.close()


def _send_reads(s: socket.socket, first: int = 1) -> None:
    s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, first + i, i * LEN, LEN)
                       for i in range(N)))


def _wait_queued(s: socket.socket, n: int) -> None:
    """Until the client's socket holds n bytes unread (FIONREAD): the
    server sent them."""
    import fcntl
    import termios
    import time
    deadline = time.monotonic() + WAIT
    buf = bytearray(4)
    while True:
        fcntl.ioctl(s.fileno(), termios.FIONREAD, buf)
        if struct.unpack("i", buf)[0] >= n:
            return
        assert time.monotonic() < deadline, "the replies were not sent"
        time.sleep(0.001)


def _replies(s: socket.socket, n: int = N) -> dict[int, bytes]:
    out = {}
    for _ in range(n):
        magic, err, h = struct.unpack(">IIQ", recv(s, 16))
        assert magic == SIMPLE and err == 0
        out[h] = recv(s, LEN)
    return out


def _read(s: socket.socket, off: int, handle: int = 99) -> bytes:
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, handle, off, LEN))
    return _replies(s, 1)[handle]


def _grant_and_write(eng, node, res: dict) -> threading.Thread:
    def go_write():
        try:
            fe = eng.attach(node)           # takes write on the node
            fe.write(0, b"\x77" * (N * LEN))
            res["ok"] = True
        except PermissionConflict as e:
            res["error"] = str(e)
    t = threading.Thread(target=go_write, daemon=True)
    t.start()
    return t


def _holding(tmp_path, serve, read_only: bool = False) -> tuple:
    """A read-only export of a qcow2 node whose client sent N READs and
    reads none of the replies, all queued in its socket: (client socket,
    engine, node, server, export)."""
    path, eng, node, srv, exp = serve(_image(tmp_path), "qcow2", read_only=read_only)
    s = handshake(path)
    go(s, b"d")
    _send_reads(s)
    _wait_queued(s, N * (16 + LEN))
    return s, eng, node, srv, exp


def test_a_write_grant_fails_while_a_client_holds_zero_copy_replies(tmp_path, serve,
                                                                      monkeypatch):
    monkeypatch.setattr(fastpath, "ZC_WAIT", 1.0)
    s, eng, node, srv, exp = _holding(tmp_path, serve)
    res: dict = {}
    t = _grant_and_write(eng, node, res)
    t.join(WAIT)
    assert not t.is_alive()
    assert res["error"].split(" cannot take ", 1)[1] == (
        "'write' on node 'd': a client of NBD export 'd' has not read, for 1 s, replies "
        "sent from the node's files without copying; try again once it reads, or "
        "disconnect it")
    # the client gets the bytes of its reads
    assert _replies(s) == {1 + i: b"\x11" * LEN for i in range(N)}
    # read: the grant goes through, the write lands, later reads see it
    res = {}
    t = _grant_and_write(eng, node, res)
    t.join(WAIT)
    assert res == {"ok": True}
    assert _read(s, 0) == b"\x77" * LEN
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert (exp.zero_copy_reads, exp.zero_copy_bytes) == (N, N * LEN)


def test_a_write_grant_waits_until_the_client_read_its_replies(tmp_path, serve):
    s, eng, node, srv, exp = _holding(tmp_path, serve)
    res: dict = {}
    t = _grant_and_write(eng, node, res)
    got = _replies(s)
    t.join(WAIT)
    assert res == {"ok": True}
    assert got == {1 + i: b"\x11" * LEN for i in range(N)}
    assert _read(s, LEN) == b"\x77" * LEN
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert exp.zero_copy_reads == N


async def _fleecing(s, d) -> dict:
    import asyncio
    src, fleece = str(d / "src.qcow2"), str(d / "fleece.qcow2")
    assert qemu_img("create", "-f", "qcow2", src, "4M").returncode == 0
    qemu_io(src, "write -P 0x11 0 4M")
    assert qemu_img("create", "-f", "qcow2", "-b", src, "-F", "qcow2", fleece).returncode == 0
    sock = str(d / "nbd.sock")
    await s.x("blockdev-add", **qcow2_node("src", src))
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await s.x("blockdev-add", **qcow2_node("fleece", fleece, backing="src"))
    await s.x("blockdev-backup", device="src", target="fleece", sync="none", **{
        "job-id": "fl", "filter-node-name": "cbw"})
    await s.x("block-export-add", type="nbd", id="vm", **{"node-name": "cbw"}, name="src",
              writable=True)
    await s.x("block-export-add", type="nbd", id="fleece", **{"node-name": "fleece"})
    c = handshake(sock)
    go(c, b"fleece")
    _send_reads(c)
    await asyncio.to_thread(_wait_queued, c, N * (16 + LEN))
    # the guest rewrites what the fleecing client has not read yet
    await asyncio.to_thread(qemu_io_nbd, uri(sock, "src"), f"write -P 0xee 0 {N * LEN}")
    got = _replies(c)
    c.close()
    now = await asyncio.to_thread(qemu_io_nbd, uri(sock, "src"), f"read -P 0xee 0 {N * LEN}",
                                  read_only=True)
    await end_fleecing(s)
    return {"got": got, "now": now}


def test_a_fleecing_export_keeps_its_point_in_time_bytes(tmp_path):
    out = run_daemon(start_blkjobs, tmp_path, _fleecing)
    assert out["got"] == {1 + i: b"\x11" * LEN for i in range(N)}
    assert "read 131072/131072 bytes" in out["now"]


@pytest.mark.parametrize("case", ["unix", "tcp", "writable", "raw", "direct", "off"])
def test_zero_copy_where_it_may_be_and_nowhere_else(tmp_path, serve, monkeypatch, case):
    fmt = "raw" if case == "raw" else "qcow2"
    img = _image(tmp_path, fmt)
    if case == "off":
        monkeypatch.setenv("BLKJOBS_NBD_ZEROCOPY", "0")
    addr, eng, node, srv, exp = serve(
        img, fmt, writable=case == "writable", read_only=case == "raw", tcp=case == "tcp",
        direct=case == "direct")
    u = (f"nbd://127.0.0.1:{addr[1]}/d" if case == "tcp" else uri(addr, "d"))
    out = tmp_path / "out.raw"
    run("nbdcopy", u, str(out))
    srv.settle(exp, timeout=WAIT)
    assert out.read_bytes() == b"\x11" * (4 * MiB)
    assert exp.zero_copy_bytes == (4 * MiB if case in ("unix", "raw") else 0)


def test_uncached_data_is_read_not_sent_zero_copy(tmp_path, serve):
    """A range not in the page cache is read (in parallel by the workers),
    not sent from the disk under the send lock; once cached, zero-copy."""
    img = _image(tmp_path)
    path, eng, node, srv, exp = serve(img, "qcow2")
    fd = os.open(img, os.O_RDONLY)      # (out of the cache once open: the open reads it)
    try:
        os.fsync(fd)        # (dirty pages stay cached)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    s = handshake(path)
    go(s, b"d")
    assert _read(s, MiB) == b"\x11" * LEN
    assert _read(s, MiB) == b"\x11" * LEN
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert (exp.zero_copy_reads, exp.zero_copy_bytes) == (1, LEN)


def test_a_reopen_and_a_permission_update_stop_zero_copy_too(tmp_path, serve, monkeypatch):
    """The other grants: a permission updated to write, a reopen read-write
    (a new file description) -- both fail while the client holds replies,
    and go through once it has read them."""
    monkeypatch.setattr(fastpath, "ZC_WAIT", 0.5)
    s, eng, node, srv, exp = _holding(tmp_path, serve, read_only=True)
    p = node.take("a test", Perm.CONSISTENT_READ)
    with pytest.raises(PermissionConflict) as e:
        p.update(perm=Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    assert str(e.value).startswith("a test cannot take 'write unchanged' on node 'd': a "
                                   "client of NBD export 'd' has not read, for 0.5 s,")
    assert p.perm == Perm.CONSISTENT_READ
    with pytest.raises(PermissionConflict) as e:
        node.reopen(read_only=False)
    assert str(e.value).startswith("reopen cannot take 'write, write unchanged, resize' on "
                                   "node 'd': a client of NBD export 'd'")
    assert node.read_only
    assert _replies(s) == {1 + i: b"\x11" * LEN for i in range(N)}
    p.update(perm=Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    p.release()
    node.reopen(read_only=False)
    assert not node.read_only
    assert _read(s, 0) == b"\x11" * LEN
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert exp.zero_copy_reads == N
