"""The NBD export's READ data path in C (``blkjobs.nbd.fastpath`` over
csrc/nbdsrv.c): the bytes nbdcopy and qemu-io read equal qemu-img's over a
qcow2 chain (data, zero and unallocated clusters, a raw backing file
shorter than its overlay), many requests in flight per connection; the
structured replies' OFFSET_DATA/OFFSET_HOLE chunks are qemu-nbd's; a
request of length 0, past the end, too large, with a bad magic get what
qemu-nbd answers; a client that closes mid-reply leaves no read tracked
or pinned; a reply of the C threads overtakes one Python still serves.

Each test checks that the reads did go through the C path (the backend's
``plan_reads`` mapped them), so none passes on the Python path alone."""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator

import pytest

from blkjobs import Engine
from blkjobs.daemon.export_commands import NodeBackend
from blkjobs.nbd.server import Connection, Export, NBDServer
from daemon_util import qemu_img, qemu_io
from nbd_peers import go, handshake, option, qemu_nbd, recv, tool, uri

WAIT = 30
REQ = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668E33EF
KiB, MiB = 1 << 10, 1 << 20


class Spy(NodeBackend):
    """A NodeBackend that counts the reads it mapped for the C path;
    ``python_at``: offsets whose reads it leaves to Python (held there
    until ``release``)."""

    def __init__(self, *a, python_at: tuple[int, ...] = (), **kw):
        super().__init__(*a, **kw)
        self.c_reads = 0
        self.python_at = python_at
        self.inside = threading.Event()
        self.release = threading.Event()

    def plan_reads(self, reqs):
        got = super().plan_reads(reqs)
        out = [None if off in self.python_at else g for (off, _), g in zip(reqs, got, strict=True)]
        for g, o in zip(got, out, strict=True):
            if g is not None and o is None:
                self.end_reads([g[1]])
        self.c_reads += sum(o is not None for o in out)
        return out

    def readinto(self, offset, buf):
        if offset in self.python_at:
            self.inside.set()
            assert self.release.wait(WAIT)
        super().readinto(offset, buf)


@pytest.fixture
def serve(tmp_path) -> Iterator:
    """serve(image, fmt) -> (socket path, Spy, Engine, node, server, export)."""
    made: list[tuple[NBDServer, Engine]] = []

    def start(image: str, fmt: str, read_only: bool = True, workers: int = 4, **kw):
        eng = Engine()
        node = eng.open(image, fmt, node_name="d", read_only=read_only)
        with eng.io:
            fe = eng.io.attach(node, writable=not read_only)
        be = Spy(eng.io, fe, {}, **kw)
        srv = NBDServer(workers=workers)
        made.append((srv, eng))
        exp = Export("d", be)
        srv.add_export(exp)
        path = str(tmp_path / f"c{len(made)}.sock")
        srv.listen_unix(path)
        return path, be, eng, node, srv, exp
    yield start
    for srv, eng in made:
        srv.close()
        eng.close()


def _chain(tmp_path) -> str:
    """A qcow2 overlay of 8 MiB over a raw base of 6 MiB: data in both,
    zero clusters, a compressed cluster (read by Python: the reads mapped
    with it in one batch are mapped again one by one), unallocated
    clusters read from the base, and past the base's end as zeroes."""
    base = str(tmp_path / "base.raw")
    top = str(tmp_path / "top.qcow2")
    assert qemu_img("create", "-f", "raw", base, "6M").returncode == 0
    qemu_io(base, "write -P 0x11 0 6M", fmt="raw")
    assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top,
                    "8M").returncode == 0
    for cmd in ("write -P 0x22 64k 192k", "write -z 1M 128k", "write -c -P 0x55 3M 64k",
                "write -P 0x33 5M 2M",
                "write -P 0x44 7344128 4k"):
        qemu_io(top, cmd)
    return top


def _run(*argv: str) -> subprocess.CompletedProcess:
    p = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (argv, p.stdout, p.stderr)
    return p


