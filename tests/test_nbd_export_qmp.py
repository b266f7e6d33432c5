"""The export commands over QMP, side by side with qemu-storage-daemon:
the same scenario on both daemons gives the same replies, error texts,
events, and the same data and maps to nbdinfo and qemu-io."""
from __future__ import annotations

import asyncio
import struct

from qemu.qmp import ExecuteError

from daemon_util import qcow2_node, qemu_img, qemu_io, side_by_side
from nbd_peers import go, handshake, nbd_map, qemu_io_nbd, run, uri


async def _try(s, out: list, cmd: str, **args) -> None:
    try:
        out.append((cmd, "ok", await s.x(cmd, **args)))
    except ExecuteError as e:
        out.append((cmd, e.error_class, e.error.error.desc))


async def errors_scenario(s, d) -> list:
    out: list = []
    img = str(d / "a.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "1M").returncode == 0
    sock = str(d / "nbd.sock")
    unix = {"type": "unix", "data": {"path": sock}}
    await _try(s, out, "nbd-server-stop")
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "disk"})
    await _try(s, out, "blockdev-add", **qcow2_node("disk", img))
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "disk"})
    await _try(s, out, "nbd-server-start", addr=unix, **{"tls-creds": "nope"})
    await _try(s, out, "nbd-server-start", addr=unix)
    await _try(s, out, "nbd-server-start", addr=unix)
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "nod"})
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
               bitmaps=["bx"])
    await _try(s, out, "block-dirty-bitmap-add", node="disk", name="b0")
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
               bitmaps=["b0"])
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
               bitmaps=["b0"], writable=True)
    await _try(s, out, "block-export-add", type="nbd", id="e0", **{"node-name": "disk"})
    await _try(s, out, "block-export-add", type="nbd", id="e1", **{"node-name": "disk"})
    await _try(s, out, "block-export-add", type="nbd", id="e1", **{"node-name": "disk"},
               name="other", description="the other one")
    await _try(s, out, "query-block-exports")
    await _try(s, out, "blockdev-del", **{"node-name": "disk"})
    await _try(s, out, "block-dirty-bitmap-remove", node="disk", name="b0")
    await _try(s, out, "block-export-del", id="zz")
    # a client holds e0: a safe delete is refused, a hard one drops it
    client = await asyncio.to_thread(handshake, sock)
    size, flags = await asyncio.to_thread(go, client, b"disk")
    out.append(("go", size, flags & 1))
    await _try(s, out, "block-export-del", id="e0")
    await _try(s, out, "block-export-del", id="e1")
    out.append(("ev", [(e["event"], e["data"]) for e in await s.until("BLOCK_EXPORT_DELETED")]))
    await _try(s, out, "block-export-del", id="e0", mode="hard")
    out.append(("ev", [(e["event"], e["data"]) for e in await s.until("BLOCK_EXPORT_DELETED")]))
    out.append(("eof", await asyncio.to_thread(client.recv, 1)))
    client.close()
    await _try(s, out, "query-block-exports")
    await _try(s, out, "block-dirty-bitmap-remove", node="disk", name="b0")
    await _try(s, out, "nbd-server-stop")
    await _try(s, out, "nbd-server-stop")
    return out


def test_export_commands_match_qemu_storage_daemon(tmp_path):
    ref, ours = side_by_side(tmp_path, errors_scenario)
    assert ours == ref
    assert ("block-export-del", "GenericError", "export 'e0' still in use") in ours
    assert ("ev", [("BLOCK_EXPORT_DELETED", {"id": "e0"})]) in ours


