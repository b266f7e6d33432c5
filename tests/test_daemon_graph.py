"""Reshaping and inspecting the graph over QMP (blockdev-snapshot,
block_resize, block-set-write-threshold and its event, query-block,
x-debug-query-block-graph) against qemu-storage-daemon doing the same:
replies field by field, events in order, refusal texts to the byte, data
checked with qemu-img."""
from __future__ import annotations

import json
import subprocess

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
        out = {"block": await s.x("query-block"),
               "graph": await s.x("x-debug-query-block-graph")}
        # a qcow2 node that opens its backing chain by itself
        base2 = img(d, "base2.qcow2")
        mid = img(d, "mid.qcow2", "4M", "-b", base2, "-F", "qcow2")
        top2 = img(d, "top2.qcow2", "4M", "-b", mid, "-F", "qcow2")
        await s.x("blockdev-add", **qcow2_node("top2", top2, **{"read-only": True}))
        out["implicit"] = await s.x("x-debug-query-block-graph")
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["block"] == []
    assert len(ours["graph"]["nodes"]) == 8 and len(ours["graph"]["edges"]) == 5
    assert len(ours["implicit"]["nodes"]) == 14


def test_blockdev_reopen_matches_qemu(tmp_path):
    """read-only toggles and backing changes, all-or-nothing lists, and
    QEMU's refusals."""
    async def sc(s, d):
        base, b2 = img(d, "base.qcow2"), img(d, "b2.qcow2")
        top = img(d, "top.qcow2", "4M", "-b", base, "-F", "qcow2")
        qemu_io(base, "write -P 0x61 0 64k")
        qemu_io(b2, "write -P 0x62 0 64k")
        for name, path, extra in (("base", base, {}), ("b2", b2, {}),
                                  ("top", top, {"backing": "base"})):
            await s.x("blockdev-add", driver="qcow2", **{"node-name": name}, **extra,
                      file={"driver": "file", "filename": path, "node-name": name + "f"})

        def opt(**o):
            return {"driver": "qcow2", "node-name": "top", "file": "topf", **o}
        out = {"errors": [
            await s.err("blockdev-reopen", options=[opt(**{"read-only": True})]),
            await s.err("blockdev-reopen", options=[opt(backing="top")]),
            await s.err("blockdev-reopen", options=[opt(backing="nosuch")]),
            await s.err("blockdev-reopen", options=[{"driver": "qcow2", "file": "x"}]),
            await s.err("blockdev-reopen", options=[opt(driver="raw")]),
            await s.err("blockdev-reopen", options=[opt(file="nosuch", backing="base")]),
            await s.err("blockdev-reopen", options=[
                opt(backing="base", **{"read-only": True}),
                {"driver": "qcow2", "node-name": "nosuch", "file": "x"}]),
            await s.err("blockdev-reopen", options=[
                {"driver": "file", "node-name": "b2f", "filename": str(d / "b2.qcow2"),
                 "read-only": True}]),
            await s.err("blockdev-reopen", options=[
                {"driver": "file", "node-name": "b2f", "filename": str(d / "other")}]),
        ]}
        out["after-errors"] = nodes(await s.x("query-named-block-nodes"))
        rw_file = {"driver": "file", "filename": str(d / "top.qcow2"), "node-name": "topf"}
        steps = [[opt(backing="base", **{"read-only": True})],
                 [opt(backing="base"),
                  {"driver": "file", "node-name": "topf", "filename": str(d / "top.qcow2")}],
                 [opt(backing=None, **{"read-only": True}, file=rw_file)],
                 [opt(backing="b2", file=rw_file)]]
        out["steps"] = []
        for i, o in enumerate(steps):
            out["steps"].append((await s.x("blockdev-reopen", options=o),
                                 nodes(await s.x("query-named-block-nodes"))))
            if i == 0:      # the file node stays read-only: the format node cannot go rw
                out["ro-to-rw"] = [
                    await s.err("blockdev-reopen", options=[opt(backing="base")]),
                    await s.err("blockdev-reopen", options=[
                        {"driver": "file", "node-name": "topf",
                         "filename": str(d / "top.qcow2")}, opt(backing="base")])]
        out["cycle"] = await s.err("blockdev-reopen", options=[
            {"driver": "qcow2", "node-name": "b2", "file": "b2f", "backing": "top"}])
        # top now reads through b2: stream it in, then compare
        await s.x("block-stream", **{"job-id": "st"}, device="top")
        await s.until("JOB_STATUS_CHANGE", id="st", status="null")
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["errors"][0] == ["GenericError", "backing is missing for 'top'"]
    assert ours["cycle"] == ["GenericError", "Making 'top' a backing child of 'b2' would "
                                             "create a cycle"]
    for name in ("qsd", "blkjobs"):
        qemu_io(str(tmp_path / name / "top.qcow2"), "read -P 0x62 0 64k")


