"""The job manager: creation, every verb, completion of transactions, queries.

Verbs come in two layers. The object verbs (:meth:`JobManager.cancel_job`,
:meth:`~JobManager.user_pause`, ...) act on a :class:`Job`; the QMP verbs
(``job_*`` and ``block_job_*`` methods, named after the commands) find the job
by id with the right error for their spelling and call them. Completion
(docs/job-model.md §6, §8) follows QEMU's ``job_completed`` -> ``job_completed_txn_*`` ->
``job_do_finalize`` -> ``job_finalize_single`` and keeps their names.
"""
from __future__ import annotations

import errno
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from ..errors import JobError
from .events import (BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED, BLOCK_JOB_PENDING,
                     JOB_STATUS_CHANGE, Clock, Event, EventBus, SystemClock)
from .job import IoStatus, Job, JobDriver, JobOutcome, error_text
from .status import JobStatus, JobVerb, check_verb, transition
from .txn import CompletionMode, JobTxn

S = JobStatus
_log = logging.getLogger(__name__)

#: QEMU ``id_wellformed``: a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*", re.ASCII)


class DeviceNotActive(JobError):
    """A ``block-job-*`` command named a job that does not exist."""

    qmp_class = "DeviceNotActive"


class JobManager:
    """Owns the jobs, the lock, the clock and the event bus. See the package
    docstring for the concurrency model.

    ``trace(job, old, new)``, if given, is called on every status change,
    with the lock held, just before the event is emitted (tests use it to
    check that events and transitions match one to one).
    """

    def __init__(self, clock: Clock | None = None,
                 trace: Callable[[Job, JobStatus, JobStatus], None] | None = None):
        self.clock = clock or SystemClock()
        #: The one lock (re-entrant) and its condition: every job state change
        #: happens while holding it, and every change notifies it.
        self.lock = threading.Condition(threading.RLock())
        self.events = EventBus(self.clock)
        self.trace = trace
        #: Bugs caught where raising would lose them (runner threads, hooks
        #: that must not fail). Empty in a healthy process.
        self.internal_errors: list[BaseException] = []
        self._jobs: list[Job] = []          # newest first, like QEMU's job list

    # ------------------------------------------------------------------
    # Listeners and lookups

    def add_listener(self, listener: Callable[[Event], None]) -> Callable[[Event], None]:
        """Receive every event from now on; returns ``listener``."""
        with self.lock:
            return self.events.add_listener(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        with self.lock:
            self.events.remove_listener(listener)

    def jobs(self) -> list[Job]:
        """Every job not yet dismissed (internal ones too), newest first."""
        with self.lock:
            return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            for job in self._jobs:
                if job.id == job_id:
                    return job
            return None

    def find_job(self, job_id: str) -> Job:
        """The job, or ``Job not found`` (the ``job-*`` spelling)."""
        job = self.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> Job:
        """The block job, or DeviceNotActive ``Block job '<id>' not found``."""
        job = self.get(job_id)
        if job is None or not job.driver.block_job:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    # ------------------------------------------------------------------
    # Creation and start

    def create(self, driver: JobDriver, job_id: str | None, *, txn: JobTxn | None = None,
               auto_finalize: bool = True, auto_dismiss: bool = True, speed: int = 0,
               internal: bool = False) -> Job:
        """Create a job in ``created`` (emits ``JOB_STATUS_CHANGE created``).

        Id errors are raised before anything exists. A bad ``speed`` is the
        early-failure path: the job is created, then torn down (created ->
        null) and the error raised. ``txn``: the transaction it belongs to
        (None: a transaction of its own). Start it with :meth:`start`.
        """
        with self.lock:
            if job_id is not None:
                if internal:
                    raise JobError("Cannot specify job ID for internal job")
                if not _ID_RE.fullmatch(job_id):
                    raise JobError(f"Invalid job ID '{job_id}'")
                if self.get(job_id) is not None:
                    raise JobError(f"Job ID '{job_id}' already in use")
            elif not internal:
                raise JobError("An explicit job ID is required")
            job = Job(self, driver, job_id, None, auto_finalize, auto_dismiss)  # type: ignore[arg-type]
            job.txn = (txn or JobTxn(CompletionMode.GROUPED))._add(job)
            self._jobs.insert(0, job)
            transition(job, S.CREATED)
            try:
                self._set_speed(job, speed)
            except JobError:
                self.abandon(job)
                raise
            return job

    def abandon(self, job: Job) -> None:
        """Early failure: tear down a job that was created but never started
        (created -> null), e.g. when a later setup step of its start command
        failed. The caller then returns its own error."""
        with self.lock:
            if job.started or job.status is not S.CREATED:
                raise RuntimeError(f"{job!r}: only a never-started job can be abandoned")
            if job in job.txn.jobs:
                job.txn.jobs.remove(job)
            self._do_dismiss(job)

    def start(self, job: Job) -> None:
        """created -> running, and start the runner thread."""
        with self.lock:
            if job.started or job.status is not S.CREATED:
                raise RuntimeError(f"{job!r} cannot be started")
            job.started = True
            job.pause_count -= 1
            job.busy = True
            transition(job, S.RUNNING)
            threading.Thread(target=self._runner, args=(job,), daemon=True,
                             name=f"job-{job.id}").start()

    def start_txn(self, txn: JobTxn) -> None:
        """Start every member still in created (a committed QMP transaction)."""
        with self.lock:
            for job in txn.members:
                if job.status is S.CREATED and not job.started:
                    self.start(job)

    def rollback_txn(self, txn: JobTxn) -> None:
        """Force-cancel every member still in created (a QMP transaction that
        rolled back): created -> aborting -> concluded -> null, no block-job
        events."""
        with self.lock:
            for job in txn.members:
                if job.status is S.CREATED:
                    self._cancel(job, True)

    def _runner(self, job: Job) -> None:
        err: str | None = None
        try:
            rc = job.driver.run(job)
            if isinstance(rc, int) and rc < 0:
                err = error_text(rc)
        except Exception as e:
            err = error_text(e)
        with self.lock:
            try:
                job.deferred = True
                job.busy = True
                if err is not None and job.error is None:
                    job.error = err
                self._job_completed(job)
            except Exception as e:  # a bug: keep it visible to tests
                self.internal_errors.append(e)
                _log.error("internal error completing job %s", job.id, exc_info=e)
            finally:
                job.busy = False
                self.lock.notify_all()

    # ------------------------------------------------------------------
    # Events

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.events.emit(name, data)
        self.lock.notify_all()

    def _status_changed(self, job: Job, old: JobStatus, new: JobStatus) -> None:
        if self.trace is not None:
            self.trace(job, old, new)
        if not job.is_internal:
            self._emit(JOB_STATUS_CHANGE, {"id": job.id, "status": new.value})
        self.lock.notify_all()

    def _emit_block(self, job: Job, name: str) -> None:
        """READY / COMPLETED / CANCELLED: {type, device, len, offset, speed[, error]}.
        Block jobs only: QEMU's other jobs (``create``) send JOB_STATUS_CHANGE alone."""
        if job.is_internal or not job.driver.block_job:
            return
        cur, total = job.progress.snapshot()
        data = {"type": job.type, "device": job.id, "len": total, "offset": cur,
                "speed": job.speed}
        if name == BLOCK_JOB_COMPLETED and job.error is not None:
            data["error"] = job.error
        self._emit(name, data)

    # ------------------------------------------------------------------
    # Completion (QEMU job.c names), all with the lock held

    def _update_rc(self, job: Job) -> None:
        if job.error is None and job.is_cancelled:
            job.error = error_text(errno.ECANCELED)
        if job.error is not None:
            transition(job, S.ABORTING)

    def _job_completed(self, job: Job) -> None:
        """The worker is done (or the job will never start)."""
        self._update_rc(job)
        if job.error is not None:
            self._txn_abort(job)
        else:
            self._txn_success(job)

    def _txn_success(self, job: Job) -> None:
        transition(job, S.WAITING)
        group = job.txn
        if any(not other.is_completed for other in group.jobs):
            return
        for other in list(group.jobs):
            transition(other, S.PENDING)
            if not other.auto_finalize and not other.is_internal:
                self._emit(BLOCK_JOB_PENDING, {"type": other.type, "id": other.id})
        if all(other.auto_finalize for other in group.jobs):
            self._do_finalize(group)

    def _do_finalize(self, group: JobTxn) -> None:
        """Every prepare (in list order, stopping at the first failure), then
        commit for all, or abort for all."""
        for job in list(group.jobs):
            if job.error is None:
                try:
                    job.driver.prepare(job)
                except Exception as e:
                    job.error = error_text(e)
                self._update_rc(job)
            if job.error is not None:
                self._txn_abort(job)
                return
        for job in list(group.jobs):
            self._finalize_single(job)

    def _txn_abort(self, job: Job) -> None:
        """``job`` failed: force-cancel the other members; once no member's
        worker is still running, finalize (abort) them all."""
        group = job.txn
        if not group.aborting:
            group.aborting = True
            for other in list(group.jobs):
                if other is not job:
                    self._cancel_async(other, True)
            for other in list(group.jobs):
                if not other.started and not other.is_completed:
                    self._update_rc(other)          # created -> aborting: no worker
                elif other.started and not other.deferred:
                    self._wake(other)
        if any(other.started and not other.deferred for other in group.jobs):
            return      # the last runner to finish comes back here
        for other in list(group.jobs):
            self._finalize_single(other)

    def _finalize_single(self, job: Job) -> None:
        if job not in job.txn.jobs:
            return
        self._update_rc(job)
        if job.error is None:
            self._hook(job.driver.commit, job)
            outcome = JobOutcome.COMPLETED
        else:
            self._hook(job.driver.abort, job)
            outcome = JobOutcome.CANCELLED if job.is_cancelled else JobOutcome.FAILED
        self._hook(job.driver.clean, job)
        if job.started:         # events only for jobs that actually ran
            self._emit_block(job, BLOCK_JOB_CANCELLED if job.is_cancelled
                             else BLOCK_JOB_COMPLETED)
        job.txn.jobs.remove(job)
        job.outcome = outcome
        _log.info("%s job %s %s%s", job.type, job.id, outcome.value,
                  f": {job.error}" if outcome is JobOutcome.FAILED else "")
        transition(job, S.CONCLUDED)
        if job.auto_dismiss or not job.started:
            self._do_dismiss(job)

    def _do_dismiss(self, job: Job) -> None:
        transition(job, S.NULL)
        job.busy = False
        if job in self._jobs:
            self._jobs.remove(job)

    def _hook(self, fn: Callable[[Job], None], job: Job) -> None:
        """Run a hook that must not fail; a failure is a bug, kept visible."""
        try:
            fn(job)
        except Exception as e:
            self.internal_errors.append(e)
            _log.error("internal error in %s of job %s", getattr(fn, "__name__", fn), job.id,
                       exc_info=e)

    # ------------------------------------------------------------------
    # Pausing, waking, cancelling (lock held)

    def _wake(self, job: Job) -> None:
        """Let a parked or sleeping job re-check why it waits."""
        if job.parked:
            if job.pause_count == 0 or job.is_cancelled:
                job.busy = True
            self.lock.notify_all()
        else:
            job._kick_locked()

    def _pause_locked(self, job: Job) -> None:
        job.pause_count += 1
        if not job.parked:
            job._kick_locked()

    def _resume_locked(self, job: Job) -> None:
        assert job.pause_count > 0
        job.pause_count -= 1
        if job.pause_count == 0:
            self._wake(job)

    def _cancel_async(self, job: Job, force: bool) -> None:
        force = job.driver.cancel(job, force)
        if job.user_paused:
            # A cancelled job must run to its exit point: drop the user pause.
            job.io_status = IoStatus.OK
            job.user_paused = False
            self._resume_locked(job)
        # A soft cancel after the worker finished is ignored.
        if force or not job.deferred:
            job.cancelled = True
            job.force_cancel |= force

    def _cancel(self, job: Job, force: bool) -> None:
        self._cancel_async(job, force)
        if not job.started:
            self._job_completed(job)
        elif job.deferred:
            if job.is_cancelled:
                self._txn_abort(job)
        else:
            self._wake(job)

    def _set_speed(self, job: Job, speed: int) -> None:
        check_verb(job.id, job.status, JobVerb.SET_SPEED)
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        old, job.speed = job.speed, speed
        job.driver.set_speed(job, speed)
        if speed and speed <= old:
            return
        if job._timer_sleep:        # a rate-limited sleep may now be too long
            job._kick_locked()

    # ------------------------------------------------------------------
    # Object verbs: the table check, the spec's extra refusals, the effect

    def cancel_job(self, job: Job, force: bool = True) -> None:
        """``cancel``. ``force=False`` is a soft cancel, which the driver may
        keep soft (mirror in ready) or make forced (the default)."""
        with self.lock:
            check_verb(job.id, job.status, JobVerb.CANCEL)
            self._cancel(job, force)

    def user_pause(self, job: Job) -> None:
        """``pause`` by the user (at most one at a time)."""
        with self.lock:
            check_verb(job.id, job.status, JobVerb.PAUSE)
            if job.user_paused:
                raise JobError("Job is already paused")
            job.user_paused = True
            self._pause_locked(job)

    def user_resume(self, job: Job) -> None:
        """``resume`` of the user's pause; resets the io-status."""
        with self.lock:
            if not job.user_paused or job.pause_count <= 0:
                raise JobError("Can't resume a job that was not paused")
            check_verb(job.id, job.status, JobVerb.RESUME)
            job.io_status = IoStatus.OK
            job.user_paused = False
            self._resume_locked(job)

    def complete_job(self, job: Job) -> None:
        """``complete``: set ``should_complete``, call the driver, kick the job."""
        with self.lock:
            check_verb(job.id, job.status, JobVerb.COMPLETE)
            if job.cancelled or type(job.driver).complete is JobDriver.complete:
                raise JobError(f"The active block job '{job.id}' cannot be completed")
            job.should_complete = True
            try:
                job.driver.complete(job)
            except BaseException:
                job.should_complete = False
                raise
            self._wake(job)

    def finalize_job(self, job: Job) -> None:
        """``finalize``: finalize every member of the job's transaction."""
        with self.lock:
            check_verb(job.id, job.status, JobVerb.FINALIZE)
            if job.txn.aborting:
                return      # already being aborted; it concludes on its own
            self._do_finalize(job.txn)

    def dismiss_job(self, job: Job) -> None:
        """``dismiss``: concluded -> null; the id becomes free."""
        with self.lock:
            check_verb(job.id, job.status, JobVerb.DISMISS)
            self._do_dismiss(job)

    def set_speed(self, job: Job, speed: int) -> None:
        """``set-speed`` in bytes/s (0: unlimited)."""
        with self.lock:
            self._set_speed(job, speed)

    def change_job(self, job: Job, options: dict[str, Any]) -> None:
        """``change``: handed to the driver's ``change`` hook."""
        with self.lock:
            check_verb(job.id, job.status, JobVerb.CHANGE)
            job.driver.change(job, options)

    # ------------------------------------------------------------------
    # QMP verbs by id: job-* (GenericError "Job not found")

    def job_cancel(self, id: str) -> None:
        self.cancel_job(self.find_job(id), force=True)

    def job_pause(self, id: str) -> None:
        self.user_pause(self.find_job(id))

    def job_resume(self, id: str) -> None:
        self.user_resume(self.find_job(id))

    def job_complete(self, id: str) -> None:
        self.complete_job(self.find_job(id))

    def job_finalize(self, id: str) -> None:
        self.finalize_job(self.find_job(id))

    def job_dismiss(self, id: str) -> None:
        self.dismiss_job(self.find_job(id))

    # block-job-* (DeviceNotActive "Block job '<id>' not found")

    def block_job_cancel(self, device: str, force: bool = False) -> None:
        with self.lock:
            job = self.find_block_job(device)
            if job.user_paused and not force:
                raise JobError(f"The block job for device '{device}' is currently paused")
            self.cancel_job(job, force)

    def block_job_pause(self, device: str) -> None:
        self.user_pause(self.find_block_job(device))

    def block_job_resume(self, device: str) -> None:
        self.user_resume(self.find_block_job(device))

    def block_job_complete(self, device: str) -> None:
        self.complete_job(self.find_block_job(device))

    def block_job_finalize(self, id: str) -> None:
        self.finalize_job(self.find_block_job(id))

    def block_job_dismiss(self, id: str) -> None:
        self.dismiss_job(self.find_block_job(id))

    def block_job_set_speed(self, device: str, speed: int) -> None:
        self.set_speed(self.find_block_job(device), speed)

    def block_job_change(self, id: str, type: str, **options: Any) -> None:
        self.change_job(self.find_block_job(id), {"type": type, **options})

    # ------------------------------------------------------------------
    # Queries

    def query_jobs(self) -> list[dict[str, Any]]:
        """``query-jobs``: ``JobInfo`` for every job with an id."""
        out = []
        with self.lock:
            for job in self._jobs:
                if job.is_internal:
                    continue
                cur, total = job.progress.snapshot()
                info = {"id": job.id, "type": job.type, "status": job.status.value,
                        "current-progress": cur, "total-progress": total}
                if job.error is not None:
                    info["error"] = job.error
                out.append(info)
        return out

    def query_block_jobs(self) -> list[dict[str, Any]]:
        """``query-block-jobs``: ``BlockJobInfo`` for every block job with an id."""
        out = []
        with self.lock:
            for job in self._jobs:
                if job.is_internal or not job.driver.block_job:
                    continue
                cur, total = job.progress.snapshot()
                info = {"type": job.type, "device": job.id, "len": total, "offset": cur,
                        "busy": job.busy and not job.driver.throttled(job),
                        "paused": job.is_paused, "speed": job.speed,
                        "io-status": job.io_status.value, "ready": job.is_ready,
                        "status": job.status.value, "auto-finalize": job.auto_finalize,
                        "auto-dismiss": job.auto_dismiss}
                if job.error is not None:
                    info["error"] = job.error
                info.update(job.driver.query(job))
                out.append(info)
        return out

    # ------------------------------------------------------------------
    # Waiting (tests, shutdown)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 5.0) -> None:
        """Wait (lock released) until ``predicate()`` holds; it is evaluated
        with the lock held. Raises ``TimeoutError`` (``timeout`` None: never)."""
        with self.lock:
            if not self.lock.wait_for(predicate, timeout):
                raise TimeoutError(f"condition not reached within {timeout}s")

    def is_idle(self) -> bool:
        """No runner is doing anything: each started job is parked, sleeping or done."""
        with self.lock:
            return all(not j.started or j.deferred or not j.busy for j in self._jobs)

    def wait_idle(self, timeout: float = 5.0) -> None:
        self.wait_until(self.is_idle, timeout)

