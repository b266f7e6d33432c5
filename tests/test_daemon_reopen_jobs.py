"""A ``blockdev-reopen`` switching ``cache.direct`` (O_DIRECT) while a job
copies (issue 16): the reopen drains front-end requests only; the job goes
on and finishes with the right data, its events as qemu-storage-daemon's
(QEMU's drain adds paused/running and standby/ready pairs: left out).

blkjobs' job is held at a blkdebug break point (its first write, or its
first read of the backing layer) while the reopen happens; qemu-storage-
daemon has no break points over QMP, so its job simply runs.

The switch happens on the open fd (fcntl F_SETFL) while the copy engine's
requests run, which no drain holds: a request between its alignment check
and its system call met EINVAL (csrc/dio.c now does it again in the new
mode): :func:`test_requests_racing_the_switch_do_not_fail`."""
from __future__ import annotations

import os
import threading

import pytest

from daemon_util import (brief, drop_transient_pauses, qcow2_node, qemu_img, qemu_io,
                         side_by_side)

SIZE = 8 << 20


def no_drain_pairs(events):
    """QEMU's drain pauses a job around the reopen (paused/running, a ready
    mirror standby/ready); blkjobs does not."""
    out = []
    for e in drop_transient_pauses(events):
        if out and e == ("JOB_STATUS_CHANGE", {"id": "j", "status": "ready"}) \
                and out[-1] == ("JOB_STATUS_CHANGE", {"id": "j", "status": "standby"}):
            out.pop()
            continue
        out.append(e)
    return out


def node(name: str, path: str, direct: bool, **extra) -> dict:
    return qcow2_node(name, path, cache={"direct": direct}, **extra)


@pytest.mark.parametrize("job", ["backup", "mirror", "stream"])
@pytest.mark.parametrize("direct", [True, False])
def test_reopen_direct_while_a_job_copies(tmp_path, job, direct):
    """``direct``: what the reopen switches O_DIRECT to (the nodes were
    opened the other way)."""
    async def sc(s, d):
        src, other = str(d / "src.qcow2"), str(d / "other.qcow2")
        breaks = await s.has_break_points()
        if job == "stream":         # other: the backing file, streamed into src
            qemu_img("create", "-f", "qcow2", other, str(SIZE))
            qemu_io(other, f"write -P 0x5a 0 {SIZE}")
            qemu_img("create", "-f", "qcow2", "-b", other, "-F", "qcow2", src)
            qemu_io(src, "write -P 0x11 1M 1M")
            await s.x("blockdev-add", **node("other", other, not direct))
            await s.x("blockdev-add", **node("src", src, not direct, backing="other"))
            held, event = "other", "read_aio"
        else:
            for p in (src, other):
                qemu_img("create", "-f", "qcow2", p, str(SIZE))
            qemu_io(src, f"write -P 0x5a 0 {SIZE}")
            qemu_io(src, "write -P 0x11 1M 1M")
            await s.x("blockdev-add", **node("src", src, not direct))
            await s.x("blockdev-add", **node("other", other, not direct))
            held, event = "other", "write_aio"
        if breaks:
            await s.x("x-blkjobs-blkdebug-break", node=held, event=event, tag="t")
        if job == "backup":
            await s.x("blockdev-backup", **{"job-id": "j"}, device="src", target="other",
                      sync="full")
        elif job == "mirror":
            await s.x("blockdev-mirror", **{"job-id": "j"}, device="src", target="other",
                      sync="full")
        else:
            await s.x("block-stream", **{"job-id": "j"}, device="src")
        if breaks:
            await s.x("x-blkjobs-blkdebug-wait-break", tag="t")
            [info] = await s.x("query-jobs")
            assert info["status"] == "running"
        for name, path in (("src", src), ("other", other)):
            o = {**node(name, path, direct), **({"backing": "other"} if job == "stream"
                                                 and name == "src" else {})}
            await s.x("blockdev-reopen", options=[o])
        if breaks:
            await s.x("x-blkjobs-blkdebug-resume", tag="t")
        ev = []
        if job == "mirror":
            ev += await s.until("BLOCK_JOB_READY", device="j")
            await s.x("job-complete", id="j")
        ev += await s.until("JOB_STATUS_CHANGE", id="j", status="null")
        for name in ("src", "other"):
            await s.x("blockdev-del", **{"node-name": name})
        return no_drain_pairs(brief(ev))
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert [e for e in ours if e[0] == "BLOCK_JOB_COMPLETED"] == [
        ("BLOCK_JOB_COMPLETED", {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0,
                                 "type": job})]
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2" if job != "stream" else "raw",
                     str(d / "src.qcow2"),
                     str(d / "other.qcow2") if job != "stream" else _expect(d))
        assert p.returncode == 0, (name, p.stdout + p.stderr)
        assert "No errors were found" in qemu_img("check", str(d / "src.qcow2")).stdout
    assert qemu_img("info", str(tmp_path / "blkjobs" / "src.qcow2")).stdout.count(
        "backing file") == qemu_img("info", str(tmp_path / "qsd" / "src.qcow2")).stdout.count(
        "backing file")


def _expect(d) -> str:
    """What the streamed image reads: the backing file's bytes, 1 MiB of
    the top's at 1 MiB."""
    p = str(d / "expect.raw")
    with open(p, "wb") as f:
        f.write(b"\x5a" * (1 << 20) + b"\x11" * (1 << 20) + b"\x5a" * (SIZE - (2 << 20)))
    return p


def test_requests_racing_the_switch_do_not_fail(tmp_path):
    """Unaligned reads and writes through native.dio (the copy engine's
    path) while another thread switches O_DIRECT on and off: none fails and
    the bytes land. Before csrc/dio.c retried, a few in 100000 met EINVAL."""
    from blkjobs.native import dio
    path = str(tmp_path / "f.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDWR)
    stop = threading.Event()

    def switch() -> None:
        on = False
        while not stop.is_set():
            on = not on
            dio.set_direct(fd, on)
    t = threading.Thread(target=switch)
    t.start()
    failed = []
    try:
        for i in range(50000):
            data = bytes([i % 251]) * 1000
            off = 4096 + 7 + (i % 64) * 1000
            try:
                dio.pwrite(fd, data, off)
                if dio.pread(fd, 1000, off) != data:
                    failed.append((i, "bytes"))
            except OSError as e:
                failed.append((i, e.strerror))
    finally:
        stop.set()
        t.join()
        os.close(fd)
    assert failed == []
