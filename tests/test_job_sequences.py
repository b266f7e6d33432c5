"""The worked event sequences of docs/job-model.md, checked token by token (see
blkjobs.jobmodel.testing.compact: statuses are lower case, BLOCK_JOB_* events upper)."""
from __future__ import annotations

import errno
import io
import json

import pytest

from blkjobs.errors import JobError
from blkjobs.jobmodel import (JOB_STATUS_CHANGE, FakeClock, JobOutcome, JobStatus, JobTxn,
                         JsonLinesWriter, SystemClock)
from blkjobs.jobmodel.testing import ReadyDriver, Recorder, StepDriver

S = JobStatus
T = 5
OK_TAIL = ["waiting", "pending", "COMPLETED", "concluded", "null"]
CANCEL_TAIL = ["aborting", "CANCELLED", "concluded", "null"]


def consistent(rec: Recorder) -> None:
    """Events and transitions match one to one; no hidden bug."""
    evs = [(e.data["id"], e.data["status"]) for e in rec.listener.events
           if e.name == JOB_STATUS_CHANGE]
    assert evs == [(i, new.value) for i, old, new in rec.transitions if i is not None]
    assert rec.mgr.internal_errors == [] and rec.mgr.events.errors == []


def gone(rec, *jobs):
    rec.mgr.wait_until(lambda: all(j.status is S.NULL for j in jobs), T)


def test_auto_finalize_auto_dismiss():
    rec = Recorder()
    d = StepDriver(2)
    job = rec.job(d, "b0")
    d.allow(2)
    gone(rec, job)
    assert rec.seq("b0") == ["created", "running"] + OK_TAIL
    assert d.log == ["speed=0", "run", "prepare", "commit", "clean"]
    assert job.outcome is JobOutcome.COMPLETED and job.error is None
    ev = rec.listener.wait_for("BLOCK_JOB_COMPLETED")
    assert ev.data == {"type": "backup", "device": "b0", "len": 2, "offset": 2, "speed": 0}
    consistent(rec)


def test_manual_finalize_and_dismiss():
    rec = Recorder()
    d = StepDriver(1, gated=False)
    job = rec.job(d, "b0", auto_finalize=False, auto_dismiss=False)
    rec.mgr.wait_until(lambda: job.status is S.PENDING, T)
    rec.idle()
    assert rec.seq("b0") == ["created", "running", "waiting", "pending", "PENDING"]
    assert rec.listener.wait_for("BLOCK_JOB_PENDING").data == {"type": "backup", "id": "b0"}
    assert "prepare" not in d.log                 # nothing irreversible before finalize
    rec.mgr.job_finalize("b0")
    assert rec.seq("b0")[5:] == ["COMPLETED", "concluded"]
    assert rec.mgr.query_jobs() == [{"id": "b0", "type": "backup", "status": "concluded",
                                     "current-progress": 1, "total-progress": 1}]
    with pytest.raises(JobError, match=r"^Job ID 'b0' already in use$"):
        rec.mgr.create(StepDriver(), "b0")
    rec.mgr.job_dismiss("b0")
    assert rec.seq("b0")[-1] == "null" and rec.mgr.query_jobs() == []
    rec.mgr.create(StepDriver(), "b0")            # the id is free again
    consistent(rec)


def test_ready_then_complete():
    rec = Recorder()
    d = ReadyDriver(2, step_size=512, gated=False)
    job = rec.job(d, "m0")
    ev = rec.listener.wait_for("BLOCK_JOB_READY", timeout=T)
    assert ev.data == {"type": "mirror", "device": "m0", "len": 1024, "offset": 1024,
                       "speed": 0}
    rec.idle()
    assert rec.mgr.query_block_jobs()[0]["ready"] is True
    assert rec.mgr.query_block_jobs()[0]["actively-synced"] is True
    rec.mgr.job_complete("m0")
    gone(rec, job)
    assert rec.seq("m0") == ["created", "running", "ready", "READY"] + OK_TAIL
    assert d.log[-4:] == ["prepare", "pivot", "commit", "clean"]
    consistent(rec)


