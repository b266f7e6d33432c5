"""What management software does to the daemon, compared with
qemu-storage-daemon doing the same: the snapshot-then-backup transaction,
the job entries of x-debug-query-block-graph, a libvirt-style session.
Events in order, replies field by field, data checked with qemu-img."""
from __future__ import annotations

import json
import re

from daemon_util import (brief, compare, drop_transient_pauses, make_images, qcow2_node,
                         qemu_img, side_by_side)


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
