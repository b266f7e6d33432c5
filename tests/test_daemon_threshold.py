"""Write thresholds on protocol (``file``) nodes, as libvirt sets them on
thin LVs, against qemu-storage-daemon doing the same: a writable NBD export
of the format node, qemu-io writing through it, the events in order and
``write_threshold`` in ``query-named-block-nodes``, field by field."""
from __future__ import annotations

import asyncio

from daemon_util import qemu_img, side_by_side
from nbd_peers import qemu_io_nbd, uri


def thresholds(listing: list[dict]) -> list[tuple]:
    return [(n["node-name"], n["drv"], n["write_threshold"]) for n in listing
            if not n["node-name"].startswith("#")]


async def _export(s, d, node: str) -> str:
    sock = str(d / "nbd.sock")
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await s.x("block-export-add", type="nbd", id="e0", **{"node-name": node}, writable=True)
    return uri(sock, node)


async def _unexport(s) -> None:
    await s.x("block-export-del", id="e0")
    await s.until("BLOCK_EXPORT_DELETED")
    await s.x("nbd-server-stop")


def _events(evs: list[dict]) -> list[tuple]:
    return [(e["event"], e["data"]) for e in evs if e["event"] == "BLOCK_WRITE_THRESHOLD"]


def test_qcow2_file_node_threshold_matches_qemu(tmp_path):
    """A qcow2 node over a named file node, the threshold on the file node:
    writes below it (in host offsets) send nothing; the write whose new
    cluster reaches past it sends one event with the amount QEMU reports
    (the end of the data write into the file, less the threshold), then the
    threshold is 0."""
    async def sc(s, d):
        img = str(d / "a.qcow2")
        assert qemu_img("create", "-f", "qcow2", img, "16M").returncode == 0
        # header, refcount table and block, L1 table: 4 clusters; then an
        # L2 table at 256k and data clusters from 320k, in write order
        thr = (7 << 16) + 100
        await s.x("blockdev-add", driver="file", filename=img, **{"node-name": "proto"})
        await s.x("block-set-write-threshold", **{"node-name": "proto",
                                                  "write-threshold": thr})
        await s.x("blockdev-add", driver="qcow2", file="proto", **{"node-name": "fmt"})
        out = {"set": thresholds(await s.x("query-named-block-nodes"))}
        u = await _export(s, d, "fmt")
        # an L2 table and one data cluster, then a second data cluster: below
        await asyncio.to_thread(qemu_io_nbd, u, "write -P 1 0 64k", "write -P 2 64k 64k")
        out["below"] = thresholds(await s.x("query-named-block-nodes"))
        # 128 KiB more: the first of them already reaches past it
        await asyncio.to_thread(qemu_io_nbd, u, "write -P 3 1M 128k")
        out["events"] = _events(await s.until("BLOCK_WRITE_THRESHOLD"))
        out["after"] = thresholds(await s.x("query-named-block-nodes"))
        await asyncio.to_thread(qemu_io_nbd, u, "write -P 4 4M 1M")
        await _unexport(s)
        out["size"] = (d / "a.qcow2").stat().st_size
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours["set"] == [("fmt", "qcow2", 0), ("proto", "file", (7 << 16) + 100)]
    assert ours["below"] == ours["set"]
    # the 128k write went to [448k, 576k) of the file in one request
    assert ours["events"] == [("BLOCK_WRITE_THRESHOLD", {
        "node-name": "proto", "amount-exceeded": (2 << 16) - 100,
        "write-threshold": (7 << 16) + 100})]
    assert ours["after"] == [("fmt", "qcow2", 0), ("proto", "file", 0)]


def test_raw_file_node_threshold_matches_qemu(tmp_path):
    """A raw node over a file node, thresholds on both: a raw node's guest
    offsets are its file's, so one write crossing both sends the format
    node's event, then the file node's, each with its own amount."""
    async def sc(s, d):
        img = str(d / "a.raw")
        assert qemu_img("create", "-f", "raw", img, "4M").returncode == 0
        await s.x("blockdev-add", driver="raw", **{"node-name": "fmt"},
                  file={"driver": "file", "filename": img, "node-name": "proto"})
        out = {"err": await s.err("block-set-write-threshold",
                                  **{"node-name": "nosuch", "write-threshold": 1})}
        await s.x("block-set-write-threshold", **{"node-name": "proto",
                                                  "write-threshold": (1 << 20) + 512})
        await s.x("block-set-write-threshold", **{"node-name": "fmt",
                                                  "write-threshold": 1 << 20})
        out["set"] = thresholds(await s.x("query-named-block-nodes"))
        u = await _export(s, d, "fmt")
        await asyncio.to_thread(qemu_io_nbd, u, "write -P 1 0 1M")
        out["below"] = thresholds(await s.x("query-named-block-nodes"))
        await asyncio.to_thread(qemu_io_nbd, u, "write -P 2 1M 4k")
        evs = await s.until("BLOCK_WRITE_THRESHOLD", **{"node-name": "proto"})
        out["events"] = _events(evs)
        out["after"] = thresholds(await s.x("query-named-block-nodes"))
        # a zero write past a new threshold counts as a write too
        await s.x("block-set-write-threshold", **{"node-name": "proto",
                                                  "write-threshold": 3 << 20})
        await asyncio.to_thread(qemu_io_nbd, u, "write -z 3M 64k")
        out["zero"] = _events(await s.until("BLOCK_WRITE_THRESHOLD"))
        await _unexport(s)
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours["err"] == ("GenericError", "Device 'nosuch' not found")
    assert ours["below"] == ours["set"] == [("fmt", "raw", 1 << 20),
                                            ("proto", "file", (1 << 20) + 512)]
    assert ours["events"] == [
        ("BLOCK_WRITE_THRESHOLD", {"node-name": "fmt", "amount-exceeded": 4096,
                                   "write-threshold": 1 << 20}),
        ("BLOCK_WRITE_THRESHOLD", {"node-name": "proto", "amount-exceeded": 4096 - 512,
                                   "write-threshold": (1 << 20) + 512})]
    assert ours["after"] == [("fmt", "raw", 0), ("proto", "file", 0)]
    assert ours["zero"] == [("BLOCK_WRITE_THRESHOLD", {
        "node-name": "proto", "amount-exceeded": 64 << 10, "write-threshold": 3 << 20})]
