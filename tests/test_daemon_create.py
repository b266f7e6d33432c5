"""blockdev-create (job type ``create``) against qemu-storage-daemon: the
same creations over QMP give the same events in order, the same query-jobs
entries and job errors to the byte, and images qemu-img reads the same."""
from __future__ import annotations

import json

from conftest import content_digest, data_bytes
from daemon_util import brief, qemu_img, side_by_side


async def create(s, jid: str, options: dict) -> dict:
    """Run one blockdev-create to its end: events, query-jobs, then dismiss."""
    await s.x("blockdev-create", **{"job-id": jid}, options=options)
    ev = brief(await s.until("JOB_STATUS_CHANGE", id=jid, status="concluded"))
    jobs = await s.x("query-jobs")
    await s.x("job-dismiss", id=jid)
    ev += brief(await s.until("JOB_STATUS_CHANGE", id=jid, status="null"))
    return {"events": ev, "jobs": jobs}


def norm(out, d):
    """``out`` with the scenario's directory written as ``D`` (each daemon
    runs in its own)."""
    return json.loads(json.dumps(out).replace(str(d), "D"))


def _info(path: str) -> dict:
    p = qemu_img("info", "-U", "--output=json", path)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    for k in ("filename", "actual-size", "full-backing-filename", "dirty-flag"):
        info.pop(k, None)
    return info


def test_blockdev_create_file_and_qcow2_match_qemu(tmp_path):
    async def sc(s, d):
        out = {}
        img = str(d / "a.qcow2")
        out["file"] = await create(s, "c0", {"driver": "file", "filename": img, "size": 0})
        out["raw-full"] = await create(s, "c1", {"driver": "file", "filename": str(d / "p.raw"),
                                                 "size": 1 << 20, "preallocation": "full"})
        await s.x("blockdev-add", driver="file", filename=img, **{"node-name": "af"})
        out["qcow2"] = await create(s, "c2", {
            "driver": "qcow2", "file": "af", "size": 4 << 20, "backing-file": "b.qcow2",
            "backing-fmt": "qcow2", "cluster-size": 4096, "refcount-bits": 1,
            "lazy-refcounts": True, "compression-type": "zstd"})
        out["info"] = _info(img)
        out["plain"] = await create(s, "c3", {"driver": "qcow2", "file": "af", "size": 1 << 30})
        out["info-plain"] = _info(img)
        # the image is usable at once: a format node over the file node
        await s.x("blockdev-add", driver="qcow2", file="af", **{"node-name": "fmt"})
        out["node"] = [(n["node-name"], n["drv"], n["image"]["virtual-size"])
                       for n in await s.x("query-named-block-nodes") if n["node-name"] == "fmt"]
        await s.x("blockdev-del", **{"node-name": "fmt"})
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["qcow2"]["events"] == [("JOB_STATUS_CHANGE", {"id": "c2", "status": s})
                                       for s in ("created", "running", "waiting", "pending",
                                                 "concluded", "null")]
    assert ours["qcow2"]["jobs"] == [{"id": "c2", "type": "create", "status": "concluded",
                                      "current-progress": 1, "total-progress": 1}]
    fs = ours["info"]["format-specific"]["data"]
    assert (fs["lazy-refcounts"], fs["refcount-bits"], fs["compression-type"]) == \
        (True, 1, "zstd")
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        p = qemu_img("check", "-f", "qcow2", str(d / "a.qcow2"))
        assert p.returncode == 0 and "No errors were found" in p.stdout, p.stdout + p.stderr
        assert (d / "p.raw").read_bytes() == bytes(1 << 20)
        assert (d / "p.raw").stat().st_blocks * 512 >= 1 << 20      # allocated: full


BAD_QCOW2 = [
    {"cluster-size": 1000}, {"cluster-size": 4 << 20}, {"size": (4 << 20) + 1},
    {"refcount-bits": 3}, {"refcount-bits": 128}, {"backing-fmt": "raw"},
    {"version": "v2", "lazy-refcounts": True}, {"version": "v2", "refcount-bits": 8},
    {"version": "v2", "compression-type": "zstd"}, {"version": "v2", "extended-l2": True},
    {"extended-l2": True, "cluster-size": 4096},
    {"backing-file": "b.qcow2", "preallocation": "metadata"},
    {"file": "nosuch"},
]


