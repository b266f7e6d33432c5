"""Job progress in qemu-storage-daemon's units: the same jobs over QMP give
the same ``len``/``offset`` in the BLOCK_JOB_* events and the same
current-/total-progress in query-jobs (and offset/len in query-block-jobs)
at completion.

* backup counts whole clusters of its copy bitmap (the cluster: 64 KiB or
  the target's, if larger): an image of 1536 bytes is 64 KiB of work, one of
  70000 bytes (70144: whole sectors) 128 KiB, and 2 MiB with a 2 MiB target
  cluster; sync=none counts every cluster in its total; sync=top of an
  image without a backing file counts (and copies) only the clusters the
  image allocates, as does an incremental backup only its dirty clusters;
* mirror, stream and commit count bytes (1536, 70144), and a mirror with
  sync=top of an image without a backing file only what the image
  allocates (QEMU: sync=full without zeroing the target first).
"""
from __future__ import annotations

from pathlib import Path

from daemon_util import compare, qcow2_node, qemu_img, qemu_io, side_by_side


def _img(d: Path, name: str, size: int, *opts: str, fmt: str = "qcow2") -> str:
    path = str(d / name)
    p = qemu_img("create", "-f", fmt, *opts, path, str(size))
    assert p.returncode == 0, p.stderr
    return path


def _node(name: str, path: str, fmt: str = "qcow2") -> dict:
    if fmt == "raw":
        return {"driver": "raw", "node-name": name,
                "file": {"driver": "file", "filename": path}}
    return qcow2_node(name, path)


def _units(events: list[dict]) -> list[tuple]:
    return [(e["event"], e["data"]["len"], e["data"]["offset"]) for e in events
            if e["event"] in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]


async def _to_completion(s, jid: str, cmd: str, ready: bool = False, **args) -> dict:
    """Start a job (manual finalize and dismiss), drive it to its end; what
    it counted: the events' len/offset, the queries while it is pending."""
    await s.x(cmd, **{"job-id": jid, "auto-finalize": False, "auto-dismiss": False}, **args)
    evs = []
    if ready:
        evs += await s.until("BLOCK_JOB_READY", device=jid)
        await s.x("job-complete", id=jid)
    evs += await s.until("BLOCK_JOB_PENDING", id=jid)
    out = {"query-jobs": [(j["current-progress"], j["total-progress"])
                          for j in await s.x("query-jobs") if j["id"] == jid],
           "query-block-jobs": [(j["offset"], j["len"]) for j in await s.x("query-block-jobs")
                                if j["device"] == jid]}
    await s.x("job-finalize", id=jid)
    evs += await s.until("JOB_STATUS_CHANGE", id=jid, status="concluded")
    await s.x("job-dismiss", id=jid)
    await s.until("JOB_STATUS_CHANGE", id=jid, status="null")
    out["events"] = _units(evs)
    return out


async def _backups(s, d: Path) -> dict:
    out: dict = {}
    for size in (1536, 70000):
        src = _img(d, f"b{size}.qcow2", size)
        qemu_io(src, "write -q -P 1 0 1k")
        await s.x("blockdev-add", **_node(f"b{size}", src))
        for cs in ("64k", "512", "2M"):
            name = f"b{size}-{cs}"
            await s.x("blockdev-add", **_node(name, _img(d, f"{name}.qcow2", size, "-o",
                                                         f"cluster_size={cs}")))
            out[f"full {name}"] = await _to_completion(s, name, "blockdev-backup",
                                                       device=f"b{size}", target=name,
                                                       sync="full")
        name = f"b{size}-raw"
        await s.x("blockdev-add", **_node(name, _img(d, f"{name}.raw", size, fmt="raw"), "raw"))
        out[f"full {name}"] = await _to_completion(s, name, "blockdev-backup", device=f"b{size}",
                                                   target=name, sync="full")
        name = f"b{size}-top"
        await s.x("blockdev-add", **_node(name, _img(d, f"{name}.qcow2", size)))
        out[f"top {name}"] = await _to_completion(s, name, "blockdev-backup", device=f"b{size}",
                                                  target=name, sync="top")
        # sync=none: the total is every cluster; cancelled at once
        name = f"b{size}-none"
        await s.x("blockdev-add", **_node(name, _img(d, f"{name}.qcow2", size)))
        await s.x("blockdev-backup", **{"job-id": name}, device=f"b{size}", target=name,
                  sync="none")
        q = [(j["current-progress"], j["total-progress"]) for j in await s.x("query-jobs")
             if j["id"] == name]
        await s.x("job-cancel", id=name)
        out[f"none {name}"] = (q, _units(await s.until("JOB_STATUS_CHANGE", id=name,
                                                       status="null")))
    return out


async def _incremental(s, d: Path) -> dict:
    """A persistent bitmap (4 KiB granules) dirty in the first and the last
    cluster of a 70000-byte image: two clusters of work."""
    src = _img(d, "i.qcow2", 70000)
    assert qemu_img("bitmap", "--add", "-g", "4k", src, "bm").returncode == 0
    qemu_io(src, "write -q -P 2 1k 1k")
    qemu_io(src, "write -q -P 3 69900 100")
    await s.x("blockdev-add", **_node("i", src))
    await s.x("blockdev-add", **_node("i-tgt", _img(d, "i-tgt.qcow2", 70000)))
    return {"incremental": await _to_completion(s, "i-tgt", "blockdev-backup", device="i",
                                                target="i-tgt", sync="incremental",
                                                bitmap="bm")}


