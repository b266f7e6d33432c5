"""Reads outside the I/O lock, and several requests of one NBD connection
served at once.

* ``BlockIO.guest_read`` of a raw node runs without the I/O lock, tracked
  as in flight: a write landing in its range, a quiesce (a pivot) and
  closing the node wait for it (qcow2 reads: test_qcow2_read_outside_lock.py).
* The NBD server answers a client's later request while an earlier one is
  still being served (replies by handle, out of order), finishes the
  requests in flight on ``DISC`` before closing, and with ``workers=1``
  serves them in order.

A read is held inside the raw driver (its ``readinto`` waits for an event)
so each step waits for an event, never for time."""
from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

import pytest

from blkjobs import Engine
from blkjobs.nbd.server import Export, NBDServer
from nbd_peers import go, handshake, recv

WAIT = 30           # seconds: only a bound on a failure, never slept
REQ = 0x25609513


class HeldRead:
    """The node's driver holds a read of offset ``at`` until :meth:`go`;
    every driver write records whether such a read was inside it."""

    def __init__(self, node, at: int = 0):
        self.drv = node.driver
        self.at = at
        self.inside = threading.Event()     # the held read is in the driver
        self.release = threading.Event()
        self.reading = False
        self.torn = False                   # a write reached the driver meanwhile
        self.order: list[str] = []
        self._read, self._write = self.drv.readinto, self.drv.write

    def readinto(self, offset, buf):
        if offset != self.at:
            return self._read(offset, buf)
        self.reading = True
        self.inside.set()
        assert self.release.wait(WAIT)
        self._read(offset, buf)
        self.reading = False
        self.order.append("read")

    def write(self, offset, data, fill=None):
        self.torn |= self.reading
        self._write(offset, data)
        self.order.append("write")

    def go(self) -> None:
        self.release.set()


@pytest.fixture
def raw_node(tmp_path) -> Iterator[tuple[Engine, object, HeldRead]]:
    img = tmp_path / "d.raw"
    img.write_bytes(b"o" * (1 << 20))
    eng = Engine()
    try:
        node = eng.open(str(img), "raw", node_name="d")
        held = HeldRead(node)
        node.driver.readinto = held.readinto
        node.driver.write = held.write
        yield eng, node, held
    finally:
        eng.close()


def _start(fn, *args) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def _on_call(obj, name: str) -> threading.Event:
    """An event set when ``obj.name`` is called (``busy``: when it returns
    true), the call going on as before."""
    ev = threading.Event()
    orig = getattr(obj, name)

    def hook(*a):
        if name != "busy":
            ev.set()
        r = orig(*a)
        if r:
            ev.set()
        return r
    setattr(obj, name, hook)
    return ev


def test_raw_read_runs_outside_the_io_lock(raw_node):
    eng, node, held = raw_node
    fe = eng.attach(node)
    t, out = _start(fe.read, 0, 4096)
    assert held.inside.wait(WAIT)
    # the I/O lock is free while the read is in the driver (it used to be held)
    assert eng.io.lock.acquire(timeout=WAIT), "the read holds the I/O lock"
    eng.io.lock.release()
    # another read and a write elsewhere go on meanwhile
    assert fe.read(8192, 4) == b"oooo"
    fe.write(65536, b"x" * 4096)
    held.go()
    t.join(WAIT)
    assert out == [b"o" * 4096]


def test_write_landing_in_a_read_in_flight_waits_for_it(raw_node):
    eng, node, held = raw_node
    fe = eng.attach(node)
    t, out = _start(fe.read, 0, 4096)
    assert held.inside.wait(WAIT)
    saw = _on_call(eng.io._reads(node), "busy")
    w, _ = _start(fe.write, 2048, b"n" * 4096)
    assert saw.wait(WAIT)                   # the write found the read in its way
    assert held.order == []
    held.go()
    t.join(WAIT)
    w.join(WAIT)
    assert not held.torn and held.order == ["read", "write"]
    assert out == [b"o" * 4096]
    assert fe.read(0, 8192) == b"o" * 2048 + b"n" * 4096 + b"o" * 2048


