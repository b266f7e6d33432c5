"""The handshake's common options answered in C (csrc/nbdsrv.c
``bj_nbdh_step``): nbdcopy's and qemu's sequence -- STRUCTURED_REPLY,
SET_META_CONTEXT base:allocation, GO -- and nbdinfo's (INFO,
LIST_META_CONTEXT) are answered without the Python option code, also when
every byte comes in its own segment; every other option, and every case C
cannot answer alone (an export with dirty bitmaps to list...), falls back
to Python: the bytes a client receives are the same with the C handshake
and without it (``BLKJOBS_NBD_C=0``), and the replies' kinds are
qemu-nbd's. And the accept loop that hands the connections over: a
blocking accept on UNIX and TCP sockets, ended by ``close()``."""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from blkjobs import Engine
from blkjobs.nbd import handshake as H
from blkjobs.nbd.server import NBDServer
from daemon_util import qemu_img, qemu_io
from nbd_peers import in_process_export, qemu_nbd, recv

IHAVEOPT = 0x49484156454F5054
OPT_REPLY = 0x3E889045565A9
REQ = 0x25609513
STRUCT = 0x668E33EF
BASE = b"base:allocation"


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def _s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _info(opt: int, name: bytes, *types: int) -> bytes:
    return _opt(opt, _s(name) + struct.pack(f">H{len(types)}H", len(types), *types))


def _meta(opt: int, name: bytes, *queries: bytes) -> bytes:
    return _opt(opt, _s(name) + struct.pack(">I", len(queries)) + b"".join(map(_s, queries)))


STRUCTURED = _opt(8)
#: nbdcopy's (libnbd's) options, and qemu-img's
COMMON = [STRUCTURED, _meta(10, b"d", BASE), _info(7, b"d", 3)]

#: option sequences (each option's replies are read before the next goes)
SEQUENCES = {
    "nbdcopy": COMMON,
    "nbdinfo": [STRUCTURED, _info(6, b"d", 3, 1, 2), _meta(9, b"d"), _info(7, b"d", 3, 1, 2)],
    "list queries": [STRUCTURED, _meta(9, b"d", b"base:"), _meta(9, b"d", BASE),
                     _meta(9, b"d", b"qemu:"), _meta(9, b"d", BASE, b"base:"),
                     _meta(9, b"x"), _info(6, b"x"), _info(6, b"d", 2), _info(7, b"d")],
    "meta before structured": [_meta(10, b"d", BASE), *COMMON],
    "structured twice": [STRUCTURED, STRUCTURED, _info(7, b"d")],
    "unknown export": [STRUCTURED, _meta(10, b"x", BASE), _info(7, b"x", 3),
                       _meta(10, b"d", BASE, b"qemu:dirty-bitmap:nope"), _info(7, b"d", 3)],
    "no query, two queries": [STRUCTURED, _meta(10, b"d"), _meta(10, b"d", BASE, BASE),
                              _info(7, b"d")],
    "meta then another query": [STRUCTURED, _meta(10, b"d", BASE), _meta(10, b"d", b"base:"),
                                _info(7, b"d", 1)],
    "unknown option, list": [_opt(0x42, b"junk"), _opt(3), STRUCTURED, _info(7, b"d", 3)],
    "malformed": [STRUCTURED, _opt(8, b"x"), _opt(7, _s(b"d") + b"\0\2\0\3"),
                  _opt(10, _s(b"d") + b"\0\0\0\1" + _s(BASE)[:-3]), _info(7, b"d", 2, 0)],
    "no structured replies": [_info(7, b"d", 3)],
    # (longer than the read-ahead buffer: C leaves it to Python)
    "long option": [STRUCTURED, _meta(10, b"d", b"x" * 4090), _info(7, b"d", 3)],
}


