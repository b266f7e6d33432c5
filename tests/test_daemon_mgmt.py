"""What management software does to the daemon, compared with
qemu-storage-daemon doing the same: the snapshot-then-backup transaction,
the job entries of x-debug-query-block-graph, a libvirt-style session.
Events in order, replies field by field, data checked with qemu-img."""
from __future__ import annotations

import json
import re

from daemon_util import (brief, compare, drop_transient_pauses, make_images, qcow2_node,
                         qemu_img, qemu_io, side_by_side)
from test_daemon_pbitmaps import guest_write


def norm(out, d):
    """The scenario's directory as ``D``, auto-named nodes as ``#auto``."""
    return json.loads(re.sub(r'"#block\d+"', '"#auto"', json.dumps(out).replace(str(d), "D")))


def nodes(listing: list[dict]) -> list[tuple]:
    return [(n["node-name"] if not n["node-name"].startswith("#") else "#auto", n["drv"],
             n["ro"], n.get("backing_file"), n["image"]["virtual-size"]) for n in listing]


def test_snapshot_sync_and_backup_of_the_old_node_in_one_transaction(tmp_path):
    """The usual "snapshot, then back up the frozen base" in one transaction:
    QEMU accepts it (its copy-before-write filter asks only what its parents
    need: the new overlay's backing link, no write). The job's events, the
    nodes after it (the base read-only, the overlay gone), the overlay file
    naming the base, the backup equal to the base. A backup of a node used
    as backing, outside a transaction, likewise."""
    async def sc(s, d):
        src, tgt = make_images(d)
        tgt2 = str(d / "tgt2.qcow2")
        assert qemu_img("create", "-f", "qcow2", tgt2, "4M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("disk0", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-add", **qcow2_node("tgt2", tgt2))
        out = {"txn": await s.x("transaction", actions=[
            {"type": "blockdev-snapshot-sync",
             "data": {"node-name": "disk0", "snapshot-file": str(d / "ov.qcow2"),
                      "snapshot-node-name": "ov", "format": "qcow2"}},
            {"type": "blockdev-backup",
             "data": {"job-id": "b0", "device": "disk0", "target": "tgt", "sync": "full"}}])}
        out["events"] = drop_transient_pauses(brief(
            await s.until("JOB_STATUS_CHANGE", id="b0", status="null")))
        out["nodes"] = nodes(await s.x("query-named-block-nodes"))
        # a node used as backing: the overlay's link shares no write
        top = str(d / "top.qcow2")
        assert qemu_img("create", "-f", "qcow2", "-b", src, "-F", "qcow2", top).returncode == 0
        await s.x("blockdev-add", **qcow2_node("top", top, backing="disk0"))
        await s.x("blockdev-backup", **{"job-id": "b1"}, device="disk0", target="tgt2",
                  sync="full")
        out["events2"] = drop_transient_pauses(brief(
            await s.until("JOB_STATUS_CHANGE", id="b1", status="null")))
        for n in ("tgt", "tgt2", "top"):
            await s.x("blockdev-del", **{"node-name": n})
        out["same"] = [compare(src, tgt)[0], compare(src, tgt2)[0]]
        out["ov"] = json.loads(qemu_img("info", "-U", "--output=json",
                                        str(d / "ov.qcow2")).stdout)["backing-filename"]
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours["same"] == [0, 0]
    assert ours["ov"] == "D/src.qcow2"
    assert [s for _, s in ours["events"] if "status" in s][-1] == {"id": "b0", "status": "null"}
    assert [n for n in ours["nodes"] if n[0] == "disk0"] == [["disk0", "qcow2", True, None,
                                                              4 << 20]]
    assert not [n for n in ours["nodes"] if n[0] == "ov"]


