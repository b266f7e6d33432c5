"""Job states, verbs and the two tables that govern them, as data.

This module is the only place that knows which state may follow which, and
which verb a state accepts. The tables are copied cell by cell from the spec
(``docs/job-model.md`` §2 and §3, QEMU's ``JobSTT`` and ``JobVerbTable``);
:func:`render_tables` prints them back in the spec's markdown, and a test
checks that the spec, ``docs/job-tables.md`` and this module agree.

Every change of a job's status goes through :func:`transition`, which refuses
an edge that is not in the matrix (a programming error: no API path may reach
it) and reports the change so that the manager emits ``JOB_STATUS_CHANGE``.
"""
from __future__ import annotations

import enum
import logging
from typing import Protocol

from ..errors import InternalError, JobError

_log = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    """Job states, in the wire enum's order."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"

    def __str__(self) -> str:
        return self.value


class JobVerb(str, enum.Enum):
    """Management verbs, in the wire enum's order."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"

    def __str__(self) -> str:
        return self.value


S = JobStatus
V = JobVerb

#: QEMU's one-letter abbreviations, in table column order.
LETTER: dict[JobStatus, str] = {
    S.UNDEFINED: "U", S.CREATED: "C", S.RUNNING: "R", S.PAUSED: "P",
    S.READY: "Y", S.STANDBY: "S", S.WAITING: "W", S.PENDING: "D",
    S.ABORTING: "X", S.CONCLUDED: "E", S.NULL: "N",
}
_BY_LETTER = {v: k for k, v in LETTER.items()}


def _states(letters: str) -> frozenset[JobStatus]:
    return frozenset(_BY_LETTER[c] for c in letters)


#: The transition matrix (docs/job-model.md §2): from-state -> the states it may move to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: _states("C"),
    S.CREATED: _states("RXN"),
    S.RUNNING: _states("PYWX"),
    S.PAUSED: _states("R"),
    S.READY: _states("SWX"),
    S.STANDBY: _states("Y"),
    S.WAITING: _states("DX"),
    S.PENDING: _states("XE"),
    S.ABORTING: _states("XE"),
    S.CONCLUDED: _states("N"),
    S.NULL: _states(""),
}

#: The verb table (docs/job-model.md §3): verb -> the states that accept it. The dict's
#: order is the spec table's row order (which differs from the enum order:
#: finalize before dismiss).
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    V.CANCEL: _states("CRPYSWD"),
    V.PAUSE: _states("CRPYS"),
    V.RESUME: _states("CRPYS"),
    V.SET_SPEED: _states("CRPYS"),
    V.COMPLETE: _states("YS"),
    V.FINALIZE: _states("D"),
    V.DISMISS: _states("E"),
    V.CHANGE: _states("CRPYS"),
}

#: Derived predicates (docs/job-model.md §1).
READY_ISH = _states("YS")
COMPLETED = _states("WDXEN")


class IllegalTransition(InternalError, RuntimeError):
    """An edge outside the transition matrix was attempted: a bug in blkjobs."""


class _HasStatus(Protocol):
    id: str | None
    status: JobStatus

    def _status_changed(self, old: JobStatus, new: JobStatus) -> None: ...


def transition(job: _HasStatus, new: JobStatus) -> None:
    """Move ``job`` to ``new``: the one place where a job's status changes.

    Refuses an edge not in :data:`TRANSITIONS`. A self-edge (only X->X is
    legal) changes nothing and reports nothing; any other change is reported
    to ``job._status_changed(old, new)``, which emits ``JOB_STATUS_CHANGE``.
    Called with the manager lock held.
    """
    old = job.status
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job {job.id!r}: illegal transition {old} -> {new}")
    if new is old:
        return
    job.status = new
    _log.debug("job %s: %s -> %s", job.id, old.value, new.value)
    job._status_changed(old, new)


def check_verb(job_id: str | None, status: JobStatus, verb: JobVerb) -> None:
    """Raise the spec's refusal (GenericError) if ``status`` does not accept ``verb``."""
    if status not in VERBS[verb]:
        raise JobError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")


def render_tables() -> str:
    """Both tables in the spec's markdown (the text of docs/job-tables.md)."""
    cols = list(LETTER)
    head = " | ".join(LETTER[s] for s in cols)
    sep = "|---" * (len(cols) + 1) + "|"

    def row(label: str, allowed: frozenset[JobStatus]) -> str:
        cells = "".join(" ✔ |" if s in allowed else "  |" for s in cols)
        return f"| {label} |{cells}"

    out = [
        "# Job tables",
        "",
        "Generated from `src/blkjobs/jobmodel/status.py` by `python3 -m blkjobs.jobmodel`;",
        "do not edit. `tests/test_job_tables.py` checks that this file, the code and",
        "the contract (`docs/job-model.md` §2 and §3) agree.",
        "",
        "## Transition matrix",
        "",
        f"| from \\ to | {head} |",
        sep,
    ]
    out += [row(f"**{LETTER[s]}** {s}", TRANSITIONS[s]) for s in cols]
    out += ["", "## Verb permission table", "", f"| verb \\ state | {head} |", sep]
    out += [row(str(v), states) for v, states in VERBS.items()]
    return "\n".join(out) + "\n"