@pytest.mark.parametrize("flags", [["-C", "4"], ["-C", "1", "--requests=64",
                                                 "--request-size=4096"]])
def test_nbdcopy_reads_what_qemu_img_reads(tmp_path, serve, flags):
    top = _chain(tmp_path)
    path, be, *_ = serve(top, "qcow2")
    out = str(tmp_path / "out.raw")
    _run("nbdcopy", *flags, uri(path, "d"), out)
    assert be.c_reads > 0
    p = qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", top, out)
    assert p.returncode == 0, p.stdout + p.stderr


def test_qemu_io_reads_in_flight_see_the_right_bytes(tmp_path, serve):
    top = _chain(tmp_path)
    path, be, *_ = serve(top, "qcow2")
    cmds = ["aio_read -P 0x11 0 64k", "aio_read -P 0x22 64k 192k", "aio_read -P 0 1M 128k",
            "aio_read -P 0x11 2M 1M", "aio_read -P 0x55 3M 64k",
            "aio_read -P 0x33 5M 2M", "aio_read -P 0 7M 4k",
            "aio_read -P 0x44 7344128 4k", "aio_read -P 0 7348224 1016k", "aio_flush"]
    argv = ["qemu-io", "-r", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = _run(*argv, uri(path, "d"))
    assert "fail" not in p.stdout.lower() and "error" not in p.stdout.lower(), p.stdout
    assert p.stdout.count("read ") == 9
    assert be.c_reads >= 8


def _structured(path: str) -> socket.socket:
    s = handshake(path)
    rtype, _ = option(s, 8)             # NBD_OPT_STRUCTURED_REPLY
    assert rtype == 1
    go(s, b"d")
    return s


def _chunks(s: socket.socket, handle: int) -> list[tuple[str, int, int, bytes]]:
    """A structured reply's chunks: (type, offset, length, data)."""
    out = []
    while True:
        magic, flags, ctype, h, n = struct.unpack(">IHHQI", recv(s, 20))
        assert magic == STRUCT and h == handle
        payload = recv(s, n)
        if ctype == 1:
            off = struct.unpack(">Q", payload[:8])[0]
            out.append(("data", off, n - 8, payload[8:]))
        elif ctype == 2:
            off, ln = struct.unpack(">QI", payload)
            out.append(("hole", off, ln, b""))
        else:
            out.append(("error", struct.unpack(">I", payload[:4])[0], 0, b""))
        if flags & 1:
            return out


def _read(s: socket.socket, handle: int, offset: int, length: int, flags: int = 0) -> None:
    s.sendall(struct.pack(">IHHQQI", REQ, flags, 0, handle, offset, length))


def _merged(chunks: list[tuple[str, int, int, bytes]]) -> list[tuple[str, int, int, bytes]]:
    out: list[tuple[str, int, int, bytes]] = []
    for c in chunks:
        if out and out[-1][0] == c[0] and out[-1][1] + out[-1][2] == c[1]:
            t, off, n, d = out.pop()
            c = (t, off, n + c[2], d + c[3])
        out.append(c)
    return out


def test_structured_reads_send_holes_as_qemu_nbd(tmp_path, serve):
    p = str(tmp_path / "s.qcow2")
    assert qemu_img("create", "-f", "qcow2", p, "4M").returncode == 0
    qemu_io(p, "write -P 0x55 0 64k")
    qemu_io(p, "write -z 64k 64k")
    qemu_io(p, "write -P 0x66 256k 64k")
    path, be, *_ = serve(p, "qcow2")
    ref_sock = str(tmp_path / "qn.sock")
    got = {}
    with qemu_nbd(p, ref_sock, "d", "qcow2", "-r"):
        for name, sp in (("ours", path), ("qemu-nbd", ref_sock)):
            res = {}
            for h, fl in ((1, 0), (2, 1 << 2)):
                s = _structured(sp)
                _read(s, h, 0, 512 * KiB, flags=fl)
                res[h] = _chunks(s, h)
                s.close()
            got[name] = res
    # the same runs (qemu-nbd splits a hole where a zero cluster meets an
    # unallocated one: a block-status boundary)
    assert {h: _merged(c) for h, c in got["ours"].items()} == \
        {h: _merged(c) for h, c in got["qemu-nbd"].items()}
    assert [c[:3] for c in got["ours"][1]] == [("data", 0, 64 * KiB),
                                               ("hole", 64 * KiB, 192 * KiB),
                                               ("data", 256 * KiB, 64 * KiB),
                                               ("hole", 320 * KiB, 192 * KiB)]
    assert [c[:3] for c in got["ours"][2]] == [("data", 0, 512 * KiB)]
    assert be.c_reads == 2


def _simple_reply(s: socket.socket) -> tuple[int, int]:
    magic, err, h = struct.unpack(">IIQ", recv(s, 16))
    assert magic == SIMPLE
    return h, err


def _edge_cases(path: str, bad_magic: bool) -> list[object]:
    out: list[object] = []
    s = handshake(path)
    go(s, b"d")
    # length 0, past the end, across the end, too large, then a good read
    for h, off, n in ((1, 0, 0), (2, 4 * MiB, 512), (3, 4 * MiB - 512, 1024),
                      (4, 0, (32 << 20) + 1), (5, 2**63, 512)):
        _read(s, h, off, n)
        out.append((off, n, _simple_reply(s)))
    _read(s, 6, 4 * MiB - 4096, 4096)
    out.append(("last", _simple_reply(s), recv(s, 4096) == b"\x42" * 4096))
    # 64 reads in one go, answered once each by handle, with their bytes
    s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, 100 + i, i * 61440, 4096 + i)
                       for i in range(64)))
    seen = {}
    for _ in range(64):
        h, err = _simple_reply(s)
        seen[h] = (err, recv(s, 4096 + h - 100))
    out.append(("64", sorted(seen) == list(range(100, 164)),
                all(e == 0 and d == b"\x42" * len(d) for e, d in seen.values())))
    if not bad_magic:       # (qemu-nbd may close before a read in flight is answered)
        s.close()
        return out
    # a bad magic after a read: the read is answered, then the connection ends
    _read(s, 7, 0, 512)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 8, 0, 512))
    out.append(("bad magic", _simple_reply(s), recv(s, 512) == b"\x42" * 512))
    s.settimeout(WAIT)
    out.append(("eof", s.recv(1)))
    s.close()
    return out


