"""``detect-zeroes`` on an exported node, side by side with
qemu-storage-daemon: an NBD client's WRITE of zero bytes becomes a zero
write (``on``: no unmapping; ``unmap``: unmapped where the node has
``discard=unmap``), so the image's map equals QEMU's; ``off`` writes the
zero bytes as data."""
from __future__ import annotations

import asyncio
import json
import struct

from daemon_util import qcow2_node, qemu_img, qemu_io, side_by_side
from nbd_peers import go, handshake, recv

MiB = 1 << 20
KiB = 1 << 10


def _write(c, offset: int, data: bytes, handle: int) -> int:
    c.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, handle, offset, len(data)) + data)
    magic, err, h = struct.unpack(">IIQ", recv(c, 16))
    assert magic == 0x67446698 and h == handle
    return err


async def detect_zeroes_scenario(s, d) -> dict:
    """qcow2 images of data (MiB 0-2) and of nothing (MiB 3); through an
    export of a node with detect-zeroes off/on/unmap: zero bytes over MiB
    1 (data), 64 KiB of zero bytes in MiB 3 (unallocated) and 64 KiB of
    data in MiB 2 (the control)."""
    out: dict = {}
    sock = str(d / "nbd.sock")
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    cases = (("off", {}), ("on", {"detect-zeroes": "on"}),
             ("on-discard", {"detect-zeroes": "on", "discard": "unmap"}),
             ("unmap", {"detect-zeroes": "unmap", "discard": "unmap"}))
    for name, extra in cases:
        img = str(d / f"{name}.qcow2")
        assert qemu_img("create", "-f", "qcow2", img, "4M").returncode == 0
        qemu_io(img, "write -P 0x33 0 3M")
        await s.x("blockdev-add", **qcow2_node(name, img, **extra))
        await s.x("block-export-add", type="nbd", id=name, **{"node-name": name},
                  writable=True)

        def talk(name=name):
            c = handshake(sock)
            go(c, name.encode())
            errs = [_write(c, 1 * MiB, bytes(MiB), 1),
                    _write(c, 3 * MiB, bytes(64 * KiB), 2),
                    _write(c, 2 * MiB, b"\x44" * (64 * KiB), 3)]
            c.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
            c.close()
            return errs
        out[name + "-errs"] = await asyncio.to_thread(talk)
        await s.x("block-export-del", id=name, mode="hard")
        await s.until("BLOCK_EXPORT_DELETED")
        await s.x("blockdev-del", **{"node-name": name})
        out[name + "-map"] = json.loads(qemu_img("map", "--output=json", img).stdout)
        out[name + "-check"] = qemu_img("check", img).returncode
    await s.x("nbd-server-stop")
    return out


def _at(m: list[dict], start: int) -> tuple[bool, bool, bool]:
    """(data, zero, host cluster) of the map entry starting at ``start``."""
    e = next(e for e in m if e["start"] == start)
    return e["data"], e["zero"], "offset" in e


def test_detect_zeroes_on_an_exported_node(tmp_path):
    ref, ours = side_by_side(tmp_path, detect_zeroes_scenario)
    assert ours == ref
    # what QEMU does, in words: off writes the zero bytes as data (MiB 0 to
    # 3 + 64 KiB are one data run); on makes MiB 1 a zero cluster that keeps
    # its host cluster (discard=unmap or not); unmap frees it; the 64 KiB
    # in MiB 3 become a zero cluster without a host cluster in all three
    assert ours["off-map"][0]["length"] == 3 * MiB + 64 * KiB and ours["off-map"][0]["data"]
    for case in ("on", "on-discard"):
        assert _at(ours[case + "-map"], 1 * MiB) == (False, True, True)
    assert _at(ours["unmap-map"], 1 * MiB) == (False, True, False)
    for case in ("on", "on-discard", "unmap"):
        assert _at(ours[case + "-map"], 3 * MiB) == (False, True, False)
        assert _at(ours[case + "-map"], 2 * MiB)[0]          # the control: data
        assert ours[case + "-check"] == 0 and ours[case + "-errs"] == [0, 0, 0]
