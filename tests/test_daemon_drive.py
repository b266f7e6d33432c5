"""drive-backup and drive-mirror against qemu-storage-daemon: the target
file is created (or opened with mode=existing) as QEMU does it, the job's
events and the refusals are the same, and qemu-img reads the same data and
backing files in the targets."""
from __future__ import annotations

import json

from daemon_util import (brief, compare, drop_transient_pauses, qcow2_node, qemu_img,
                         qemu_io, side_by_side)


def norm(out, d):
    text = json.dumps(out).replace(str(d), "D")
    return json.loads(__import__("re").sub(r'"#block\d+"', '"#auto"', text))


def chain(d) -> tuple[str, str]:
    base, src = str(d / "base.qcow2"), str(d / "src.qcow2")
    assert qemu_img("create", "-f", "qcow2", base, "4M").returncode == 0
    qemu_io(base, "write -P 0xaa 0 1M")
    assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", src).returncode == 0
    qemu_io(src, "write -P 0x55 2M 64k")
    return base, src


async def job(s, cmd: str, jid: str, **args) -> list:
    await s.x(cmd, **{"job-id": jid}, **args)
    if cmd == "drive-mirror":
        ev = brief(await s.until("BLOCK_JOB_READY", device=jid))
        await s.x("job-complete", id=jid)
    else:
        ev = []
    return drop_transient_pauses(ev + brief(await s.until("JOB_STATUS_CHANGE", id=jid,
                                                           status="null")))


def info(path: str) -> dict:
    i = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return {k: i.get(k) for k in ("format", "virtual-size", "backing-filename",
                                  "backing-filename-format")}


TARGETS = ["t-full.qcow2", "t-raw.raw", "t-top.qcow2", "t-none.qcow2", "ex.qcow2",
           "m-full.qcow2", "m-top.qcow2"]


def test_drive_backup_and_mirror_match_qemu(tmp_path):
    async def sc(s, d):
        base, src = chain(d)
        ex = str(d / "ex.qcow2")
        assert qemu_img("create", "-f", "qcow2", ex, "4M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("src", src))
        out = {
            "full": await job(s, "drive-backup", "b0", device="src", sync="full",
                              target=str(d / "t-full.qcow2")),
            "raw": await job(s, "drive-backup", "b1", device="src", sync="full",
                             target=str(d / "t-raw.raw"), format="raw"),
            "top": await job(s, "drive-backup", "b2", device="src", sync="top",
                             target=str(d / "t-top.qcow2")),
            "existing": await job(s, "drive-backup", "b3", device="src", sync="full",
                                  target=ex, mode="existing"),
        }
        # sync=none: the target's backing node is the source while the job runs
        await s.x("drive-backup", **{"job-id": "b4", "auto-dismiss": False}, device="src",
                  sync="none", target=str(d / "t-none.qcow2"))
        out["none-nodes"] = sorted(
            (n["drv"], n["file"], n.get("backing_file"))
            for n in await s.x("query-named-block-nodes") if n["drv"] == "qcow2")
        await s.x("job-cancel", id="b4")
        await s.until("JOB_STATUS_CHANGE", id="b4", status="concluded")
        await s.x("job-dismiss", id="b4")
        out["errors"] = [
            await s.err("drive-backup", **{"job-id": "e"}, device="src", sync="full",
                        target=str(d / "nodir/x.qcow2")),
            await s.err("drive-backup", **{"job-id": "e"}, device="nosuch", sync="full",
                        target=str(d / "y.qcow2")),
            await s.err("drive-backup", **{"job-id": "e"}, device="src", sync="full",
                        target=str(d / "nonexist.qcow2"), mode="existing"),
            await s.err("drive-mirror", **{"job-id": "e"}, device="nosuch", sync="full",
                        target=str(d / "y.qcow2")),
            await s.err("drive-mirror", **{"job-id": "e"}, device="src", sync="full",
                        target=str(d / "y.qcow2"), replaces="src"),
        ]
        out["m-full"] = await job(s, "drive-mirror", "m0", device="src", sync="full",
                                  target=str(d / "m-full.qcow2"))
        out["m-top"] = await job(s, "drive-mirror", "m1", device="src", sync="top",
                                 target=str(d / "m-top.qcow2"))
        # the targets went with their jobs
        out["nodes"] = sorted(n["file"] for n in await s.x("query-named-block-nodes"))
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["none-nodes"] == sorted([["qcow2", "D/src.qcow2", "D/base.qcow2"],
                                         ["qcow2", "D/base.qcow2", None],
                                         ["qcow2", "D/t-none.qcow2", "D/src.qcow2"]])
    infos = {}
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        infos[name] = [json.loads(json.dumps(info(str(d / t))).replace(str(d), "D"))
                       for t in TARGETS]
        src = str(d / "src.qcow2")
        for t in ("t-full.qcow2", "t-top.qcow2", "ex.qcow2", "m-full.qcow2", "m-top.qcow2"):
            assert compare(src, str(d / t))[0] == 0, t
        p = qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", src, str(d / "t-raw.raw"))
        assert p.returncode == 0, p.stdout
    assert infos["qsd"] == infos["blkjobs"]
    assert infos["blkjobs"][2]["backing-filename"] == "D/base.qcow2"       # sync=top


def test_drive_mirror_unmap_false_matches_qemu(tmp_path):
    """drive-mirror unmap=false into existing targets full of data: the
    source's zeroes are written as zeroes that keep the target's clusters
    (qcow2: zero clusters with their host offset; raw: no hole punched),
    where unmap=true (the default) frees them; maps and data as QEMU's."""
    async def sc(s, d):
        src = str(d / "src.qcow2")
        assert qemu_img("create", "-f", "qcow2", src, "4M").returncode == 0
        qemu_io(src, "write -P 0xaa 0 1M")
        qemu_io(src, "write -z 1M 1M")
        await s.x("blockdev-add", **qcow2_node("src", src))
        out = {}
        for fmt in ("qcow2", "raw"):
            for unmap in (False, True):
                tgt = str(d / f"t-{unmap}.{fmt}")
                assert qemu_img("create", "-f", fmt, tgt, "4M").returncode == 0
                qemu_io(tgt, "write -P 0x11 0 4M", fmt=fmt)
                jid = f"m-{fmt}-{unmap}"
                out[jid] = await job(s, "drive-mirror", jid, device="src", target=tgt,
                                     sync="full", mode="existing", format=fmt, unmap=unmap)
                m = json.loads(qemu_img("map", "--output=json", "-U", "-f", fmt, tgt).stdout)
                out[f"map-{fmt}-{unmap}"] = m
                out[f"cmp-{fmt}-{unmap}"] = qemu_img("compare", "-U", "-f", "qcow2", "-F", fmt,
                                                     src, tgt).returncode
        return norm(out, d)
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert [ours[f"cmp-{f}-{u}"] for f in ("qcow2", "raw") for u in (False, True)] == [0] * 4
    kept, freed = ours["map-qcow2-False"][1], ours["map-qcow2-True"][1]
    assert (kept["zero"], "offset" in kept) == (True, True)
    assert (freed["zero"], "offset" in freed) == (True, False)