@pytest.mark.parametrize("standby", [False, True])
def test_soft_cancel_in_ready_finishes_without_pivot(standby):
    rec = Recorder()
    d = ReadyDriver(1, gated=False)
    job = rec.job(d, "m0")
    rec.listener.wait_for("BLOCK_JOB_READY", timeout=T)
    rec.idle()
    if standby:                   # an internal pause: the user's soft cancel is allowed
        job.pause()
        rec.idle()
        rec.mgr.block_job_cancel("m0", force=False)
        rec.idle()
        assert job.status is S.STANDBY    # soft: the internal pause still holds it
        job.resume()
    else:
        rec.mgr.block_job_cancel("m0", force=False)
    gone(rec, job)
    mid = ["standby", "ready"] if standby else []
    assert rec.seq("m0") == ["created", "running", "ready", "READY"] + mid + OK_TAIL
    assert "pivot" not in d.log and "commit" in d.log
    assert job.outcome is JobOutcome.COMPLETED and job.error is None
    consistent(rec)


def test_soft_cancel_after_the_worker_finished_is_ignored():
    rec = Recorder()
    d = ReadyDriver(1, gated=False)
    job = rec.job(d, "m0", auto_finalize=False)
    rec.listener.wait_for("BLOCK_JOB_READY", timeout=T)
    rec.mgr.job_complete("m0")
    rec.mgr.wait_until(lambda: job.status is S.PENDING, T)
    rec.mgr.block_job_cancel("m0", force=False)
    assert job.status is S.PENDING and not job.cancel_requested
    rec.mgr.job_finalize("m0")
    assert rec.seq("m0")[-5:] == ["pending", "PENDING", "COMPLETED", "concluded", "null"]
    consistent(rec)


def _in_state(rec, state):
    """Job 'j' (and maybe a partner) parked in ``state`` with nothing moving."""
    mgr = rec.mgr
    if state is S.CREATED:
        return mgr.create(StepDriver(), "j"), None
    if state in (S.RUNNING, S.PAUSED):
        job = rec.job(StepDriver(), "j")
        rec.idle()
        if state is S.PAUSED:
            mgr.job_pause("j")
    elif state in (S.READY, S.STANDBY):
        job = rec.job(ReadyDriver(1, gated=False), "j")
        rec.listener.wait_for("BLOCK_JOB_READY", timeout=T)
        if state is S.STANDBY:
            mgr.job_pause("j")
    elif state is S.WAITING:
        txn = JobTxn("grouped")
        partner = rec.job(StepDriver(), "p", txn=txn)
        job = rec.job(StepDriver(1, gated=False), "j", txn=txn)
        rec.idle()
        return job, partner
    else:
        job = rec.job(StepDriver(1, gated=False), "j", auto_finalize=False)
    rec.idle()
    assert job.status is state
    return job, None


PREFIX = {
    S.CREATED: ["created"],
    S.RUNNING: ["created", "running"],
    S.PAUSED: ["created", "running", "paused", "running"],
    S.READY: ["created", "running", "ready", "READY"],
    S.STANDBY: ["created", "running", "ready", "READY", "standby", "ready"],
    S.WAITING: ["created", "running", "waiting"],
    S.PENDING: ["created", "running", "waiting", "pending", "PENDING"],
}


@pytest.mark.parametrize("how", ["job-cancel", "block-job-cancel-force", "soft"])
@pytest.mark.parametrize("state", list(PREFIX), ids=[s.value for s in PREFIX])
def test_cancel_in_each_state(state, how):
    rec = Recorder()
    job, partner = _in_state(rec, state)
    if how == "job-cancel":
        rec.mgr.job_cancel("j")
    elif how == "soft" and state in (S.PAUSED, S.STANDBY):
        with pytest.raises(JobError, match=r"^The block job for device 'j' is currently paused$"):
            rec.mgr.block_job_cancel("j")
        return
    else:
        rec.mgr.block_job_cancel("j", force=how != "soft")
    gone(rec, job, *([partner] if partner else []))
    if how == "soft" and state is S.READY:
        assert rec.seq("j") == PREFIX[state] + OK_TAIL          # stays soft
        return
    if state is S.CREATED:        # never started: no block-job events
        assert rec.seq("j") == ["created", "aborting", "concluded", "null"]
        assert job.driver.log == ["speed=0", "abort", "clean"]
    else:
        assert rec.seq("j") == PREFIX[state] + CANCEL_TAIL
        assert job.driver.log[-2:] == ["abort", "clean"] and "commit" not in job.driver.log
    if partner:                   # cancelling a waiting member cancels its transaction
        assert rec.seq("p") == ["created", "running"] + CANCEL_TAIL
    assert job.outcome is JobOutcome.CANCELLED and job.error == "Operation canceled"
    consistent(rec)


