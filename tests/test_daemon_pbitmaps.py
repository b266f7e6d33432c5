"""Persistent dirty bitmaps in the daemon, side by side with
qemu-storage-daemon: block-dirty-bitmap-add persistent=true, what
query-named-block-nodes shows (a pending backup's anonymous bitmaps
included), the bitmap-mode matrix of sync=bitmap backups, storing on
blockdev-del / exit and loading at the next start, and a SIGKILL leaving
the bitmap in use (inconsistent) until it is removed."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess

from conftest import run_blkjobs
from daemon_util import (connect, make_images, qcow2_node, qemu_img, qemu_io, run_daemon,
                         side_by_side, start_blkjobs, start_qsd)

MiB = 1 << 20


async def guest_write(s, d, node: str, offset: int, length: int, pattern: int,
                      flush: bool = True) -> None:
    """A guest write to ``node``: ours has x-blkjobs-write; QEMU's daemon
    gets it through a writable NBD export and qemu-io."""
    if d.name != "qsd":
        await s.x("x-blkjobs-write", node=node, offset=offset, length=length,
                  pattern=pattern, flush=flush)
        return
    sock = str(d / "nbd.sock")
    nodes = await s.x("query-named-block-nodes")
    fname = [n["file"] for n in nodes if n["node-name"] == node][0]
    for n in nodes:
        if n["drv"] == "copy-before-write" and n["file"] == fname:
            node = n["node-name"]      # a job's filter: the guest writes through it
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await s.x("block-export-add", type="nbd", id="e", **{"node-name": node}, writable=True,
              name="g")
    try:
        p = await asyncio.to_thread(
            subprocess.run, ["qemu-io", "-f", "raw", "-c",
                             f"write -P {pattern} {offset} {length}",
                             f"nbd+unix:///g?socket={sock}"],
            capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        await s.x("block-export-del", id="e")
        await s.until("BLOCK_EXPORT_DELETED", id="e")
        await s.x("nbd-server-stop")


async def bitmaps(s, node: str) -> list[dict]:
    for n in await s.x("query-named-block-nodes"):
        if n["node-name"] == node:
            return n.get("dirty-bitmaps", [])
    raise AssertionError(f"no node {node}")


def info_bitmaps(path: str) -> list[dict]:
    p = qemu_img("info", "-U", "--output", "json", path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["format-specific"]["data"].get("bitmaps", [])


def check_clean(path: str) -> None:
    p = qemu_img("check", path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_persistent_bitmap_is_stored_listed_and_loaded_like_qsd(tmp_path):
    async def sc(s, d):
        src, _ = make_images(d)
        raw = str(d / "r.raw")
        assert qemu_img("create", "-f", "raw", raw, "4M").returncode == 0
        out = {}
        await s.x("blockdev-add", driver="raw", **{"node-name": "r"},
                  file={"driver": "file", "filename": raw})
        out["raw"] = await s.err("block-dirty-bitmap-add", node="r", name="p",
                                 persistent=True)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("block-dirty-bitmap-add", node="src", name="p", persistent=True)
        await s.x("block-dirty-bitmap-add", node="src", name="m")
        out["dup"] = await s.err("block-dirty-bitmap-add", node="src", name="p",
                                 persistent=True)
        out["long"] = await s.err("block-dirty-bitmap-add", node="src", name="x" * 1024,
                                  persistent=True)
        await guest_write(s, d, "src", MiB, 65536, 0x11)
        await guest_write(s, d, "src", 3 * MiB + 4096, 4096, 0x22)
        out["listed"] = await bitmaps(s, "src")
        await s.x("blockdev-del", **{"node-name": "src"})
        out["info"] = info_bitmaps(src)
        check_clean(src)
        await s.x("blockdev-add", **qcow2_node("src", src))
        out["reopened"] = await bitmaps(s, "src")
        return out

    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["raw"] == ("GenericError",
                           "Can't store persistent bitmaps to r: Operation not supported")
    assert ours["info"] == [{"flags": ["auto"], "name": "p", "granularity": 65536}]
    p = [b for b in ours["reopened"] if b.get("name") == "p"]
    assert p == [{"name": "p", "recording": True, "persistent": True, "busy": False,
                  "granularity": 65536, "count": 2 * 65536}]

    # each daemon's image is loaded by the other one, after a restart
    async def reload(s, d):
        await s.x("blockdev-add", **qcow2_node("src", str(d / "src.qcow2")))
        return await bitmaps(s, "src")
    assert run_daemon(start_qsd, tmp_path / "blkjobs", reload) == p
    assert run_daemon(start_blkjobs, tmp_path / "qsd", reload) == p


async def _matrix_case(s, d, mode: str, outcome: str) -> dict:
    tag = f"{mode}-{outcome}"
    sub = d / tag
    sub.mkdir()
    src, tgt = make_images(sub)
    sn, tn = f"s-{tag}", f"t-{tag}"
    await s.x("blockdev-add", **qcow2_node(sn, src))
    await s.x("block-dirty-bitmap-add", node=sn, name="p", persistent=True)
    await guest_write(s, d, sn, 0, 3 * 65536, 0x31)
    if outcome == "failure":
        await s.x("blockdev-add", driver="qcow2", **{"node-name": tn},
                  file={"driver": "blkdebug", "inject-error": [{"event": "pwritev"}],
                        "image": {"driver": "file", "filename": tgt}})
    else:
        await s.x("blockdev-add", **qcow2_node(tn, tgt))
    job = f"j-{tag}"
    await s.x("blockdev-backup", device=sn, target=tn, sync="bitmap", bitmap="p",
              **{"bitmap-mode": mode, "job-id": job, "auto-finalize": False,
                 "auto-dismiss": False})
    out: dict = {}
    if outcome == "failure":
        await s.until("JOB_STATUS_CHANGE", id=job, status="concluded")
    else:
        await s.until("JOB_STATUS_CHANGE", id=job, status="pending")
        # a write while the bitmap is frozen goes to its successor
        await guest_write(s, d, sn, 2 * MiB, 65536, 0x32)
        out["pending"] = await bitmaps(s, sn)
        if outcome == "cancel":
            await s.x("job-cancel", id=job)
        else:
            await s.x("job-finalize", id=job)
        await s.until("JOB_STATUS_CHANGE", id=job, status="concluded")
    out["job"] = [(j["id"], j["status"], "error" in j) for j in await s.x("query-jobs")
                  if j["id"] == job]
    await s.x("job-dismiss", id=job)
    out["after"] = await bitmaps(s, sn)
    await s.x("blockdev-del", **{"node-name": tn})
    await s.x("blockdev-del", **{"node-name": sn})
    out["info"] = info_bitmaps(src)
    check_clean(src)
    return out


def test_bitmap_mode_matrix_matches_qsd(tmp_path):
    modes, outcomes = ("on-success", "always", "never"), ("success", "failure", "cancel")

    async def sc(s, d):
        return {(m, o): await _matrix_case(s, d, m, o) for m in modes for o in outcomes}

    ref, ours = side_by_side(tmp_path, sc)
    for key in ref:
        assert ours[key] == ref[key], key
    counts = {k: [b["count"] for b in v["after"] if b.get("name") == "p"][0]
              for k, v in ours.items()}
    g = 65536
    assert counts == {
        ("on-success", "success"): g, ("on-success", "failure"): 3 * g,
        ("on-success", "cancel"): 4 * g,
        ("always", "success"): g, ("always", "failure"): 3 * g, ("always", "cancel"): g,
        ("never", "success"): 4 * g, ("never", "failure"): 3 * g, ("never", "cancel"): 4 * g}


def _kill(daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(15)
    daemon.proc.stdout.close()
    daemon.proc.stderr.close()
    if os.path.exists(daemon.sock):
        os.unlink(daemon.sock)


def test_sigkill_leaves_bitmap_in_use_refused_then_removed(tmp_path):
    """As qemu-storage-daemon: a bitmap in use when the daemon is killed is
    flagged in-use in the image, inconsistent at the next start and refused
    for a backup; check -r all leaves it; removing it recovers."""
    out = {}
    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        src, tgt = make_images(d)
        assert qemu_img("bitmap", "--add", src, "p").returncode == 0
        daemon = start(d)

        async def first(s=None, d=d, src=src, daemon=daemon):
            s = await connect(daemon.sock)
            await s.x("blockdev-add", **qcow2_node("src", src))
            await guest_write(s, d, "src", 0, 65536, 0x41, flush=False)
        try:
            asyncio.run(first())
        finally:
            _kill(daemon)     # also when the scenario failed: nothing left running
        r: dict = {"killed": info_bitmaps(src)}
        shutil.copy(src, d / "copy.qcow2")

        async def second(s, d, src=src, tgt=tgt):
            await s.x("blockdev-add", **qcow2_node("src", src))
            await s.x("blockdev-add", **qcow2_node("tgt", tgt))
            got = {"listed": await bitmaps(s, "src")}
            got["backup"] = await s.err("blockdev-backup", device="src", target="tgt",
                                        sync="bitmap", bitmap="p",
                                        **{"job-id": "j", "bitmap-mode": "on-success"})
            got["enable"] = await s.err("block-dirty-bitmap-enable", node="src", name="p")
            await s.x("block-dirty-bitmap-remove", node="src", name="p")
            await s.x("blockdev-del", **{"node-name": "src"})
            return got
        r.update(run_daemon(start, d, second))
        r["removed"] = info_bitmaps(src)
        check_clean(src)
        out[name] = r
    assert out["qsd"] == out["blkjobs"]
    ours = out["blkjobs"]
    assert ours["killed"] == [{"flags": ["in-use", "auto"], "name": "p",
                               "granularity": 65536}]
    assert ours["backup"] == ("GenericError", "Bitmap 'p' is inconsistent and cannot be used")
    assert ours["listed"] == [{"name": "p", "recording": False, "persistent": True,
                               "busy": False, "granularity": 65536, "count": 0,
                               "inconsistent": True}]
    assert ours["removed"] == []
    # the killed image: check -r all keeps the in-use bitmap, as qemu-img
    # does; blkjobs bitmap --remove drops it
    killed = str(tmp_path / "blkjobs" / "copy.qcow2")
    p = run_blkjobs("check", "-r", "all", killed)
    assert p.returncode == 0, p.stderr
    assert info_bitmaps(killed)[0]["flags"] == ["in-use", "auto"]
    p = run_blkjobs("bitmap", "--remove", killed, "p")
    assert p.returncode == 0, p.stderr
    assert info_bitmaps(killed) == []
    check_clean(killed)
    qemu_io(killed, "read -P 0x41 0 64k")


def test_daemon_exit_stores_bitmaps_in_use(tmp_path):
    """A bitmap added is stored at close, as QEMU stores it (not on disk
    meanwhile, even after a write without a flush); quitting the daemon
    (SIGTERM, as qemu-storage-daemon) stores it consistent."""
    async def sc(s, d):
        src, _ = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("block-dirty-bitmap-add", node="src", name="p", persistent=True)
        await guest_write(s, d, "src", MiB, 4096, 0x51, flush=False)
        return info_bitmaps(src)

    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref == []
    for name in ("qsd", "blkjobs"):
        src = str(tmp_path / name / "src.qcow2")
        assert info_bitmaps(src) == [{"flags": ["auto"], "name": "p", "granularity": 65536}]
        check_clean(src)

    async def count(s, d):
        await s.x("blockdev-add", **qcow2_node("src", str(d / "src.qcow2")))
        return [b["count"] for b in await bitmaps(s, "src")]
    assert run_daemon(start_qsd, tmp_path / "blkjobs", count) == [65536]


def test_read_only_node_bitmaps_match_qsd(tmp_path):
    """QEMU's rule: a bitmap loaded from an image opened read-only is
    readonly (clear, remove and backup refused; disable allowed); one added
    since, persistent or not, is not."""
    async def sc(s, d):
        src, tgt = make_images(d)
        assert qemu_img("bitmap", "--add", src, "old").returncode == 0
        await s.x("blockdev-add", **qcow2_node("src", src, **{"read-only": True}))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        out = {"listed": await bitmaps(s, "src")}
        await s.x("block-dirty-bitmap-add", node="src", name="m")
        await s.x("block-dirty-bitmap-add", node="src", name="p", persistent=True)
        for name in ("m", "p"):
            await s.x("block-dirty-bitmap-clear", node="src", name=name)
        out["clear"] = await s.err("block-dirty-bitmap-clear", node="src", name="old")
        out["remove"] = await s.err("block-dirty-bitmap-remove", node="src", name="old")
        await s.x("block-dirty-bitmap-disable", node="src", name="old")
        out["backup"] = await s.err("blockdev-backup", device="src", target="tgt",
                                    sync="bitmap", bitmap="old",
                                    **{"bitmap-mode": "on-success", "job-id": "j"})
        out["after"] = await bitmaps(s, "src")
        await s.x("blockdev-del", **{"node-name": "src"})
        out["info"] = info_bitmaps(src)
        return out

    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours["remove"] == ("GenericError", "Bitmap 'old' is readonly and cannot be modified")
    assert ours["info"] == [{"flags": ["auto"], "name": "old", "granularity": 65536}]


def test_disabled_bitmap_backup_matches_qsd(tmp_path):
    """QEMU: the successor of a disabled bitmap is disabled -- writes while
    the backup is pending are not recorded, nor after the hand-over."""
    async def sc(s, d):
        out = []
        for persistent in (False, True):
            sub = d / f"p{int(persistent)}"
            sub.mkdir()
            src, tgt = make_images(sub)
            sn, tn, job = f"s{int(persistent)}", f"t{int(persistent)}", f"j{int(persistent)}"
            await s.x("blockdev-add", **qcow2_node(sn, src))
            await s.x("blockdev-add", **qcow2_node(tn, tgt))
            await s.x("block-dirty-bitmap-add", node=sn, name="p", persistent=persistent)
            await guest_write(s, d, sn, 0, 65536, 1)
            await s.x("block-dirty-bitmap-disable", node=sn, name="p")
            await s.x("blockdev-backup", device=sn, target=tn, sync="bitmap", bitmap="p",
                      **{"bitmap-mode": "on-success", "job-id": job, "auto-finalize": False})
            await s.until("JOB_STATUS_CHANGE", id=job, status="pending")
            await guest_write(s, d, sn, MiB, 65536, 2)
            out.append(await bitmaps(s, sn))
            await s.x("job-finalize", id=job)
            await s.until("JOB_STATUS_CHANGE", id=job, status="null")
            out.append(await bitmaps(s, sn))
        return out

    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert [b["count"] for b in ours[3]] == [0]
    assert ours[2][1] == {"recording": False, "persistent": False, "busy": False,
                          "granularity": 65536, "count": 0}


def test_bitmaps_of_an_image_opened_read_write_laid_out_as_qsd(tmp_path):
    """An image with two bitmaps added read-write: QEMU flags them in use on
    disk at once (format-specific shows it), a removal leaves the image at
    once, two new ones are stored at close newest first after the one left;
    the files are qemu-storage-daemon's byte for byte."""
    async def sc(s, d):
        src, _ = make_images(d)
        for name in ("a", "b"):
            assert qemu_img("bitmap", "--add", src, name).returncode == 0
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("block-dirty-bitmap-add", node="src", name="p", persistent=True)
        await s.x("block-dirty-bitmap-add", node="src", name="q", persistent=True)
        # into allocated clusters (where a new data cluster goes is not
        # QEMU's: blkjobs takes it at the end of the file, QEMU first-fit)
        await guest_write(s, d, "src", 0, 65536, 0x33)

        async def fs():
            for n in await s.x("query-named-block-nodes"):
                if n["node-name"] == "src":
                    return n["image"]["format-specific"]["data"].get("bitmaps")
        out = {"open": await fs(), "disk": info_bitmaps(src)}
        await s.x("block-dirty-bitmap-remove", node="src", name="a")
        out["removed"] = await fs()
        await s.x("blockdev-del", **{"node-name": "src"})
        out["closed"] = info_bitmaps(src)
        check_clean(src)
        return out

    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours["open"] == ours["disk"] == [
        {"flags": ["in-use", "auto"], "name": n, "granularity": 65536} for n in "ab"]
    assert ours["removed"] == [{"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}]
    assert [b["name"] for b in ours["closed"]] == ["b", "q", "p"]
    files = [(tmp_path / w / "src.qcow2").read_bytes() for w in ("qsd", "blkjobs")]
    assert files[0] == files[1]
