"""Job transactions: the jobs that finish together.

Every job runs in a completion group (QEMU's ``JobTxn``), a lone job in a
group of one. The group's members wait for each other in ``waiting``, move to
``pending`` together, run every ``prepare`` before any ``commit``, and, if
one fails, are all force-cancelled and aborted (docs/job-model.md §6, §8). The logic lives
in :mod:`blkjobs.jobmodel.manager`, under its lock; this module is the data.

A :class:`JobTxn` is what callers create for a QMP ``transaction``:

* ``grouped``: the txn *is* the completion group of all its jobs;
* ``individual`` (default): each job gets a group of its own; the txn only
  remembers its members so that they are started together (or rolled back
  together if the QMP transaction fails).
"""
from __future__ import annotations

import enum
from typing import Any


class CompletionMode(enum.StrEnum):
    """``ActionCompletionMode``."""

    INDIVIDUAL = "individual"
    GROUPED = "grouped"


class JobTxn:
    """A transaction of jobs. See the module docstring."""

    def __init__(self, completion_mode: CompletionMode | str = CompletionMode.INDIVIDUAL):
        self.mode = CompletionMode(completion_mode)
        #: Every job created in this txn, in creation order (start / rollback).
        #: (Jobs: blkjobs.jobmodel.job.Job, a module that imports this one, so
        #: not named here -- test_architecture counts every import)
        self.members: list[Any] = []
        #: The completion group, in QEMU's list order (newest first, as
        #: ``QLIST_INSERT_HEAD``); a job leaves it when it concludes.
        self.jobs: list[Any] = []
        #: Set once a member failed or was cancelled: the group is aborting.
        self.aborting = False

    def _add(self, job: Any) -> JobTxn:
        """Record ``job``; return the completion group it belongs to."""
        self.members.append(job)
        group = self if self.mode is CompletionMode.GROUPED else JobTxn(CompletionMode.GROUPED)
        group.jobs.insert(0, job)
        return group

    def __repr__(self) -> str:
        ids = [j.id for j in self.members] or [j.id for j in self.jobs]
        return f"<JobTxn {self.mode.value} {ids}>"