def test_blockdev_snapshot_sync_matches_qemu(tmp_path):
    """qemu-storage-daemon without exports: the overlay file is created, the
    old node goes read-only, and the new overlay node does not stay (it
    has no parent and no monitor reference)."""
    async def sc(s, d):
        base = img(d, "base.qcow2")
        raw = str(d / "r.raw")
        assert qemu_img("create", "-f", "raw", raw, "4M").returncode == 0
        top = img(d, "top.qcow2", "4M", "-b", base, "-F", "qcow2")
        await s.x("blockdev-add", **qcow2_node("base", base))
        await s.x("blockdev-add", **qcow2_node("top", top, backing="base"))
        await s.x("blockdev-add", driver="raw", **{"node-name": "r"},
                  file={"driver": "file", "filename": raw})
        sn = {"snapshot-file": str(d / "s.qcow2")}
        out = {"errors": [
            await s.err("blockdev-snapshot-sync", device="top", **sn),
            await s.err("blockdev-snapshot-sync", **{"node-name": "nosuch"}, **sn),
            await s.err("blockdev-snapshot-sync", **{"node-name": "base"}, **sn,
                        **{"snapshot-node-name": "s"}),
            await s.err("blockdev-snapshot-sync", **{"node-name": "top"}, **sn),
            await s.err("blockdev-snapshot-sync", **{"node-name": "top"}, **sn,
                        **{"snapshot-node-name": "base"}),
            await s.err("blockdev-snapshot-sync", **{"node-name": "top", "format": "raw"},
                        **sn, **{"snapshot-node-name": "s"}),
            await s.err("blockdev-snapshot-sync", **{"node-name": "top"},
                        **{"snapshot-file": str(d / "no/s.qcow2"), "snapshot-node-name": "s"}),
            await s.err("blockdev-snapshot-sync", **{"node-name": "top", "mode": "existing"},
                        **{"snapshot-file": str(d / "none.qcow2"), "snapshot-node-name": "s"}),
        ]}
        await s.x("blockdev-snapshot-sync", **{"node-name": "top"}, **sn,
                  **{"snapshot-node-name": "s"})
        await s.x("blockdev-snapshot-sync", **{"node-name": "r"},
                  **{"snapshot-file": str(d / "s2.qcow2"), "snapshot-node-name": "s2"})
        out["nodes"] = nodes(await s.x("query-named-block-nodes"))
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["errors"][3] == ["GenericError", "New overlay node-name missing"]
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        for f, backing in (("s.qcow2", "top.qcow2"), ("s2.qcow2", "r.raw")):
            info = json.loads(qemu_img("info", "--output=json", str(d / f)).stdout)
            assert info["backing-filename"] == str(d / backing)
            assert info["virtual-size"] == 4 << 20