def test_protocol_edge_cases_answered_as_qemu_nbd(tmp_path, serve):
    img = str(tmp_path / "e.raw")
    assert qemu_img("create", "-f", "raw", img, "4M").returncode == 0
    qemu_io(img, "write -P 0x42 0 4M", fmt="raw")
    path, be, *_ = serve(img, "raw")
    ref_sock = str(tmp_path / "qn.sock")
    with qemu_nbd(img, ref_sock, "d", "raw", "-r"):
        ref = _edge_cases(ref_sock, False)
    ours = _edge_cases(path, True)
    assert ours[:-2] == ref
    assert ours[-2:] == [("bad magic", (7, 0), True), ("eof", b"")]
    assert ours[0] == (0, 0, (1, 0)) and ours[1][2] == (2, 22)
    assert be.c_reads >= 64


def test_client_gone_mid_reply_leaves_nothing_tracked(tmp_path, serve):
    top = _chain(tmp_path)
    path, be, eng, node, srv, exp = serve(top, "qcow2", read_only=False)
    s = handshake(path)
    go(s, b"d")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, (i % 4) * 2 * MiB, 2 * MiB)
                       for i in range(32)))
    _simple_reply(s)                    # the first reply has begun
    s.close()
    # the connection ends once its reads are done: none stays tracked or pinned
    srv.settle(exp, timeout=WAIT)
    assert not exp.clients
    assert eng.io._reads(node).count == 0
    assert not node.driver.read_pins._live
    assert be.c_reads > 0
    fe = eng.attach(node)
    fe.write(0, b"\x99" * 65536)
    # and the export goes on serving
    p = _run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x99 0 64k", "-c",
             "read -P 0x22 64k 64k", uri(path, "d"))
    assert "fail" not in p.stdout.lower(), p.stdout


