"""The permission model QEMU has (issue 10 §3): each scenario runs the same QMP
script against qemu-storage-daemon and blkjobs serve and compares replies,
error texts, events and the nodes listed; the images are then checked with
qemu-img (compare against the guest view computed beforehand, check).

* stream of an intermediate node (device=n2 in n0 <- n1 <- n2 <- n3);
* two streams on disjoint parts of one 5-deep chain at once, and the busy
  refusals QEMU gives for overlapping ones;
* commit top-node/base-node under an overlay;
* image fleecing: backup sync=none into a qcow2 overlay of the source;
* nodes the monitor added stay listed (parentless) after a job drops them
  out of the chain, until blockdev-del; implicitly opened ones go;
* a refused job start holds nothing afterwards (library).
"""
from __future__ import annotations

import asyncio
import os

import pytest
from daemon_util import (brief, compare, connect, drop_transient_pauses, qcow2_node, qemu_img,
                         qemu_io, start_blkjobs, start_qsd)

from blkjobs.errors import BlkjobsError
from blkjobs.graph import ALL, Perm
from blkjobs.engine import Engine

MiB = 1 << 20
DAEMONS = (("qsd", start_qsd), ("blkjobs", start_blkjobs))


def make_chain(d, n: int, size: str = "8M") -> list[str]:
    """n0 <- n1 <- ... (n-1): image i has 1 MiB of byte i+1 at i MiB and
    512 KiB of byte 0x40+i at 6 MiB + i*128 KiB (layers overlapping there)."""
    paths, prev = [], None
    for i in range(n):
        p = str(d / f"n{i}.qcow2")
        back = ["-b", prev, "-F", "qcow2"] if prev else []
        assert qemu_img("create", "-f", "qcow2", *back, p, size).returncode == 0
        qemu_io(p, f"write -P {i + 1} {i}M 1M")
        qemu_io(p, f"write -P {0x40 + i} {6 * MiB + i * 128 * 1024} 512k")
        paths.append(p)
        prev = p
    return paths


def guest_view(path: str, out: str) -> str:
    """A standalone copy of what the guest sees through ``path``."""
    assert qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", path, out).returncode == 0
    return out


def check(path: str) -> None:
    p = qemu_img("check", "-U", path)
    assert p.returncode == 0, p.stdout + p.stderr


def backing_of(path: str) -> str | None:
    import json
    p = qemu_img("info", "-U", "--output", "json", path)
    return json.loads(p.stdout).get("backing-filename")


async def add_chain(s, n: int, paths: list[str]) -> None:
    prev = None
    for i in range(n):
        await s.x("blockdev-add", **qcow2_node(f"n{i}", paths[i], backing=prev))
        prev = f"n{i}"


async def names(s) -> list[str]:
    """Node names listed, automatic ones as '#auto'."""
    return [n["node-name"] if not n["node-name"].startswith("#") else "#auto"
            for n in await s.x("query-named-block-nodes")]


def side_by_side(tmp_path, n: int, script) -> dict[str, tuple]:
    """Run ``script(session, paths, dir)`` against both daemons on fresh
    copies of an n-deep chain; returns {daemon: (result, paths, dir)}."""
    out = {}
    for name, start in DAEMONS:
        d = tmp_path / name
        d.mkdir()
        paths = make_chain(d, n)
        daemon = start(d)
        try:
            async def main():       # run at once: this iteration's daemon
                s = await connect(daemon.sock)  # noqa: B023
                try:
                    return await script(s, paths, d)  # noqa: B023
                finally:
                    await s.close()
            res = asyncio.run(main())
        finally:
            assert daemon.stop() == 0, daemon.stderr
        assert "Traceback" not in daemon.stderr, daemon.stderr
        out[name] = (res, paths, d)
    return out


async def wait_null(s, *jobs: str) -> list[dict]:
    """Events until every job in ``jobs`` reached null."""
    got, left = [], set(jobs)
    while left:
        evs = await s.until("JOB_STATUS_CHANGE", status="null")
        got += evs
        left.discard(evs[-1]["data"]["id"])
    return got


def per_job(events: list[dict], job: str) -> list[tuple]:
    return [e for e in drop_transient_pauses(brief(events))
            if e[1].get("id", e[1].get("device")) == job]


# --------------------------------------------------------------------------