def test_quiesce_and_close_wait_for_reads_in_flight(raw_node):
    eng, node, held = raw_node
    fe = eng.attach(node)
    t, out = _start(fe.read, 0, 4096)
    assert held.inside.wait(WAIT)
    reads = eng.io._reads(node)
    drained = _on_call(reads, "drain")
    q, _ = _start(eng.io.quiesce, node)
    assert drained.wait(WAIT)
    assert q.is_alive() and held.order == []
    held.go()
    t.join(WAIT)
    q.join(WAIT)
    assert not q.is_alive() and out == [b"o" * 4096]
    eng.io.unquiesce(node)
    # a close waits too: the read's file descriptor stays open under it
    held.release.clear()
    held.inside.clear()
    t, out = _start(fe.read, 0, 4096)
    assert held.inside.wait(WAIT)
    drained.clear()
    fe.close()
    c, _ = _start(node.close)
    assert drained.wait(WAIT)
    assert c.is_alive()
    held.go()
    t.join(WAIT)
    c.join(WAIT)
    assert out == [b"o" * 4096]     # its fd was still open


# --------------------------------------------------------------------------
# the server


class SlowBackend:
    """A 1 MiB export of b"d"; a read of offset 0 waits for ``release``."""

    size = 1 << 20

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()

    def readinto(self, offset, buf):
        if offset == 0:
            self.inside.set()
            assert self.release.wait(WAIT)
        buf[:] = b"d" * len(buf)

    def flush(self) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    made: list[NBDServer] = []

    def start(workers: int) -> tuple[str, SlowBackend]:
        srv = NBDServer(workers=workers)
        made.append(srv)
        be = SlowBackend()
        srv.add_export(Export("d", be))
        path = str(tmp_path / f"s{len(made)}.sock")
        srv.listen_unix(path)
        return path, be
    yield start
    for srv in made:
        srv.close()


def _read(s, handle: int, offset: int, length: int) -> None:
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, handle, offset, length))


def _reply(s, length: int) -> tuple[int, int, bytes]:
    magic, err, h = struct.unpack(">IIQ", recv(s, 16))
    assert magic == 0x67446698
    return h, err, recv(s, length) if not err else b""


def test_later_request_answered_while_an_earlier_one_waits(server):
    path, be = server(4)
    s = handshake(path)
    go(s, b"d")
    _read(s, 1, 0, 4096)
    assert be.inside.wait(WAIT)
    _read(s, 2, 4096, 512)
    assert _reply(s, 512) == (2, 0, b"d" * 512)     # out of order: 1 still waits
    be.release.set()
    assert _reply(s, 4096) == (1, 0, b"d" * 4096)
    s.close()


def test_disc_finishes_requests_in_flight(server):
    path, be = server(4)
    s = handshake(path)
    go(s, b"d")
    _read(s, 1, 0, 4096)
    assert be.inside.wait(WAIT)
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 2, 9, 0, 0))      # DISC
    be.release.set()
    assert _reply(s, 4096) == (1, 0, b"d" * 4096)
    assert s.recv(1) == b""
    s.close()


def test_one_worker_serves_in_order(server):
    path, be = server(1)
    s = handshake(path)
    go(s, b"d")
    _read(s, 1, 0, 4096)
    assert be.inside.wait(WAIT)
    _read(s, 2, 4096, 512)
    be.release.set()
    assert [_reply(s, n)[0] for n in (4096, 512)] == [1, 2]
    s.close()


def test_worker_count_from_environment(monkeypatch):
    for value, workers in (("2", 2), ("zero", 4), ("0", 4)):
        monkeypatch.setenv("BLKJOBS_NBD_WORKERS", value)
        srv = NBDServer()
        srv.close()
        assert srv.workers == workers


def test_settle_lets_clients_that_hung_up_leave(tmp_path):
    """A client that sent DISC and closed while its request was still being
    served stays attached until its thread ends (``block-export-del`` sent
    right after a qemu-io exited found the export 'still in use' on a busy
    host); ``settle`` waits for it, and keeps a client still connected."""
    srv = NBDServer(workers=4)
    be = SlowBackend()
    exp = Export("d", be)
    srv.add_export(exp)
    path = str(tmp_path / "s.sock")
    srv.listen_unix(path)
    try:
        stay = handshake(path)
        go(stay, b"d")
        s = handshake(path)
        go(s, b"d")
        _read(s, 1, 0, 4096)
        assert be.inside.wait(WAIT)
        s.sendall(struct.pack(">IHHQQI", REQ, 0, 2, 9, 0, 0))      # DISC
        s.close()
        assert len(exp.clients) == 2        # its request is still in flight
        leaving = [c for c in exp.clients if c.peer_left()]
        assert len(leaving) == 1
        t, _ = _start(srv.settle, exp)
        be.release.set()
        t.join(WAIT)
        assert not t.is_alive()
        assert len(exp.clients) == 1 and leaving[0] not in exp.clients
        srv.settle(exp, timeout=0)          # the one still connected stays
        assert len(exp.clients) == 1
        stay.close()
    finally:
        srv.close()