def test_pause_counter_nesting_user_and_internal():
    rec = Recorder()
    mgr = rec.mgr
    d = StepDriver(2)
    job = rec.job(d, "j")
    rec.idle()
    mgr.job_pause("j")
    assert mgr.query_block_jobs()[0]["paused"] is True       # as soon as requested
    rec.idle()
    assert job.status is S.PAUSED
    with pytest.raises(JobError, match=r"^Job is already paused$"):
        mgr.job_pause("j")
    job.pause()                               # internal pause on top
    job.pause()
    d.allow(2)
    mgr.job_resume("j")                       # the user's resume ...
    rec.idle()
    assert job.status is S.PAUSED and job.pause_count == 2     # ... does not override
    assert job.progress.current == 0           # no progress while paused
    with pytest.raises(JobError, match=r"^Can't resume a job that was not paused$"):
        mgr.job_resume("j")
    job.resume()
    mgr.job_pause("j")                        # internal resumes never undo the user's
    job.resume()
    rec.idle()
    assert job.status is S.PAUSED and job.user_paused
    with pytest.raises(RuntimeError):
        job.resume()                          # no internal pause left
    mgr.job_resume("j")
    gone(rec, job)
    assert rec.seq("j") == ["created", "running", "paused", "running"] + OK_TAIL
    consistent(rec)


def test_pause_in_created_parks_at_first_pause_point():
    rec = Recorder()
    job = rec.job(StepDriver(1, gated=False), "j", start=False)
    rec.mgr.job_pause("j")
    assert job.pause_count == 2
    rec.mgr.start(job)
    rec.idle()
    assert job.status is S.PAUSED
    rec.mgr.job_resume("j")
    gone(rec, job)
    assert rec.seq("j") == ["created", "running", "paused", "running"] + OK_TAIL


def _grouped(rec, a_kw, b_kw, **job_kw):
    txn = JobTxn("grouped")
    a, b = StepDriver(**a_kw), StepDriver(**b_kw)
    ja = rec.job(a, "a", txn=txn, start=False, **job_kw)
    jb = rec.job(b, "b", txn=txn, start=False)
    rec.mgr.start_txn(txn)        # started together, as a committed QMP transaction
    return a, b, ja, jb


def test_grouped_one_fails_while_other_runs():
    rec = Recorder()
    a, b, ja, jb = _grouped(rec, {"steps": 1, "fail_at": 0}, {"steps": 2})
    b.allow(1)
    rec.idle()
    a.allow(1)
    gone(rec, ja, jb)
    assert rec.seq("a") == ["created", "running", "ERROR:write:report", "aborting",
                            "COMPLETED:Input/output error", "concluded", "null"]
    assert rec.seq("b") == ["created", "running"] + CANCEL_TAIL
    for d in (a, b):
        assert d.log[-2:] == ["abort", "clean"] and "commit" not in d.log
        assert "prepare" not in d.log
    assert ja.outcome is JobOutcome.FAILED and jb.outcome is JobOutcome.CANCELLED
    consistent(rec)


def test_grouped_one_fails_while_other_waits():
    rec = Recorder()
    a, b, ja, jb = _grouped(rec, {"steps": 1, "fail_at": 0}, {"steps": 1, "gated": False})
    rec.mgr.wait_until(lambda: jb.status is S.WAITING, T)
    rec.idle()
    a.allow(1)
    gone(rec, ja, jb)
    assert rec.seq("b") == ["created", "running", "waiting"] + CANCEL_TAIL
    assert rec.seq("a")[-4:] == ["aborting", "COMPLETED:Input/output error", "concluded",
                                 "null"]
    assert b.log[-2:] == ["abort", "clean"] and "commit" not in b.log
    consistent(rec)


