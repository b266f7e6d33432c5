"""How the server reads a client's handshake (blkjobs.nbd.server.Connection:
an option's header and data in one ``recv``, the handshake's time limit
as the socket's SO_RCVTIMEO/SO_SNDTIMEO): a handshake and requests sent
one byte a segment are served; requests a client sent with its options,
before the reply to NBD_OPT_GO (read into the handshake's buffer, not left
in the socket), are served and none is lost; a client silent in the
handshake is dropped after ``handshake_timeout``, one idle in transmission
longer than that is not -- in clear and inside TLS."""
from __future__ import annotations

import select
import socket
import ssl
import struct
from collections.abc import Iterator

import pytest

from blkjobs import Engine
from blkjobs.nbd.server import NBDServer
from daemon_util import qemu_img, qemu_io
from nbd_peers import go, handshake, in_process_export, option, recv
from test_nbd_tls import make_ca, make_cert

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668E33EF
OPT_REPLY = 0x3E889045565A9
#: the handshake time limit of the tests that check it: long enough for a client
#: on a loaded host to send its next option in time (the limit is per receive)
LIMIT = 1.0
MiB = 1 << 20


def _pattern(n: int) -> bytes:
    return bytes([0x5A]) * n


@pytest.fixture
def server(tmp_path) -> Iterator:
    """server(**NBDServer kw) -> (unix path, (host, port)) serving export
    ``d``: 2 MiB, the first MiB 0x5a, the second zeroes."""
    made: list[tuple[NBDServer, Engine]] = []

    def start(**kw):
        img = str(tmp_path / "d.raw")
        assert qemu_img("create", "-f", "raw", img, "2M").returncode == 0
        qemu_io(img, "write -P 0x5a 0 1M", fmt="raw")
        srv = in_process_export(img, made, **kw)
        path = str(tmp_path / f"s{len(made)}.sock")
        srv.listen_unix(path)
        port = srv.listen_tcp("127.0.0.1", 0)
        return path, ("127.0.0.1", port)
    yield start
    for srv, eng in made:
        srv.close()
        eng.close()


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def _go(name: bytes) -> bytes:
    return _opt(7, struct.pack(">I", len(name)) + name + b"\0\0")


def _req(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQ, flags, cmd, handle, offset, length)


def _replies_to(s: socket.socket, opt: int) -> list[int]:
    """The reply types of one option, up to its ACK (or an error)."""
    types = []
    while True:
        magic, ropt, rtype, n = struct.unpack(">QIII", recv(s, 20))
        assert magic == OPT_REPLY and ropt == opt
        recv(s, n)
        types.append(rtype)
        if rtype == 1 or rtype & 0x80000000:
            return types


def _structured_reads(s: socket.socket, n: int) -> dict[int, bytes]:
    """The data of the structured replies to ``n`` READs (OFFSET_DATA,
    OFFSET_HOLE chunks, in any order) up to each one's DONE chunk, per
    handle, as bytes from the read's offset."""
    got: dict[int, bytearray] = {}
    done = 0
    while done < n:
        magic, flags, rtype, h, k = struct.unpack(">IHHQI", recv(s, 20))
        assert magic == STRUCT, hex(magic)
        body = recv(s, k)
        out = got.setdefault(h, bytearray())
        if rtype == 1:                      # OFFSET_DATA (in order here)
            out += body[8:]
        elif rtype == 2:                    # OFFSET_HOLE
            out += bytes(struct.unpack(">QI", body)[1])
        else:
            assert rtype == 0, rtype        # NONE
        done += flags & 1
    return {h: bytes(b) for h, b in got.items()}


def _eof(s: socket.socket) -> bool:
    """The server closed the connection (within 30 s: False if not)."""
    s.settimeout(30)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:                         # (a reset, or TLS cut short)
        pass
    return True


