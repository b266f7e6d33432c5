"""The jobs' filter nodes (docs/jobs.md: filter-node-name): inserted above the
node at job creation, named or implicit (#blockN), front ends re-pointed
through them, transparent to data, removed at the end."""
from __future__ import annotations

import os
import threading

import pytest

from blkjobs.errors import UsageError
from test_jobs_helpers import (MIB_BATCHES, MiB, SIZE, assert_same, chain3, eng,  # noqa: F401
                               mkimg, snapshot)


def test_backup_cbw_filter_node(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x11", 0, SIZE)])
    tgt = mkimg(tmp_path / "tgt.qcow2")
    orig = snapshot(src, "qcow2", tmp_path / "orig.raw")
    s = eng.open(src, node_name="src")
    eng.open(tgt, node_name="tgt")
    vm = eng.attach(s)
    eng.blkdebug_break("tgt", "write_aio", "w")     # held at its first batch (MiB 0-1)
    job = eng.backup("src", "tgt", sync="full", job_id="b0", speed=MIB_BATCHES,
                     filter_node_name="cbw0")
    eng.blkdebug_wait_break("w")
    eng.job_set_speed("b0", 0)
    f = eng.graph.nodes["cbw0"]
    assert (f.format, f.is_filter, f.file, f.size, f.filename) == \
        ("copy-before-write", True, s, s.size, s.filename)
    assert vm.node is f and eng.graph.parents(s) == [f]
    assert f.chain() == [f, s] and f.below_filters() is s
    assert eng.io.above_filters(s) is f
    vm.write(3 * MiB, b"\x22" * 65536)         # through the filter: old data saved first
    assert vm.read(3 * MiB, 4) == b"\x22" * 4 and s.read(3 * MiB, 4) == b"\x22" * 4
    eng.blkdebug_resume("w")
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
    eng.blkdebug_break("tgt", "pwritev", "w")      # the job stays running
    job = eng.backup("src", "tgt", sync="full", job_id="b1")
    eng.blkdebug_wait_break("w")
    [f] = eng.graph.parents(s)
    assert f.name.startswith("#block") and f.format == "copy-before-write"
    eng.job_cancel("b1")
    eng.blkdebug_remove_break("w")
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
    mkimg(tmp_path / "base.qcow2", writes=[("0x55", 0, SIZE)])
    top = mkimg(tmp_path / "top.qcow2", backing="base.qcow2")
    view = snapshot(top, "qcow2", tmp_path / "view.raw")
    t = eng.open(top, node_name="top")
    vm = eng.attach(t)
    eng.blkdebug_break("top", "write_aio", "w")    # the job stays running
    job = eng.stream("top", job_id="s0", filter_node_name="cor")
    eng.blkdebug_wait_break("w")
    f = eng.graph.nodes["cor"]
    assert f.format == "copy-on-read" and vm.node is f
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 30).value == "completed"
    assert "cor" not in eng.graph.nodes and vm.node is t and t.backing is None
    eng.close()
    assert_same(view, top, "raw", "qcow2")


@pytest.mark.parametrize("outcome", ["completed", "cancelled"])
def test_commit_filter_above_top(eng, tmp_path, outcome):
    """Intermediate commit: a commit_top filter sits between the overlay and
    the committed node; prepare backs the overlay onto base and drops the
    filter, a cancel puts the overlay back onto the node."""
    base, mid, top = chain3(tmp_path)
    view = snapshot(top, "qcow2", tmp_path / "view.raw")
    t = eng.open(top, node_name="top")
    m, b = t.chain()[1], t.chain()[2]
    vm = eng.attach(t)
    eng.blkdebug_break(m.name, "read_aio", "w")    # the job stays running
    job = eng.commit("top", top_node=m.name, base_node=b.name, job_id="c0",
                     filter_node_name="ct")
    eng.blkdebug_wait_break("w")
    f = eng.graph.nodes["ct"]
    assert (f.format, f.file, t.backing) == ("commit_top", m, f)
    assert t.chain() == [t, f, m, b]
    assert vm.read(0, 4) == b"\x61" * 4 and vm.read(1 * MiB, 4) == b"\x51" * 4
    if outcome == "cancelled":
        eng.job_cancel("c0")
        eng.blkdebug_resume("w")
        assert eng.wait_job(job, 30).value == "cancelled"
        assert "ct" not in eng.graph.nodes and t.backing is m and t.chain() == [t, m, b]
    else:
        eng.blkdebug_resume("w")
        assert eng.wait_job(job, 30).value == "completed"
        assert "ct" not in eng.graph.nodes and t.backing is b and t.chain() == [t, b]
        assert m.name not in eng.graph.nodes           # the intermediate left the graph
    eng.close()
    assert_same(view, top, "raw", "qcow2")