def test_c_reply_overtakes_a_read_python_serves(tmp_path, serve):
    img = str(tmp_path / "o.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    qemu_io(img, "write -P 0x61 0 1M", fmt="raw")
    path, be, *_ = serve(img, "raw", python_at=(0,))
    s = handshake(path)
    go(s, b"d")
    _read(s, 1, 0, 4096)
    assert be.inside.wait(WAIT)         # held in a Python worker
    _read(s, 2, 65536, 512)
    assert _simple_reply(s) == (2, 0) and recv(s, 512) == b"a" * 512
    be.release.set()
    assert _simple_reply(s) == (1, 0) and recv(s, 4096) == b"a" * 4096
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 2, 9, 0, 0))      # DISC
    s.settimeout(WAIT)
    assert s.recv(1) == b""
    s.close()
    assert be.c_reads == 1


def test_a_client_not_reading_its_replies_holds_up_no_write(tmp_path, serve):
    """Its reads are untracked once their bytes are read, not once the
    replies are sent (as on the Python path): a write to the same range
    lands while those replies are stuck in the socket."""
    top = _chain(tmp_path)
    path, be, eng, node, srv, exp = serve(top, "qcow2", read_only=False)
    s = handshake(path)
    go(s, b"d")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, 0, 2 * MiB) for i in range(16)))
    _simple_reply(s)                    # replies are going out, and stuck
    fe = eng.attach(node)
    done = threading.Event()
    t = threading.Thread(target=lambda: (fe.write(0, b"\x77" * 65536), done.set()),
                         daemon=True)
    t.start()
    assert done.wait(WAIT), "the write waits for reads whose replies are stuck"
    assert be.c_reads > 0
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert eng.io._reads(node).count == 0


def test_many_workers_and_no_session_still_serve(tmp_path, serve, monkeypatch):
    """40 workers (the session's threads capped at 64); and a session that
    cannot be made (no memory, no threads): the Python path serves."""
    top = _chain(tmp_path)
    path, be, *_ = serve(top, "qcow2", workers=40)
    out = str(tmp_path / "out.raw")
    _run("nbdcopy", "-C", "2", uri(path, "d"), out)
    assert be.c_reads > 0
    assert qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", top, out).returncode == 0
    from blkjobs.nbd import fastpath

    def no_session(*a):
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(fastpath, "Session", no_session)
    path, be, *_ = serve(top, "qcow2")
    _run("nbdcopy", "-C", "2", uri(path, "d"), out)
    assert be.c_reads == 0
    assert qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", top, out).returncode == 0


# -- BLOCK_STATUS (base:allocation) and holes in C ----------------------------


def _map(u: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map``'s extents: (start, length, flags)."""
    p = _run("nbdinfo", "--map", u)
    return [(int(a), int(b), int(c)) for a, b, c, *_ in (ln.split() for ln in p.stdout.splitlines())]


def _sparse_raw(tmp_path, name: str = "sp.raw") -> str:
    """A raw file with holes and data (4 KiB at 0, as qemu-img create
    allocates it), 64 KiB pieces, one at an odd place, and an unaligned
    tail of data (the file 4 MiB + 1000 bytes)."""
    img = str(tmp_path / name)
    assert qemu_img("create", "-f", "raw", img, "4M").returncode == 0
    with open(img, "r+b") as f:
        f.truncate(4 * MiB + 1000)
    for cmd in ("write -P 0x11 1M 64k", "write -P 0x22 1216k 4k", "write -P 0x33 3M 128k",
                "write -P 0x44 4194304 1000"):
        qemu_io(img, cmd, fmt="raw")
    return img


def _qcow2_kinds(tmp_path) -> str:
    """A qcow2 overlay over a qcow2 base: data in both, zero clusters over
    base data, unallocated clusters (base data, base unallocated), and past
    the shorter base's end."""
    base = str(tmp_path / "kb.qcow2")
    top = str(tmp_path / "kt.qcow2")
    assert qemu_img("create", "-f", "qcow2", base, "3M").returncode == 0
    qemu_io(base, "write -P 0x11 0 1M")
    qemu_io(base, "write -P 0x12 2M 64k")
    assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
                    "6M").returncode == 0
    for cmd in ("write -P 0x22 64k 64k", "write -z 256k 128k", "write -z 1536k 64k",
                "write -P 0x33 4M 192k", "write -z 5M 64k"):
        qemu_io(top, cmd)
    return top