def test_grouped_prepare_fails_while_pending():
    rec = Recorder()
    a, b, ja, jb = _grouped(rec, {"steps": 1, "gated": False, "prepare_error": errno.EIO},
                            {"steps": 1, "gated": False})
    gone(rec, ja, jb)
    assert rec.seq("a") == ["created", "running", "waiting", "pending", "aborting",
                            "COMPLETED:Input/output error", "concluded", "null"]
    assert rec.seq("b") == ["created", "running", "waiting", "pending"] + CANCEL_TAIL
    # list order is newest first: b prepared (and succeeded) before a failed
    assert b.log[-3:] == ["prepare", "abort", "clean"]
    assert a.log[-3:] == ["prepare", "abort", "clean"]
    consistent(rec)


def test_grouped_cancel_while_pending_and_mixed_auto_finalize():
    rec = Recorder()
    a, b, ja, jb = _grouped(rec, {"steps": 1, "gated": False}, {"steps": 1, "gated": False},
                            auto_finalize=False)
    rec.mgr.wait_until(lambda: ja.status is S.PENDING and jb.status is S.PENDING, T)
    rec.idle()
    # one manual member holds the automatic one in pending; only it gets PENDING
    assert [t for t in rec.all() if t.endswith("PENDING")] == ["a:PENDING"]
    rec.mgr.job_cancel("b")
    gone(rec, ja, jb)
    assert rec.seq("b") == ["created", "running", "waiting", "pending"] + CANCEL_TAIL
    assert rec.seq("a") == ["created", "running", "waiting", "pending", "PENDING"] + CANCEL_TAIL
    assert "commit" not in a.log + b.log
    consistent(rec)


def test_grouped_finalize_on_any_member_finalizes_all():
    rec = Recorder()
    a, b, ja, jb = _grouped(rec, {"steps": 1, "gated": False}, {"steps": 1, "gated": False},
                            auto_finalize=False)
    shared: list[str] = []
    a.log = b.log = shared
    rec.mgr.wait_until(lambda: ja.status is S.PENDING and jb.status is S.PENDING, T)
    rec.mgr.job_finalize("b")
    gone(rec, ja, jb)
    # every prepare before any commit; each job commit then clean
    assert [x for x in shared if x in ("prepare", "commit", "clean")] == [
        "prepare", "prepare", "commit", "clean", "commit", "clean"]
    assert rec.all()[-6:] == ["b:COMPLETED", "b:concluded", "b:null",
                              "a:COMPLETED", "a:concluded", "a:null"]
    consistent(rec)


def test_individual_transaction_members_finish_on_their_own():
    rec = Recorder()
    txn = JobTxn("individual")
    a = StepDriver(1, fail_at=0)
    b = StepDriver(1)
    ja = rec.job(a, "a", txn=txn, start=False)
    jb = rec.job(b, "b", txn=txn, start=False)
    rec.mgr.start_txn(txn)
    a.allow(1)
    gone(rec, ja)
    rec.idle()
    assert jb.status is S.RUNNING
    b.allow(1)
    gone(rec, jb)
    assert rec.seq("b") == ["created", "running"] + OK_TAIL
    assert b.log[-2:] == ["commit", "clean"] and a.log[-2:] == ["abort", "clean"]
    consistent(rec)


@pytest.mark.parametrize("mode", ["individual", "grouped"])
def test_transaction_rollback_of_created_jobs(mode):
    rec = Recorder()
    txn = JobTxn(mode)
    ds = [StepDriver() for _ in range(3)]
    # a job that never started is dismissed at once, whatever auto-dismiss says
    jobs = [rec.job(d, f"j{i}", txn=txn, start=False, auto_dismiss=False)
            for i, d in enumerate(ds)]
    rec.mgr.rollback_txn(txn)
    assert all(j.status is S.NULL for j in jobs)
    for i, d in enumerate(ds):
        assert rec.seq(f"j{i}") == ["created", "aborting", "concluded", "null"]
        assert d.log == ["speed=0", "abort", "clean"]
    consistent(rec)