async def bitmap_scenario(s, d) -> dict:
    """A writable export with a dirty bitmap: qemu-io writes through it,
    nbdinfo maps both contexts, nbdcopy reads it back."""
    img = str(d / "a.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "8M").returncode == 0
    qemu_io(img, "write -P 0x11 0 1M")
    sock = str(d / "nbd.sock")
    # discard=unmap: QEMU ignores discards by default (blkjobs always unmaps)
    await s.x("blockdev-add", **qcow2_node("disk", img, discard="unmap"))
    await s.x("block-dirty-bitmap-add", node="disk", name="b0", granularity=65536)
    await s.x("block-dirty-bitmap-add", node="disk", name="small", granularity=4096)
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await s.x("block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
              writable=True, bitmaps=["b0", "small"])
    u = uri(sock, "disk")
    # (zeroes in whole clusters: QEMU's qcow2 turns a partial-cluster zero
    # write over a cluster reading as zeroes into a zero cluster, blkjobs'
    # qcow2 driver writes the zero bytes -- same data, another map)
    await asyncio.to_thread(qemu_io_nbd, u, "write -P 0x22 4k 4k", "write -z 2M 128k",
                            "write -P 0x33 5M 1M", "discard 512k 64k", "write -P 0x44 8188k 4k")
    res = {"base": await asyncio.to_thread(nbd_map, u),
           "b0": await asyncio.to_thread(nbd_map, u, "qemu:dirty-bitmap:b0"),
           "small": await asyncio.to_thread(nbd_map, u, "qemu:dirty-bitmap:small"),
           "list": await asyncio.to_thread(lambda: run("nbdinfo", "--list", "--json",
                                                       f"nbd+unix://?socket={sock}").stdout)}
    await asyncio.to_thread(run, "nbdcopy", u, str(d / "copy.raw"))
    res["data"] = (d / "copy.raw").read_bytes()
    await s.x("block-export-del", id="e0")
    await s.until("BLOCK_EXPORT_DELETED")
    await s.x("nbd-server-stop")
    return res


def test_dirty_bitmap_maps_match_qemu_storage_daemon(tmp_path):
    ref, ours = side_by_side(tmp_path, bitmap_scenario)
    for key in ("base", "b0", "small", "data"):
        assert ours[key] == ref[key], key
    lines = [line.split() for line in ours["b0"].splitlines()]
    assert lines[0] == ["0", "65536", "1", "dirty"]
    assert ["5242880", "1048576", "1", "dirty"] in lines
    assert ours["data"][4096:8192] == b"\x22" * 4096
    # the exports' list names the contexts alike (paths differ)
    assert ours["list"].replace("/blkjobs/", "/X/") == ref["list"].replace("/qsd/", "/X/")


def test_fast_zero_and_no_hole_requests(tmp_path):
    """WRITE_ZEROES with NO_HOLE and FAST_ZERO over a raw connection: both
    daemons succeed and the bytes read back are zero."""
    async def scenario(s, d):
        img = str(d / "a.qcow2")
        assert qemu_img("create", "-f", "qcow2", img, "1M").returncode == 0
        qemu_io(img, "write -P 0x11 0 1M")
        sock = str(d / "nbd.sock")
        await s.x("blockdev-add", **qcow2_node("disk", img))
        await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        await s.x("block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
                  writable=True)

        def talk():
            c = handshake(sock)
            _size, flags = go(c, b"disk")
            replies = []
            for handle, fl in ((1, 2), (2, 16), (3, 2 | 16)):   # NO_HOLE, FAST_ZERO
                c.sendall(struct.pack(">IHHQQI", 0x25609513, fl, 6, handle, handle * 65536,
                                      65536))
                replies.append(struct.unpack(">IIQ", c.recv(16)))
            c.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
            c.close()
            return flags, replies
        flags, replies = await asyncio.to_thread(talk)
        await s.x("block-export-del", id="e0", mode="hard")
        await s.until("BLOCK_EXPORT_DELETED")
        await s.x("nbd-server-stop")
        await s.x("blockdev-del", **{"node-name": "disk"})
        await asyncio.to_thread(run, "qemu-img", "convert", "-O", "raw", img, str(d / "out.raw"))
        return flags, replies, (d / "out.raw").read_bytes()
    ref, ours = side_by_side(tmp_path, scenario)
    assert ours[1] == ref[1] == [(0x67446698, 0, 1), (0x67446698, 0, 2), (0x67446698, 0, 3)]
    assert ours[2] == ref[2]
    assert ours[2][65536:4 * 65536] == bytes(3 * 65536)
    assert ours[0] & 0x800 and ref[0] & 0x800        # NBD_FLAG_SEND_FAST_ZERO


async def legacy_scenario(s, d) -> list:
    out: list = []
    img = str(d / "a.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "1M").returncode == 0
    sock = str(d / "nbd.sock")
    await _try(s, out, "nbd-server-add", device="disk")
    await _try(s, out, "blockdev-add", **qcow2_node("disk", img))
    await _try(s, out, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await _try(s, out, "block-dirty-bitmap-add", node="disk", name="b0")
    await _try(s, out, "nbd-server-add", device="disk", name="x", writable=True, bitmap="b0",
               description="legacy")
    await _try(s, out, "nbd-server-add", device="disk")
    await _try(s, out, "query-block-exports")
    out.append(("list", await asyncio.to_thread(
        lambda: run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}").stdout
        .replace(str(d), "D"))))
    await _try(s, out, "nbd-server-remove", name="nope")
    await _try(s, out, "nbd-server-remove", name="x")
    out.append(("ev", [(e["event"], e["data"]) for e in await s.until("BLOCK_EXPORT_DELETED")]))
    await _try(s, out, "nbd-server-remove", name="disk", mode="hard")
    out.append(("ev", [(e["event"], e["data"]) for e in await s.until("BLOCK_EXPORT_DELETED")]))
    await _try(s, out, "query-block-exports")
    await _try(s, out, "nbd-server-stop")
    return out


def test_legacy_nbd_server_add_remove_match_qemu_storage_daemon(tmp_path):
    ref, ours = side_by_side(tmp_path, legacy_scenario)
    assert ours == ref