@pytest.mark.parametrize("kind", ["raw sparse", "raw over nothing", "qcow2 chain",
                                  "qcow2 alone", "qcow2 compressed"])
def test_block_status_map_equals_qemu_nbd(tmp_path, serve, kind, monkeypatch):
    """nbdinfo --map of our export equals qemu-nbd's on the same image, and
    ours with the C path equals ours without it (a compressed cluster: the
    block status stays Python's)."""
    if kind == "raw sparse":
        img, fmt = _sparse_raw(tmp_path), "raw"
    elif kind == "raw over nothing":
        img, fmt = str(tmp_path / "e.raw"), "raw"
        with open(img, "wb") as f:
            f.truncate(3 * MiB)
    elif kind == "qcow2 chain":
        img, fmt = _qcow2_kinds(tmp_path), "qcow2"
    elif kind == "qcow2 compressed":
        img, fmt = _chain(tmp_path), "qcow2"
    else:
        img, fmt = str(tmp_path / "a.qcow2"), "qcow2"
        assert qemu_img("create", "-f", "qcow2", img, "2M").returncode == 0
        qemu_io(img, "write -P 0x55 64k 64k")
        qemu_io(img, "write -z 1M 512k")
    path, be, *_ = serve(img, fmt)
    ours = _map(uri(path, "d"))
    # the block status went to C (not with a compressed cluster in its range)
    assert (be.c_reads > 0) == (kind != "qcow2 compressed")
    ref_sock = str(tmp_path / "qn.sock")
    with qemu_nbd(img, ref_sock, "d", fmt, "-r") as ref:
        theirs = _map(ref)
    assert ours == theirs
    assert len(ours) > 1 or kind == "raw over nothing"
    monkeypatch.setenv("BLKJOBS_NBD_C", "0")
    path, be, *_ = serve(img, fmt)
    assert _map(uri(path, "d")) == ours
    assert be.c_reads == 0


def _alloc_client(path: str) -> socket.socket:
    """Structured replies and the meta context base:allocation, then GO."""
    s = handshake(path)
    assert option(s, 8)[0] == 1         # NBD_OPT_STRUCTURED_REPLY
    q = b"base:allocation"
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 10, 4 + 1 + 4 + 4 + len(q))
              + struct.pack(">I", 1) + b"d" + struct.pack(">II", 1, len(q)) + q)
    while True:
        magic, _o, rtype, n = struct.unpack(">QIII", recv(s, 20))
        recv(s, n)
        if rtype == 1:
            break
        assert rtype == 4               # NBD_REP_META_CONTEXT
    go(s, b"d")
    return s


def _status(s: socket.socket, handle: int, offset: int, length: int,
            flags: int = 0) -> list[tuple[int, int]] | int:
    """A BLOCK_STATUS's extents (or its error number)."""
    s.sendall(struct.pack(">IHHQQI", REQ, flags, 7, handle, offset, length))
    magic, fl, ctype, h, n = struct.unpack(">IHHQI", recv(s, 20))
    assert magic == STRUCT and h == handle and fl & 1
    payload = recv(s, n)
    if ctype != 5:
        return struct.unpack(">I", payload[:4])[0]
    return [struct.unpack(">II", payload[i:i + 8]) for i in range(4, n, 8)]


