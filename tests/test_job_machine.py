"""Random verbs and random failures into transactions of 1-4 small test jobs.

After every step (once every runner is parked, sleeping or done -- with a
timeout, so a deadlock fails instead of hanging): every verb answered as the
tables say, only legal edges were taken, events match transitions one to one,
hooks ran in their contract, and at the end every job concluded and went to
null."""
from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blkjobs.errors import JobError
from blkjobs.jobmodel import JOB_STATUS_CHANGE, TRANSITIONS, VERBS, JobStatus, JobTxn, JobVerb
from blkjobs.jobmodel.testing import ReadyDriver, Recorder, StepDriver, event_job_id

S = JobStatus
T = 5.0
MAX_JOBS = 8

job_spec = st.fixed_dictionaries({
    "ready": st.booleans(),
    "gated": st.booleans(),
    "steps": st.integers(1, 2),
    "fail_at": st.sampled_from([None, None, 0, 1]),
    "policy": st.sampled_from(["report", "stop", "ignore", "enospc"]),
    "fail_errno": st.sampled_from([errno.EIO, errno.ENOSPC]),
    "prepare_error": st.sampled_from([None, None, None, errno.EIO]),
    "auto_finalize": st.booleans(),
    "auto_dismiss": st.booleans(),
})

VERB_NAMES = ["job-cancel", "block-job-cancel", "block-job-cancel-force", "pause", "resume",
              "complete", "finalize", "dismiss", "set-speed", "change"]


def table_msg(job_id, state, verb):
    return f"Job '{job_id}' in state '{state.value}' cannot accept command verb '{verb}'"


class JobMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.rec = Recorder()
        self.mgr = self.rec.mgr
        self.jobs = {}            # id -> Job (also after null)
        self.txns = []            # (JobTxn, [ids])
        self.internal = {}        # id -> internal pauses we hold
        self.n = 0

    # ------------------------------------------------------------------

    def settle(self):
        self.mgr.wait_idle(T)

    @precondition(lambda self: len(self.jobs) < MAX_JOBS)
    @rule(specs=st.lists(job_spec, min_size=1, max_size=4),
          grouped=st.booleans(), start=st.booleans())
    def create_txn(self, specs, grouped, start):
        txn = JobTxn("grouped" if grouped else "individual")
        ids = []
        for spec in specs:
            self.n += 1
            jid = f"j{self.n}"
            cls = ReadyDriver if spec["ready"] else StepDriver
            fail_at = spec["fail_at"] if (spec["fail_at"] or 0) < spec["steps"] else None
            d = cls(spec["steps"], gated=spec["gated"], fail_at=fail_at, policy=spec["policy"],
                    fail_errno=spec["fail_errno"], prepare_error=spec["prepare_error"])
            job = self.mgr.create(d, jid, txn=txn, auto_finalize=spec["auto_finalize"],
                                  auto_dismiss=spec["auto_dismiss"])
            self.jobs[jid] = job
            self.internal[jid] = 0
            ids.append(jid)
        self.txns.append((txn, ids))
        if start:
            self.mgr.start_txn(txn)
        self.settle()

    @precondition(lambda self: self.txns)
    @rule(data=st.data())
    def start_txn(self, data):
        txn, _ = data.draw(st.sampled_from(self.txns))
        self.mgr.start_txn(txn)
        self.settle()

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), n=st.integers(1, 2))
    def allow(self, data, n):
        jid = data.draw(st.sampled_from(sorted(self.jobs)))
        self.jobs[jid].driver.allow(n)
        self.settle()

    @precondition(lambda self: self.jobs)
    @rule()
    def allow_all(self):
        for job in self.jobs.values():
            job.driver.allow(1)
        self.settle()

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), pause=st.booleans())
    def internal_pause(self, data, pause):
        jid = data.draw(st.sampled_from(sorted(self.jobs)))
        job = self.jobs[jid]
        if pause:
            job.pause()
            self.internal[jid] += 1
        elif self.internal[jid]:
            job.resume()
            self.internal[jid] -= 1
        self.settle()

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), verb=st.sampled_from(VERB_NAMES))
    def verb(self, data, verb):
        jid = data.draw(st.sampled_from(sorted(self.jobs)))
        job = self.jobs[jid]
        state, user_paused = job.status, job.user_paused
        want = self.expected(job, verb)
        call = {
            "job-cancel": lambda: self.mgr.job_cancel(jid),
            "block-job-cancel": lambda: self.mgr.block_job_cancel(jid),
            "block-job-cancel-force": lambda: self.mgr.block_job_cancel(jid, force=True),
            "pause": lambda: self.mgr.job_pause(jid),
            "resume": lambda: self.mgr.job_resume(jid),
            "complete": lambda: self.mgr.job_complete(jid),
            "finalize": lambda: self.mgr.job_finalize(jid),
            "dismiss": lambda: self.mgr.block_job_dismiss(jid),
            "set-speed": lambda: self.mgr.block_job_set_speed(jid, 4096),
            "change": lambda: self.mgr.block_job_change(jid, job.type),
        }[verb]
        try:
            call()
        except JobError as e:
            assert str(e) == want, (verb, state, str(e), want)
            assert job.status is state and job.user_paused is user_paused
        else:
            assert want is None, (verb, state, want)
        self.settle()

    def expected(self, job, verb):
        """The error the verb must raise now (None: accepted)."""
        s, jid = job.status, job.id
        if s is S.NULL:
            return f"Block job '{jid}' not found" if verb in (
                "block-job-cancel", "block-job-cancel-force", "dismiss", "set-speed",
                "change") else "Job not found"
        v = {"job-cancel": JobVerb.CANCEL, "block-job-cancel": JobVerb.CANCEL,
             "block-job-cancel-force": JobVerb.CANCEL, "pause": JobVerb.PAUSE,
             "resume": JobVerb.RESUME, "complete": JobVerb.COMPLETE,
             "finalize": JobVerb.FINALIZE, "dismiss": JobVerb.DISMISS,
             "set-speed": JobVerb.SET_SPEED, "change": JobVerb.CHANGE}[verb]
        if verb == "block-job-cancel" and job.user_paused:
            return f"The block job for device '{jid}' is currently paused"
        if verb == "resume" and (not job.user_paused or job.pause_count <= 0):
            return "Can't resume a job that was not paused"
        if s not in VERBS[v]:
            return table_msg(jid, s, v.value)
        if verb == "pause" and job.user_paused:
            return "Job is already paused"
        if verb == "complete" and (job.cancel_requested
                                   or not isinstance(job.driver, ReadyDriver)):
            return f"The active block job '{jid}' cannot be completed"
        if verb == "change":
            return "Job type does not support change"
        return None

    # ------------------------------------------------------------------

    @invariant()
    def events_match_transitions(self):
        assert self.mgr.internal_errors == [] and self.mgr.events.errors == []
        evs = [(e.data["id"], e.data["status"]) for e in self.rec.listener.events
               if e.name == JOB_STATUS_CHANGE]
        assert evs == [(i, new.value) for i, _, new in self.rec.transitions]
        # the edges seen by a client are legal edges
        last = {}
        for jid, status in evs:
            old = last.get(jid, S.UNDEFINED)
            if old is S.NULL:           # an id may be reused only after null
                old = S.UNDEFINED
            assert S(status) in TRANSITIONS[old] and S(status) is not old, (jid, old, status)
            last[jid] = S(status)

    @invariant()
    def hooks_follow_the_contract(self):
        for jid, job in self.jobs.items():
            log = [x for x in job.driver.log if x in ("commit", "abort", "clean")]
            if not job.started:         # never-started jobs never stay concluded
                assert job.status is not S.CONCLUDED, jid
            if job.status in (S.CONCLUDED, S.NULL):
                assert log in (["commit", "clean"], ["abort", "clean"]), (jid, log)
                assert (log[0] == "commit") == (job.outcome.value == "completed")
            else:
                assert log == [], (jid, job.status, log)
        for txn, ids in self.txns:
            if txn.mode.value == "grouped":
                firsts = {self.jobs[i].driver.log.count("commit") for i in ids
                          if self.jobs[i].status in (S.CONCLUDED, S.NULL)}
                assert len(firsts) <= 1, ids      # never mixed commit / abort in a group

    def teardown(self):
        try:
            for _ in range(20):
                live = [j for j in self.jobs.values() if j.status is not S.NULL]
                if not live:
                    break
                for jid, job in self.jobs.items():
                    while self.internal[jid]:
                        job.resume()
                        self.internal[jid] -= 1
                    job.driver.allow(10)
                    for fn in (self.mgr.job_resume, self.mgr.job_complete,
                               self.mgr.job_finalize, self.mgr.job_dismiss):
                        try:
                            fn(jid)
                        except JobError:
                            pass
                for txn, _ in self.txns:      # checks and starts under the lock
                    self.mgr.start_txn(txn)
                self.settle()
            self.events_match_transitions()
            self.hooks_follow_the_contract()
            for jid, job in self.jobs.items():
                seq = self.rec.seq(jid)
                assert seq[-1] == "null" and seq[-2] == "concluded", (jid, seq)
                if job.started:
                    assert seq[-3] in ("COMPLETED", "CANCELLED") or seq[-3].startswith(
                        "COMPLETED:"), (jid, seq)
                    assert ("READY" in seq) == ("ready" in seq)
                    if "READY" in seq:
                        assert seq[seq.index("ready") + 1] == "READY"
                    if "PENDING" in seq:
                        assert seq[seq.index("pending") + 1] == "PENDING"
                        assert not job.auto_finalize
                else:
                    assert seq == ["created", "aborting", "concluded", "null"]
                ev_ids = {event_job_id(e) for e in self.rec.listener.events}
                assert jid in ev_ids
        finally:
            # never leave runner threads behind, even after a failure
            for job in self.jobs.values():
                try:
                    self.mgr.cancel_job(job, force=True)
                except JobError:
                    pass


JobMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestJobMachine = JobMachine.TestCase
