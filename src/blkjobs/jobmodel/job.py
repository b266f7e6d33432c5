"""The job object and the driver interface a job type implements.

A :class:`Job` is created by ``JobManager.create`` and owned by it; its
state is changed only under the manager lock. A :class:`JobDriver` is one
instance per job: it holds the job type's own state and implements the hooks.
The contract of each hook is written on it; it follows QEMU's ``JobDriver``
(``include/qemu/job.h``) and docs/job-model.md (§6, §7, §9, §10).
"""
from __future__ import annotations

import enum
import errno as _errno
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Protocol

from ..errors import Cancelled, JobError
from .events import BLOCK_JOB_ERROR, BLOCK_JOB_READY, Clock
from .status import COMPLETED, READY_ISH, JobStatus, transition
from .txn import JobTxn


class JobOwner(Protocol):
    """What a :class:`Job` needs of the manager that owns it (the
    :class:`~blkjobs.jobmodel.manager.JobManager` satisfies it). Declared here so
    that this module does not import the manager, which imports it."""

    #: the manager's one re-entrant lock (a condition)
    lock: threading.Condition
    #: the manager's clock
    clock: Clock

    def _emit(self, name: str, data: dict[str, Any]) -> None: ...

    def _emit_block(self, job: Job, name: str) -> None: ...

    def _pause_locked(self, job: Job) -> None: ...

    def _resume_locked(self, job: Job) -> None: ...

    def _status_changed(self, job: Job, old: JobStatus, new: JobStatus) -> None: ...


