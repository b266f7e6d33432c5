"""Every cell of the verb table on real jobs, through the QMP verbs by id, with
the extra refusals of docs/job-model.md §4 in their places."""
from __future__ import annotations

import errno
import threading

import pytest

from blkjobs.errors import JobError
from blkjobs.jobmodel import JobDriver, JobStatus, JobTxn, JobVerb, VERBS
from blkjobs.jobmodel.testing import ReadyDriver, Recorder, StepDriver

S = JobStatus
TIMEOUT = 5


class Holder(JobDriver):
    """Runs without pause points, so it stays in its state until released;
    optionally becomes ready first, pauses itself, or fails at the end."""

    job_type = "backup"
    block_job = True

    def __init__(self, mgr, ready=False, self_pause=False, hold=True, fail=False):
        self.mgr, self.ready, self.self_pause = mgr, ready, self_pause
        self.hold, self.fail = hold, fail
        self.release = threading.Event()
        self.reached = threading.Event()

    def run(self, job):
        if self.ready:
            job.set_ready()
        if self.self_pause:
            self.mgr.user_pause(job)
        self.reached.set()
        if self.hold:
            assert self.release.wait(TIMEOUT)
        if self.fail:
            raise OSError(errno.EIO, "x")

    def cancel(self, job, force):
        return force or not job.is_ready

    def complete(self, job):
        pass


def make(rec: Recorder, state: S, user_paused: bool):
    """A job 'j' in ``state``; ``user_paused`` says whether it holds a user pause.
    Returns (job, cleanup)."""
    mgr = rec.mgr
    helpers = []

    def hold_job(**kw):
        d = Holder(mgr, self_pause=user_paused, **kw)
        helpers.append(d)
        return d

    if state is S.CREATED:
        job = mgr.create(StepDriver(), "j")
        if user_paused:
            mgr.job_pause("j")
    elif state in (S.RUNNING, S.READY):
        d = hold_job(ready=state is S.READY)
        job = rec.job(d, "j")
        assert d.reached.wait(TIMEOUT)
    elif state in (S.PAUSED, S.STANDBY):
        d = (ReadyDriver(1, gated=False) if state is S.STANDBY else StepDriver())
        helpers.append(d)
        job = rec.job(d, "j")
        if state is S.STANDBY:
            rec.listener.wait_for("BLOCK_JOB_READY", timeout=TIMEOUT)
        rec.idle()
        if user_paused:
            mgr.job_pause("j")
        else:
            job.pause()                      # an internal pause parks it too
        rec.idle()
    elif state in (S.WAITING, S.ABORTING):
        # the partner runs without pause points, so even a cancel cannot stop
        # it: the transaction stays unfinished and 'j' stays where it is
        txn = JobTxn("grouped")
        partner = Holder(mgr)
        helpers.append(partner)
        rec.job(partner, "partner", txn=txn)
        job = rec.job(hold_job(hold=False, fail=state is S.ABORTING), "j", txn=txn)
        mgr.wait_until(lambda: job.status is state, TIMEOUT)
    else:
        job = rec.job(hold_job(hold=False), "j", auto_finalize=state is not S.PENDING,
                      auto_dismiss=state is not S.CONCLUDED)
        rec.idle()
    assert job.status is state
    assert job.user_paused is user_paused

    def cleanup():
        for d in helpers:
            if isinstance(d, Holder):
                d.release.set()
            else:
                d.allow(100)
        for j in mgr.jobs():
            try:
                mgr.cancel_job(j, force=True)
            except JobError:
                pass
        for j in mgr.jobs():
            if j.status is S.PENDING:
                mgr.finalize_job(j)
        rec.mgr.wait_until(lambda: all(j.status in (S.CONCLUDED, S.NULL) or not j.started
                                       for j in mgr.jobs()), TIMEOUT)
        assert mgr.internal_errors == []

    return job, cleanup


def expected_error(verb: JobVerb, state: S, user_paused: bool) -> str | None:
    """What docs/job-model.md says the verb answers (None: accepted)."""
    table = f"Job 'j' in state '{state.value}' cannot accept command verb '{verb.value}'"
    if verb is JobVerb.RESUME and not user_paused:
        return "Can't resume a job that was not paused"      # checked before the table
    if state not in VERBS[verb]:
        return table
    if verb is JobVerb.PAUSE and user_paused:
        return "Job is already paused"
    if verb is JobVerb.CHANGE:
        return "Job type does not support change"
    return None


def apply(mgr, verb: JobVerb) -> None:
    {JobVerb.CANCEL: lambda: mgr.job_cancel("j"),
     JobVerb.PAUSE: lambda: mgr.job_pause("j"),
     JobVerb.RESUME: lambda: mgr.job_resume("j"),
     JobVerb.SET_SPEED: lambda: mgr.block_job_set_speed("j", 1000),
     JobVerb.COMPLETE: lambda: mgr.job_complete("j"),
     JobVerb.FINALIZE: lambda: mgr.job_finalize("j"),
     JobVerb.DISMISS: lambda: mgr.job_dismiss("j"),
     JobVerb.CHANGE: lambda: mgr.block_job_change("j", "backup")}[verb]()


STATES = [S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING,
          S.ABORTING, S.CONCLUDED]