@pytest.fixture
def ours(tmp_path) -> Iterator:
    """ours(bitmaps=(), **kw) -> the UNIX socket of a server exporting
    ``d`` (1 MiB raw)."""
    made: list[tuple[NBDServer, Engine]] = []
    img = str(tmp_path / "d.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    qemu_io(img, "write -P 0x5a 0 64k", fmt="raw")

    def start(bitmaps: tuple[str, ...] = (), **kw) -> str:
        # (bitmaps: named in the handshake only; no BLOCK_STATUS asks them)
        srv = in_process_export(img, made, bitmaps, **kw)
        path = str(tmp_path / f"s{len(made)}.sock")
        srv.listen_unix(path)
        return path
    yield start
    for srv, eng in made:
        srv.close()
        eng.close()


@pytest.fixture
def python_options(monkeypatch) -> list[int]:
    """The options the Python handshake answered (handshake._option)."""
    seen: list[int] = []
    orig = H._option

    def spy(conn, option, data):
        seen.append(option)
        return orig(conn, option, data)
    monkeypatch.setattr(H, "_option", spy)
    return seen


def _replies(s: socket.socket) -> tuple[bytes, list[tuple[int, int]]]:
    """One option's replies up to its ACK or error: their bytes, and
    (option, reply type) each."""
    raw, kinds = b"", []
    while True:
        hdr = recv(s, 20)
        magic, opt, rtype, n = struct.unpack(">QIII", hdr)
        assert magic == OPT_REPLY
        raw += hdr + recv(s, n)
        kinds.append((opt, rtype))
        if rtype == 1 or rtype & 0x80000000:
            return raw, kinds


def _talk(path: str, options: list[bytes], cflags: int = 3,
          segments: bool = False) -> tuple[bytes, list[tuple[int, int]]]:
    """Greeting, client flags, then each option and its replies; the
    server's bytes and reply kinds, up to the end of GO (then a DISC)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)

    def send(b: bytes) -> None:
        for i in range(len(b)) if segments else [0]:
            s.sendall(b[i:i + 1] if segments else b)
    raw = recv(s, 18)
    send(struct.pack(">I", cflags))
    kinds: list[tuple[int, int]] = []
    for o in options:
        send(o)
        r, k = _replies(s)
        raw += r
        kinds += k
        if o[8:12] == b"\0\0\0\7" and k[-1][1] == 1:
            s.sendall(struct.pack(">IHHQQI", REQ, 0, 2, 1, 0, 0))     # DISC
    s.close()
    return raw, kinds


def test_nbdinfos_options_are_answered_in_c(ours, python_options):
    """nbdinfo's sequence (INFO, LIST_META_CONTEXT, GO): no option goes to
    the Python option code; the same bytes as without the C handshake."""
    path = ours()
    raw, kinds = _talk(path, SEQUENCES["nbdinfo"], segments=True)
    assert python_options == []
    assert kinds == [(8, 1), *[(6, 3)] * 3, (6, 1), (9, 4), (9, 1), *[(7, 3)] * 3, (7, 1)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLKJOBS_NBD_C", "0")
        assert _talk(path, SEQUENCES["nbdinfo"])[0] == raw
    assert python_options == [8, 6, 9, 7]


def test_an_export_with_bitmaps_lists_them_from_python(ours, python_options):
    """LIST_META_CONTEXT of an export with dirty-bitmap contexts is the
    Python code's (C knows base:allocation only): every context listed,
    the same bytes as without the C handshake."""
    path = ours(bitmaps=("b0", "b1"))
    seq = [STRUCTURED, _meta(9, b"d"), _meta(9, b"d", b"qemu:dirty-bitmap:"),
           _meta(9, b"d", b"base:"), _meta(10, b"d", BASE), _info(7, b"d")]
    raw, kinds = _talk(path, seq)
    assert python_options == [9, 9, 9]
    assert kinds.count((9, 4)) == 3 + 2 + 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLKJOBS_NBD_C", "0")
        assert _talk(path, seq)[0] == raw


def test_the_common_options_are_answered_in_c(ours, python_options):
    """nbdcopy's sequence, each byte a segment of its own: no option goes
    to the Python handshake, the replies are Python's bytes, and the
    connection is served (a structured READ after GO)."""
    path = ours()
    raw, kinds = _talk(path, COMMON, segments=True)
    assert python_options == []
    assert kinds == [(8, 1), (10, 4), (10, 1), (7, 3), (7, 3), (7, 1)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLKJOBS_NBD_C", "0")
        assert _talk(path, COMMON)[0] == raw
    assert python_options == [8, 10, 7]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    recv(s, 18)
    s.sendall(struct.pack(">I", 3) + b"".join(COMMON))
    for _ in range(3):
        _replies(s)
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 0, 5, 0, 4096))
    magic, flags, rtype, handle, n = struct.unpack(">IHHQI", recv(s, 20))
    assert (magic, flags & 1, rtype, handle, n) == (STRUCT, 1, 1, 5, 8 + 4096)
    assert recv(s, n)[8:] == b"\x5a" * 4096
    s.close()


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_other_sequences_fall_back_and_answer_as_qemu_nbd(ours, python_options, tmp_path,
                                                          name):
    """Each sequence: the same bytes with the C handshake and without it;
    the same replies (option, kind) as qemu-nbd's."""
    seq = SEQUENCES[name]
    path = ours()
    with_c = _talk(path, seq)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLKJOBS_NBD_C", "0")
        assert _talk(path, seq) == with_c
    img = str(tmp_path / "q.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    with qemu_nbd(img, str(tmp_path / "q.sock"), "d", "raw", "-r"):
        assert _talk(str(tmp_path / "q.sock"), seq)[1] == with_c[1]


def test_client_flags_without_no_zeroes_and_unknown(ours):
    """A client without NO_ZEROES gets EXPORT_NAME's 124 zero bytes (the
    option is Python's); unknown client flags: the server hangs up."""
    path = ours()
    for c in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BLKJOBS_NBD_C", c)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(path)
            recv(s, 18)
            s.sendall(struct.pack(">I", 1) + _opt(1, b"d"))
            size, flags = struct.unpack(">QH", recv(s, 10))
            assert size == 1 << 20 and recv(s, 124) == bytes(124)
            s.close()
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(path)
            recv(s, 18)
            s.sendall(struct.pack(">I", 0x10))
            assert s.recv(1) == b""
            s.close()


def test_accepting_on_unix_and_tcp_and_close_ends_the_accept(ours, tmp_path):
    """The accept loop's blocking accept (no select): clients on the UNIX
    and the TCP socket are served; close() ends both waiting accepts
    (the listening sockets shut down), after which nobody is accepted."""
    import threading
    from blkjobs.nbd.server import NBDServer
    srv_path = ours()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(srv_path)
        assert recv(s, 18)[:8] == b"NBDMAGIC"
    srv = NBDServer()
    path = str(tmp_path / "own.sock")
    srv.listen_unix(path)
    port = srv.listen_tcp("127.0.0.1", 0)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        assert recv(s, 18)[:8] == b"NBDMAGIC"
    closer = threading.Thread(target=srv.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
        s.connect(path)
