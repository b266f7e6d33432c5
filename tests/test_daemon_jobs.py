"""blkjobs serve: jobs driven over QMP with qemu.qmp (docs/qmp.md §4-7, §9);
target data checked with qemu-img compare / map."""
from __future__ import annotations

import asyncio
import json

import pytest
from daemon_util import (brief, compare, connect, make_images, qcow2_node, qemu_img,
                         start_blkjobs, status_seq)

MiB = 1 << 20


@pytest.fixture
def daemon(tmp_path):
    d = start_blkjobs(tmp_path)
    yield d
    assert d.stop() == 0, d.stderr
    assert "Traceback" not in d.stderr, d.stderr


def test_backup_event_sequence(daemon, tmp_path):
    src, tgt = make_images(tmp_path)

    async def main():
        s = await connect(daemon.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        assert await s.x("blockdev-backup", **{"job-id": "b0"}, device="src", target="tgt",
                         sync="full") == {}
        evs = await s.until("JOB_STATUS_CHANGE", id="b0", status="null")
        assert brief(evs) == [
            ("JOB_STATUS_CHANGE", {"id": "b0", "status": "created"}),
            ("JOB_STATUS_CHANGE", {"id": "b0", "status": "running"}),
            ("JOB_STATUS_CHANGE", {"id": "b0", "status": "waiting"}),
            ("JOB_STATUS_CHANGE", {"id": "b0", "status": "pending"}),
            ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "b0", "len": 4 * MiB,
                                     "offset": 4 * MiB, "speed": 0}),
            ("JOB_STATUS_CHANGE", {"id": "b0", "status": "concluded"}),
            ("JOB_STATUS_CHANGE", {"id": "b0", "status": "null"}),
        ]
        stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in evs]
        assert stamps == sorted(stamps) and stamps[0][0] > 1_600_000_000
        assert await s.x("query-jobs") == []
        await s.close()

    asyncio.run(main())
    assert compare(src, tgt) == (0, "Images are identical.\n")


