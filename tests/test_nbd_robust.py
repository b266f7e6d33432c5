"""Hostile or broken NBD clients: each is dropped (or refused) as qemu-nbd
does it, holds no more than one request's payload, and the export goes on
serving everyone else."""
from __future__ import annotations

import struct

from daemon_util import qemu_img, qemu_io
from nbd_peers import blkjobs_export, go, handshake, nbd_map, option, qemu_nbd, recv

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513


def _eof(s) -> bool:
    """The server closed the connection (after any pending reply bytes)."""
    s.settimeout(30)
    try:
        while True:
            d = s.recv(65536)
            if not d:
                return True
    except OSError:
        return True


def misbehave(path: str) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    # a request with a bad magic
    s = handshake(path)
    go(s, b"d")
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    out.append(("bad magic", _eof(s)))
    s.close()
    # a write announcing more than 32 MiB: the payload cannot be skipped
    s = handshake(path)
    go(s, b"d")
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 1, 2, 0, (32 << 20) + 1) + bytes(4096))
    out.append(("huge write", _eof(s)))
    s.close()
    # a write whose payload never comes in full, then a hang-up
    s = handshake(path)
    go(s, b"d")
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 1, 3, 0, 65536) + bytes(100))
    s.close()
    # an option with a bad magic during the handshake
    s = handshake(path)
    s.sendall(struct.pack(">QII", 0x1234, 7, 0))
    out.append(("bad option magic", _eof(s)))
    s.close()
    # an oversized option is refused, the haggling goes on
    s = handshake(path)
    rtype, _ = option(s, 6, bytes(20000))
    out.append(("big option", rtype >> 31))
    rtype, _ = option(s, 2)
    out.append(("abort after", rtype))
    s.close()
    # unknown command
    s = handshake(path)
    go(s, b"d")
    s.sendall(struct.pack(">IHHQQI", REQ, 0, 99, 4, 0, 0))
    out.append(("unknown command", struct.unpack(">IIQ", recv(s, 16))[1]))
    s.close()
    return out


def test_bad_clients_are_dropped_like_qemu_nbd(tmp_path):
    img = str(tmp_path / "disk.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    qemu_io(img, "write -P 0x42 0 64k", fmt="raw")
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    with qemu_nbd(img, str(tmp_path / "qn.sock"), "d", "raw", "-r") as ref, \
            blkjobs_export(ours_dir, img, "d") as ours:
        got_ref = misbehave(str(tmp_path / "qn.sock"))
        got_ours = misbehave(str(ours_dir / "blkjobs-nbd.sock"))
        assert got_ours == got_ref == [
            ("bad magic", True), ("huge write", True), ("bad option magic", True),
            ("big option", 1), ("abort after", 1), ("unknown command", 22)]
        # and both go on serving
        assert nbd_map(ours) == nbd_map(ref)