def test_write_threshold_on_guest_writes(tmp_path):
    """A front end's writes (x-blkjobs-write, blkjobs only: qemu-storage-
    daemon has no guest without exports): below the threshold nothing, the
    first write past it one event with the amount past it, then nothing."""
    from daemon_util import run_daemon, start_blkjobs

    async def sc(s, d):
        src, _ = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("block-set-write-threshold", **{"node-name": "src",
                                                  "write-threshold": 1 << 20})
        await s.x("x-blkjobs-write", node="src", offset=0, length=1 << 20, pattern=1)
        await s.x("x-blkjobs-write", node="src", offset=(1 << 20) - 512, length=4096,
                  pattern=2)
        ev = await s.event("BLOCK_WRITE_THRESHOLD")
        thr = [n[5] for n in nodes(await s.x("query-named-block-nodes")) if n[0] == "src"]
        # the threshold is off now: this write sends nothing; the next event
        # is the one of a new threshold
        await s.x("x-blkjobs-write", node="src", offset=3 << 20, length=4096, pattern=3)
        await s.x("block-set-write-threshold", **{"node-name": "src",
                                                  "write-threshold": 2 << 20})
        await s.x("x-blkjobs-write", node="src", offset=2 << 20, length=512, pattern=4)
        ev2 = await s.event("BLOCK_WRITE_THRESHOLD")
        return ev["data"], thr, ev2["data"]
    first, thr, second = run_daemon(start_blkjobs, tmp_path, sc)
    assert first == {"node-name": "src", "amount-exceeded": 4096 - 512,
                     "write-threshold": 1 << 20}
    assert thr == [0]
    assert second == {"node-name": "src", "amount-exceeded": 512, "write-threshold": 2 << 20}