def test_backup_point_in_time_and_manual_finalize(daemon, tmp_path):
    """A guest write during the job does not reach the target; with
    auto-finalize/auto-dismiss off the job waits in pending, then concluded."""
    src, tgt = make_images(tmp_path, "64M")
    orig = str(tmp_path / "orig.qcow2")
    assert qemu_img("convert", "-f", "qcow2", "-O", "qcow2", src, orig).returncode == 0

    async def main():
        s = await connect(daemon.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        # the job's first write to the target is held at a break point: it is
        # still running for the guest write and the refused finalize below
        # (speed: batches of 1 MiB, so the data at 2 MiB is not in the held
        # batch and the guest write need not wait for it)
        await s.x("x-blkjobs-blkdebug-break", node="tgt", event="write_aio", tag="w")
        await s.x("blockdev-backup", **{"job-id": "b1", "auto-finalize": False,
                                        "auto-dismiss": False},
                  device="src", target="tgt", sync="full", speed=10 << 20)
        held = await s.x("x-blkjobs-blkdebug-wait-break", tag="w")
        assert (held["offset"], held["length"]) == (0, 1 << 20)
        await s.x("x-blkjobs-write", node="src", offset=2 << 20, length=65536, pattern=0x11)
        assert await s.err("job-finalize", id="b1") == \
            ("GenericError", "Job 'b1' in state 'running' cannot accept command verb 'finalize'")
        await s.x("block-job-set-speed", device="b1", speed=0)
        await s.x("x-blkjobs-blkdebug-resume", tag="w")
        evs = await s.until("BLOCK_JOB_PENDING", id="b1")
        assert status_seq("b1", evs) == ["created", "running", "waiting", "pending",
                                         "BLOCK_JOB_PENDING"]
        [info] = await s.x("query-block-jobs")
        assert info == {"type": "backup", "device": "b1", "len": 64 * MiB,
                        "offset": 64 * MiB, "busy": False, "paused": False, "speed": 0,
                        "io-status": "ok", "ready": False, "status": "pending",
                        "auto-finalize": False, "auto-dismiss": False}
        assert await s.err("job-dismiss", id="b1") == \
            ("GenericError", "Job 'b1' in state 'pending' cannot accept command verb 'dismiss'")
        assert await s.x("job-finalize", id="b1") == {}
        evs = await s.until("JOB_STATUS_CHANGE", id="b1", status="concluded")
        assert [e["event"] for e in evs] == ["BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE"]
        assert await s.x("query-jobs") == [{"id": "b1", "type": "backup",
                                            "status": "concluded",
                                            "current-progress": 64 * MiB,
                                            "total-progress": 64 * MiB}]
        await s.x("block-job-dismiss", id="b1")
        await s.event("JOB_STATUS_CHANGE", id="b1", status="null")
        assert await s.x("query-jobs") == []
        await s.close()

    asyncio.run(main())
    assert compare(orig, tgt)[0] == 0          # as it was at job start
    assert compare(src, tgt)[0] == 1           # the write reached only the source


def test_mirror_ready_and_complete(daemon, tmp_path):
    src, tgt = make_images(tmp_path)

    async def main():
        s = await connect(daemon.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("dst", tgt))
        await s.x("blockdev-mirror", **{"job-id": "m0"}, device="src", target="dst",
                  sync="full")
        evs = await s.until("BLOCK_JOB_READY")
        assert status_seq("m0", evs) == ["created", "running", "ready", "BLOCK_JOB_READY"]
        assert evs[-1]["data"] == {"type": "mirror", "device": "m0", "len": 4 * MiB,
                                   "offset": 4 * MiB, "speed": 0}
        [info] = await s.x("query-block-jobs")
        assert info["ready"] is True and info["status"] == "ready"
        assert info["actively-synced"] is False
        # written while ready: mirrored before the pivot
        await s.x("x-blkjobs-write", node="src", offset=3 * MiB, length=4096, pattern=0x77)
        assert await s.err("job-finalize", id="m0") == \
            ("GenericError", "Job 'm0' in state 'ready' cannot accept command verb 'finalize'")
        await s.x("job-complete", id="m0")
        evs = await s.until("JOB_STATUS_CHANGE", id="m0", status="null")
        assert status_seq("m0", evs) == ["waiting", "pending", "BLOCK_JOB_COMPLETED",
                                         "concluded", "null"]
        done = evs[2]["data"]
        assert done["len"] == done["offset"] and "error" not in done
        await s.close()

    asyncio.run(main())
    assert compare(src, tgt) == (0, "Images are identical.\n")


def test_transactions(daemon, tmp_path):
    src, tgt = make_images(tmp_path)
    tgt2 = str(tmp_path / "tgt2.qcow2")
    assert qemu_img("create", "-f", "qcow2", tgt2, "4M").returncode == 0

    async def main():
        s = await connect(daemon.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-add", **qcow2_node("tgt2", tgt2))
        bm = {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0"}}

        def backup(job, target, **kw):
            return {"type": "blockdev-backup",
                    "data": {"job-id": job, "device": "src", "target": target,
                             "sync": "full", **kw}}

        grouped = {"completion-mode": "grouped"}
        assert await s.err("transaction", actions=[backup("g0", "tgt"), bm],
                           properties=grouped) == \
            ("GenericError", "Action 'block-dirty-bitmap-add' does not support Transaction "
                             "property completion-mode = grouped")
        # grouped, second action fails: the first job is rolled back
        assert await s.err("transaction", actions=[backup("g1", "tgt"),
                                                   backup("g2", "nosuch")],
                           properties=grouped) == \
            ("GenericError", "Cannot find device='nosuch' nor node-name='nosuch'")
        evs = await s.until("JOB_STATUS_CHANGE", id="g1", status="null")
        assert status_seq("g1", evs) == ["created", "aborting", "concluded", "null"]
        # bitmap + backup + abort: everything undone, nothing started
        await s.x("block-dirty-bitmap-add", node="src", name="keep")
        await s.x("block-dirty-bitmap-disable", node="src", name="keep")
        assert await s.err("transaction", actions=[
            bm, {"type": "block-dirty-bitmap-enable", "data": {"node": "src", "name": "keep"}},
            backup("t1", "tgt"), {"type": "abort", "data": {}}]) == \
            ("GenericError", "Transaction aborted using Abort action")
        evs = await s.until("JOB_STATUS_CHANGE", id="t1", status="null")
        assert status_seq("t1", evs) == ["created", "aborting", "concluded", "null"]
        [node] = [n for n in await s.x("query-named-block-nodes", flat=True)
                  if n["node-name"] == "src"]
        assert [(b["name"], b["recording"]) for b in node["dirty-bitmaps"]] == \
            [("keep", False)]
        assert await s.x("query-jobs") == []
        # grouped success: both jobs wait for each other and finish together
        await s.x("transaction", actions=[backup("g3", "tgt"), backup("g4", "tgt2")],
                  properties=grouped)
        evs = await s.until("JOB_STATUS_CHANGE", id="g3", status="null")
        if not any(e["data"] == {"id": "g4", "status": "null"} for e in evs):
            evs += await s.until("JOB_STATUS_CHANGE", id="g4", status="null")
        for job in ("g3", "g4"):
            seq = status_seq(job, evs)
            assert seq == ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED",
                           "concluded", "null"], (job, seq)
        pend = [i for i, e in enumerate(evs) if e["data"].get("status") == "pending"]
        waits = [i for i, e in enumerate(evs) if e["data"].get("status") == "waiting"]
        assert max(waits) < min(pend)          # nobody pending before both waited
        await s.close()

    asyncio.run(main())
    assert compare(src, tgt)[0] == 0 and compare(src, tgt2)[0] == 0


def test_bitmap_incremental_backup(daemon, tmp_path):
    src, full = make_images(tmp_path)
    inc = str(tmp_path / "inc.qcow2")

    async def main():
        s = await connect(daemon.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("full", full))
        await s.x("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0"}},
            {"type": "blockdev-backup", "data": {"job-id": "f0", "device": "src",
                                                 "target": "full", "sync": "full"}}])
        await s.until("JOB_STATUS_CHANGE", id="f0", status="null")
        assert await s.err("block-dirty-bitmap-add", node="src", name="bm0") == \
            ("GenericError", "Bitmap already exists: bm0")
        assert await s.err("block-dirty-bitmap-add", node="src", name="g", granularity=1000) \
            == ("GenericError", "Granularity must be power of 2 and at least 512")
        assert await s.err("block-dirty-bitmap-remove", node="src", name="nob") == \
            ("GenericError", "Dirty bitmap 'nob' not found")
        empty = (await s.x("x-debug-block-dirty-bitmap-sha256", node="src",
                           name="bm0"))["sha256"]
        await s.x("x-blkjobs-write", node="src", offset=MiB + 4096, length=4096, pattern=0x33)
        await s.x("x-blkjobs-write", node="src", offset=3 * MiB, length=65536, pattern=0x44)
        [node] = [n for n in await s.x("query-named-block-nodes")
                  if n["node-name"] == "src"]
        assert node["dirty-bitmaps"] == [{"name": "bm0", "count": 2 * 65536,
                                          "granularity": 65536, "recording": True,
                                          "busy": False, "persistent": False}]
        h = await s.x("x-debug-block-dirty-bitmap-sha256", node="src", name="bm0")
        assert h["sha256"] != empty
        # a copy to merge into and compare
        await s.x("block-dirty-bitmap-add", node="src", name="copy", disabled=True)
        await s.x("block-dirty-bitmap-merge", node="src", target="copy", bitmaps=["bm0"])
        assert await s.x("x-debug-block-dirty-bitmap-sha256", node="src", name="copy") == h

        assert qemu_img("create", "-f", "qcow2", "-b", full, "-F", "qcow2", inc,
                        "4M").returncode == 0
        await s.x("blockdev-add", driver="qcow2", **{"node-name": "inc"},
                  file={"driver": "file", "filename": inc}, backing="full")
        await s.x("blockdev-backup", **{"job-id": "i0"}, device="src", target="inc",
                  sync="incremental", bitmap="bm0")
        evs = await s.until("JOB_STATUS_CHANGE", id="i0", status="null")
        done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"][0]["data"]
        assert done["len"] == done["offset"] == 2 * 65536
        [node] = [n for n in await s.x("query-named-block-nodes")
                  if n["node-name"] == "src"]
        counts = {b["name"]: b["count"] for b in node["dirty-bitmaps"]}
        assert counts == {"bm0": 0, "copy": 2 * 65536}      # on-success: consumed
        await s.close()

    asyncio.run(main())
    assert compare(src, inc) == (0, "Images are identical.\n")
    m = json.loads(qemu_img("map", "-U", "--output=json", "-f", "qcow2", inc).stdout)
    top = [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["data"]]
    assert top == [(MiB, 65536), (3 * MiB, 65536)]


