"""Error policies met through the fault-injection node, cancel in every state,
grouped transactions, and backup bitmap modes."""
from __future__ import annotations

import errno

import pytest

from blkjobs.jobs.blkdebug import Rule
from test_jobs_helpers import (SIZE, MiB, assert_same, chain3, eng, mkimg,  # noqa: F401
                               snapshot)

WRITES = [("0x11", 0, 1 * MiB), ("0x22", 2 * MiB + 4096, 300 << 10), ("0x33", 3 * MiB, 1 * MiB)]


def pair(eng, tmp_path, name="", fmt="qcow2"):
    src = mkimg(tmp_path / f"src{name}.{fmt}", fmt, writes=WRITES)
    dst = mkimg(tmp_path / f"dst{name}.{fmt}", fmt)
    expect = snapshot(src, fmt, tmp_path / f"expect{name}.raw")
    eng.open(src, fmt, node_name=f"src{name}")
    eng.open(dst, fmt, node_name=f"dst{name}")
    return src, dst, expect


def seq(ev, job_id):
    out = []
    for e in ev.events:
        d = e.data
        if d.get("id", d.get("device")) != job_id:
            continue
        if e.name == "JOB_STATUS_CHANGE":
            out.append(d["status"])
        elif e.name == "BLOCK_JOB_ERROR":
            out.append(f"ERROR:{d['operation']}:{d['action']}")
        else:
            out.append(e.name.removeprefix("BLOCK_JOB_") + (f":{d['error']}" if "error" in d else ""))
    return out