def test_early_failure_created_to_null():
    rec = Recorder()
    with pytest.raises(JobError) as e:
        rec.mgr.create(StepDriver(), "j", speed=-1)
    assert str(e.value) == "Parameter 'speed' expects a non-negative value"
    assert rec.seq("j") == ["created", "null"]
    assert rec.mgr.query_jobs() == []
    job = rec.mgr.create(StepDriver(), "j")
    rec.mgr.abandon(job)                      # a later setup step failed
    assert rec.seq("j") == ["created", "null", "created", "null"]
    consistent(rec)


@pytest.mark.parametrize("job_id,kw,msg", [
    ("1abc", {}, "Invalid job ID '1abc'"),
    ("", {}, "Invalid job ID ''"),
    ("a b", {}, "Invalid job ID 'a b'"),
    ("é", {}, "Invalid job ID 'é'"),
    (None, {}, "An explicit job ID is required"),
    ("x", {"internal": True}, "Cannot specify job ID for internal job"),
])
def test_creation_id_errors(job_id, kw, msg):
    rec = Recorder()
    with pytest.raises(JobError) as e:
        rec.mgr.create(StepDriver(), job_id, **kw)
    assert str(e.value) == msg and rec.listener.events == []


def test_good_ids_and_duplicates():
    rec = Recorder()
    rec.mgr.create(StepDriver(), "a-b.c_9")
    with pytest.raises(JobError, match=r"^Job ID 'a-b\.c_9' already in use$"):
        rec.mgr.create(StepDriver(), "a-b.c_9")


def test_internal_job_is_silent_and_unlisted():
    rec = Recorder()
    d = StepDriver(1, gated=False, fail_at=0, policy="ignore")
    job = rec.job(d, None, internal=True)
    rec.mgr.wait_until(lambda: job.status is S.NULL, T)
    assert rec.listener.events == [] and rec.mgr.query_jobs() == []
    assert [t[2].value for t in rec.transitions] == [
        "created", "running", "waiting", "pending", "concluded", "null"]


@pytest.mark.parametrize("policy,err,action,io,tail", [
    ("report", errno.EIO, "report", None, ["aborting", "COMPLETED:Input/output error",
                                            "concluded", "null"]),
    ("ignore", errno.EIO, "ignore", None, OK_TAIL),
    ("stop", errno.EIO, "stop", "failed", ["paused", "running"] + OK_TAIL),
    ("stop", errno.ENOSPC, "stop", "nospace", ["paused", "running"] + OK_TAIL),
    ("enospc", errno.ENOSPC, "stop", "nospace", ["paused", "running"] + OK_TAIL),
    ("enospc", errno.EIO, "report", None, ["aborting", "COMPLETED:Input/output error",
                                            "concluded", "null"]),
    ("auto", errno.ENOSPC, "stop", "nospace", ["paused", "running"] + OK_TAIL),
    ("auto", errno.EIO, "report", None, ["aborting", "COMPLETED:Input/output error",
                                          "concluded", "null"]),
])
@pytest.mark.parametrize("op", ["read", "write"])
def test_error_policies(policy, err, action, io, tail, op):
    rec = Recorder()
    d = StepDriver(2, fail_at=1, fail_errno=err, policy=policy, operation=op)
    job = rec.job(d, "j")
    d.allow(2)
    if io is not None:
        rec.mgr.wait_until(lambda: job.status is S.PAUSED, T)
        info = rec.mgr.query_block_jobs()[0]
        assert info["io-status"] == io and info["paused"] is True and job.user_paused
        rec.mgr.job_resume("j")             # resets the io-status and retries
        assert job.io_status.value == "ok"
    gone(rec, job)
    ev = rec.listener.wait_for("BLOCK_JOB_ERROR")
    assert ev.data == {"device": "j", "operation": op, "action": action}
    assert rec.seq("j") == ["created", "running", f"ERROR:{op}:{action}"] + tail
    assert job.progress.current == (1 if action == "ignore" else 2 if action == "stop" else 1)
    consistent(rec)