def test_blockdev_create_failures_match_qemu(tmp_path):
    """Bad options fail the job (aborting -> concluded, QEMU's error in
    query-jobs), not the command; bad commands fail before any job."""
    async def sc(s, d):
        out = {}
        img = str(d / "a.qcow2")
        out["nodir"] = await create(s, "f0", {"driver": "file", "filename": str(d / "no/x"),
                                              "size": 0})
        out["metadata"] = await create(s, "f1", {"driver": "file", "filename": img,
                                                 "size": 0, "preallocation": "metadata"})
        await s.x("blockdev-add", driver="file", filename=img, **{"node-name": "af"})
        for i, bad in enumerate(BAD_QCOW2):
            out[f"bad{i}"] = await create(s, f"b{i}", {"driver": "qcow2", "file": "af",
                                                       "size": 4 << 20, **bad})
        await s.x("blockdev-create", **{"job-id": "kept"},
                  options={"driver": "file", "filename": str(d / "k"), "size": 0})
        await s.until("JOB_STATUS_CHANGE", id="kept", status="concluded")
        out["cmd"] = [
            await s.err("blockdev-create", **{"job-id": "kept"},
                        options={"driver": "file", "filename": str(d / "k"), "size": 0}),
            await s.err("job-cancel", id="kept"),
            await s.err("blockdev-create", **{"job-id": "r"},
                        options={"driver": "raw", "file": "af"}),
            await s.err("blockdev-create", **{"job-id": "r"}, options={"driver": "raw"}),
            await s.err("blockdev-create", options={"driver": "file", "filename": "x",
                                                    "size": 0}),
            await s.err("blockdev-create", **{"job-id": "r"},
                        options={"driver": "qcow2", "file": "af"}),
        ]
        out["jobs"] = await s.x("query-jobs")
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["bad0"]["events"][2] == ["JOB_STATUS_CHANGE", {"id": "b0",
                                                               "status": "aborting"}]
    assert ours["bad0"]["jobs"][0]["error"] == \
        "Cluster size must be a power of two between 512 and 2048k"
    assert ours["cmd"][3] == ["GenericError", "Driver does not support blockdev-create"]


def test_uint64_and_size_arguments_match_qemu(tmp_path):
    """QEMU's visitor takes a negative JSON integer for a uint64 or size
    argument modulo 2**64 (a write threshold of -1 then reads back as -1,
    an int64 in BlockDeviceInfo; a file of size -512 fails in the job); a
    number beyond, or a fraction, is refused with the full member path."""
    async def sc(s, d):
        a = str(d / "a.qcow2")
        assert qemu_img("create", "-f", "qcow2", a, "4M").returncode == 0
        await s.x("blockdev-add", driver="qcow2", **{"node-name": "a"},
                  file={"driver": "file", "filename": a})
        await s.x("block-set-write-threshold", **{"node-name": "a", "write-threshold": -1})
        out = {"thr": [n["write_threshold"] for n in await s.x("query-named-block-nodes")],
               "job": await create(s, "c", {"driver": "file", "filename": str(d / "n"),
                                            "size": -512})}
        f = {"driver": "file", "filename": str(d / "n")}
        out["errors"] = [
            await s.err("block-set-write-threshold",
                        **{"node-name": "a", "write-threshold": 1 << 64}),
            await s.err("blockdev-create", **{"job-id": "x"}, options={**f, "size": 1 << 64}),
            await s.err("blockdev-create", **{"job-id": "x"},
                        options={**f, "size": -(1 << 63) - 1}),
            await s.err("blockdev-create", **{"job-id": "x"}, options={**f, "size": 1.5}),
            await s.err("block-dirty-bitmap-add", node="a", name="b", granularity=-1),
        ]
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["thr"] == [-1, 0]
    assert ours["job"]["jobs"][0]["error"] == "Could not resize file: Invalid argument"
    assert ours["errors"][1] == ["GenericError", "Parameter 'options.size' expects uint64"]


async def _qcow2_in_file(s, d, name: str, jid: str, **options) -> bytes:
    """blockdev-create a file node, a qcow2 image in it; the file's bytes."""
    path = str(d / name)
    await create(s, f"{jid}f", {"driver": "file", "filename": path, "size": 0})
    await s.x("blockdev-add", driver="file", filename=path, **{"node-name": jid})
    out = await create(s, jid, {"driver": "qcow2", "file": jid, **options})
    await s.x("blockdev-del", **{"node-name": jid})
    assert out["jobs"][0].get("error") is None, out
    return (d / name).read_bytes()