def test_block_status_requests_answered_as_qemu_nbd(tmp_path, serve):
    """REQ_ONE, ranges starting and ending inside extents, unaligned, the
    last bytes of an unaligned file, past the end: qemu-nbd's extents."""
    img = _sparse_raw(tmp_path)
    top = _qcow2_kinds(tmp_path)
    reqs = [(0, 4 * MiB, 0), (0, 4 * MiB, 8), (1 * MiB + 4096, 200 * KiB, 0),
            (1 * MiB + 4096, 200 * KiB, 8), (12345, 1 * MiB + 777, 0), (4 * MiB, 1000, 0),
            (4 * MiB - 512, 1512, 8), (4 * MiB, 1024, 0), (5 * MiB, 512, 0)]
    for image, fmt in ((img, "raw"), (top, "qcow2")):
        path, be, *_ = serve(image, fmt)
        ref_sock = str(tmp_path / f"qn-{fmt}.sock")
        got = {}
        with qemu_nbd(image, ref_sock, "d", fmt, "-r"):
            for name, sp in (("ours", path), ("qemu-nbd", ref_sock)):
                s = _alloc_client(sp)
                got[name] = [_status(s, h, off, n, fl) for h, (off, n, fl) in enumerate(reqs)]
                s.close()
        if fmt == "raw":            # the export is 4M + 1024: the file's size rounded up
            assert got["ours"][7] == [(1000, 0), (24, 3)]
        assert got["ours"] == got["qemu-nbd"], fmt
        assert be.c_reads == (8 if fmt == "raw" else len(reqs))  # past the end: Python


def test_raw_reads_send_holes_as_qemu_nbd(tmp_path, serve):
    img = _sparse_raw(tmp_path)
    path, be, *_ = serve(img, "raw")
    ref_sock = str(tmp_path / "qn.sock")
    reqs = ((1, 0, 2 * MiB, 0), (2, 1 * MiB - 4096, 128 * KiB, 0), (3, 2 * MiB, 256 * KiB, 0),
            (4, 1 * MiB, 512 * KiB, 1 << 2), (5, 4 * MiB - 24, 1024, 0))
    got = {}
    with qemu_nbd(img, ref_sock, "d", "raw", "-r"):
        for name, sp in (("ours", path), ("qemu-nbd", ref_sock)):
            s = _structured(sp)
            res = {}
            for h, off, n, fl in reqs:
                _read(s, h, off, n, flags=fl)
                res[h] = _merged(_chunks(s, h))
            s.close()
            got[name] = res
    assert got["ours"] == got["qemu-nbd"]
    assert [c[:3] for c in got["ours"][2]] == [("hole", 1 * MiB - 4096, 4096),
                                               ("data", 1 * MiB, 64 * KiB),
                                               ("hole", 1 * MiB + 64 * KiB, 60 * KiB)]
    assert got["ours"][3] == [("hole", 2 * MiB, 256 * KiB, b"")]
    assert [c[0] for c in got["ours"][4]] == ["data"]
    assert be.c_reads == len(reqs)


def test_block_status_sees_writes_and_a_client_gone_mid_reply(tmp_path, serve):
    """A write through another front end (a job's, a guest's) is in the
    next block status as before; a client that sends block status and reads
    and closes without reading the replies leaves nothing tracked."""
    top = _qcow2_kinds(tmp_path)
    path, be, eng, node, srv, exp = serve(top, "qcow2", read_only=False)
    s = _alloc_client(path)
    assert _status(s, 1, 0, 6 * MiB) == [(256 * KiB, 0), (128 * KiB, 3), (640 * KiB, 0),
                                         (1 * MiB, 3), (64 * KiB, 0), (1984 * KiB, 3),
                                         (192 * KiB, 0), (1856 * KiB, 3)]
    fe = eng.attach(node)
    fe.write(3 * MiB, b"\x99" * 65536)      # past the base's end: was a hole
    fe.write_zeroes(4 * MiB, 64 * KiB)      # was data
    assert _status(s, 2, 3 * MiB, 2 * MiB) == [(64 * KiB, 0), (1 * MiB, 3), (128 * KiB, 0),
                                               (832 * KiB, 3)]
    assert be.c_reads >= 2
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 7 if i % 2 else 0, 100 + i,
                                   (i % 6) * MiB, MiB) for i in range(40)))
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert not exp.clients
    assert eng.io._reads(node).count == 0
    assert not node.driver.read_pins._live
    s = _alloc_client(path)
    assert _status(s, 3, 3 * MiB, 64 * KiB) == [(64 * KiB, 0)]
    s.close()


