"""The job core: states, verbs, transactions, events and the job manager.

It implements ``docs/job-model.md`` (the contract) and knows nothing of blocks or
images: a job type plugs in by subclassing :class:`JobDriver`.

* :mod:`.status`  -- JobStatus, JobVerb, the transition matrix and verb table
  as data, the one ``transition()`` function;
* :mod:`.events`  -- events, listeners, JSON lines, clocks;
* :mod:`.job`     -- Job and the JobDriver contract;
* :mod:`.txn`     -- JobTxn (completion modes individual / grouped);
* :mod:`.manager` -- JobManager: creation, verbs by id, completion, queries.

Concurrency, in one paragraph: each started job has one runner thread that
calls ``driver.run(job)`` without any lock; everything else -- every state
change, every verb, the completion of a transaction (prepare, commit/abort,
clean) and every event -- happens while holding the manager's one re-entrant
lock, whose condition variable is notified after each change. The runner
only takes that lock inside ``job.pause_point()``, ``job.sleep()``,
``job.set_ready()``, ``job.handle_error()`` and progress updates, and parks
or sleeps by waiting on the condition; when ``run`` returns, the runner takes
the lock once more to complete the job (and, if it is the last of its
transaction, finalize them all) and then exits. Events are emitted under the
lock, so listeners see them in exactly the order of the changes; callback
listeners must be quick and must not call back into the manager (an
``EventListener`` queues them for another thread). Hooks other than ``run``
run with the lock held and must not wait for a runner. Time (event stamps,
``job.sleep``) comes from the manager's injectable :class:`Clock`.
"""
from .events import (BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED, BLOCK_JOB_ERROR,
                     BLOCK_JOB_PENDING, BLOCK_JOB_READY, JOB_STATUS_CHANGE, Clock, Event,
                     EventBus, EventListener, FakeClock, JsonLinesWriter, SystemClock)
from .job import (ErrorAction, ErrorPolicy, IoStatus, Job, JobDriver, JobOutcome, Progress,
                  error_text)
from .manager import DeviceNotActive, JobManager
from .status import (TRANSITIONS, VERBS, IllegalTransition, JobStatus, JobVerb, check_verb,
                     render_tables, transition)
from .txn import CompletionMode, JobTxn

__all__ = [
    "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING",
    "BLOCK_JOB_READY", "JOB_STATUS_CHANGE", "Clock", "CompletionMode", "DeviceNotActive",
    "ErrorAction", "ErrorPolicy", "Event", "EventBus", "EventListener", "FakeClock",
    "IllegalTransition", "IoStatus", "Job", "JobDriver", "JobManager", "JobOutcome", "JobStatus",
    "JobTxn", "JobVerb", "JsonLinesWriter", "Progress", "SystemClock", "TRANSITIONS", "VERBS",
    "check_verb", "error_text", "render_tables", "transition",
]