def test_stream_intermediate_node_like_qemu(tmp_path):
    """block-stream device=n2 base-node=n0 under the overlay n3: accepted,
    same events; n1 (monitor-added) stays listed until blockdev-del."""
    async def script(s, paths, d):
        guest_view(paths[2], str(d / "view2.qcow2"))
        guest_view(paths[3], str(d / "view3.qcow2"))
        await add_chain(s, 4, paths)
        r = {"start": await s.x("block-stream", **{"job-id": "s0", "base-node": "n0"},
                                device="n2")}
        r["events"] = drop_transient_pauses(brief(await wait_null(s, "s0")))
        r["after"] = await names(s)
        r["del-n1"] = await s.x("blockdev-del", **{"node-name": "n1"})
        r["after-del"] = await names(s)
        r["del-again"] = await s.err("blockdev-del", **{"node-name": "n1"})
        return r

    res = side_by_side(tmp_path, 4, script)
    assert res["qsd"][0] == res["blkjobs"][0]
    r = res["blkjobs"][0]
    assert r["after"] == ["n3", "#auto", "n2", "#auto", "n1", "#auto", "n0", "#auto"]
    assert r["after-del"] == ["n3", "#auto", "n2", "#auto", "n0", "#auto"]
    assert r["del-again"] == ("GenericError", "Failed to find node with node-name='n1'")
    for name in ("qsd", "blkjobs"):
        _, paths, d = res[name]
        assert compare(paths[2], str(d / "view2.qcow2")) == (0, "Images are identical.\n")
        assert compare(paths[3], str(d / "view3.qcow2")) == (0, "Images are identical.\n")
        assert os.path.basename(backing_of(paths[2])) == "n0.qcow2"
        check(paths[2])


def test_two_streams_on_disjoint_parts_and_busy_refusals(tmp_path):
    """n0 <- n1 <- n2 <- n3 <- n4: stream n3 into n4 and n1 into n2 at once;
    a stream, commit or backup touching either job's nodes is refused with
    QEMU's busy text."""
    async def script(s, paths, d):
        guest_view(paths[4], str(d / "view4.qcow2"))
        guest_view(paths[2], str(d / "view2.qcow2"))
        await add_chain(s, 5, paths)
        held = {"auto-finalize": False}
        r = {"s1": await s.x("block-stream", **{"job-id": "s1", "base-node": "n2"}, **held,
                             device="n4"),
             "s2": await s.x("block-stream", **{"job-id": "s2", "base-node": "n0"}, **held,
                             device="n2")}
        r["refused"] = [
            await s.err("block-stream", **{"job-id": "x"}, device="n3"),
            await s.err("block-stream", **{"job-id": "x"}, device="n4"),
            await s.err("block-stream", **{"job-id": "x"}, device="n1"),
            await s.err("block-stream", **{"job-id": "x", "base-node": "n1"}, device="n2"),
            await s.err("block-commit", **{"job-id": "x", "top-node": "n3"}, device="n4"),
        ]
        evs, pending = [], set()
        while pending != {"s1", "s2"}:
            e = await s.until("BLOCK_JOB_PENDING")
            evs += e
            pending.add(e[-1]["data"]["id"])
        for j in ("s1", "s2"):
            await s.x("job-finalize", id=j)
        evs += await wait_null(s, "s1", "s2")
        r["s1-events"], r["s2-events"] = per_job(evs, "s1"), per_job(evs, "s2")
        r["after"] = await names(s)
        return r

    res = side_by_side(tmp_path, 5, script)
    assert res["qsd"][0] == res["blkjobs"][0]
    r = res["blkjobs"][0]
    busy = "Node '{}' is busy: block device is in use by block job: stream"
    assert r["refused"][:4] == [("GenericError", busy.format(n)) for n in ("n3", "n4", "n1", "n2")]
    assert r["s1-events"][-1] == ("JOB_STATUS_CHANGE", {"id": "s1", "status": "null"})
    assert ("BLOCK_JOB_COMPLETED", {"device": "s2", "len": 8 * MiB, "offset": 8 * MiB,
                                    "speed": 0, "type": "stream"}) in r["s2-events"]
    for name in ("qsd", "blkjobs"):
        _, paths, d = res[name]
        assert compare(paths[4], str(d / "view4.qcow2")) == (0, "Images are identical.\n")
        assert compare(paths[2], str(d / "view2.qcow2")) == (0, "Images are identical.\n")
        assert os.path.basename(backing_of(paths[4])) == "n2.qcow2"
        assert os.path.basename(backing_of(paths[2])) == "n0.qcow2"
        check(paths[4])
        check(paths[2])