async def _others(s, d: Path) -> dict:
    out: dict = {}
    for size, write in ((70000, "write -q -P 1 0 1k"), (1 << 20, "write -q -z 128k 64k")):
        src = _img(d, f"m{size}.qcow2", size)
        qemu_io(src, write)
        await s.x("blockdev-add", **_node(f"m{size}", src))
        for sync in ("top", "full"):
            name = f"m{size}-{sync}"
            await s.x("blockdev-add", **_node(name, _img(d, f"{name}.qcow2", size)))
            out[f"mirror {name}"] = await _to_completion(s, name, "blockdev-mirror", ready=True,
                                                         device=f"m{size}", target=name,
                                                         sync=sync)
    # commit and stream of unaligned chains: bytes
    for job in ("commit", "stream"):
        base = _img(d, f"{job}-base.qcow2", 70000)
        qemu_io(base, "write -q -P 1 0 1k")
        mid = _img(d, f"{job}-mid.qcow2", 70000, "-b", base, "-F", "qcow2")
        qemu_io(mid, "write -q -P 2 512 512")
        top = _img(d, f"{job}-top.qcow2", 70000, "-b", mid, "-F", "qcow2")
        await s.x("blockdev-add", **qcow2_node(job, top, backing={
            **qcow2_node(f"{job}-mid", mid), "backing": qcow2_node(f"{job}-base", base)}))
        if job == "commit":
            out[job] = await _to_completion(s, job, "block-commit", device=job,
                                            **{"top-node": f"{job}-mid",
                                               "base-node": f"{job}-base"})
        else:
            out[job] = await _to_completion(s, job, "block-stream", device=job)
    return out


def test_backup_progress_counts_qemus_clusters(tmp_path):
    ref, ours = side_by_side(tmp_path, _backups)
    assert ref == ours
    # the units, spelled out: whole 64 KiB clusters (2 MiB with that target)
    assert ours["full b1536-64k"]["events"] == [("BLOCK_JOB_COMPLETED", 65536, 65536)]
    assert ours["full b70000-512"]["query-jobs"] == [(131072, 131072)]
    assert ours["full b70000-2M"]["query-block-jobs"] == [(2097152, 2097152)]
    assert ours["none b70000-none"] == ([(0, 131072)], [("BLOCK_JOB_CANCELLED", 131072, 0)])
    assert ours["top b70000-top"]["events"] == [("BLOCK_JOB_COMPLETED", 65536, 65536)]
    for name in ("b70000-64k", "b70000-top"):
        assert compare(str(tmp_path / "blkjobs" / "b70000.qcow2"),
                       str(tmp_path / "blkjobs" / f"{name}.qcow2"))[0] == 0


def test_incremental_backup_progress_counts_dirty_clusters(tmp_path):
    ref, ours = side_by_side(tmp_path, _incremental)
    assert ref == ours
    assert ours["incremental"]["events"] == [("BLOCK_JOB_COMPLETED", 131072, 131072)]


def test_mirror_stream_commit_progress_as_qemu(tmp_path):
    ref, ours = side_by_side(tmp_path, _others)
    assert ref == ours
    assert ours["mirror m70000-full"]["events"] == [("BLOCK_JOB_READY", 70144, 70144),
                                                   ("BLOCK_JOB_COMPLETED", 70144, 70144)]
    # top of an image without a backing file: only its one allocated cluster
    assert ours["mirror m70000-top"]["query-jobs"] == [(65536, 65536)]
    assert ours["mirror m1048576-top"]["query-jobs"] == [(65536, 65536)]
    for size in (70000, 1 << 20):
        d = tmp_path / "blkjobs"
        assert compare(str(d / f"m{size}.qcow2"), str(d / f"m{size}-top.qcow2"))[0] == 0


def test_copy_before_write_counts_whole_clusters(tmp_path):
    """A guest write to the last, partial cluster of a 70000-byte image
    under a sync=none backup: copy-before-write saves that cluster, and the
    progress counts it as one whole cluster of the two (the unit the tests
    above check against qemu-storage-daemon); BLOCK_JOB_CANCELLED says so."""
    from blkjobs import Engine
    src, dst = _img(tmp_path, "s.qcow2", 70000), _img(tmp_path, "t.qcow2", 70000)
    qemu_io(src, "write -q -P 7 0 70000")
    eng = Engine()
    try:
        s = eng.open(src, node_name="src")
        eng.open(dst, node_name="dst")
        vm = eng.attach(s)
        ev = eng.listen(["BLOCK_JOB_CANCELLED"])
        job = eng.backup("src", "dst", sync="none", job_id="b0")
        vm.write(69900, b"\xee" * 100)
        eng.job_cancel("b0")
        assert eng.wait_job(job, 30).value == "cancelled"
        got = ev.wait_for("BLOCK_JOB_CANCELLED", timeout=30)
        assert (got.data["offset"], got.data["len"]) == (65536, 131072)
    finally:
        eng.close()