def test_blockdev_create_qcow2_bytes_match_qemu(tmp_path):
    """The images are QEMU's byte for byte, small clusters included (QEMU
    writes no feature name table into images with clusters of 4 KiB or
    less) and an empty one (no L1 table: its offset is 0)."""
    async def sc(s, d):
        return [await _qcow2_in_file(s, d, f"c{cs}-{size}.qcow2", f"j{cs}-{size}", size=size,
                                     **{"cluster-size": cs})
                for cs, size in ((512, 3 << 20), (4096, 3 << 20), (8192, 3 << 20),
                                 (65536, 3 << 20), (65536, 0))]
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours


def test_blockdev_create_qcow2_preallocated_matches_qemu(tmp_path):
    """qcow2 preallocation falloc and full: every cluster allocated, laid out
    as QEMU lays it out (its L2 tables in the freed refcount table cluster and
    after the data), the file allocated over the data; the files are QEMU's
    byte for byte, with the same map, check and allocation."""
    cases = [("falloc", 4 << 20, 65536), ("full", 4 << 20, 65536),
             ("falloc", 3 << 20, 4096), ("full", (1 << 20) + 512, 65536),
             ("falloc", 64 << 10, 512), ("full", 0, 65536)]

    async def sc(s, d):
        out = []
        for i, (mode, size, cs) in enumerate(cases):
            name = f"p{i}.qcow2"
            data = await _qcow2_in_file(s, d, name, f"p{i}", size=size, preallocation=mode,
                                        **{"cluster-size": cs})
            path = str(d / name)
            out.append((data, data_bytes(d / name),
                        json.loads(qemu_img("map", "--output=json", path).stdout),
                        qemu_img("check", path).stdout))
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    for (_, size, _), (_, blocks, m, check) in zip(cases, ours, strict=True):
        assert "No errors were found" in check
        if size:
            assert [(r["start"], r["length"], r["data"], r["zero"]) for r in m] == \
                [(0, size, True, False)]
            assert blocks >= size
    assert ours[2][2][0]["offset"] == 5 * 4096     # after header, L2, refblock, L1, table


def test_blockdev_create_preallocated_beyond_one_refcount_block_matches_qemu(tmp_path):
    """qcow2 preallocation falloc, full and metadata of images more than one
    refcount block covers (new refcount blocks after the L1 table and a new
    refcount table for falloc/full; each block after the run that first
    needs it for metadata), and with extended L2 entries (subcluster bitmaps
    left 0): the files are QEMU's byte for byte, with the same map, check and
    allocation. Small clusters (or 64-bit refcounts) make small images need
    many refcount blocks; one 3 GiB image has the default layout."""
    cases = [("falloc", 1 << 20, 512, {}), ("full", 16 << 20, 4096, {}),
             ("metadata", 4 << 20, 512, {}), ("metadata", 3 << 30, 65536, {}),
             ("falloc", 1 << 30, 65536, {"refcount-bits": 64}),
             ("falloc", 256 << 20, 16384, {"extended-l2": True}),
             ("full", 4 << 20, 16384, {"extended-l2": True}),
             ("metadata", 1 << 20, 65536, {"extended-l2": True})]

    async def sc(s, d):
        out = []
        for i, (mode, size, cs, extra) in enumerate(cases):
            path = str(d / f"p{i}.qcow2")
            await create(s, f"p{i}f", {"driver": "file", "filename": path, "size": 0})
            await s.x("blockdev-add", driver="file", filename=path, **{"node-name": f"p{i}"})
            res = await create(s, f"p{i}", {"driver": "qcow2", "file": f"p{i}", "size": size,
                                            "preallocation": mode, "cluster-size": cs, **extra})
            await s.x("blockdev-del", **{"node-name": f"p{i}"})
            assert res["jobs"][0].get("error") is None, res
            out.append((content_digest(path), data_bytes(path),
                        json.loads(qemu_img("map", "--output=json", path).stdout),
                        qemu_img("check", path).stdout))
            if size > 64 << 20:
                (d / f"p{i}.qcow2").unlink()      # the disk space, at once
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    for (mode, size, _, _), (_, blocks, m, check) in zip(cases, ours, strict=True):
        assert "No errors were found" in check
        assert (m[0]["start"], m[-1]["start"] + m[-1]["length"]) == (0, size)
        if mode != "metadata":
            assert blocks >= size