def test_commit_top_node_base_node_under_overlay(tmp_path):
    """block-commit device=n3 top-node=n2 base-node=n0: accepted, n3 ends
    on n0 with its guest view unchanged; n2 and n1 stay until blockdev-del."""
    async def script(s, paths, d):
        guest_view(paths[3], str(d / "view3.qcow2"))
        guest_view(paths[2], str(d / "view2.qcow2"))
        await add_chain(s, 4, paths)
        # held before finalize (the graph changes there), so n2 is surely
        # still under n3 when the second commit names it: not a root
        r = {"start": await s.x("block-commit", **{"job-id": "c0", "top-node": "n2",
                                                   "base-node": "n0", "auto-finalize": False},
                                device="n3"),
             "not-root": await s.err("block-commit", **{"job-id": "x"}, device="n2")}
        evs = await s.until("JOB_STATUS_CHANGE", id="c0", status="pending")
        await s.x("job-finalize", id="c0")
        r["events"] = drop_transient_pauses(brief(evs + await wait_null(s, "c0")))
        r["after"] = await names(s)
        r["del"] = [await s.x("blockdev-del", **{"node-name": n}) for n in ("n2", "n1")]
        r["after-del"] = await names(s)
        return r

    res = side_by_side(tmp_path, 4, script)
    assert res["qsd"][0] == res["blkjobs"][0]
    r = res["blkjobs"][0]
    assert r["not-root"] == ("GenericError", "Need a root block node")
    assert r["after-del"] == ["n3", "#auto", "n0", "#auto"]
    for name in ("qsd", "blkjobs"):
        _, paths, d = res[name]
        assert compare(paths[3], str(d / "view3.qcow2")) == (0, "Images are identical.\n")
        assert compare(paths[0], str(d / "view2.qcow2")) == (0, "Images are identical.\n")
        assert os.path.basename(backing_of(paths[3])) == "n0.qcow2"
        check(paths[0])
        check(paths[3])


def test_implicit_nodes_leave_with_the_chain(tmp_path):
    """n3 added alone (its backing files opened implicitly): after a stream
    onto n0 the implicit n2 and n1 are gone, n0 stays (n3's backing)."""
    async def script(s, paths, d):
        await s.x("blockdev-add", **qcow2_node("n3", paths[3]))
        before = await names(s)
        await s.x("block-stream", **{"job-id": "s0", "base": paths[0]}, device="n3")
        evs = drop_transient_pauses(brief(await wait_null(s, "s0")))
        return before, evs, await names(s)

    res = side_by_side(tmp_path, 4, script)
    assert res["qsd"][0] == res["blkjobs"][0]
    before, _, after = res["blkjobs"][0]
    assert before == ["#auto"] * 6 + ["n3", "#auto"]      # n0..n2 and their files
    assert after == ["#auto", "#auto", "n3", "#auto"]       # n0 and its file only


def test_fleecing_backup_sync_none_into_overlay_of_source(tmp_path):
    """blockdev-backup sync=none into a qcow2 overlay of the source is
    accepted as in QEMU; guest writes to the source then leave the fleecing
    image showing the point in time; after the job blockdev-del frees it."""
    async def script(s, paths, d):
        fl = str(d / "fleece.qcow2")
        assert qemu_img("create", "-f", "qcow2", "-b", paths[1], "-F", "qcow2", fl,
                        "8M").returncode == 0
        guest_view(paths[1], str(d / "orig.qcow2"))
        await add_chain(s, 2, paths)
        await s.x("blockdev-add", **qcow2_node("fl", fl, backing="n1"))
        r = {"start": await s.x("blockdev-backup", **{"job-id": "b0"}, device="n1",
                                target="fl", sync="none")}
        if "blkjobs" in str(d):
            # the guest overwrites data of both layers and a hole
            for off in (0, 1 * MiB + 4096, 5 * MiB):
                await s.x("x-blkjobs-write", node="n1", offset=off, length=200 << 10,
                          pattern=0xee)
        await s.x("job-cancel", id="b0")
        evs = brief(await wait_null(s, "b0"))
        r["events"] = [(n, {k: v for k, v in e.items() if k not in ("len", "offset")})
                       for n, e in drop_transient_pauses(evs)]
        r["del"] = await s.x("blockdev-del", **{"node-name": "fl"})
        r["after"] = await names(s)
        return r

    res = side_by_side(tmp_path, 2, script)
    assert res["qsd"][0] == res["blkjobs"][0]
    assert res["blkjobs"][0]["events"][-1] == ("JOB_STATUS_CHANGE",
                                               {"id": "b0", "status": "null"})
    _, paths, d = res["blkjobs"]
    fl, orig = str(d / "fleece.qcow2"), str(d / "orig.qcow2")
    assert compare(fl, orig) == (0, "Images are identical.\n")
    assert compare(paths[1], orig)[0] == 1            # the source did change
    check(fl)