@pytest.mark.parametrize("user_paused", [False, True], ids=["plain", "user-paused"])
@pytest.mark.parametrize("state", STATES, ids=[s.value for s in STATES])
@pytest.mark.parametrize("verb", list(JobVerb), ids=[v.value for v in JobVerb])
def test_verb_cell(verb, state, user_paused):
    rec = Recorder()
    job, cleanup = make(rec, state, user_paused)
    try:
        want = expected_error(verb, state, user_paused)
        before = rec.all()
        if want is None:
            apply(rec.mgr, verb)
        else:
            with pytest.raises(JobError) as e:
                apply(rec.mgr, verb)
            assert str(e.value) == want
            assert e.value.qmp_class == "GenericError"
            assert job.status is state                      # a refusal changes nothing
            assert job.user_paused is user_paused
            assert rec.all() == before
    finally:
        cleanup()


def test_accepted_cells_have_their_effect():
    rec = Recorder()
    job, cleanup = make(rec, S.RUNNING, False)
    rec.mgr.job_pause("j")
    assert job.user_paused and job.pause_count == 1
    rec.mgr.job_resume("j")
    assert not job.user_paused and job.pause_count == 0
    rec.mgr.block_job_set_speed("j", 1000)
    assert job.speed == 1000
    cleanup()


def test_unknown_and_dismissed_ids():
    rec = Recorder()
    mgr = rec.mgr
    for fn in (mgr.job_cancel, mgr.job_pause, mgr.job_resume, mgr.job_complete,
               mgr.job_finalize, mgr.job_dismiss):
        with pytest.raises(JobError) as e:
            fn("nope")
        assert str(e.value) == "Job not found" and e.value.qmp_class == "GenericError"
    for fn in (mgr.block_job_cancel, mgr.block_job_pause, mgr.block_job_resume,
               mgr.block_job_complete, mgr.block_job_finalize, mgr.block_job_dismiss,
               lambda d: mgr.block_job_set_speed(d, 1),
               lambda d: mgr.block_job_change(d, "mirror")):
        with pytest.raises(JobError) as e:
            fn("nope")
        assert str(e.value) == "Block job 'nope' not found"
        assert e.value.qmp_class == "DeviceNotActive"
    # a job in null is gone: its id is not found any more
    d = StepDriver(1, gated=False)
    rec.job(d, "gone")
    mgr.wait_until(lambda: rec.seq("gone")[-1:] == ["null"])
    with pytest.raises(JobError, match=r"^Job not found$"):
        mgr.job_dismiss("gone")


def test_block_job_verbs_do_not_find_non_block_jobs():
    class Generic(StepDriver):
        job_type = "create"
        block_job = False

    rec = Recorder()
    job = rec.mgr.create(Generic(), "g")
    with pytest.raises(JobError, match=r"^Block job 'g' not found$"):
        rec.mgr.block_job_pause("g")
    rec.mgr.job_pause("g")                      # the job-* spelling finds it
    assert [i["id"] for i in rec.mgr.query_jobs()] == ["g"]
    assert rec.mgr.query_block_jobs() == []
    rec.mgr.job_cancel("g")
    assert job.status is S.NULL


def test_block_job_cancel_of_user_paused_job_needs_force():
    rec = Recorder()
    job, cleanup = make(rec, S.PAUSED, True)
    with pytest.raises(JobError) as e:
        rec.mgr.block_job_cancel("j")
    assert str(e.value) == "The block job for device 'j' is currently paused"
    assert job.status is S.PAUSED and job.user_paused
    rec.mgr.block_job_cancel("j", force=True)
    rec.mgr.wait_until(lambda: job.status is S.NULL)
    assert rec.seq("j")[-6:] == ["paused", "running", "aborting", "CANCELLED", "concluded",
                                 "null"]
    cleanup()


def test_complete_refusals():
    rec = Recorder()
    # a type without a complete operation, in ready
    class NoComplete(Holder):
        complete = JobDriver.complete
    d = NoComplete(rec.mgr, ready=True)
    job = rec.job(d, "j")
    assert d.reached.wait(TIMEOUT)
    with pytest.raises(JobError, match=r"^The active block job 'j' cannot be completed$"):
        rec.mgr.job_complete("j")
    assert not job.should_complete
    d.release.set()
    # a job with a pending (soft) cancel request
    d2 = Holder(rec.mgr, ready=True)
    job2 = rec.job(d2, "k")
    assert d2.reached.wait(TIMEOUT)
    rec.mgr.block_job_cancel("k", force=False)
    assert job2.cancel_requested and not job2.is_cancelled
    with pytest.raises(JobError, match=r"^The active block job 'k' cannot be completed$"):
        rec.mgr.block_job_complete("k")
    d2.release.set()
    rec.mgr.wait_until(lambda: job.status is S.NULL and job2.status is S.NULL)
    assert rec.seq("k")[-4:] == ["pending", "COMPLETED", "concluded", "null"]


def test_speed_refusal_and_change_hook():
    class Changeable(StepDriver):
        def change(self, job, options):
            self.log.append(options)

    rec = Recorder()
    d = Changeable()
    job = rec.job(d, "j", start=False)
    with pytest.raises(JobError) as e:
        rec.mgr.block_job_set_speed("j", -1)
    assert str(e.value) == "Parameter 'speed' expects a non-negative value"
    assert job.speed == 0
    rec.mgr.block_job_change("j", "backup", **{"copy-mode": "write-blocking"})
    assert d.log[-1] == {"type": "backup", "copy-mode": "write-blocking"}
    rec.mgr.job_cancel("j")
