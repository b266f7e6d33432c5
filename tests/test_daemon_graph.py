"""Reshaping and inspecting the graph over QMP (blockdev-snapshot,
block_resize, block-set-write-threshold and its event, query-block,
x-debug-query-block-graph) against qemu-storage-daemon doing the same:
replies field by field, events in order, refusal texts to the byte, data
checked with qemu-img."""
from __future__ import annotations

import json

from daemon_util import (brief, compare, drop_transient_pauses, make_images, qcow2_node,
                         qemu_img, qemu_io, side_by_side)


def norm(out, d):
    """The scenario's directory as ``D`` and auto-named nodes as ``#auto``
    (each daemon runs in its own directory and numbers its own nodes)."""
    text = json.dumps(out).replace(str(d), "D")
    return json.loads(__import__("re").sub(r'"#block\d+"', '"#auto"', text))


def nodes(listing: list[dict]) -> list[tuple]:
    return [(n["node-name"] if not n["node-name"].startswith("#") else "#auto", n["drv"],
             n["ro"], n.get("backing_file"), n["image"]["virtual-size"], n["write_threshold"])
            for n in listing]


def img(d, name: str, size: str = "4M", *extra: str) -> str:
    path = str(d / name)
    assert qemu_img("create", "-f", "qcow2", *extra, path, size).returncode == 0
    return path