def _c_workers() -> set[int]:
    """The thread ids of the C data path's workers (csrc/nbdsrv.c names
    them ``bj-nbds``) in this process."""
    out = set()
    for t in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/self/task/{t}/comm") as f:
                if f.read().strip() == "bj-nbds":
                    out.add(int(t))
    return out


def _one_read_session(path: str, gone_mid_batch: bool = False, length: int = 64 * KiB) -> None:
    """A connection that reads ``length`` bytes (and DISC), or that queues
    32 reads of 2 MiB and hangs up after the first reply has begun."""
    s = handshake(path)
    go(s, b"d")
    if gone_mid_batch:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, (i % 4) * 2 * MiB, 2 * MiB)
                           for i in range(32)))
        _simple_reply(s)
        s.close()
        return
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, 7, 0, length))
    assert _simple_reply(s) == (7, 0)
    assert recv(s, length) == b"\x5a" * length
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 2, 8, 0, 0))       # DISC
    s.close()


def test_c_workers_are_kept_for_the_next_sessions(tmp_path, serve):
    """The C workers are one pool for the process: the thread that served
    the first connection serves the next 19 (no thread started or joined
    per session), and after clients gone mid-batch every C worker is back,
    parked (none left behind, none serving). (Reads of 128 KiB: a lone
    read up to fastpath.INLINE_MAX is the connection thread's.)"""
    from blkjobs.native import nbdserve
    img = str(tmp_path / "p.raw")
    assert qemu_img("create", "-f", "raw", img, "8M").returncode == 0
    qemu_io(img, "write -P 0x5a 0 8M", fmt="raw")
    path, be, eng, node, srv, exp = serve(img, "raw")
    nbdserve.pool_trim(0)            # (threads parked by earlier tests: ended)
    _one_read_session(path, length=128 * KiB)   # (one read at a time: one C worker)
    srv.settle(exp, timeout=WAIT)
    first = _c_workers()
    assert len(first) == 1 and nbdserve.pool_idle() == 1
    for _ in range(19):
        _one_read_session(path, length=128 * KiB)
        srv.settle(exp, timeout=WAIT)
        assert _c_workers() == first
    for _ in range(3):
        _one_read_session(path, gone_mid_batch=True)
        srv.settle(exp, timeout=WAIT)
        assert not exp.clients
        # at most a session's workers (8: 2 per Python worker), all parked
        now = _c_workers()
        assert first <= now and len(now) <= 8 and nbdserve.pool_idle() == len(now)
    assert be.c_reads >= 20
    assert eng.io._reads(node).count == 0