@pytest.mark.parametrize("side", ["source", "target"])
def test_backup_report(eng, tmp_path, side):
    src, dst, expect = pair(eng, tmp_path)
    node, op = ("src", "read") if side == "source" else ("dst", "write")
    eng.blkdebug(node, [Rule(op, errno.EIO, offset=2 * MiB, length=4096)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0")
    assert eng.wait_job(job, 20).value == "failed"
    s = seq(ev, "b0")
    assert f"ERROR:{op}:report" in s
    assert s[-3:] == ["COMPLETED:Input/output error", "concluded", "null"]


def test_backup_ignore_retries_and_succeeds(eng, tmp_path):
    src, dst, expect = pair(eng, tmp_path)
    eng.blkdebug("dst", [Rule("write", errno.EIO, offset=1 * MiB, once=True)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0", on_target_error="ignore")
    assert eng.wait_job(job, 20).value == "completed"
    assert "ERROR:write:ignore" in seq(ev, "b0")
    eng.close()
    assert_same(expect, dst, "raw", "qcow2")


@pytest.mark.parametrize("policy,err,io", [("stop", errno.EIO, "failed"),
                                           ("enospc", errno.ENOSPC, "nospace")])
def test_backup_stop_then_resume(eng, tmp_path, policy, err, io):
    src, dst, expect = pair(eng, tmp_path)
    eng.blkdebug("src", [Rule("read", err, offset=3 * MiB, once=True)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0", on_source_error=policy)
    eng.wait_status(job, "paused", timeout=20)
    info = eng.query_block_jobs()[0]
    assert info["io-status"] == io and info["paused"]
    eng.job_resume("b0")
    assert eng.wait_job(job, 20).value == "completed"
    assert seq(ev, "b0")[:5] == ["created", "running", "ERROR:read:stop", "paused", "running"]
    eng.close()
    assert_same(expect, dst, "raw", "qcow2")


def test_enospc_policy_reports_eio(eng, tmp_path):
    pair(eng, tmp_path)
    eng.blkdebug("dst", [Rule("write", errno.EIO)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0", on_target_error="enospc")
    assert eng.wait_job(job, 20).value == "failed"
    assert "ERROR:write:report" in seq(ev, "b0")


def test_backup_stop_then_cancel(eng, tmp_path):
    pair(eng, tmp_path)
    eng.blkdebug("dst", [Rule("write", errno.EIO)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0", on_target_error="stop")
    eng.wait_status(job, "paused", timeout=20)
    eng.job_cancel("b0")
    assert eng.wait_job(job, 20).value == "cancelled"
    assert seq(ev, "b0")[-3:] == ["CANCELLED", "concluded", "null"]


def test_flush_error_goes_through_policy(eng, tmp_path):
    pair(eng, tmp_path)
    eng.blkdebug("dst", [Rule("flush", errno.EIO, once=True)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0", on_target_error="stop")
    eng.wait_status(job, "paused", timeout=20)
    eng.job_resume("b0")
    assert eng.wait_job(job, 20).value == "completed"
    assert "ERROR:write:stop" in seq(ev, "b0")


def test_mirror_stop_resume_and_report(eng, tmp_path):
    src, dst, expect = pair(eng, tmp_path)
    eng.blkdebug("dst", [Rule("write", errno.EIO, offset=2 * MiB, once=True)])
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="full", job_id="m0", on_target_error="stop")
    eng.wait_status(job, "paused", timeout=20)
    eng.job_resume("m0")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    eng.job_cancel("m0", force=False)
    assert eng.wait_job(job, 20).value == "completed"
    eng.close()
    assert_same(expect, dst, "raw", "qcow2")


def test_stream_and_commit_report(eng, tmp_path):
    base, mid, top = chain3(tmp_path)
    t = eng.open(top, node_name="top")
    m = t.chain()[1]
    eng.blkdebug(m, [Rule("read", errno.EIO)])
    ev = eng.listen()
    job = eng.stream("top", job_id="s0")
    assert eng.wait_job(job, 20).value == "failed"
    assert "ERROR:read:report" in seq(ev, "s0")
    assert t.backing is m                         # abort: chain unchanged
    job = eng.commit("top", top_node=m.name, job_id="c0")
    assert eng.wait_job(job, 20).value == "failed"
    assert t.backing is m


def test_cancel_in_every_state(eng, tmp_path):
    pair(eng, tmp_path)
    ev = eng.listen()
    # created (never started): no block-job events
    job = eng.backup("src", "dst", sync="full", job_id="c", start=False)
    eng.job_cancel("c")
    assert seq(ev, "c") == ["created", "aborting", "concluded", "null"]
    # running
    eng.blkdebug_break("dst", "pwritev", "w")
    job = eng.backup("src", "dst", sync="full", job_id="r")
    eng.blkdebug_wait_break("w")
    eng.job_cancel("r")
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 20).value == "cancelled"
    # paused
    eng.blkdebug_break("dst", "pwritev", "w")
    job = eng.backup("src", "dst", sync="full", job_id="p")
    eng.blkdebug_wait_break("w")
    eng.job_pause("p")
    eng.blkdebug_resume("w")
    eng.wait_status(job, "paused", timeout=10)
    eng.job_cancel("p")
    assert eng.wait_job(job, 20).value == "cancelled"
    # pending (auto-finalize off)
    job = eng.backup("src", "dst", sync="full", job_id="d", auto_finalize=False,
                     auto_dismiss=False)
    eng.wait_status(job, "pending", timeout=20)
    eng.job_cancel("d")
    assert eng.wait_job(job, 20).value == "cancelled"
    assert eng.query_jobs()[0]["error"] == "Operation canceled"
    eng.job_dismiss("d")
    # ready / standby (mirror): forced cancel
    job = eng.mirror("src", "dst", sync="full", job_id="y")
    eng.wait_status(job, "ready", timeout=20)
    eng.job_pause("y")
    eng.wait_status(job, "standby", timeout=10)
    eng.job_cancel("y")
    assert eng.wait_job(job, 20).value == "cancelled"
    assert eng.jobs.internal_errors == []


def test_finalize_gate_and_no_graph_change_before(eng, tmp_path):
    base, mid, top = chain3(tmp_path)
    t = eng.open(top, node_name="top")
    m = t.chain()[1]
    job = eng.stream("top", job_id="s0", auto_finalize=False)
    eng.wait_status(job, "pending", timeout=20)
    assert t.backing is m                         # nothing changed yet
    eng.job_finalize("s0")
    assert eng.wait_job(job, 10).value == "completed"
    assert t.backing is not m


def test_grouped_transaction_one_target_fails(eng, tmp_path):
    exp = [pair(eng, tmp_path, str(i)) for i in range(3)]
    before = [snapshot(s, "qcow2", tmp_path / f"before{i}.raw") for i, (s, _, _) in enumerate(exp)]
    eng.blkdebug("dst1", [Rule("write", errno.EIO)])
    # all three held at their first write; j1 let go first, so j0 and j2 are
    # surely still running when it fails (unheld, j1 could fail and cancel
    # j2 before j2 reached its break point)
    for i in (0, 1, 2):
        eng.blkdebug_break(f"dst{i}", "write_aio", f"h{i}")
    ev = eng.listen()
    jobs = eng.transaction(
        [("backup", dict(device=f"src{i}", target=f"dst{i}", sync="full", job_id=f"j{i}"))
         for i in range(3)],
        completion_mode="grouped")
    for i in (0, 1, 2):
        eng.blkdebug_wait_break(f"h{i}")
    eng.blkdebug_resume("h1")
    eng.jobs.wait_until(lambda: jobs[0].cancel_requested and jobs[2].cancel_requested, 60)
    for i in (0, 2):
        eng.blkdebug_resume(f"h{i}")
    outcomes = [eng.wait_job(j, 30).value for j in jobs]
    assert outcomes == ["cancelled", "failed", "cancelled"]
    assert seq(ev, "j1")[-3] == "COMPLETED:Input/output error"
    for i in (0, 2):
        assert "CANCELLED" in seq(ev, f"j{i}")
    eng.close()
    for i, (s, _, _) in enumerate(exp):
        assert_same(before[i], s, "raw", "qcow2")   # sources untouched


def test_grouped_refuses_other_actions(eng, tmp_path):
    pair(eng, tmp_path)
    with pytest.raises(Exception, match="does not support transaction property "
                                        "completion-mode = grouped"):
        eng.transaction([("mirror", dict(device="src", target="dst", sync="full"))],
                        completion_mode="grouped")


def test_transaction_rollback_on_bad_action(eng, tmp_path):
    pair(eng, tmp_path)
    ev = eng.listen()
    with pytest.raises(Exception, match="Cannot find device=nope"):
        eng.transaction([("backup", dict(device="src", target="dst", sync="full", job_id="a")),
                         ("backup", dict(device="nope", target="dst", sync="full", job_id="b"))])
    assert seq(ev, "a") == ["created", "aborting", "concluded", "null"]
    assert eng.query_jobs() == []


# -- bitmaps -------------------------------------------------------------------

def dirty_setup(eng, tmp_path):
    src, dst, _ = pair(eng, tmp_path)
    bm = eng.block_dirty_bitmap_add("src", "bm0")
    vm = eng.attach("src")
    vm.write(1 * MiB, b"\xab" * 4096)
    vm.write(3 * MiB + 65536, b"\xcd" * 70000)
    return src, dst, bm, vm


def test_incremental_copies_only_dirty_and_consumes(eng, tmp_path):
    src, dst, bm, vm = dirty_setup(eng, tmp_path)
    n0 = bm.count()
    assert n0 == 3 * 65536
    expect = tmp_path / "exp.raw"
    expect.write_bytes(vm.read(0, SIZE))
    job = eng.backup("src", "dst", sync="incremental", bitmap="bm0", job_id="i0")
    assert eng.wait_job(job, 20).value == "completed"
    assert bm.count() == 0 and not bm.busy
    eng.close()
    got = open(snapshot(dst, "qcow2", tmp_path / "got.raw"), "rb").read()
    want = expect.read_bytes()
    for off, n in [(1 * MiB, 65536), (3 * MiB + 65536, 2 * 65536)]:
        assert got[off:off + n] == want[off:off + n]
    assert got[:1 * MiB] == bytes(1 * MiB)       # clean clusters were not copied


@pytest.mark.parametrize("mode,left", [("on-success", "all"), ("never", "all"),
                                       ("always", "uncopied")])
def test_bitmap_modes_on_failure(eng, tmp_path, mode, left):
    src, dst, bm, vm = dirty_setup(eng, tmp_path)
    n0 = bm.count()
    eng.blkdebug("dst", [Rule("write", errno.EIO, offset=3 * MiB)])
    job = eng.backup("src", "dst", sync="bitmap", bitmap="bm0", bitmap_mode=mode, job_id="i0")
    assert eng.wait_job(job, 20).value == "failed"
    if left == "all":
        assert bm.count() == n0
    else:
        assert 0 < bm.count() <= n0
    assert not bm.busy


def test_bitmap_never_keeps_and_successor_merges(eng, tmp_path):
    src, dst, bm, vm = dirty_setup(eng, tmp_path)
    n0 = bm.count()
    eng.blkdebug_break("dst", "write_aio", "w")
    job = eng.backup("src", "dst", sync="bitmap", bitmap="bm0", bitmap_mode="never",
                     job_id="i0")
    assert eng.blkdebug_wait_break("w").offset == 1 * MiB      # the first dirty cluster
    assert bm.busy
    vm.write(0, b"\x01" * 10)                      # recorded by the successor
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 20).value == "completed"
    assert bm.count() == n0 + 65536


@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_cbw_error_modes(eng, tmp_path, mode):
    src, dst, expect = pair(eng, tmp_path)
    vm = eng.attach("src")
    job = eng.backup("src", "dst", sync="none", job_id="b0", on_cbw_error=mode)
    eng.blkdebug("dst", [Rule("write", errno.ENOSPC)])
    if mode == "break-guest-write":
        with pytest.raises(OSError):
            vm.write(0, b"\xff" * 4096)
        assert vm.read(0, 4096) == b"\x11" * 4096      # nothing reached the source
        eng.job_cancel("b0")
        assert eng.wait_job(job, 10).value == "cancelled"
    else:
        vm.write(0, b"\xff" * 4096)                     # the guest write goes through
        assert vm.read(0, 4096) == b"\xff" * 4096
        assert eng.wait_job(job, 10).value == "failed"


def test_after_n_operations_front_end_and_job(eng, tmp_path):
    """Rule(after=N): the first N matching operations pass, then it fails
    (once: one time). Front-end requests count one each; a job counts one
    per batch it plans for the target, so a rate-limited backup (small
    batches) fails in the middle, stops, and resume retries the batch."""
    src, dst, expect = pair(eng, tmp_path)
    fe_node = mkimg(tmp_path / "fe.qcow2")
    eng.open(fe_node, node_name="fe")
    eng.blkdebug("fe", [Rule("write", errno.EIO, after=2, once=True)])
    vm = eng.attach(eng.node("fe"))
    vm.write(0, b"\x01" * 4096)
    vm.write(4096, b"\x02" * 4096)
    with pytest.raises(OSError) as ei:
        vm.write(8192, b"\x03" * 4096)
    assert ei.value.errno == errno.EIO
    vm.write(8192, b"\x03" * 4096)                   # once: the next one passes
    assert vm.read(0, 12288) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096

    eng.blkdebug("dst", [Rule("write", errno.EIO, after=2, once=True)])
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0", on_target_error="stop",
                     speed=10 * MiB)                  # batches of 1 MiB
    eng.wait_status(job, "paused", timeout=20)
    [info] = eng.query_block_jobs()
    assert 0 < info["offset"] < info["len"]           # it failed in the middle
    assert info["io-status"] == "failed" and info["paused"]
    eng.job_resume("b0")
    assert eng.wait_job(job, 30).value == "completed"
    s = seq(ev, "b0")
    assert s.count("ERROR:write:stop") == 1
    eng.close()
    assert_same(expect, dst, "raw", "qcow2")
