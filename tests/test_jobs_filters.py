"""The jobs' filter nodes (jobs.md: filter-node-name): inserted above the
node at job creation, named or implicit (#blockN), front ends re-pointed
through them, transparent to data, removed at the end."""
from __future__ import annotations

import os

import pytest

from blkjobs.errors import UsageError
from test_jobs_helpers import MiB, SIZE, assert_same, eng, mkimg, snapshot  # noqa: F401


def test_backup_cbw_filter_node(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x11", 0, SIZE)])
    tgt = mkimg(tmp_path / "tgt.qcow2")
    orig = snapshot(src, "qcow2", tmp_path / "orig.raw")
    s = eng.open(src, node_name="src")
    eng.open(tgt, node_name="tgt")
    vm = eng.attach(s)
    job = eng.backup("src", "tgt", sync="full", job_id="b0", speed=1 * MiB,
                     filter_node_name="cbw0")
    f = eng.graph.nodes["cbw0"]
    assert (f.format, f.is_filter, f.file, f.size, f.filename) == \
        ("copy-before-write", True, s, s.size, s.filename)
    assert vm.node is f and eng.graph.parents(s) == [f]
    assert f.chain() == [f, s] and f.below_filters() is s
    assert eng.above_filters(s) is f
    vm.write(0, b"\x22" * 65536)               # through the filter: old data saved first
    assert vm.read(0, 4) == b"\x22" * 4 and s.read(0, 4) == b"\x22" * 4
    eng.block_job_set_speed("b0", 0)
    assert eng.wait_job(job, 30).value == "completed"
    assert "cbw0" not in eng.graph.nodes and vm.node is s and eng.graph.parents(s) == []
    eng.close()
    assert_same(orig, tgt, "raw", "qcow2")     # point in time


def test_implicit_name_and_duplicate(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x11", 0, SIZE)])
    tgt = mkimg(tmp_path / "tgt.qcow2")
    s = eng.open(src, node_name="src")
    eng.open(tgt, node_name="tgt")
    with pytest.raises(UsageError, match=r"^Duplicate nodes with node-name='tgt'$"):
        eng.backup("src", "tgt", sync="full", job_id="b0", filter_node_name="tgt")
    assert eng.query_jobs() == [] and eng.graph.parents(s) == []
    job = eng.backup("src", "tgt", sync="full", job_id="b1", speed=1 * MiB)
    [f] = eng.graph.parents(s)
    assert f.name.startswith("#block") and f.format == "copy-before-write"
    eng.job_cancel("b1")
    eng.wait_job(job, 30)
    assert eng.graph.parents(s) == [] and f.name not in eng.graph.nodes


def test_mirror_filter_goes_at_the_pivot(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x33", 0, SIZE)])
    dst = mkimg(tmp_path / "dst.qcow2")
    s = eng.open(src, node_name="src")
    d = eng.open(dst, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="full", job_id="m0", filter_node_name="mt")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    f = eng.graph.nodes["mt"]
    assert f.format == "mirror_top" and vm.node is f and f.file is s
    vm.write(4096, b"\x44" * 4096)
    eng.job_complete("m0")
    assert eng.wait_job(job, 20).value == "completed"
    assert "mt" not in eng.graph.nodes and vm.node is d
    eng.close()
    assert_same(src, dst, "qcow2", "qcow2")


def test_stream_copy_on_read_filter(eng, tmp_path):
    base = mkimg(tmp_path / "base.qcow2", writes=[("0x55", 0, SIZE)])
    top = mkimg(tmp_path / "top.qcow2", backing="base.qcow2")
    view = snapshot(top, "qcow2", tmp_path / "view.raw")
    t = eng.open(top, node_name="top")
    vm = eng.attach(t)
    job = eng.stream("top", job_id="s0", speed=1 * MiB, filter_node_name="cor")
    f = eng.graph.nodes["cor"]
    assert f.format == "copy-on-read" and vm.node is f
    eng.block_job_set_speed("s0", 0)
    assert eng.wait_job(job, 30).value == "completed"
    assert "cor" not in eng.graph.nodes and vm.node is t and t.backing is None
    eng.close()
    assert_same(view, top, "raw", "qcow2")


def test_daemon_lists_the_filter_like_qemu(tmp_path):
    """query-named-block-nodes during a backup with filter-node-name: the
    filter node as qemu-storage-daemon lists it."""
    import asyncio

    from daemon_util import connect, make_images, qcow2_node, start_blkjobs, start_qsd

    async def run(sock, src, tgt):
        s = await connect(sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-backup", **{"job-id": "b0", "filter-node-name": "fl"},
                  device="src", target="tgt", sync="full", speed=1 << 20)
        nodes = await s.x("query-named-block-nodes")
        await s.x("block-job-cancel", device="b0")
        await s.until("JOB_STATUS_CHANGE", id="b0", status="null")
        after = [n["node-name"] for n in await s.x("query-named-block-nodes")]
        await s.close()
        return nodes, after

    got = {}
    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        src, tgt = make_images(d, "64M")
        daemon = start(d)
        try:
            nodes, after = asyncio.run(run(daemon.sock, src, tgt))
        finally:
            assert daemon.stop() == 0, daemon.stderr
        [fl] = [n for n in nodes if n["node-name"] == "fl"]
        assert nodes[0] is fl                       # newest first
        assert "fl" not in after
        img = fl["image"]
        got[name] = (fl["drv"], os.path.basename(fl["file"]), fl["ro"], fl["backing_file_depth"],
                     # QEMU also lists its internal anonymous bitmaps here
                     sorted(set(fl) - {"active", "dirty-bitmaps"}), img["format"], img["virtual-size"],
                     img.get("cluster-size"), sorted(img), img["backing-image"]["format"],
                     len([n for n in nodes if n["drv"] == "file"]))
    assert got["blkjobs"] == got["qsd"]
    assert got["qsd"][:2] == ("copy-before-write", "src.qcow2")