def test_blockdev_snapshot_matches_qemu(tmp_path):
    async def sc(s, d):
        base = img(d, "base.qcow2")
        qemu_io(base, "write -P 0xab 0 1M")
        ov = img(d, "ov.qcow2", "4M", "-b", base, "-F", "qcow2")
        other = img(d, "other.qcow2")
        ov2 = img(d, "ov2.qcow2", "4M", "-b", other, "-F", "qcow2")
        raw = str(d / "r.raw")
        assert qemu_img("create", "-f", "raw", raw, "4M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("base", base))
        await s.x("blockdev-add", **qcow2_node("ov", ov, backing=None))
        await s.x("blockdev-add", **qcow2_node("ov2", ov2))        # opens its backing
        await s.x("blockdev-add", driver="raw", **{"node-name": "r"},
                  file={"driver": "file", "filename": raw})
        out = {"errors": [
            await s.err("blockdev-snapshot", node="base", overlay="nosuch"),
            await s.err("blockdev-snapshot", node="nosuch", overlay="ov"),
            await s.err("blockdev-snapshot", node="base", overlay="base"),
            await s.err("blockdev-snapshot", node="base", overlay="r"),
            await s.err("blockdev-snapshot", node="base", overlay="ov2"),
        ]}
        await s.x("blockdev-snapshot", node="base", overlay="ov")
        out["again"] = await s.err("blockdev-snapshot", node="base", overlay="ov")
        out["del"] = await s.err("blockdev-del", **{"node-name": "base"})
        out["nodes"] = nodes(await s.x("query-named-block-nodes"))
        # the overlay reads through its new backing node: stream it in
        await s.x("block-stream", **{"job-id": "st"}, device="ov")
        out["stream"] = drop_transient_pauses(
            brief(await s.until("JOB_STATUS_CHANGE", id="st", status="null")))
        out["after"] = nodes(await s.x("query-named-block-nodes"))
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["errors"][2:] == [
        ["GenericError", "Making 'base' a backing child of 'base' would create a cycle"],
        ["GenericError", "The overlay does not support backing images"],
        ["GenericError", "The overlay already has a backing image"]]
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        assert compare(str(d / "base.qcow2"), str(d / "ov.qcow2"))[0] == 0
        p = qemu_img("map", "--output=json", "-f", "qcow2", str(d / "ov.qcow2"))
        assert [e for e in json.loads(p.stdout) if e["data"]][0]["depth"] == 0  # streamed


def test_block_resize_matches_qemu(tmp_path):
    async def sc(s, d):
        q = img(d, "q.qcow2")
        qemu_io(q, "write -P 0x11 0 2M")
        base = img(d, "base.qcow2")
        top = img(d, "top.qcow2", "4M", "-b", base, "-F", "qcow2")
        ro = img(d, "ro.qcow2")
        raw = str(d / "r.raw")
        assert qemu_img("create", "-f", "raw", raw, "4M").returncode == 0
        await s.x("blockdev-add", driver="qcow2", **{"node-name": "q"},
                  file={"driver": "file", "filename": q, "node-name": "qf"})
        await s.x("blockdev-add", **qcow2_node("base", base))
        await s.x("blockdev-add", **qcow2_node("top", top, backing="base"))
        await s.x("blockdev-add", **qcow2_node("ro", ro, **{"read-only": True}))
        await s.x("blockdev-add", driver="raw", **{"node-name": "r"},
                  file={"driver": "file", "filename": raw})
        out = {"ok": [
            await s.x("block_resize", **{"node-name": "q"}, size=8 << 20),
            await s.x("block_resize", **{"node-name": "r"}, size=6 << 20),
            await s.x("block_resize", device="", **{"node-name": "r"}, size=5 << 20),
        ], "errors": [
            await s.err("block_resize", **{"node-name": "q"}, size=(8 << 20) - 1),
            await s.err("block_resize", **{"node-name": "q"}, size=-1),
            await s.err("block_resize", **{"node-name": "nosuch"}, size=1 << 20),
            await s.err("block_resize", device="nosuch", size=1 << 20),
            await s.err("block_resize", size=1 << 20),
            await s.err("block_resize", **{"node-name": "base"}, size=8 << 20),
            await s.err("block_resize", device="x", **{"node-name": "base"}, size=8 << 20),
            await s.err("block_resize", **{"node-name": "ro"}, size=8 << 20),
            await s.err("block_resize", **{"node-name": "qf"}, size=8 << 20),
        ]}
        out["shrink"] = await s.x("block_resize", **{"node-name": "q"}, size=1 << 20)
        out["nodes"] = [n for n in nodes(await s.x("query-named-block-nodes"))
                        if n[1] != "file"]
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["errors"][5:8] == [["GenericError", "Device '(null)' is in use"],
                                   ["GenericError", "Device 'x' is in use"],
                                   ["GenericError", "Image is read-only"]]
    for name in ("qsd", "blkjobs"):
        q = str(tmp_path / name / "q.qcow2")
        p = qemu_img("check", "-f", "qcow2", q)
        assert p.returncode == 0, p.stdout + p.stderr
        info = json.loads(qemu_img("info", "--output=json", q).stdout)
        assert info["virtual-size"] == 1 << 20
        qemu_io(q, "read -P 0x11 0 1M")
        assert (tmp_path / name / "r.raw").stat().st_size == 5 << 20


def test_write_threshold_matches_qemu(tmp_path):
    """The event fires once, when a write first goes past the threshold
    (here a backup's write into its target), and the threshold is then 0."""
    async def sc(s, d):
        src, tgt = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        out = {"errors": [await s.err("block-set-write-threshold",
                                      **{"node-name": "nosuch", "write-threshold": 1})]}
        await s.x("block-set-write-threshold", **{"node-name": "tgt",
                                                  "write-threshold": (1 << 20) - 1})
        out["set"] = nodes(await s.x("query-named-block-nodes"))
        await s.x("blockdev-backup", **{"job-id": "b0"}, device="src", target="tgt",
                  sync="full")
        out["events"] = drop_transient_pauses(
            brief(await s.until("JOB_STATUS_CHANGE", id="b0", status="null")))
        out["after"] = nodes(await s.x("query-named-block-nodes"))
        # 0 turns it off: no event
        await s.x("block-set-write-threshold", **{"node-name": "src", "write-threshold": 1})
        await s.x("block-set-write-threshold", **{"node-name": "src", "write-threshold": 0})
        await s.x("blockdev-backup", **{"job-id": "b1"}, device="tgt", target="src",
                  sync="full")
        out["off"] = drop_transient_pauses(
            brief(await s.until("JOB_STATUS_CHANGE", id="b1", status="null")))
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    # amount-exceeded is the end of the write request that crossed, less the
    # threshold: QEMU's backup wrote [0, 2M) in one request (data and the
    # zeroes after it), blkjobs writes each run it copies ([0, 1M) here)
    amounts = []
    for r in (ref, ours):
        [ev] = [e for e in r["events"] if e[0] == "BLOCK_WRITE_THRESHOLD"]
        amounts.append(ev[1].pop("amount-exceeded"))
    assert amounts == [(1 << 20) + 1, 1]
    assert ref == ours
    assert ours["errors"] == [["GenericError", "Device 'nosuch' not found"]]
    assert [e for e in ours["events"] if e[0] == "BLOCK_WRITE_THRESHOLD"] == [
        ["BLOCK_WRITE_THRESHOLD", {"node-name": "tgt", "write-threshold": (1 << 20) - 1}]]
    assert not [e for e in ours["off"] if e[0] == "BLOCK_WRITE_THRESHOLD"]


def test_query_block_and_block_graph_match_qemu(tmp_path):
    async def sc(s, d):
        base = img(d, "base.qcow2")
        top = img(d, "top.qcow2", "4M", "-b", base, "-F", "qcow2")
        ro = img(d, "ro.qcow2")
        raw = str(d / "r.raw")
        assert qemu_img("create", "-f", "raw", raw, "4M").returncode == 0
        await s.x("blockdev-add", driver="file", filename=raw, **{"node-name": "rf"})
        await s.x("blockdev-add", **qcow2_node("base", base, backing=None))
        await s.x("blockdev-add", **qcow2_node("top", top, backing="base"))
        await s.x("blockdev-add", **qcow2_node("ro", ro, **{"read-only": True}))
        await s.x("blockdev-add", driver="raw", file="rf", **{"node-name": "r"})
        return norm({"block": await s.x("query-block"),
                     "graph": await s.x("x-debug-query-block-graph")}, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["block"] == []
    assert len(ours["graph"]["nodes"]) == 8 and len(ours["graph"]["edges"]) == 5