def test_block_graph_with_stream_and_commit_jobs_matches_qemu(tmp_path):
    """x-debug-query-block-graph while a stream (to a base node, then
    whole), a commit of an intermediate node and an active commit are held
    at their first write: QEMU's block-job entries (main node, active node,
    intermediate node, base; source and target for the active commit), the
    jobs' BlockBackends and filters (copy-on-read, commit_top, mirror_top),
    every edge's perm and shared-perm."""
    async def sc(s, d):
        def img(name: str, *extra: str) -> str:
            p = str(d / name)
            assert qemu_img("create", "-f", "qcow2", *extra, p, "4M").returncode == 0
            return p
        base = img("base.qcow2")
        qemu_io(base, "write -P 0x11 0 1M")
        mid = img("mid.qcow2", "-b", base, "-F", "qcow2")
        qemu_io(mid, "write -P 0x22 1M 1M")
        top = img("top.qcow2", "-b", mid, "-F", "qcow2")
        below = None
        for name, path in (("base", base), ("mid", mid), ("top", top)):
            await s.x("blockdev-add", driver="qcow2", **{"node-name": name},
                      file={"driver": "file", "filename": path, "node-name": f"{name}-f"},
                      **({"backing": below} if below else {}))
            below = name
        out = {}
        for job, cmd, args, written in (
                ("st", "block-stream", {"device": "top", "base-node": "base"}, "top"),
                ("sw", "block-stream", {"device": "top"}, "top"),
                ("cm", "block-commit", {"device": "top", "top-node": "mid",
                                        "base-node": "base"}, "base"),
                ("ac", "block-commit", {"device": "top"}, "base")):
            extra = await s.hold(written, job)
            await s.x(cmd, **{"job-id": job}, **args, **extra)
            await s.held(job)
            out[job] = await s.x("x-debug-query-block-graph")
            await s.cancel_held(job, job)
        out["idle"] = await s.x("x-debug-query-block-graph")
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref

    def edges(g: dict) -> set:
        names = {n["id"]: n["name"] for n in g["nodes"]}
        return {(names[e["parent"]], e["name"], names[e["child"]]) for e in g["edges"]}
    assert {e for e in edges(ours["st"]) if e[0] == "st"} == {
        ("st", "main node", "#auto"), ("st", "active node", "top"),
        ("st", "intermediate node", "mid")}
    assert ("sw", "intermediate node", "base") in edges(ours["sw"])
    assert {e for e in edges(ours["cm"]) if e[0] == "cm"} == {
        ("cm", "main node", "top"), ("cm", "intermediate node", "mid"), ("cm", "base", "base")}
    assert {e for e in edges(ours["ac"]) if e[0] == "ac"} == {
        ("ac", "main node", "#auto"), ("ac", "source", "top"), ("ac", "target", "base"),
        ("ac", "intermediate node", "mid")}
    assert {n["type"] for n in ours["idle"]["nodes"]} == {"block-driver"}