def test_a_handshake_and_requests_in_one_byte_segments(server):
    """Every byte its own TCP segment: the options and the requests are
    put together from as many reads as they come in."""
    _, addr = server()
    s = socket.create_connection(addr, timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def dribble(data: bytes) -> None:
        for i in range(len(data)):
            s.sendall(data[i:i + 1])
    hello = recv(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT"
    dribble(struct.pack(">I", 3))
    dribble(_opt(8))                        # STRUCTURED_REPLY
    assert _replies_to(s, 8) == [1]
    dribble(_go(b"d"))
    assert _replies_to(s, 7) == [3, 3, 1]      # INFO block size, export; ACK
    for h, (off, n) in enumerate([(0, 4096), (MiB - 512, 1024), (MiB + 4096, 512)], 1):
        dribble(_req(0, h, off, n))
        assert _structured_reads(s, 1) == {h: (_pattern(MiB) + bytes(MiB))[off:off + n]}
    dribble(_req(2, 9, 0, 0))               # DISC
    assert _eof(s)
    s.close()


@pytest.mark.parametrize("structured", [False, True])
def test_requests_sent_with_the_options_are_served(server, structured):
    """A client that does not wait for the reply to NBD_OPT_GO: its
    requests came with the options, into the handshake's buffer; they are
    served (by the Python path: the C one reads the socket), and the DISC after them ends the connection."""
    path, _ = server()
    s = handshake(path)
    reads = [(1, 0, 65536), (2, MiB - 4096, 8192), (3, 1536 * 1024, 4096)]
    s.sendall((_opt(8) if structured else b"") + _go(b"d")
              + b"".join(_req(0, h, off, n) for h, off, n in reads) + _req(2, 9, 0, 0))
    if structured:
        assert _replies_to(s, 8) == [1]
    assert _replies_to(s, 7)[-1] == 1
    want = {h: (_pattern(MiB) + bytes(MiB))[off:off + n] for h, off, n in reads}
    if structured:
        assert _structured_reads(s, len(reads)) == want
    else:
        got = {}
        for _ in reads:                     # (in the order they are ready)
            magic, err, h = struct.unpack(">IIQ", recv(s, 16))
            assert (magic, err) == (SIMPLE, 0)
            got[h] = recv(s, len(want[h]))
        assert got == want
    assert _eof(s)
    s.close()


def _served_after_idle(s: socket.socket) -> None:
    """Past GO, ``s`` idles twice the handshake's limit and is not dropped:
    a READ is answered, DISC closes it."""
    go(s, b"d")
    assert select.select([s], [], [], 2 * LIMIT)[0] == []
    s.sendall(_req(0, 5, 0, 4096))
    magic, err, h = struct.unpack(">IIQ", recv(s, 16))
    assert (magic, err, h) == (SIMPLE, 0, 5) and recv(s, 4096) == _pattern(4096)
    s.sendall(_req(2, 6, 0, 0))
    assert _eof(s)
    s.close()


def test_the_handshake_time_limit_and_none_after_it(server):
    """``handshake_timeout``: a client that says nothing is dropped; one
    past the handshake may stay idle longer than that and is served."""
    path, _ = server(handshake_timeout=LIMIT)
    silent = handshake(path)
    assert _eof(silent)                     # (dropped, after LIMIT)
    silent.close()
    _served_after_idle(handshake(path))


def test_the_handshake_time_limit_with_tls(server, tmp_path):
    """On a TLS server: a client silent after STARTTLS's ACK (in the TLS
    handshake) and one silent in the options inside TLS are dropped after
    ``handshake_timeout``; one idle in transmission longer than that is
    served."""
    make_ca(tmp_path / "ca", "test CA")
    make_cert(tmp_path / "ca", tmp_path / "srv", "server")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "srv" / "server-cert.pem",
                         tmp_path / "srv" / "server-key.pem")
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(tmp_path / "ca" / "ca-cert.pem")
    path, _ = server(tls=sctx, handshake_timeout=LIMIT)

    def encrypted() -> ssl.SSLSocket:
        s = handshake(path)
        assert option(s, 5) == (1, b"")         # STARTTLS: ACK
        t = cctx.wrap_socket(s, server_hostname="localhost")
        t.settimeout(30)
        return t
    silent = handshake(path)
    assert option(silent, 5) == (1, b"")
    assert _eof(silent)                     # no ClientHello: dropped
    silent.close()
    quiet = encrypted()
    assert _eof(quiet)                      # no option inside TLS: dropped
    quiet.close()
    s = encrypted()
    _served_after_idle(s)