def test_sigterm_cancels_jobs_and_cli_options(tmp_path):
    """--blockdev (keyval and JSON) and --chardev/--monitor; SIGTERM while a
    backup runs (held at a break point): the job is cancelled (its events
    still reach the client), the daemon exits 0 and removes its socket."""
    import os

    from daemon_util import Daemon
    src, tgt = make_images(tmp_path, "64M")
    sock = str(tmp_path / "cd.sock")
    import sys
    d = Daemon([sys.executable, "-m", "blkjobs", "serve", "--print-ready",
                "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--blockdev", f"driver=qcow2,node-name=src,file.driver=file,"
                              f"file.filename={src}",
                "--blockdev", json.dumps(qcow2_node("tgt", tgt))], sock, True)
    assert d.ready["sockets"] == [sock]

    async def main():
        s = await connect(sock)
        names = {n["node-name"] for n in await s.x("query-named-block-nodes")}
        assert {"src", "tgt"} <= names
        # held at its first write: the job could not end by itself
        await s.x("x-blkjobs-blkdebug-break", node="tgt", event="write_aio", tag="w")
        await s.x("blockdev-backup", **{"job-id": "slow"}, device="src", target="tgt",
                  sync="full")
        await s.x("x-blkjobs-blkdebug-wait-break", tag="w")
        d.proc.send_signal(15)
        evs = await s.until("JOB_STATUS_CHANGE", id="slow", status="null")
        assert [e["event"] for e in evs][-3:] == ["BLOCK_JOB_CANCELLED", "JOB_STATUS_CHANGE",
                                                  "JOB_STATUS_CHANGE"]
        try:
            await s.qmp.disconnect()
        except EOFError:        # the daemon may have hung up already
            pass

    asyncio.run(main())
    assert d.stop() == 0, d.stderr
    assert not os.path.exists(sock)