def test_no_python_thread_per_session_for_its_reads(tmp_path, serve, monkeypatch):
    """The reads C serves are ended by the process's one reaper: a session
    whose requests all go to C (nbdcopy's reads and block status) starts
    no Python thread but its connection's, and every read is ended when
    the sessions are over."""
    from blkjobs.nbd import fastpath
    from blkjobs.nbd import threads
    img = str(tmp_path / "t.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "4M").returncode == 0
    qemu_io(img, "write -P 0x61 0 1M")
    qemu_io(img, "write -P 0x62 3M 512k")
    path, be, eng, node, srv, exp = serve(img, "qcow2")
    started = []
    orig = threads.Thread.start

    def start(self):
        started.append(self)
        orig(self)
    monkeypatch.setattr(threads.Thread, "start", start)
    conns = []
    orig_init = Connection.__init__

    def init(self, *a):
        conns.append(self)
        orig_init(self, *a)
    monkeypatch.setattr(Connection, "__init__", init)
    out = str(tmp_path / "o.raw")
    for _ in range(5):
        _run("nbdcopy", uri(path, "d"), out)
        srv.settle(exp, timeout=WAIT)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", img, out).returncode == 0
    assert be.c_reads > 0 and len(conns) >= 5
    assert len(started) == len(conns)
    assert fastpath._reaper is not None and fastpath._reaper.is_alive()
    assert not fastpath._sides
    assert eng.io._reads(node).count == 0


def test_a_short_session_asks_a_raw_file_its_length_once_per_go_and_batch(tmp_path, serve,
                                                                         monkeypatch):
    """The length of an exported raw file is one ``fstat`` per question
    (GO's export size, each batch of requests with reads: the export's
    size is the file's length rounded up to a sector) and none for the
    batch holding only DISC: a session of one read asks three times in
    all (GO, the read's batch, the read's own mapping), where it asked
    seven (two per question, and a question for the DISC)."""
    img = str(tmp_path / "len.raw")
    with open(img, "wb") as f:
        f.write(b"\x5a" * (64 * KiB) + b"\x00" * (1000 - 0))    # 66536 bytes: unaligned
    path, be, eng, node, srv, exp = serve(img, "raw")
    fd = node.driver.fd
    asked = []
    real = os.fstat

    def fstat(n):
        if n == fd:
            asked.append(n)
        return real(n)
    monkeypatch.setattr(os, "fstat", fstat)
    assert be.size == 64 * KiB + 1000 and len(asked) == 1
    assert exp.size == 64 * KiB + 1024
    asked.clear()
    _one_read_session(path)
    srv.settle(exp, timeout=WAIT)
    assert be.c_reads == 1
    assert len(asked) == 3, len(asked)


def test_a_lone_small_read_is_served_by_the_connections_thread(tmp_path, serve):
    """A batch of one READ up to fastpath.INLINE_MAX (nbdinfo's, a client
    that waits for each reply) is read and answered in the connection's
    thread: 20 such sessions start no C worker, and every read is ended."""
    from blkjobs.native import nbdserve
    img = str(tmp_path / "l.raw")
    assert qemu_img("create", "-f", "raw", img, "8M").returncode == 0
    qemu_io(img, "write -P 0x5a 0 8M", fmt="raw")
    path, be, eng, node, srv, exp = serve(img, "raw")
    nbdserve.pool_trim(0)            # (threads parked by earlier tests: ended)
    for _ in range(20):
        _one_read_session(path)
        srv.settle(exp, timeout=WAIT)
    assert not _c_workers() and nbdserve.pool_idle() == 0
    assert be.c_reads == 20
    assert eng.io._reads(node).count == 0


def test_a_lone_read_served_in_place_holds_up_no_write_when_stuck(tmp_path, serve):
    """The connection's thread serving a lone read whose reply cannot go
    out (the client reads nothing: 8 replies of 2 MiB hold the socket and
    the send lock) hands the read's tracking to the reaper before it waits:
    a write to that range lands meanwhile."""
    top = _chain(tmp_path)
    path, be, eng, node, srv, exp = serve(top, "qcow2", read_only=False)
    planned = threading.Event()
    plan = be.plan_reads

    def plan_reads(reqs):
        got = plan(reqs)
        if any(off == 6 * MiB for off, _ in reqs):
            planned.set()
        return got
    be.plan_reads = plan_reads
    s = handshake(path)
    go(s, b"d")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # (8: the session's workers, all of them stuck sending)
    s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, 0, 2 * MiB) for i in range(8)))
    _simple_reply(s)                    # replies are going out, and stuck
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, 99, 6 * MiB, 64 * KiB))
    assert planned.wait(WAIT), "the lone read was not planned"
    fe = eng.attach(node)
    done = threading.Event()
    t = threading.Thread(target=lambda: (fe.write(6 * MiB, b"\x77" * 65536), done.set()),
                         daemon=True)
    t.start()
    assert done.wait(WAIT), "the write waits for a lone read whose reply is stuck"
    s.close()
    srv.settle(exp, timeout=WAIT)
    assert eng.io._reads(node).count == 0