def test_query_fields_order_and_error():
    rec = Recorder()
    d = StepDriver(1, fail_at=0)
    m = ReadyDriver(1, gated=False)
    job = rec.job(d, "b0", auto_dismiss=False)
    rec.job(m, "m0")
    rec.listener.wait_for("BLOCK_JOB_READY", timeout=T)
    rec.idle()
    jobs = rec.mgr.query_block_jobs()
    assert [j["device"] for j in jobs] == ["m0", "b0"]           # newest first, as QEMU
    assert list(jobs[0]) == ["type", "device", "len", "offset", "busy", "paused", "speed",
                             "io-status", "ready", "status", "auto-finalize", "auto-dismiss",
                             "actively-synced"]
    assert jobs[1] == {"type": "backup", "device": "b0", "len": 1, "offset": 0, "busy": False,
                       "paused": False, "speed": 0, "io-status": "ok", "ready": False,
                       "status": "running", "auto-finalize": True, "auto-dismiss": False}
    d.allow(1)
    rec.mgr.wait_until(lambda: job.status is S.CONCLUDED, T)
    info = [j for j in rec.mgr.query_jobs() if j["id"] == "b0"][0]
    assert list(info) == ["id", "type", "status", "current-progress", "total-progress", "error"]
    assert info["error"] == "Input/output error" and job.outcome is JobOutcome.FAILED
    rec.mgr.job_cancel("m0")
    rec.mgr.job_dismiss("b0")
    consistent(rec)


def test_json_lines_and_timestamps():
    clock = FakeClock(start_ns=0, epoch=1_700_000_000.25)
    rec = Recorder(clock)
    out = io.StringIO()
    rec.mgr.add_listener(JsonLinesWriter(out))
    rec.mgr.create(StepDriver(), "j")
    clock.advance(1_500_000_123)
    rec.mgr.job_cancel("j")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == {"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "created"},
                        "timestamp": {"seconds": 1_700_000_000, "microseconds": 250_000}}
    assert lines[1]["timestamp"] == {"seconds": 1_700_000_001, "microseconds": 750_000}
    assert list(json.loads(out.getvalue().splitlines()[0])) == ["event", "data", "timestamp"]
    assert [e["data"]["status"] for e in lines] == ["created", "aborting", "concluded", "null"]
    sec, usec = SystemClock().wall()
    assert sec > 1_600_000_000 and 0 <= usec < 1_000_000


class Sleeper(StepDriver):
    """Sleeps 10 s of clock time per step (a rate limit)."""

    def run(self, job):
        self.job = job
        job.progress.update(0, self.steps)
        for _ in range(self.steps):
            job.sleep(10_000_000_000)
            job.progress.advance(1)


def test_sleep_uses_the_injected_clock():
    clock = FakeClock()
    rec = Recorder(clock)
    job = rec.job(Sleeper(2), "j")
    rec.idle()
    assert job.progress.current == 0 and not job.busy
    clock.advance(10_000_000_000)
    rec.mgr.wait_until(lambda: job.progress.current == 1, T)
    rec.mgr.block_job_set_speed("j", 100)          # raised from unlimited: kicks the sleeper
    gone(rec, job)
    assert clock.monotonic_ns() == 10_000_000_000
    assert job.driver.log[:2] == ["speed=0", "speed=100"]


def test_sleep_auto_advancing_clock_runs_at_once():
    clock = FakeClock(auto_advance=True)
    rec = Recorder(clock)
    job = rec.job(Sleeper(3), "j")
    gone(rec, job)
    assert clock.monotonic_ns() >= 30_000_000_000


def test_progress_rules():
    rec = Recorder()
    job = rec.mgr.create(StepDriver(), "j")
    job.progress.update(10, 100)
    job.progress.grow(50)
    job.progress.update(total=120)
    job.progress.advance(5)
    assert job.progress.snapshot() == (15, 120)
    with pytest.raises(ValueError):
        job.progress.update(3)
