"""NBD clients write through the guest path, so jobs see their writes:
fleecing (pull-mode backup: ``blockdev-backup sync=none`` into an overlay
exported read-only with a bitmap, read while a client keeps writing the
source) and a mirror whose source a client writes, which converges and
pivots the export to its target. Each scenario runs on qemu-storage-daemon
too and must come out the same."""
from __future__ import annotations

import asyncio
import subprocess

from daemon_util import qcow2_node, qemu_img, qemu_io, side_by_side
from nbd_peers import end_fleecing, nbd_map, qemu_io_nbd, run, tool, uri

#: what the "guest" writes through the source's export after the backup
#: started (a pattern per 64 KiB granule, all over the disk)
LATER = [f"write -P 0x{0xe0 + i % 16:02x} {i * 640}k 64k" for i in range(24)]


def _copy(u: str, path) -> bytes:
    run("nbdcopy", u, str(path))
    return path.read_bytes()


async def fleecing_scenario(s, d) -> dict:
    src, fleece = str(d / "src.qcow2"), str(d / "fleece.qcow2")
    assert qemu_img("create", "-f", "qcow2", src, "16M").returncode == 0
    qemu_io(src, "write -P 0x11 0 4M")
    qemu_io(src, "write -P 0x22 8M 1M")
    assert qemu_img("create", "-f", "qcow2", "-b", src, "-F", "qcow2", fleece).returncode == 0
    sock = str(d / "nbd.sock")
    await s.x("blockdev-add", **qcow2_node("src", src))
    await s.x("block-dirty-bitmap-add", node="src", name="b0")
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await s.x("block-export-add", type="nbd", id="vm", **{"node-name": "src"}, writable=True)
    vm = uri(sock, "src")
    # changes since the last backup, recorded in b0
    await asyncio.to_thread(qemu_io_nbd, vm, "write -P 0x33 1M 64k", "write -P 0x44 12M 128k")
    expected = await asyncio.to_thread(_copy, vm, d / "expected.raw")
    # (the guest's export goes while the overlay is added: blkjobs' backing
    # links never share write, QEMU's do when the overlay's users allow it;
    # the fleecing backup relaxes the link, as in QEMU. QEMU then wants the
    # writer on the job's filter node, blkjobs puts it there by itself.)
    await s.x("block-export-del", id="vm")
    await s.until("BLOCK_EXPORT_DELETED", id="vm")
    await s.x("blockdev-add", **qcow2_node("fleece", fleece, backing="src"))
    await s.x("transaction", actions=[
        {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"device": "src", "target": "fleece",
                                             "sync": "none", "job-id": "fl",
                                             "filter-node-name": "cbw"}}])
    await s.x("block-export-add", type="nbd", id="vm", **{"node-name": "cbw"}, name="src",
              writable=True)
    await s.x("block-export-add", type="nbd", id="fleece", **{"node-name": "fleece"},
              bitmaps=["b0"])
    fl = uri(sock, "fleece")
    await asyncio.to_thread(qemu_io_nbd, vm, *LATER[:8])
    # the pull: nbdcopy reads the fleecing export while the guest writes on
    nbdcopy = subprocess.Popen([tool("nbdcopy"), fl, str(d / "pulled.raw")],
                               stderr=subprocess.PIPE, text=True)
    await asyncio.to_thread(qemu_io_nbd, vm, *LATER[8:])
    err = (await asyncio.to_thread(nbdcopy.communicate, None, 120))[1]
    assert nbdcopy.returncode == 0, err
    await asyncio.to_thread(qemu_io_nbd, vm, "write -z 0 16M")
    res = {"expected": expected, "pulled": (d / "pulled.raw").read_bytes(),
           "bitmap": await asyncio.to_thread(nbd_map, fl, "qemu:dirty-bitmap:b0")}
    await asyncio.to_thread(run, "qemu-img", "convert", "-f", "raw", "-O", "raw", fl,
                            str(d / "converted.raw"))
    res["converted"] = (d / "converted.raw").read_bytes()
    res["source"] = await asyncio.to_thread(_copy, vm, d / "now.raw")
    await end_fleecing(s)
    return res