def test_blockdev_snapshot_in_a_transaction_matches_qemu(tmp_path):
    """A transaction that fails after a blockdev-snapshot action unlinks the
    overlay again; one that succeeds links it and makes the old node
    read-only, and a backup in the same transaction reads the new chain."""
    async def sc(s, d):
        base = img(d, "base.qcow2")
        qemu_io(base, "write -P 0xcd 0 1M")
        ov = img(d, "ov.qcow2", "4M", "-b", base, "-F", "qcow2")
        tgt = img(d, "tgt.qcow2")
        await s.x("blockdev-add", **qcow2_node("base", base))
        await s.x("blockdev-add", **qcow2_node("ov", ov, backing=None))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        snap = {"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "ov"}}
        backup = {"type": "blockdev-backup", "data": {"job-id": "b", "device": "ov",
                                                      "target": "tgt", "sync": "full"}}
        out = {"errors": [
            await s.err("transaction", actions=[snap, {"type": "abort", "data": {}}]),
            await s.err("transaction", actions=[snap, backup],
                        properties={"completion-mode": "grouped"}),
            await s.err("transaction", actions=[
                {"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "base"}}]),
        ]}
        out["rolled-back"] = nodes(await s.x("query-named-block-nodes"))
        await s.x("transaction", actions=[snap, backup])
        out["events"] = drop_transient_pauses(
            brief(await s.until("JOB_STATUS_CHANGE", id="b", status="null")))
        out["nodes"] = nodes(await s.x("query-named-block-nodes"))
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["errors"][1] == ["GenericError", "Action 'blockdev-snapshot' does not support "
                                 "Transaction property completion-mode = grouped"]
    assert [n for n in ours["rolled-back"] if n[0] == "ov"][0][3] is None
    assert [n for n in ours["nodes"] if n[0] == "ov"][0][3] == "D/base.qcow2"
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        assert compare(str(d / "base.qcow2"), str(d / "tgt.qcow2"))[0] == 0


def test_qcow2_nodes_hold_qemus_locks_as_qsd(tmp_path):
    """QEMU's qcow2 rule in the daemon, as qemu-storage-daemon's
    blockdev-add: a read-write qcow2 node with no user yet already holds
    write and resize (its metadata is cached here), so qemu-io can neither
    write it nor read it with a stable view; a read-only one refuses other
    writers only; an inline backing object opens read-only. (The daemon used
    to take nothing until a user came: another process could write an image
    whose L1/L2/refcounts it held in memory.)"""
    async def sc(s, d):
        rw, ro, ov = img(d, "rw.qcow2"), img(d, "ro.qcow2"), str(d / "ov.qcow2")
        assert qemu_img("create", "-f", "qcow2", "-b", ro, "-F", "qcow2", ov).returncode == 0
        await s.x("blockdev-add", **qcow2_node("rw", rw))
        await s.x("blockdev-add", **qcow2_node("ro", ro, **{"read-only": True}))
        await s.x("blockdev-add", **qcow2_node("ov", ov, backing={
            "driver": "qcow2", "file": {"driver": "file", "filename": ro}}))
        out = {}
        for name, path in (("rw", rw), ("ro", ro)):
            for how in (["-c", "write 0 512"], ["-r", "-c", "read 0 512"], ["-r", "-U", "-c", "read 0 512"]):
                p = subprocess.run(["qemu-io", "-f", "qcow2", *how, path],
                                   capture_output=True, text=True, timeout=60)
                text = __import__("re").sub(r"\d+ bytes, \d+ ops;.*\n", "", p.stdout + p.stderr)
                out[f"{name} {' '.join(how)}"] = [p.returncode, text.replace(str(d), "D")]
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert "Failed to get \"write\" lock" in ours["rw -c write 0 512"][1]
    assert "Failed to get shared \"write\" lock" in ours["rw -r -c read 0 512"][1]
    assert ours["ro -r -c read 0 512"][0] == 0


def test_blockdev_snapshot_sync_in_a_transaction_matches_qemu(tmp_path):
    """blockdev-snapshot-sync as a transaction action: rolled back when a
    later action fails (the old node stays writable; the overlay file it
    created stays on disk, as QEMU leaves it), committed with a bitmap
    action (the old node read-only with its new bitmap, the overlay gone:
    nothing holds it). (A backup of the new overlay in the same transaction
    makes qemu-storage-daemon 7.2 abort when the job ends: not compared.)"""
    async def sc(s, d):
        base = img(d, "base.qcow2")
        top = img(d, "top.qcow2", "4M", "-b", base, "-F", "qcow2")
        qemu_io(top, "write -P 0x5a 64k 128k")
        tgt = img(d, "tgt.qcow2")
        await s.x("blockdev-add", **qcow2_node("top", top))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))

        def snap(f: str) -> dict:
            return {"type": "blockdev-snapshot-sync",
                    "data": {"node-name": "top", "snapshot-file": str(d / f),
                             "snapshot-node-name": "s"}}
        backup = {"type": "blockdev-backup", "data": {"job-id": "b", "device": "s",
                                                      "target": "tgt", "sync": "full"}}
        out = {"errors": [
            await s.err("transaction", actions=[snap("s1.qcow2"), {"type": "abort", "data": {}}]),
            await s.err("transaction", actions=[snap("s2.qcow2"), backup],
                        properties={"completion-mode": "grouped"}),
            await s.err("transaction", actions=[
                {"type": "blockdev-snapshot-sync",
                 "data": {"node-name": "top", "snapshot-file": str(d / "s3.qcow2")}}]),
            await s.err("transaction", actions=[snap("s4.qcow2"), snap("s5.qcow2")]),
        ]}
        out["rolled-back"] = nodes(await s.x("query-named-block-nodes"))
        out["files"] = sorted(p.name for p in d.iterdir() if p.name.startswith("s"))
        await s.x("transaction", actions=[snap("s.qcow2"), {
            "type": "block-dirty-bitmap-add", "data": {"node": "top", "name": "bm"}}])
        out["bitmaps"] = [(n["node-name"], [b["name"] for b in n.get("dirty-bitmaps", [])])
                          for n in await s.x("query-named-block-nodes")
                          if not n["node-name"].startswith("#")]
        out["nodes"] = nodes(await s.x("query-named-block-nodes"))
        out["del"] = await s.err("blockdev-del", **{"node-name": "s"})
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["errors"][0] == ["GenericError", "Transaction aborted using Abort action"]
    assert ours["errors"][3] == ["GenericError",
                                 "Node 'top' is busy: node is used as backing hd of 's'"]
    assert [n[2] for n in ours["rolled-back"] if n[0] == "top"] == [False]
    assert [n[2] for n in ours["nodes"] if n[0] == "top"] == [True]
    assert not [n for n in ours["nodes"] if n[0] == "s"]
    assert ours["files"] == ["s1.qcow2", "s4.qcow2"]     # grouped: refused before
    assert ours["bitmaps"] == [["tgt", []], ["top", ["bm"]]]
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        info = json.loads(qemu_img("info", "--output=json", str(d / "s.qcow2")).stdout)
        assert info["backing-filename"] == str(d / "top.qcow2")


def test_block_graph_with_jobs_and_exports_matches_qemu(tmp_path):
    """x-debug-query-block-graph while a backup, then a mirror runs, with an
    NBD export of the source: QEMU's block-backend entries (the export's,
    the mirror target's), block-job entries and the jobs' filters, every
    edge with QEMU's name, perm and shared-perm."""
    async def sc(s, d):
        src, tgt = make_images(d)
        tgt2 = img(d, "tgt2.qcow2")
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-add", **qcow2_node("tgt2", tgt2))
        await s.x("nbd-server-start",
                  addr={"type": "unix", "data": {"path": str(d / "nbd.sock")}})
        out = {}
        for job, cmd, target, writable in (("b", "blockdev-backup", "tgt", False),
                                           ("m", "blockdev-mirror", "tgt2", True)):
            extra = await s.hold(target, job)
            await s.x(cmd, **{"job-id": job}, device="src", target=target, sync="full",
                      **extra)
            await s.held(job)
            await s.x("block-export-add", type="nbd", id="e", **{"node-name": "src"},
                      writable=writable)
            out[job] = await s.x("x-debug-query-block-graph")
            await s.x("block-export-del", id="e")
            await s.until("BLOCK_EXPORT_DELETED")
            await s.cancel_held(job, job)
        out["idle"] = await s.x("x-debug-query-block-graph")
        await s.x("nbd-server-stop")
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    kinds = sorted(n["type"] for n in ours["m"]["nodes"])
    assert kinds == ["block-backend"] * 2 + ["block-driver"] * 7 + ["block-job"]
    names = {(e["name"], tuple(e["perm"])) for e in ours["m"]["edges"]}
    assert ("main node", ("consistent-read",)) in names
    assert ("root", ("write",)) in names                    # the mirror's target
    assert ("root", ("write", "consistent-read")) in names   # the writable export
    assert {e["name"] for e in ours["b"]["edges"]} == {"file", "target", "main node", "root"}
    assert {n["type"] for n in ours["idle"]["nodes"]} == {"block-driver"}


def test_exports_and_backup_filter_match_qemu(tmp_path):
    """An export made before a backup moves onto its copy-before-write
    filter (QEMU's bdrv_append); a writable export made on the source while
    the backup runs is refused with QEMU's permission-conflict text (the
    filter shares no write below it); a read-only one is fine."""
    import re

    async def sc(s, d):
        src, tgt = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("nbd-server-start",
                  addr={"type": "unix", "data": {"path": str(d / "nbd.sock")}})
        await s.x("block-export-add", type="nbd", id="e", **{"node-name": "src"},
                  writable=True)
        extra = await s.hold("tgt", "b")
        await s.x("blockdev-backup", **{"job-id": "b"}, device="src", target="tgt",
                  sync="full", **extra)
        await s.held("b")
        out = {"moved": await s.x("x-debug-query-block-graph"),
               "refused": await s.err("block-export-add", type="nbd", id="e2", name="w",
                                      **{"node-name": "src"}, writable=True)}
        await s.x("block-export-add", type="nbd", id="e2", name="r", **{"node-name": "src"})
        out["both"] = await s.x("x-debug-query-block-graph")
        for e in ("e2", "e"):
            await s.x("block-export-del", id=e)
            await s.until("BLOCK_EXPORT_DELETED", id=e)
        await s.cancel_held("b", "b")
        await s.x("nbd-server-stop")
        return json.loads(re.sub(r"#block\d+", "#auto", json.dumps(norm(out, d))))
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours["refused"] == [
        "GenericError", "Permission conflict on node 'src': permissions 'write' are both "
        "required by an unnamed block device (uses node 'src' as 'root' child) and unshared "
        "by node '#auto' (uses node 'src' as 'file' child)."]
    g = ours["moved"]
    names = {n["id"]: n["name"] for n in g["nodes"]}
    [root] = [e for e in g["edges"] if e["name"] == "root"]
    assert names[root["child"]] == "#auto"       # the filter, not src