def test_two_backups_stack_their_filters(eng, tmp_path):
    """A second backup's filter goes right above the source, below the
    first one's; a guest write passes both (each target keeps its own point
    in time); each leaves in turn."""
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x11", 0, SIZE)])
    t1, t2 = mkimg(tmp_path / "t1.qcow2"), mkimg(tmp_path / "t2.qcow2")
    first = snapshot(src, "qcow2", tmp_path / "first.raw")
    s = eng.open(src, node_name="src")
    eng.open(t1, node_name="t1")
    eng.open(t2, node_name="t2")
    vm = eng.attach(s)
    # each job held at its first batch (MiB 0-1); the writes go after it
    eng.blkdebug_break("t1", "write_aio", "w1")
    j1 = eng.backup(s.name, "t1", sync="full", job_id="b1", speed=MIB_BATCHES,
                    filter_node_name="f1")
    eng.blkdebug_wait_break("w1")
    vm.write(2 * MiB, b"\x22" * 65536)
    second = tmp_path / "second.raw"
    old = open(first, "rb").read()
    second.write_bytes(old[:2 * MiB] + b"\x22" * 65536 + old[2 * MiB + 65536:])
    eng.blkdebug_break("t2", "write_aio", "w2")
    j2 = eng.backup(s.name, "t2", sync="full", job_id="b2", speed=MIB_BATCHES,
                    filter_node_name="f2")
    eng.blkdebug_wait_break("w2")
    f1, f2 = eng.graph.nodes["f1"], eng.graph.nodes["f2"]
    assert (f1.file, f2.file, vm.node) == (f2, s, f1)
    assert f1.chain() == [f1, f2, s] and f1.below_filters() is s
    vm.write(3 * MiB, b"\x33" * 65536)             # saved into both targets first
    assert vm.read(3 * MiB, 4) == b"\x33" * 4
    eng.job_set_speed("b1", 0)
    eng.blkdebug_resume("w1")
    assert eng.wait_job(j1, 30).value == "completed"
    assert "f1" not in eng.graph.nodes and vm.node is f2
    eng.job_set_speed("b2", 0)
    eng.blkdebug_resume("w2")
    assert eng.wait_job(j2, 30).value == "completed"
    assert vm.node is s and eng.graph.parents(s) == []
    eng.close()
    assert_same(first, t1, "raw", "qcow2")
    assert_same(str(second), t2, "raw", "qcow2")


def test_daemon_lists_the_filter_like_qemu(tmp_path):
    """query-named-block-nodes during a backup with filter-node-name: the
    filter node as qemu-storage-daemon lists it."""
    import asyncio

    from daemon_util import connect, make_images, qcow2_node, start_blkjobs, start_qsd

    async def run(sock, src, tgt):
        s = await connect(sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        hold = await s.hold("tgt", "w")         # still running when listed
        await s.x("blockdev-backup", **{"job-id": "b0", "filter-node-name": "fl"},
                  device="src", target="tgt", sync="full", **hold)
        await s.held("w")
        nodes = await s.x("query-named-block-nodes")
        await s.cancel_held("b0", "w")
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


def test_guest_write_held_in_cbw_while_the_backup_ends_lands_on_the_source(eng, tmp_path):
    """A guest write waiting inside the copy-before-write hook (its copy of
    the old data held at a break point) while the backup completes and its
    filter is taken out: once let go, it goes on down to the source image
    (the chain walk used to read the removed filter's ``file``: None)."""
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x11", 0, SIZE)])
    tgt = mkimg(tmp_path / "tgt.qcow2")
    orig = snapshot(src, "qcow2", tmp_path / "orig.raw")
    s = eng.open(src, node_name="src")
    eng.open(tgt, node_name="tgt")
    vm = eng.attach(s)
    eng.blkdebug_break("tgt", "write_aio", "job")
    # speed: batches of 1 MiB, so the guest's cluster at 3 MiB is neither
    # copied nor in flight while the job is held at its first write
    job = eng.backup("src", "tgt", sync="full", job_id="b0", speed=MIB_BATCHES,
                     filter_node_name="cbw0")
    assert eng.blkdebug_wait_break("job").offset == 0
    eng.blkdebug_break("tgt", "write_aio", "cbw")
    errors: list[BaseException] = []

    def guest():
        try:
            vm.write(3 * MiB, b"\x99" * 65536)
        except BaseException as e:      # reported below
            errors.append(e)
    t = threading.Thread(target=guest)
    t.start()
    held = eng.blkdebug_wait_break("cbw")       # the old data's copy, in the hook
    assert (held.node, held.offset, held.length) == ("tgt", 3 * MiB, 65536)
    eng.job_set_speed("b0", 0)
    eng.blkdebug_resume("job")
    assert eng.wait_job(job, 60).value == "completed"   # the rest copied, filter out
    assert "cbw0" not in eng.graph.nodes and vm.node is s
    assert t.is_alive() and eng.blkdebug_is_suspended("cbw")
    eng.blkdebug_resume("cbw")
    t.join(60)
    assert not t.is_alive()
    assert errors == []
    assert vm.read(3 * MiB, 65536) == b"\x99" * 65536
    eng.close()
    expect = bytearray(open(orig, "rb").read())
    expect[3 * MiB:3 * MiB + 65536] = b"\x99" * 65536
    now = tmp_path / "now.raw"
    now.write_bytes(bytes(expect))
    assert_same(str(now), src, "raw", "qcow2")      # the write reached the image
    assert_same(orig, tgt, "raw", "qcow2")          # the target: the point in time