def test_repeated_sigterm_during_shutdown_still_exits_cleanly(tmp_path):
    """A second (third, ...) SIGTERM while the daemon shuts down, as a service
    manager or an impatient user sends, must not kill it half-way: it still
    exits 0 and removes its socket and pid file."""
    import os
    import signal
    import sys
    import time

    from daemon_util import Daemon
    src, tgt = make_images(tmp_path, "64M")
    sock, pid = str(tmp_path / "d.sock"), str(tmp_path / "d.pid")
    for _ in range(10):
        d = Daemon([sys.executable, "-m", "blkjobs", "serve", "--print-ready",
                    "--socket", sock, "--pidfile", pid,
                    "--blockdev", json.dumps(qcow2_node("src", src)),
                    "--blockdev", json.dumps(qcow2_node("tgt", tgt))], sock, True)
        deadline = time.monotonic() + 60      # a safety net
        while d.proc.poll() is None:
            assert time.monotonic() < deadline, "daemon did not stop"
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.0005)
        assert d.stop() == 0, d.stderr
        assert not os.path.exists(sock)
        assert not os.path.exists(pid)


def test_chain_backing_refs_stream_and_active_commit(daemon, tmp_path):
    """qcow2 'backing' as a node name, as an inline object and omitted;
    block-stream then an active block-commit; base ends with the guest view."""
    from daemon_util import qemu_io
    base, mid, top = (str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top"))
    ref = str(tmp_path / "ref.qcow2")
    assert qemu_img("create", "-f", "qcow2", base, "4M").returncode == 0
    qemu_io(base, "write -P 1 0 1M")
    assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", mid).returncode == 0
    qemu_io(mid, "write -P 2 1M 1M")
    assert qemu_img("create", "-f", "qcow2", "-b", mid, "-F", "qcow2", top).returncode == 0
    qemu_io(top, "write -P 3 2M 1M")
    assert qemu_img("convert", "-O", "qcow2", top, ref).returncode == 0

    async def main():
        s = await connect(daemon.sock)
        # base and mid read-only, as libvirt adds backing images: a
        # read-write qcow2 node holds write (QEMU's qcow2 rule), and "view"
        # and "view2" open them again
        await s.x("blockdev-add", **qcow2_node("base", base, **{"read-only": True}))
        await s.x("blockdev-add", **qcow2_node("mid", mid, backing="base", **{"read-only": True}))
        await s.x("blockdev-add", **qcow2_node("top", top, backing="mid"))
        await s.x("blockdev-add", **qcow2_node("view", ref, backing={
            "driver": "qcow2", "file": {"driver": "file", "filename": base}}))
        await s.x("blockdev-add", **qcow2_node("view2", mid, **{"read-only": True}))  # opens its chain
        # (the depth is counted while nesting backing-image: not with flat)
        nodes = {n["node-name"]: n for n in await s.x("query-named-block-nodes")}
        assert nodes["top"]["backing_file_depth"] == 2
        assert nodes["top"]["backing_file"] == mid
        assert nodes["view"]["backing_file_depth"] == 1
        assert nodes["view2"]["backing_file_depth"] == 1
        assert await s.err("blockdev-del", **{"node-name": "mid"}) == \
            ("GenericError", "Node 'mid' is busy: node is used as backing hd of 'top'")
        await s.x("blockdev-del", **{"node-name": "view"})
        await s.x("blockdev-del", **{"node-name": "view2"})
        await s.x("block-stream", **{"job-id": "s0", "base-node": "base"}, device="top")
        evs = await s.until("JOB_STATUS_CHANGE", id="s0", status="null")
        assert status_seq("s0", evs) == ["created", "running", "waiting", "pending",
                                         "BLOCK_JOB_COMPLETED", "concluded", "null"]
        await s.x("block-commit", **{"job-id": "c0"}, device="top")
        evs = await s.until("BLOCK_JOB_READY")
        assert evs[-1]["data"]["type"] == "commit"
        await s.x("job-complete", id="c0")
        evs = await s.until("JOB_STATUS_CHANGE", id="c0", status="null")
        assert "BLOCK_JOB_COMPLETED" in status_seq("c0", evs)
        await s.close()

    asyncio.run(main())
    assert compare(base, ref) == (0, "Images are identical.\n")
