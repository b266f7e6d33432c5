"""What every job driver shares: :class:`BlockJob` (rate limit, error
policies, the job's filter node, the copy loop over :mod:`.blockcopy`).

A job driver receives the graph's I/O layer
(:class:`~blkjobs.graph.io.BlockIO`, ``self.io``), never the facade: nodes
are looked up, claimed, filtered and quiesced through it.

``BlockJob`` moved here alone from the former ``jobs/base.py`` (its
``Mover`` went to :mod:`.blockcopy`, the range algebra to :mod:`.ranges`);
``check_policy`` came from ``backup.py``.
"""
from __future__ import annotations

from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import CopyError, JobError
from ..graph import Node
from ..graph.io import BlockIO
from ..jobmodel import ErrorAction, Job, JobDriver
from ..native.ratelimit import TokenBucket
from .blockcopy import BATCH, Mover, Stats, Ticket

if TYPE_CHECKING:
    from ..graph.io import DirtyBitmap
    from ..native.bitmap import Bitmap

POLICIES = ("report", "ignore", "enospc", "stop", "auto")

#: what a copy loop's ``claim`` hands out: one area, or a batch of them
Area = TypeVar("Area", bound="tuple[int, int] | list[tuple[int, int]]")


def check_policy(name: str, value: str) -> None:
    if value not in POLICIES:
        raise JobError(f"Parameter '{name}' does not accept value '{value}'")


class BlockJob(JobDriver):
    """Base of the four block jobs: rate limit, error policies, teardown list.

    Subclasses set ``job_type`` and implement ``run``; they call
    :meth:`copy_with_policy` for each batch so that an I/O error goes through
    the job's error policy exactly once per failure.
    """

    block_job = True
    #: ``filter-node-name``: the name of the filter node the job inserts
    #: (None: an implicit ``#blockN``); set by the engine before setup
    filter_node_name: str | None = None

    # What the daemon and the command line ask of a block job, declared here
    # with the answer of a job that has none (callers never probe with
    # getattr/hasattr; subclasses narrow the types of what they always set):
    #: the node copied from and the node copied to (backup, mirror, active commit)
    src: Node | None = None
    dst: Node | None = None
    #: the copy engine (:mod:`.blockcopy`; the four jobs set one)
    mover: Mover | None = None
    #: a backup's copy bitmap (what is left to copy) and the dirty bitmap
    #: its sync=bitmap froze
    copy_bm: Bitmap | None = None
    bm: DirtyBitmap | None = None
    #: an active commit: a mirror from the top into the base (``src``,
    #: ``dst``), not a commit's ``top``/``base``/``nodes``
    mirrors_into_base: bool = False

    def __init__(self, io: BlockIO):
        self.io = io
        #: the job's filter node while it is in the graph
        self.fnode: Node | None = None
        #: Rate limit of the background copy (CBW copies ignore it).
        self.bucket = TokenBucket(0)
        self.on_source_error = "report"
        self.on_target_error = "report"

    @abstractmethod
    def setup(self, job: Job) -> None:
        """Claim the job's nodes and permissions, insert its filter (the
        engine calls it once the job exists, before starting it)."""

    def insert_filter(self, node: Node, hooks: Any, drv: str, **kw: Any) -> None:
        """Put the job's filter node (driver ``drv``) above ``node`` (I/O lock
        held): the guest's writes to ``node`` pass ``hooks`` from now on.
        ``kw``: ``perm``, ``keep`` of :meth:`BlockIO.add_filter`."""
        self.fnode = self.io.add_filter(node, hooks, drv, self.filter_node_name, **kw)

    def remove_filter(self) -> None:
        """Take the job's filter node out of the graph (I/O lock held)."""
        if self.fnode is not None:
            self.io.remove_filter(self.fnode)
            self.fnode = None

    def set_speed(self, job: Job, speed: int) -> None:
        self.bucket.rate = int(speed)

    def throttled(self, job: Job) -> bool:
        return self.mover is not None and self.mover.throttled()

    def bytes_progress(self) -> tuple[int, int] | None:
        """(bytes copied, bytes to copy in all) where the job's progress
        counts something else (a backup: whole clusters); None: the
        progress is the answer."""
        return None

    def policy_action(self, job: Job, e: CopyError, policy: str | None = None) -> ErrorAction:
        """Send ``e`` through the job's error policy (``BLOCK_JOB_ERROR`` is
        emitted). The caller has already released (re-dirtied) the failed
        batch. ``report``: re-raise ``e``; ``ignore``: go on and retry the
        batch later; ``stop``: the job was paused: call ``job.pause_point()``
        and retry on resume."""
        op = "read" if e.side == "source" else "write"
        if policy is None:
            policy = self.on_source_error if op == "read" else self.on_target_error
        return job.handle_error(op, e, policy)

    def copy_loop(self, job: Job, mover: Mover,
                  claim: Callable[[Job], Area | None],
                  release: Callable[[Area, Stats | None], None],
                  on_error: Callable[[Job, CopyError, Area], ErrorAction]
                  | None = None, depth: int = 2) -> None:
        """Copy areas until ``claim`` returns None, ``depth`` batches in
        flight (one copying while the next is planned and queued).

        ``claim(job)`` takes the next area -- (offset, length), or a list of
        them copied as one batch -- registering it in flight under the I/O
        lock; ``release(area, stats)`` gives it back, with ``stats``
        None when it was not copied (the caller re-dirties it). A pause or
        cancel request first lets the batches in flight land. An error
        drains the other batches, then goes through ``on_error`` (default:
        the job's policy): ``report`` raises, ``stop`` parks the job, and
        the loop goes on (the failed area was given back to be retried).
        """
        on_error = on_error or (lambda j, e, a: self.policy_action(j, e))
        q: deque[tuple[Area, Ticket]] = deque()

        def finish_one() -> CopyError | None:
            area, t = q.popleft()
            try:
                stats = mover.finish(t, job)
            except CopyError as e:
                release(area, None)
                return e
            except BaseException:
                release(area, None)
                raise
            release(area, stats)
            return None

        try:
            while True:
                err = None
                stopping = job.pause_count > 0 or job.is_cancelled   # racy read: a hint
                while not stopping and err is None and len(q) < depth:
                    area = claim(job)
                    if area is None:
                        break
                    try:
                        q.append((area, mover.start_areas(area if isinstance(area, list)
                                                          else [area])))
                    except CopyError as e:
                        release(area, None)
                        err, failed = e, area
                if err is None:
                    if not q:
                        if stopping:
                            job.pause_point()
                            continue
                        return
                    failed = q[0][0]
                    err = finish_one()
                if err is not None:
                    while q:
                        finish_one()        # their failures re-dirty their areas
                    action = on_error(job, err, failed)
                    if action is ErrorAction.REPORT:
                        raise err
                    if action is ErrorAction.STOP:
                        job.pause_point()
                elif stopping and not q:
                    job.pause_point()
        finally:
            while q:
                area, t = q.popleft()
                mover.abandon(t)
                release(area, None)

    @staticmethod
    def batch_size(job: Job, unit: int) -> int:
        """Bytes per batch: small enough that a rate-limited job still
        reaches a pause point about every 100 ms."""
        n = BATCH
        if job.speed:
            n = min(n, max(unit, job.speed // 10))
        return max(unit, n - n % unit)