def test_fleecing_reads_point_in_time_while_guest_writes(tmp_path):
    """Library: reading the fleecing node during the job gives the data of
    the start, byte for byte, while the guest keeps writing the source."""
    src, fl = str(tmp_path / "src.qcow2"), str(tmp_path / "fl.qcow2")
    assert qemu_img("create", "-f", "qcow2", src, "4M").returncode == 0
    qemu_io(src, "write -P 0x11 0 3M")
    assert qemu_img("create", "-f", "qcow2", "-b", src, "-F", "qcow2", fl).returncode == 0
    with open(src, "rb"):
        pass
    eng = Engine()
    try:
        s = eng.open(src, node_name="src")
        from blkjobs.formats import open_image
        f = eng.graph.add(open_image(fl, "qcow2", read_only=False), "fl", "qcow2")
        f.take("open", Perm.CONSISTENT_READ, ALL)
        f.attach_backing(s)
        before = s.read(0, 4 * MiB)
        job = eng.backup("src", "fl", "none", job_id="b0")
        vm = eng.attach(eng.io.above_filters(s))
        for off in (0, 65536 * 3 + 100, 2 * MiB + 7, 3 * MiB + 512):
            vm.write(off, b"\xee" * 70000)
        vm.flush()
        assert s.read(0, 4 * MiB) != before
        with eng.io:
            assert f.read(0, 4 * MiB) == before
        eng.job_cancel("b0")
        eng.wait_job(job)
        vm.close()
        assert [p.owner for p in f.users()] == ["open"]
    finally:
        eng.close()


def test_refused_backup_start_releases_target(tmp_path):
    """A backup whose filter cannot go onto the source (its name is taken)
    is refused and holds nothing on the target after. (A reader of the
    source forbidding writes no longer refuses it: the filter then asks no
    write, as QEMU's asks only what its parents need.)"""
    src, tgt = (str(tmp_path / n) for n in ("src.qcow2", "tgt.qcow2"))
    for p in (src, tgt):
        assert qemu_img("create", "-f", "qcow2", p, "4M").returncode == 0
    eng = Engine()
    try:
        s, t = eng.open(src, node_name="src"), eng.open(tgt, node_name="tgt")
        reader = s.take("reader", Perm.CONSISTENT_READ, Perm.CONSISTENT_READ)
        with pytest.raises(BlkjobsError) as ei:
            eng.backup("src", "tgt", "full", job_id="b0", filter_node_name="tgt")
        assert str(ei.value) == "Duplicate nodes with node-name='tgt'"
        assert [p.owner for p in t.users()] == ["open"]
        assert [p.owner for p in s.users()] == ["open", "reader"]
        assert eng.query_jobs() == [] and list(eng.graph.nodes) == ["src", "tgt"]
        reader.release()
        assert eng.wait_job(eng.backup("src", "tgt", "full", job_id="b1")).value == "completed"
    finally:
        eng.close()


def test_refused_stream_start_releases_everything(tmp_path):
    """A stream refused at setup (a reader of the top forbids writing it)
    leaves no node claimed, no filter and nothing held on the top; once the
    reader goes the same stream runs."""
    paths = make_chain(tmp_path, 3)
    eng = Engine()
    try:
        top = eng.open(paths[2], node_name="top")
        reader = top.take("reader", Perm.CONSISTENT_READ, Perm.CONSISTENT_READ)
        with pytest.raises(BlkjobsError) as ei:
            eng.stream("top", job_id="s0")
        assert "(requested by stream job 's0')" in str(ei.value)
        assert [p.owner for p in top.users()] == ["open", "reader"]
        assert [p.owner for p in top.backing.users()] == ["node 'top' (backing)"]
        assert not any(n.is_filter for n in eng.graph.nodes.values())
        reader.release()
        assert eng.wait_job(eng.stream("top", job_id="s1")).value == "completed"
    finally:
        eng.close()
