"""blkdebug break points (QEMU's ``break``/``wait_break``/``resume``/
``remove-break``): a request is held before it runs until resumed, so tests
wait for an event instead of hoping a slow job is still running."""
from __future__ import annotations

import subprocess
import threading

import pytest

from blkjobs.errors import UsageError
from test_jobs_helpers import (SIZE, MiB, assert_same, check, eng, mkimg,  # noqa: F401
                               snapshot, tool)

WRITES = [("0x11", 0, 1 * MiB), ("0x22", 2 * MiB + 4096, 300 << 10), (None, 3 * MiB, 64 << 10)]


def pair(eng, tmp_path, fmt="qcow2"):
    src = mkimg(tmp_path / f"src.{fmt}", fmt, writes=WRITES)
    dst = mkimg(tmp_path / f"dst.{fmt}", fmt)
    eng.open(src, fmt, node_name="src")
    eng.open(dst, fmt, node_name="dst")
    return src, dst


def empty(path, fmt):
    """Whether ``path`` still reads as zeroes (qemu-img compare -U against a
    fresh image: the engine holds the image's locks)."""
    blank = mkimg(str(path) + ".blank", "raw")
    p = subprocess.run([tool("qemu-img"), "compare", "-U", "-f", "raw", "-F", fmt, blank,
                        str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    return p.returncode == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_job_copy_held_at_first_write(eng, tmp_path, fmt):
    src, dst = pair(eng, tmp_path, fmt)
    expect = snapshot(src, fmt, tmp_path / "expect.raw")
    eng.blkdebug_break("dst", "write_aio", "w")
    job = eng.backup("src", "dst", sync="full", job_id="b0")
    held = eng.blkdebug_wait_break("w")
    assert (held.tag, held.event, held.node, held.offset) == ("w", "write_aio", "dst", 0)
    assert eng.blkdebug_is_suspended("w")
    [info] = eng.query_block_jobs()
    assert (info["offset"], info["len"], info["busy"], info["paused"]) == (0, SIZE, True, False)
    assert eng.query_jobs()[0]["status"] == "running"
    assert empty(dst, fmt)          # nothing of the held request reached the target
    eng.blkdebug_resume("w")
    assert not eng.blkdebug_is_suspended("w")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(expect, dst, "raw", fmt)


def test_read_break_on_a_backing_layer_and_rearm(eng, tmp_path):
    """A break on the layer that holds the run: held at that exact run; a
    break set again before resuming holds the next such request."""
    mkimg(tmp_path / "base.qcow2", writes=[("0x44", 0, SIZE)])
    top = mkimg(tmp_path / "top.qcow2", backing="base.qcow2", writes=[("0x55", 1 * MiB, 1 * MiB)])
    tgt = mkimg(tmp_path / "tgt.qcow2")
    expect = snapshot(top, "qcow2", tmp_path / "expect.raw")
    t = eng.open(top, node_name="top")
    eng.open(tgt, node_name="tgt")
    base_node = t.backing.name
    eng.blkdebug_break(base_node, "read_aio", "r")
    job = eng.backup("top", "tgt", sync="full", job_id="b0")
    held = eng.blkdebug_wait_break("r")
    assert (held.event, held.node, held.offset, held.length) == ("read_aio", base_node, 0, 1 * MiB)
    eng.blkdebug_break(base_node, "read_aio", "r")  # fires once: arm the next one
    eng.blkdebug_resume("r")
    # the same request planned again passes the spent rule... and the second
    # base run of the same request is the next one held
    held = eng.blkdebug_wait_break("r")
    assert (held.offset, held.length) == (2 * MiB, 2 * MiB)
    eng.blkdebug_resume("r")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(expect, tgt, "raw", "qcow2")


def test_pause_and_cancel_while_held(eng, tmp_path):
    src, dst = pair(eng, tmp_path)
    eng.blkdebug_break("dst", "pwritev", "w")
    ev = eng.listen(["JOB_STATUS_CHANGE"])
    job = eng.backup("src", "dst", sync="full", job_id="b0")
    eng.blkdebug_wait_break("w")
    eng.job_pause("b0")             # takes effect at the next pause point
    assert eng.query_jobs()[0]["status"] == "running"
    eng.blkdebug_break("dst", "flush_to_disk", "w2")   # its final flush
    eng.blkdebug_resume("w")
    # the held batch lands, then the job parks (the next batch is not planned)
    eng.wait_status(job, "paused", timeout=30)
    assert not eng.blkdebug_is_suspended("w2")
    eng.job_resume("b0")
    eng.blkdebug_wait_break("w2")
    eng.job_cancel("b0")
    eng.blkdebug_remove_break("w2")     # drops the rule and resumes what it holds
    assert eng.wait_job(job, 30).value == "cancelled"
    assert [e.data["status"] for e in ev.events] == [
        "created", "running", "paused", "running", "aborting", "concluded", "null"]


def test_cluster_alloc_and_final_flush(eng, tmp_path):
    src, dst = pair(eng, tmp_path)
    expect = snapshot(src, "qcow2", tmp_path / "expect.raw")
    eng.blkdebug_break("dst", "cluster_alloc", "a")
    eng.blkdebug_break("dst", "flush_to_disk", "f")
    job = eng.backup("src", "dst", sync="full", job_id="b0")
    held = eng.blkdebug_wait_break("a")
    assert (held.event, held.offset) == ("cluster_alloc", 0)
    eng.blkdebug_resume("a")
    held = eng.blkdebug_wait_break("f")     # the copy is done, the flush held
    assert held.event == "flush_to_disk"
    assert eng.query_jobs()[0]["status"] == "running"
    eng.blkdebug_resume("f")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(expect, dst, "raw", "qcow2")
    check(dst)


def test_front_end_request_held_without_the_io_lock(eng, tmp_path):
    src, _ = pair(eng, tmp_path)
    vm = eng.attach("src")
    eng.blkdebug_break("src", "pwritev_zero", "z")
    t = threading.Thread(target=vm.write_zeroes, args=(0, 65536))
    t.start()
    held = eng.blkdebug_wait_break("z")
    assert (held.event, held.offset, held.length) == ("pwritev_zero", 0, 65536)
    assert vm.read(0, 4096) == b"\x11" * 4096   # other requests go on; not written yet
    eng.blkdebug_resume("z")
    t.join(30)
    assert not t.is_alive()
    assert vm.read(0, 65536) == bytes(65536)


@pytest.mark.parametrize("event", ["write_aio", "flush_to_disk"])
def test_close_resumes_what_is_held(tmp_path, monkeypatch, event):
    """Closing cancels the job, then lets the held request go: the job ends
    cancelled, even held at its last request (its final flush) and even when
    the let-go job runs on to its end before close does anything more."""
    from blkjobs.engine import Engine
    e = Engine()
    src, dst = pair(e, tmp_path)
    e.blkdebug_break("dst", event, "w")
    job = e.backup("src", "dst", sync="full", job_id="b0")
    e.blkdebug_wait_break("w")
    breaks = e.io.breaks
    let_go = breaks.close

    def let_go_and_wait_for_the_job():
        let_go()
        e.jobs.wait_until(lambda: job.is_completed, 60)
    monkeypatch.setattr(breaks, "close", let_go_and_wait_for_the_job)
    e.close()                       # cancels the job; the held request runs
    assert job.is_completed
    assert job.outcome is not None and job.outcome.value == "cancelled"


def test_errors(eng, tmp_path):
    pair(eng, tmp_path)
    with pytest.raises(UsageError) as ei:
        eng.blkdebug_break("src", "bogus", "t")
    assert str(ei.value) == "blkdebug: unknown event 'bogus'"
    with pytest.raises(UsageError) as ei:
        eng.blkdebug_break("src", "l2_load", "t")
    assert str(ei.value) == ("blkdebug: event 'l2_load' is not raised by blkjobs (supported: "
                             "read_aio, pwritev, write_aio, pwritev_zero, write_compressed, "
                             "cluster_alloc, flush_to_os, flush_to_disk)")
    with pytest.raises(UsageError) as ei:
        eng.blkdebug_resume("t")
    assert str(ei.value) == "blkdebug: no request is suspended at break point 't'"
    with pytest.raises(UsageError) as ei:
        eng.blkdebug_remove_break("t")
    assert str(ei.value) == "blkdebug: no break point 't'"
    eng.blkdebug_break("src", "read_aio", "t")
    eng.blkdebug_remove_break("t")      # a rule that never fired
    with pytest.raises(TimeoutError) as ei:     # the safety net itself
        eng.blkdebug_wait_break("t", timeout=0.01)
    assert str(ei.value) == "blkdebug: no request was suspended at break point 't' within 0.01 s"


@pytest.mark.parametrize("kind", ["rule", "break"])
def test_injection_on_a_commit_base_survives_its_reopen(eng, tmp_path, kind):
    """A commit reopens its (read-only) base read-write: the blkdebug wrapper
    with its rules and break points stays on the node (it was dropped with
    the old driver, so the commit wrote the base as if nothing was set)."""
    import errno

    from blkjobs.jobs.blkdebug import Rule
    mkimg(tmp_path / "base.qcow2", writes=[("0x41", 0, SIZE)])
    top = mkimg(tmp_path / "top.qcow2", backing="base.qcow2", writes=[("0x61", 0, 1 * MiB)])
    t = eng.open(top, node_name="top")
    b = t.backing
    if kind == "rule":
        eng.blkdebug(b, [Rule("write", errno.EIO)])
        job = eng.commit("top", base_node=b.name, job_id="c0")
        assert eng.wait_job(job, 60).value == "failed"
        assert job.error == "Input/output error"
        return
    eng.blkdebug_break(b, "write_aio", "w")
    job = eng.commit("top", base_node=b.name, job_id="c0")
    held = eng.blkdebug_wait_break("w")
    assert (held.node, held.offset, held.length) == (b.name, 0, 1 * MiB)
    assert eng.query_jobs()[0]["status"] == "running"
    eng.blkdebug_resume("w")
    eng.wait_status(job, "ready", timeout=60)
    eng.job_complete("c0")
    assert eng.wait_job(job, 60).value == "completed"