def _strip(x):
    """Replies without what differs by nature: ``active`` (QEMU 10.1's
    member, which qemu-storage-daemon 7.2 lacks) and ``actual-size`` (how the
    file system allocated the file)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in ("active", "actual-size")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def test_libvirt_style_session_matches_qemu(tmp_path):
    """What libvirt does to a disk, step by step: probe the schema, query
    the nodes, add a file and a qcow2 node, add an overlay and make it the
    active layer (blockdev-snapshot), a full backup in a transaction with a
    persistent bitmap, an incremental backup, an active commit completed by
    job-complete, job-dismiss, blockdev-del. Every reply and event equals
    qemu-storage-daemon's (query-named-block-nodes flat, as libvirt asks):
    after the active commit the base is writable, as the overlay was."""
    async def sc(s, d):
        out: dict = {"schema": sorted(e["name"] for e in await s.x("query-qmp-schema")
                                      if e["meta-type"] == "command")}
        base, ov = str(d / "base.qcow2"), str(d / "ov.qcow2")
        full, inc = str(d / "full.qcow2"), str(d / "inc.qcow2")
        assert qemu_img("create", "-f", "qcow2", base, "4M").returncode == 0
        qemu_io(base, "write -P 0x11 0 1M")
        out["qb0"] = await s.x("query-block")
        await s.x("blockdev-add", driver="file", filename=base, **{"node-name": "base-f"})
        await s.x("blockdev-add", driver="qcow2", file="base-f", **{"node-name": "base"})
        out["qnbn1"] = await s.x("query-named-block-nodes", flat=True)
        assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", ov).returncode == 0
        await s.x("blockdev-add", driver="file", filename=ov, **{"node-name": "ov-f"})
        await s.x("blockdev-add", driver="qcow2", file="ov-f", backing=None,
                  **{"node-name": "ov"})
        out["snap"] = await s.x("blockdev-snapshot", node="base", overlay="ov")
        out["qnbn2"] = await s.x("query-named-block-nodes", flat=True)
        assert qemu_img("create", "-f", "qcow2", full, "4M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("full", full))
        out["txn"] = await s.x("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "ov", "name": "inc0", "persistent": True}},
            {"type": "blockdev-backup",
             "data": {"job-id": "bf", "device": "ov", "target": "full", "sync": "full",
                      "auto-dismiss": False}}])

        async def to_end(job: str, key: str) -> None:
            evs = await s.until("JOB_STATUS_CHANGE", id=job, status="concluded")
            out[f"qj-{key}"] = await s.x("query-jobs")
            out[f"dismiss-{key}"] = await s.x("job-dismiss", id=job)
            evs += await s.until("JOB_STATUS_CHANGE", id=job, status="null")
            out[f"ev-{key}"] = drop_transient_pauses(brief(evs))
        await to_end("bf", "full")
        assert qemu_img("create", "-f", "qcow2", "-b", full, "-F", "qcow2", inc).returncode == 0
        await s.x("blockdev-add", **qcow2_node("inc", inc, backing="full"))
        await s.x("blockdev-backup", **{"job-id": "bi"}, device="ov", target="inc",
                  sync="incremental", bitmap="inc0", **{"auto-dismiss": False})
        await to_end("bi", "inc")
        out["qnbn3"] = await s.x("query-named-block-nodes", flat=True)
        await s.x("block-commit", **{"job-id": "c"}, device="ov", **{"auto-dismiss": False})
        out["ev-ready"] = brief(await s.until("BLOCK_JOB_READY", device="c"))
        out["qbj"] = await s.x("query-block-jobs")
        out["complete"] = await s.x("job-complete", id="c")
        await to_end("c", "commit")
        out["qnbn4"] = await s.x("query-named-block-nodes", flat=True)
        out["qb1"] = await s.x("query-block")
        out["del"] = [await s.x("blockdev-del", **{"node-name": n})
                      for n in ("inc", "full", "ov", "ov-f", "base", "base-f")]
        out["qnbn5"] = await s.x("query-named-block-nodes", flat=True)
        return _strip(norm(out, d))
    ref, ours = side_by_side(tmp_path, sc)
    used = {"query-block", "query-named-block-nodes", "blockdev-add", "blockdev-snapshot",
            "transaction", "blockdev-backup", "query-jobs", "job-dismiss", "block-commit",
            "query-block-jobs", "job-complete", "blockdev-del"}
    assert used <= set(ours["schema"]) and used <= set(ref["schema"])
    ref.pop("schema"), ours.pop("schema")
    assert ours == ref
    assert [n["backing_file_depth"] for n in ours["qnbn3"]] == [0] * len(ours["qnbn3"])
    assert [n["ro"] for n in ours["qnbn2"] if n["node-name"] == "base-f"] == [False]
    assert [n["ro"] for n in ours["qnbn4"] if n["node-name"] == "base"] == [False]
    assert ours["qnbn5"] == []


def test_persistent_bitmap_of_a_node_made_read_only_by_snapshot(tmp_path):
    """A persistent bitmap (with bits) on the node blockdev-snapshot makes
    read-only: QEMU stores it at the reopen (qcow2_reopen_bitmaps_ro), so
    the node's format-specific lists it from then on, and nothing is stored
    again at close; the file is qemu-storage-daemon's byte for byte (the
    directory written as long as it is ends the file)."""
    async def sc(s, d):
        base, ov = str(d / "base.qcow2"), str(d / "ov.qcow2")
        assert qemu_img("create", "-f", "qcow2", base, "4M").returncode == 0
        qemu_io(base, "write -P 0x11 0 1M")
        await s.x("blockdev-add", driver="file", filename=base, **{"node-name": "base-f"})
        await s.x("blockdev-add", driver="qcow2", file="base-f", **{"node-name": "base"})
        await s.x("block-dirty-bitmap-add", node="base", name="p", persistent=True)
        await s.x("block-dirty-bitmap-add", node="base", name="q", persistent=True,
                  granularity=512, disabled=True)
        await guest_write(s, d, "base", 1 << 20, 4096, 0x22)
        out: dict = {"before": await s.x("query-named-block-nodes", flat=True)}
        assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", ov).returncode == 0
        await s.x("blockdev-add", driver="file", filename=ov, **{"node-name": "ov-f"})
        await s.x("blockdev-add", driver="qcow2", file="ov-f", backing=None,
                  **{"node-name": "ov"})
        await s.x("blockdev-snapshot", node="base", overlay="ov")
        out["after"] = await s.x("query-named-block-nodes", flat=True)
        out["qb"] = await s.x("query-block")
        for n in ("ov", "ov-f", "base", "base-f"):
            await s.x("blockdev-del", **{"node-name": n})
        return _strip(norm(out, d))
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    fs = [n["image"]["format-specific"]["data"] for n in ours["after"]
          if n["node-name"] == "base"]
    assert [b["name"] for b in fs[0]["bitmaps"]] == ["q", "p"]     # newest first
    assert "bitmaps" not in [n for n in ours["before"]
                             if n["node-name"] == "base"][0]["image"]["format-specific"]["data"]
    files = [(tmp_path / w / "base.qcow2").read_bytes() for w in ("qsd", "blkjobs")]
    assert files[0] == files[1]
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", *(str(tmp_path / w / "base.qcow2")
                    for w in ("qsd", "blkjobs"))).returncode == 0
    assert len(files[1]) % 65536 == 64      # the directory of two entries ends the file