class JobOutcome(str, enum.Enum):
    """How a job ended; set when it concludes, kept until it is dismissed."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class IoStatus(str, enum.Enum):
    """``BlockDeviceIoStatus``."""

    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class ErrorPolicy(enum.StrEnum):
    """``BlockdevOnError``."""

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class ErrorAction(str, enum.Enum):
    """``BlockErrorAction``: what :meth:`Job.handle_error` decided."""

    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


def error_text(err: BaseException | int) -> str:
    """The human-readable error a failed job reports.

    QEMU's default is the errno's ``strerror`` (``Input/output error``); an
    exception without an errno reports ``str(exc)``.
    """
    if isinstance(err, int):
        return os.strerror(abs(err))
    if isinstance(err, Cancelled):
        return os.strerror(_errno.ECANCELED)
    code = getattr(err, "errno", None)
    if isinstance(code, int) and code:
        return os.strerror(abs(code))
    return str(err) or type(err).__name__


class Progress:
    """Progress as (current, total) in an arbitrary unit (bytes for block jobs).

    ``current`` never decreases; ``total`` may move up (mirror: new dirty
    data) or down (backup sync=top: unallocated areas found). Count work when
    it has completed, not when it is issued.
    """

    def __init__(self, lock: threading.Condition):
        self._lock = lock
        self.current = 0
        self.total = 0

    def update(self, current: int | None = None, total: int | None = None) -> None:
        """Set ``current`` and/or ``total`` (absolute values)."""
        with self._lock:
            if current is not None:
                if current < self.current:
                    raise ValueError(f"progress went back from {self.current} to {current}")
                self.current = current
            if total is not None:
                self.total = total

    def advance(self, done: int) -> None:
        """``done`` more units completed."""
        with self._lock:
            self.current += done

    def grow(self, more: int) -> None:
        """The work grew by ``more`` units (e.g. re-dirtied data)."""
        with self._lock:
            self.total += more

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.current, self.total


class JobDriver(ABC):
    """What a job type implements. One instance per job.

    Threads: :meth:`run` runs in the job's own runner thread, without the
    manager lock. Every other hook runs with the manager lock held (it is
    re-entrant, so a hook may read the job), in whichever thread made the
    request or finished the work; those hooks must not wait for the runner
    thread, and must not call manager verbs. ``prepare``/``commit``/
    ``abort``/``clean`` run only after ``run`` has returned, never
    concurrently with it.
    """

    #: ``JobType`` on the wire: "backup", "mirror", "stream", "commit", ...
    job_type: str = "generic"
    #: Listed by query-block-jobs and found by the ``block-job-*`` verbs.
    block_job: bool = False

    @abstractmethod
    def run(self, job: Job) -> int | None:
        """Do the work. Required.

        Called once, in the runner thread, after the job started. Must call
        :meth:`Job.pause_point` (or :meth:`Job.sleep`) often, e.g. between
        chunks: that is where pausing happens and where a forced cancel
        raises :class:`blkjobs.errors.Cancelled`. Report progress with
        ``job.progress``. A job with a ready phase calls
        :meth:`Job.set_ready` when in sync and then keeps running until
        ``job.should_complete`` or ``job.cancel_requested`` (a soft cancel).

        Return ``None`` / ``0`` on success. Fail by raising (an exception with
        an ``errno`` reports its ``strerror``, others ``str(exc)``) or by
        returning a negative errno. A forced cancel always ends as
        ``Operation canceled``, whatever ``run`` returns.
        """

    def prepare(self, job: Job) -> None:
        """Optional. At finalization, if the job has not failed.

        The step that may still fail: the graph changes that must succeed for
        the job to count as successful (pivot, backing-file rewrite). Raise to
        fail the job; the whole transaction is then aborted.
        """

    def commit(self, job: Job) -> None:
        """Optional. After every ``prepare`` of the transaction succeeded.

        Must not fail. A job gets exactly one of commit or abort.
        """

    def abort(self, job: Job) -> None:
        """Optional. When this job or any job of its transaction failed or
        was cancelled, or a ``prepare`` failed. Must not fail; rolls back.
        """

    def clean(self, job: Job) -> None:
        """Optional. Always, exactly once, after commit or abort. Releases
        resources (filters, read-only reopen, ...)."""

    def complete(self, job: Job) -> None:
        """The ``complete`` verb, for types with a ready phase (mirror, active
        commit). Overriding it is what makes a type completable; the default
        type is not (``The active block job '<id>' cannot be completed``).

        Called after the manager set ``job.should_complete`` (and before it
        kicks the job); may raise :class:`JobError` to refuse, in which case
        ``should_complete`` is reset.
        """
        # Not reached through the manager (it checks for an override first).
        raise JobError(f"The active block job '{job.id}' cannot be completed")

    def cancel(self, job: Job, force: bool) -> bool:
        """On every cancel request; return the effective ``force``.

        Default: every cancel is forced. Mirror/active commit return
        ``force or not job.is_ready`` so that a soft cancel in ready stays soft
        (the job then finishes successfully without its graph change). May
        also abort in-flight I/O when forcing.
        """
        return True

    def pause(self, job: Job) -> None:
        """Optional. In the runner thread, when a pause is pending at a pause
        point, before parking: quiesce in-flight I/O."""

    def resume(self, job: Job) -> None:
        """Optional. In the runner thread, after ``pause`` (whether or not the
        job actually parked): restart what ``pause`` stopped."""

    def set_speed(self, job: Job, speed: int) -> None:
        """Optional. After ``job.speed`` changed (and at creation if non-zero):
        forward it to the rate limiter. 0 means unlimited."""

    def change(self, job: Job, options: dict[str, Any]) -> None:
        """The ``change`` verb (``block-job-change``). Optional; the default
        refuses with ``Job type does not support change``."""
        raise JobError("Job type does not support change")

    def query(self, job: Job) -> dict[str, Any]:
        """Optional. Type-specific members appended to the job's
        query-block-jobs entry (mirror: ``actively-synced``)."""
        return {}

    def throttled(self, job: Job) -> bool:
        """Optional. True while the job's copy only waits in its rate
        limiter: ``busy`` is then false, as for QEMU's job sleeping there."""
        return False


