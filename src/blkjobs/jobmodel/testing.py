"""Small test jobs and a recorder, for tests of the job core and its users.

:class:`StepDriver` is a job of N steps that the test releases one at a time
(:meth:`StepDriver.allow`), so a test decides exactly where the job is when it
sends a verb. :class:`ReadyDriver` adds a ready phase (like mirror).
:class:`Recorder` wraps a :class:`JobManager` on a :class:`FakeClock` and
keeps every transition and event, with a compact form for golden sequences.
"""
from __future__ import annotations

import errno
import math
import os
from typing import Any

from .events import (BLOCK_JOB_COMPLETED, BLOCK_JOB_ERROR, BLOCK_JOB_PENDING,
                     JOB_STATUS_CHANGE, Clock, Event, EventListener, FakeClock)
from .job import ErrorAction, Job, JobDriver
from .manager import JobManager
from .status import JobStatus


class StepDriver(JobDriver):
    """``steps`` steps of ``step_size`` units; each waits for :meth:`allow`
    (``gated=False``: free-running) and passes a pause point.

    ``fail_at=i``: step i fails once with ``fail_errno`` through
    ``handle_error(op, err, policy)``: report fails the job, stop parks and
    retries, ignore skips the step's progress. ``prepare_error``: errno that
    ``prepare`` fails with. Every hook call is appended to ``log``.
    """

    job_type = "backup"
    block_job = True

    def __init__(self, steps: int = 2, *, step_size: int = 1, gated: bool = True,
                 fail_at: int | None = None, fail_errno: int = errno.EIO,
                 policy: str = "report", operation: str = "write",
                 prepare_error: int | None = None):
        self.steps = steps
        self.step_size = step_size
        self.allowed: float = 0 if gated else math.inf
        self.fail_at = fail_at
        self.fail_errno = fail_errno
        self.policy = policy
        self.operation = operation
        self.prepare_error = prepare_error
        self.log: list[str] = []
        self.job: Job | None = None

    def allow(self, n: int = 1) -> None:
        """Release ``n`` more steps."""
        self.allowed += n
        if self.job is not None:
            self.job.kick()

    def run(self, job: Job) -> None:
        self.job = job
        self.log.append("run")
        job.progress.update(0, self.steps * self.step_size)
        i = 0
        while i < self.steps:
            while self.allowed <= i:
                job.sleep(None)
            job.pause_point()
            if i == self.fail_at:
                self.fail_at = None
                err = OSError(self.fail_errno, os.strerror(self.fail_errno))
                action = job.handle_error(self.operation, err, self.policy)
                if action is ErrorAction.REPORT:
                    raise err
                if action is ErrorAction.STOP:
                    job.pause_point()
                    continue            # retry the step
                i += 1                  # ignore: skip it
                continue
            job.progress.advance(self.step_size)
            i += 1
        self.run_tail(job)

    def run_tail(self, job: Job) -> None:
        pass

    def prepare(self, job: Job) -> None:
        self.log.append("prepare")
        if self.prepare_error is not None:
            raise OSError(self.prepare_error, os.strerror(self.prepare_error))

    def commit(self, job: Job) -> None:
        self.log.append("commit")

    def abort(self, job: Job) -> None:
        self.log.append("abort")

    def clean(self, job: Job) -> None:
        self.log.append("clean")

    def set_speed(self, job: Job, speed: int) -> None:
        self.log.append(f"speed={speed}")


class ReadyDriver(StepDriver):
    """A :class:`StepDriver` with a ready phase, cancelled like mirror: after
    its steps it becomes ready and stays until completed or cancelled. A soft
    cancel in ready finishes successfully without the "pivot" (logged by
    ``prepare`` only if ``should_complete``)."""

    job_type = "mirror"

    became_ready = False

    def run_tail(self, job: Job) -> None:
        job.set_ready()
        self.became_ready = True
        while not (job.should_complete or job.cancel_requested):
            job.sleep(None)

    def complete(self, job: Job) -> None:
        self.log.append("complete")

    def cancel(self, job: Job, force: bool) -> bool:
        # before it was ever ready, every cancel is a forced one
        return force or not self.became_ready

    def prepare(self, job: Job) -> None:
        super().prepare(job)
        if job.should_complete:
            self.log.append("pivot")

    def query(self, job: Job) -> dict[str, Any]:
        return {"actively-synced": job.is_ready}


def compact(ev: Event) -> str:
    """One event as a short token: the status for JOB_STATUS_CHANGE, else the
    event name without ``BLOCK_JOB_`` plus its telling members."""
    d = ev.data
    if ev.name == JOB_STATUS_CHANGE:
        return d["status"]
    short = ev.name.removeprefix("BLOCK_JOB_")
    if ev.name == BLOCK_JOB_COMPLETED and "error" in d:
        return f"{short}:{d['error']}"
    if ev.name == BLOCK_JOB_ERROR:
        return f"{short}:{d['operation']}:{d['action']}"
    return short


def event_job_id(ev: Event) -> str:
    return ev.data["id"] if ev.name in (JOB_STATUS_CHANGE, BLOCK_JOB_PENDING) else ev.data["device"]



class Recorder:
    """A manager on a fake clock, with every transition and event recorded."""

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or FakeClock()
        self.transitions: list[tuple[str | None, JobStatus, JobStatus]] = []
        self.mgr = JobManager(self.clock, trace=self._trace)
        self.listener = EventListener()
        self.mgr.add_listener(self.listener)

    def _trace(self, job: Job, old: JobStatus, new: JobStatus) -> None:
        self.transitions.append((job.id, old, new))

    def seq(self, job_id: str) -> list[str]:
        """The compact event sequence of one job."""
        return [compact(e) for e in self.listener.events if event_job_id(e) == job_id]

    def all(self) -> list[str]:
        """Every event as ``id:token``, in emission order."""
        return [f"{event_job_id(e)}:{compact(e)}" for e in self.listener.events]

    def job(self, driver: JobDriver, job_id: str, start: bool = True, **kw: Any) -> Job:
        job = self.mgr.create(driver, job_id, **kw)
        if start:
            self.mgr.start(job)
        return job

    def idle(self, timeout: float = 5.0) -> None:
        self.mgr.wait_idle(timeout)
