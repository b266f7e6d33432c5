"""Server policies side by side with qemu-storage-daemon: a discard (NBD
TRIM, and WRITE_ZEROES that may punch holes) follows the exported node's
``discard`` option (QEMU ignores discards unless ``discard=unmap``), and
clients over ``max-connections`` wait for a free slot instead of being
turned away."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

from daemon_util import qcow2_node, qemu_img, qemu_io, side_by_side
from nbd_peers import go, handshake, recv, run

MiB = 1 << 20


def _cmd(c: socket.socket, cmd: int, offset: int, length: int, flags: int = 0,
         handle: int = 1) -> int:
    c.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length))
    magic, err, h = struct.unpack(">IIQ", recv(c, 16))
    assert magic == 0x67446698 and h == handle
    return err


def _per_mib(img: str) -> list[tuple[bool, bool, bool]]:
    """``qemu-img map`` of the image per MiB: (data, zero, host cluster
    allocated). (How the runs are split differs between the qcow2 drivers:
    QEMU's discard leaves zero clusters, blkjobs' unallocated ones.)"""
    m = json.loads(qemu_img("map", "--output=json", img).stdout)
    out = []
    for k in range(4):
        e = next(e for e in m if e["start"] <= k * MiB < e["start"] + e["length"])
        out.append((e["data"], e["zero"], "offset" in e))
    return out


async def discard_scenario(s, d) -> dict:
    """Two qcow2 images of data, one node with the default discard
    (ignore), one with discard=unmap; on each: TRIM of MiB 1, WRITE_ZEROES
    (may punch holes) of MiB 2, WRITE_ZEROES with NO_HOLE of MiB 3."""
    out: dict = {}
    sock = str(d / "nbd.sock")
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    for name, extra in (("ign", {}), ("unmap", {"discard": "unmap"})):
        img = str(d / f"{name}.qcow2")
        assert qemu_img("create", "-f", "qcow2", img, "4M").returncode == 0
        qemu_io(img, "write -P 0x33 0 4M")
        await s.x("blockdev-add", **qcow2_node(name, img, **extra))
        await s.x("block-export-add", type="nbd", id=name, **{"node-name": name},
                  writable=True)

        def talk(name=name):
            c = handshake(sock)
            go(c, name.encode())
            errs = [_cmd(c, 4, 1 * MiB, MiB), _cmd(c, 6, 2 * MiB, MiB),
                    _cmd(c, 6, 3 * MiB, MiB, flags=2)]
            c.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
            c.close()
            return errs
        out[name + "-errs"] = await asyncio.to_thread(talk)
        await s.x("block-export-del", id=name, mode="hard")
        await s.until("BLOCK_EXPORT_DELETED")
        await s.x("blockdev-del", **{"node-name": name})
        out[name + "-map"] = _per_mib(img)
        raw = str(d / f"{name}.raw")
        await asyncio.to_thread(run, "qemu-img", "convert", "-O", "raw", img, raw)
        with open(raw, "rb") as f:
            out[name + "-data"] = [f.read(MiB)[:1] for _ in range(4)]
    await s.x("nbd-server-stop")
    return out


def test_discard_follows_the_nodes_discard_option(tmp_path):
    ref, ours = side_by_side(tmp_path, discard_scenario)
    assert ours == ref
    assert ours["ign-data"] == [b"3", b"3", b"\0", b"\0"]       # TRIM ignored
    assert ours["unmap-data"] == [b"3", b"\0", b"\0", b"\0"]
    assert ours["unmap-map"][1] == (False, True, False)           # discarded
    assert ours["ign-map"][3] == (False, True, True)              # NO_HOLE: still allocated


def _waits(c: socket.socket, seconds: float) -> str:
    """What a client that just connected gets within ``seconds``: 'nothing'
    (it waits: the server has not accepted it), 'eof' (turned away) or
    'greeting'. The one bounded wait of these tests: nothing must happen."""
    c.settimeout(seconds)
    try:
        first = c.recv(8)
    except TimeoutError:
        return "nothing"
    finally:
        c.settimeout(15)
    return "greeting" if first == b"NBDMAGIC" else "eof" if not first else repr(first)


async def max_connections_scenario(s, d) -> list:
    out: list = []
    img = str(d / "a.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "1M").returncode == 0
    sock = str(d / "nbd.sock")
    await s.x("blockdev-add", **qcow2_node("disk", img))
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}},
              **{"max-connections": 1})
    await s.x("block-export-add", type="nbd", id="e0", **{"node-name": "disk"})

    def clients() -> None:
        a = handshake(sock)
        size, flags = go(a, b"disk")
        out.append(("a", size, bool(flags & 0x100)))       # NBD_FLAG_CAN_MULTI_CONN
        b = socket.socket(socket.AF_UNIX)
        b.connect(sock)                     # queued by the kernel: the connect succeeds
        out.append(("b while a is connected", _waits(b, 1.0)))
        a.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))    # DISC
        a.close()
        # the slot is free: b is served now (waits at most the socket timeout)
        hello = recv(b, 18)
        out.append(("b after a left", hello[:8]))
        b.sendall(struct.pack(">I", 3))
        size, flags = go(b, b"disk")
        out.append(("b", size, bool(flags & 0x100)))
        b.close()
    await asyncio.to_thread(clients)
    await s.x("nbd-server-stop")
    return out


def test_clients_over_max_connections_wait(tmp_path):
    ref, ours = side_by_side(tmp_path, max_connections_scenario)
    assert ours == ref
    assert ours == [("a", MiB, False), ("b while a is connected", "nothing"),
                    ("b after a left", b"NBDMAGIC"), ("b", MiB, False)]