class Job:
    """One job. Created by ``JobManager.create``; do not construct directly.

    Attributes read by anyone (under the manager lock for a consistent view):
    ``id`` (None for an internal job), ``type``, ``status``, ``progress``,
    ``speed``, ``auto_finalize``, ``auto_dismiss``, ``error`` (text, set when
    the job failed or was cancelled), ``outcome`` (set at conclusion),
    ``io_status``, ``pause_count``, ``user_paused``, ``busy``.

    Methods for the driver's :meth:`JobDriver.run`: :meth:`pause_point`,
    :meth:`sleep`, :meth:`set_ready`, :meth:`handle_error`, ``progress``;
    flags ``should_complete``, ``cancel_requested``, ``is_cancelled``.
    """

    def __init__(self, manager: JobOwner, driver: JobDriver, job_id: str | None,
                 txn: JobTxn, auto_finalize: bool, auto_dismiss: bool):
        self._mgr = manager
        self.driver = driver
        self.id = job_id
        self.type: str = driver.job_type
        self.txn = txn
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        self.progress = Progress(manager.lock)
        self.speed = 0
        self.error: str | None = None
        self.outcome: JobOutcome | None = None
        self.io_status = IoStatus.OK
        # Pausing (docs/job-model.md §9): the job is created "paused until started".
        self.pause_count = 1
        self.user_paused = False
        self.parked = False            # the runner waits at a pause point
        self.busy = False              # false when parked or sleeping
        # Cancelling (docs/job-model.md §7): cancelled = requested; force_cancel = forced.
        self.cancelled = False
        self.force_cancel = False
        self.should_complete = False
        self.started = False
        self.deferred = False          # run() has returned
        self._kicked = False
        self._timer_sleep = False      # sleeping with a deadline

    # ------------------------------------------------------------------
    # Derived state

    @property
    def is_internal(self) -> bool:
        return self.id is None

    @property
    def is_ready(self) -> bool:
        """ready or standby (query-block-jobs ``ready``)."""
        return self.status in READY_ISH

    @property
    def is_completed(self) -> bool:
        """The worker is done: waiting, pending, aborting, concluded, null."""
        return self.status in COMPLETED

    @property
    def is_paused(self) -> bool:
        """A pause is requested or effective (query-block-jobs ``paused``)."""
        return self.pause_count > 0

    @property
    def cancel_requested(self) -> bool:
        """Any cancel, soft or forced, was requested."""
        return self.cancelled

    @property
    def is_cancelled(self) -> bool:
        """A forced cancel was requested (QEMU ``job_is_cancelled``)."""
        return self.cancelled and self.force_cancel

    def __repr__(self) -> str:
        return f"<Job {self.id!r} {self.type} {self.status}>"

    # ------------------------------------------------------------------
    # For the driver's run(), in the runner thread

    def pause_point(self) -> None:
        """Park here while a pause is requested; raise if force-cancelled.

        If the pause counter is > 0 the driver's ``pause`` hook runs, the job
        moves to paused (from running) or standby (from ready) and waits until
        the counter is back to 0, then returns to the state it had and the
        ``resume`` hook runs. A forced cancel never parks and raises
        :class:`blkjobs.errors.Cancelled` (from here, :meth:`sleep` and
        :meth:`wait`).
        """
        cond = self._mgr.lock
        with cond:
            needed = self.pause_count > 0 and not self.is_cancelled
        if needed:
            self.driver.pause(self)
            with cond:
                if self.pause_count > 0 and not self.is_cancelled:
                    old = self.status
                    transition(self, JobStatus.STANDBY if old is JobStatus.READY
                                   else JobStatus.PAUSED)
                    self.parked, self.busy = True, False
                    cond.notify_all()
                    while self.pause_count > 0 and not self.is_cancelled:
                        cond.wait()
                    self.parked, self.busy = False, True
                    transition(self, old)
            self.driver.resume(self)
        with cond:
            if self.is_cancelled:
                raise Cancelled()

    def sleep(self, ns: int | None = None) -> None:
        """Sleep ``ns`` nanoseconds of the manager's clock (``None``: until
        kicked), then pass a pause point.

        Returns early when the job is kicked (:meth:`kick`; also by pause,
        cancel, complete and a raised speed limit). Does not sleep at all if a
        pause is pending. Callers loop on their own condition.
        """
        cond = self._mgr.lock
        clock = self._mgr.clock
        with cond:
            if self.is_cancelled:
                raise Cancelled()
            if self.pause_count == 0 and not self._kicked:
                self.busy = False
                self._timer_sleep = ns is not None
                cond.notify_all()
                deadline = None if ns is None else clock.monotonic_ns() + ns
                while not self._kicked:
                    if deadline is None:
                        cond.wait()
                    elif clock.monotonic_ns() >= deadline:
                        break
                    else:
                        clock.wait(cond, deadline)
                self._timer_sleep = False
                self.busy = True
            self._kicked = False
        self.pause_point()

    def kick(self) -> None:
        """Wake the job from :meth:`sleep` (QEMU ``job_enter``). Any thread.

        Sticky: a kick while the job is not sleeping makes its next sleep
        return at once, so a wake-up is never lost.
        """
        with self._mgr.lock:
            self._kick_locked()

    def _kick_locked(self) -> None:
        if self.started and not self.deferred:
            self._kicked = True
            if not self.parked:
                self.busy = True
            self._mgr.lock.notify_all()

    def set_ready(self, idle: bool = False) -> None:
        """The job is in sync: running -> ready, then ``BLOCK_JOB_READY``.

        Only for types with a ready phase; once per job. ``idle``: the job
        goes to :meth:`sleep` next; it reads as not busy from the event on
        (in QEMU the monitor only runs once the job's coroutine yielded, so a
        query answering the event never sees it busy).
        """
        with self._mgr.lock:
            transition(self, JobStatus.READY)
            if idle and not self._kicked:
                self.busy = False
            self._mgr._emit_block(self, BLOCK_JOB_READY)

    def handle_error(self, operation: str, err: BaseException | int,
                     policy: ErrorPolicy | str) -> ErrorAction:
        """Apply an error policy to a failed read (of the source) or write (of
        the target), docs/job-model.md §10. Returns the action; the driver then

        * ``report``: fails the job with ``err`` (raise it);
        * ``ignore``: goes on (retrying the area later if it can);
        * ``stop``: the job has been paused as if by the user (and its
          io-status set): call :meth:`pause_point`, then retry.

        ``err`` is an exception with ``errno`` or an errno (sign ignored).
        ``BLOCK_JOB_ERROR {device, operation, action}`` is emitted before the
        action is taken (not for internal jobs).
        """
        if operation not in ("read", "write"):
            raise ValueError(f"operation must be 'read' or 'write', not {operation!r}")
        code = abs(err) if isinstance(err, int) else abs(getattr(err, "errno", 0) or 0)
        policy = ErrorPolicy(policy)
        if policy in (ErrorPolicy.ENOSPC, ErrorPolicy.AUTO):
            action = ErrorAction.STOP if code == _errno.ENOSPC else ErrorAction.REPORT
        else:
            action = {ErrorPolicy.STOP: ErrorAction.STOP, ErrorPolicy.REPORT: ErrorAction.REPORT,
                      ErrorPolicy.IGNORE: ErrorAction.IGNORE}[policy]
        with self._mgr.lock:
            if not self.is_internal:
                self._mgr._emit(BLOCK_JOB_ERROR, {"device": self.id, "operation": operation,
                                                  "action": action.value})
            if action is ErrorAction.STOP:
                if not self.user_paused:
                    self.pause_count += 1
                    self.user_paused = True
                if self.io_status is IoStatus.OK:
                    self.io_status = IoStatus.NOSPACE if code == _errno.ENOSPC else IoStatus.FAILED
        return action

    # ------------------------------------------------------------------
    # Internal pauses (graph layer, not the user): they nest freely and never
    # touch the user's pause (docs/job-model.md §9).

    def pause(self) -> None:
        """Add an internal pause; the job parks at its next pause point."""
        with self._mgr.lock:
            self._mgr._pause_locked(self)

    def resume(self) -> None:
        """Drop an internal pause added by :meth:`pause`."""
        with self._mgr.lock:
            internal = self.pause_count - self.user_paused - (not self.started)
            if internal <= 0:
                raise RuntimeError(f"job {self.id!r}: internal resume without internal pause")
            self._mgr._resume_locked(self)

    # ------------------------------------------------------------------

    def _status_changed(self, old: JobStatus, new: JobStatus) -> None:
        self._mgr._status_changed(self, old, new)
