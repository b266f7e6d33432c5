"""blkjobs serve against the reference, qemu-storage-daemon: the same short
backup scenarios over QMP give the same events (modulo timestamps and QEMU's
transient paused/running pairs, docs/job-model.md §9) and the same
query-block-jobs / query-jobs results."""
from __future__ import annotations

import asyncio

import pytest
from daemon_util import (brief, compare, connect, drop_transient_pauses, make_images,
                         qcow2_node, qemu_img, start_blkjobs, start_qsd)


async def scenario(sock: str, src: str, tgt: str, tgt2: str) -> dict:
    s = await connect(sock)
    out: dict = {}
    await s.x("blockdev-add", **qcow2_node("src", src))
    await s.x("blockdev-add", **qcow2_node("tgt", tgt))
    await s.x("blockdev-add", **qcow2_node("tgt2", tgt2))
    # 1. defaults (docs/qmp.md §9)
    await s.x("blockdev-backup", **{"job-id": "b0"}, device="src", target="tgt", sync="full")
    out["auto"] = brief(await s.until("JOB_STATUS_CHANGE", id="b0", status="null"))
    # 2. manual finalize and dismiss, queries while pending and concluded
    await s.x("blockdev-backup", **{"job-id": "b1", "auto-finalize": False,
                                    "auto-dismiss": False},
              device="src", target="tgt2", sync="full")
    ev = brief(await s.until("BLOCK_JOB_PENDING", id="b1"))
    out["pending-query-block-jobs"] = await s.x("query-block-jobs")
    out["pending-query-jobs"] = await s.x("query-jobs")
    out["finalize-too-early"] = await s.err("job-dismiss", id="b1")
    await s.x("job-finalize", id="b1")
    ev += brief(await s.until("JOB_STATUS_CHANGE", id="b1", status="concluded"))
    out["concluded-query-block-jobs"] = await s.x("query-block-jobs")
    out["concluded-query-jobs"] = await s.x("query-jobs")
    await s.x("job-dismiss", id="b1")
    ev += brief(await s.until("JOB_STATUS_CHANGE", id="b1", status="null"))
    out["manual"] = ev
    # 3. errors both daemons report the same way
    out["errors"] = [
        await s.err("job-pause", id="nojob"),
        await s.err("block-job-cancel", device="nojob"),
        await s.err("blockdev-backup", device="src", target="nosuch", sync="full"),
        await s.err("blockdev-backup", **{"job-id": "x"}, device="src", target="tgt",
                    sync="bitmap"),
        await s.err("blockdev-backup", **{"job-id": "x"}, device="src", target="tgt",
                    sync="full", bitmap="nob", **{"bitmap-mode": "always"}),
        await s.err("transaction", actions=[{"type": "abort", "data": {}}]),
        await s.err("blockdev-del", **{"node-name": "nosuch"}),
        await s.err("block-commit", device="nosuch"),
    ]
    out["nodes"] = await s.x("query-named-block-nodes")
    await s.close()
    return out


_NODE_KEYS = ("drv", "ro", "backing_file_depth", "encrypted", "detect_zeroes", "cache", "bps",
              "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "write_threshold")


def node_summary(nodes: list[dict]) -> list[tuple]:
    """What must agree: per named node (in list order), the fixed members,
    the image's size/format/cluster size and the member names (QEMU 7.2
    predates 'active'), the qcow2 'format-specific' block included."""
    out = []
    for n in nodes:
        img = n["image"]
        out.append((n["node-name"] if not n["node-name"].startswith("#") else "#auto",
                    tuple(n[k] for k in _NODE_KEYS), img["format"], img["virtual-size"],
                    img.get("cluster-size"), img.get("format-specific"),
                    sorted(set(n) - {"active"}), sorted(img)))
    return out


def test_backup_matches_qemu_storage_daemon(tmp_path):
    results = {}
    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        src, tgt = make_images(d)
        tgt2 = str(d / "tgt2.qcow2")
        assert qemu_img("create", "-f", "qcow2", tgt2, "4M").returncode == 0
        daemon = start(d)
        try:
            results[name] = asyncio.run(scenario(daemon.sock, src, tgt, tgt2))
        finally:
            assert daemon.stop() == 0, daemon.stderr
        assert compare(src, tgt)[0] == 0 and compare(src, tgt2)[0] == 0
    ref, ours = results["qsd"], results["blkjobs"]
    for key in ("auto", "manual"):
        assert drop_transient_pauses(ref[key]) == ours[key], key
    assert ours["auto"][0] == ("JOB_STATUS_CHANGE", {"id": "b0", "status": "created"})
    for key in ("pending-query-block-jobs", "concluded-query-block-jobs", "pending-query-jobs",
                "concluded-query-jobs", "finalize-too-early", "errors"):
        assert ref[key] == ours[key], key
    assert node_summary(ref["nodes"]) == node_summary(ours["nodes"])


@pytest.mark.parametrize("sync", ["full"])
def test_mirror_matches_qemu_storage_daemon(tmp_path, sync):
    results = {}

    async def run(sock, src, tgt):
        s = await connect(sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("dst", tgt))
        await s.x("blockdev-mirror", **{"job-id": "m0"}, device="src", target="dst", sync=sync)
        ev = brief(await s.until("BLOCK_JOB_READY"))
        info = await s.x("query-block-jobs")
        await s.x("job-complete", id="m0")
        ev += brief(await s.until("JOB_STATUS_CHANGE", id="m0", status="null"))
        await s.close()
        return ev, info

    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        src, tgt = make_images(d)
        daemon = start(d)
        try:
            results[name] = asyncio.run(run(daemon.sock, src, tgt))
        finally:
            assert daemon.stop() == 0, daemon.stderr
        assert compare(src, tgt)[0] == 0
    (ref_ev, ref_info), (ev, info) = results["qsd"], results["blkjobs"]
    assert drop_transient_pauses(ref_ev) == ev
    # QEMU 7.2 predates 'actively-synced' (8.2); everything else must agree
    [ref_job], [job] = ref_info, info
    assert job.pop("actively-synced") is False
    assert ref_job == job


def test_job_lists_are_newest_first_like_qemu(tmp_path):
    """query-jobs and query-block-jobs list the newest job first in
    qemu-storage-daemon; blkjobs the same."""
    order = {}

    async def run(sock, d):
        s = await connect(sock)
        for i in (1, 2):
            src, tgt = make_images(d / f"p{i}", "64M")
            await s.x("blockdev-add", **qcow2_node(f"src{i}", src))
            await s.x("blockdev-add", **qcow2_node(f"tgt{i}", tgt))
        for i, jid in ((1, "first"), (2, "second")):     # still running when listed
            hold = await s.hold(f"tgt{i}", jid)
            await s.x("blockdev-backup", **{"job-id": jid}, device=f"src{i}", target=f"tgt{i}",
                      sync="full", **hold)
            await s.held(jid)
        got = ([j["id"] for j in await s.x("query-jobs")],
               [j["device"] for j in await s.x("query-block-jobs")])
        for jid in ("first", "second"):
            await s.cancel_held(jid, jid)
        await s.close()
        return got

    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        for i in (1, 2):
            (d / f"p{i}").mkdir(parents=True)
        daemon = start(d)
        try:
            order[name] = asyncio.run(run(daemon.sock, d))
        finally:
            assert daemon.stop() == 0, daemon.stderr
    assert order["qsd"] == order["blkjobs"] == (["second", "first"], ["second", "first"])