def test_fleecing_pull_backup_under_a_writer(tmp_path):
    ref, ours = side_by_side(tmp_path, fleecing_scenario)
    assert ours == ref
    # the copies are the source at the moment of the backup ...
    assert ours["pulled"] == ours["expected"]
    assert ours["converted"] == ours["expected"]
    assert ours["expected"][1 << 20:(1 << 20) + 65536] == b"\x33" * 65536
    # ... although the guest rewrote it meanwhile
    assert ours["source"] == bytes(16 << 20)
    # the bitmap shows what changed before the backup
    assert [line.split() for line in ours["bitmap"].splitlines()] == [
        ["0", "1048576", "0", "clean"], ["1048576", "65536", "1", "dirty"],
        ["1114112", "11468800", "0", "clean"], ["12582912", "131072", "1", "dirty"],
        ["12713984", "4063232", "0", "clean"]]


async def mirror_scenario(s, d) -> dict:
    src, tgt = str(d / "src.qcow2"), str(d / "tgt.qcow2")
    assert qemu_img("create", "-f", "qcow2", src, "8M").returncode == 0
    qemu_io(src, "write -P 0x11 0 3M")
    assert qemu_img("create", "-f", "qcow2", tgt, "8M").returncode == 0
    sock = str(d / "nbd.sock")
    await s.x("blockdev-add", **qcow2_node("src", src))
    await s.x("blockdev-add", **qcow2_node("tgt", tgt))
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await s.x("block-export-add", type="nbd", id="vm", **{"node-name": "src"}, writable=True)
    vm = uri(sock, "src")
    await s.x("blockdev-mirror", device="src", target="tgt", sync="full", **{"job-id": "m0"})
    await asyncio.to_thread(qemu_io_nbd, vm, "write -P 0x22 1M 8k", "write -P 0x33 5M 1M")
    await s.until("BLOCK_JOB_READY", device="m0")
    await asyncio.to_thread(qemu_io_nbd, vm, "write -P 0x44 6M 4k", "write -z 0 64k")
    await s.x("job-complete", id="m0")
    await s.until("BLOCK_JOB_COMPLETED", device="m0")
    # the export follows the pivot: this lands on the target only
    await asyncio.to_thread(qemu_io_nbd, vm, "write -P 0x55 7M 64k")
    exports = await s.x("query-block-exports")
    await s.x("block-export-del", id="vm")
    await s.until("BLOCK_EXPORT_DELETED", id="vm")
    await s.x("nbd-server-stop")
    await s.x("blockdev-del", **{"node-name": "src"})
    await s.x("blockdev-del", **{"node-name": "tgt"})
    for name, path in (("src", src), ("tgt", tgt)):
        assert qemu_img("convert", "-O", "raw", path, str(d / f"{name}.raw")).returncode == 0
    return {"exports": exports, "src": (d / "src.raw").read_bytes(),
            "tgt": (d / "tgt.raw").read_bytes()}


def test_mirror_tracks_nbd_writes_and_pivots_the_export(tmp_path):
    ref, ours = side_by_side(tmp_path, mirror_scenario)
    assert ours == ref
    src, tgt = ours["src"], ours["tgt"]
    assert tgt[1 << 20:(1 << 20) + 8192] == b"\x22" * 8192
    assert tgt[6 << 20:(6 << 20) + 4096] == b"\x44" * 4096
    assert tgt[:65536] == bytes(65536)
    assert tgt[7 << 20:(7 << 20) + 65536] == b"\x55" * 65536
    assert src[:7 << 20] == tgt[:7 << 20]
    assert src[7 << 20:] == bytes(1 << 20)
