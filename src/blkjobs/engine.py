"""The public library API: :class:`Engine`, a small facade.

An Engine owns one block graph, its I/O layer, one job manager and the
live-I/O front ends::

    eng = Engine()
    src = eng.open("disk.qcow2", node_name="disk")          # read-write
    eng.create("backup.qcow2", "qcow2", src.size, node_name="bk")
    vm = eng.attach(src)                                     # the VM's writes
    job = eng.backup("disk", "bk", sync="full", job_id="b0")
    eng.wait_job(job)                                        # -> JobOutcome
    eng.close()

Jobs are started by QEMU's option names (``docs/jobs.md``; QMP dashes become
underscores): :meth:`backup`, :meth:`mirror`, :meth:`stream`, :meth:`commit`;
:meth:`transaction` starts several at once. The verbs of ``docs/job-model.md``
take the job's id: :meth:`job_cancel` (``force=False``: a soft cancel, QMP's
``block-job-cancel``), :meth:`job_pause`, :meth:`job_resume`,
:meth:`job_complete`, :meth:`job_finalize`, :meth:`job_dismiss`,
:meth:`job_set_speed`, :meth:`job_change`; queries are
:meth:`query_jobs`/:meth:`query_block_jobs`. (The ``block-job-*`` spellings
of QMP, which find a job by device and answer ``DeviceNotActive``, are the
daemon's: ``blkjobs.daemon.commands``.) Events reach listeners added with
:meth:`add_listener` (or collected by :meth:`listen`).

Layers: this module imports :mod:`blkjobs.jobs` (the drivers),
:mod:`blkjobs.graph` (with its I/O layer, :mod:`blkjobs.graph.io`) and
:mod:`blkjobs.jobmodel` (the job core); nothing below imports it. The job drivers
get :attr:`io`, not the Engine.

Concurrency: the job core's lock orders job state; the I/O layer adds one
I/O lock (``with eng.io:`` takes it) that every front-end request, every
graph change and every job's planning step takes. The C engine copies
without it. The I/O lock is never held while taking the job core's lock.

Moved here from ``jobs/engine.py``; the internal half (filters, quiescing,
unfilled ranges, claims, the guest path, bitmaps by node) went to
:mod:`blkjobs.graph.io`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import JobError, UsageError
from .formats import create_image
from .graph import Graph, Node, open_chain
from .graph.frontend import Frontend
from .graph.io import BlockIO, DirtyBitmap
from .jobmodel import CompletionMode, Event, EventListener, Job, JobManager, JobOutcome, JobTxn
from .jobmodel.events import Clock
from .jobs.backup import BackupJob
from .jobs.base import BlockJob as BlockJob    # re-exported: the daemon asks its contract
from .jobs.blkdebug import EVENTS as _BLKDEBUG_EVENTS
from .jobs.blkdebug import Blkdebug, Breaks, Rule, Suspended
from .jobs.blkdebug import rule_event as _blkdebug_rule_event
# re-exported for the daemon, which does not import blkjobs.jobs (test_architecture)
from .jobs.blkdebug_qemu import DEFAULT_IOTYPES as DEFAULT_IOTYPES
from .jobs.blkdebug_qemu import InjectRule as InjectRule
from .jobs.blkdebug_qemu import QemuBlkdebug as QemuBlkdebug
from .jobs.blkdebug_qemu import QemuRules as QemuRules
from .jobs.blkdebug_qemu import SetStateRule as SetStateRule
from .jobs.commit import make_commit
from .jobs.mirror import MirrorJob
from .jobs.stream import StreamJob
from .options import (BitmapMode, CacheMode, CopyMode, ErrorPolicy, OnCbwError, SyncMode,
                      coerce)

__all__ = ["DirtyBitmap", "Engine"]

#: blkdebug's event names, for the daemon (as the re-exports above)
BLKDEBUG_EVENTS = _BLKDEBUG_EVENTS
#: a blkdebug rule's event checked (QEMU's text for unknown names)
blkdebug_rule_event = _blkdebug_rule_event


class Engine:
    """Graph + I/O layer + jobs + front ends. See the module docstring.

    ``clock``: the job core's clock (tests pass a fake one). ``locking``:
    take QEMU's file lock bytes on open images.

    Attributes: ``graph`` (the nodes), ``io`` (the graph's I/O layer, a
    :class:`~blkjobs.graph.io.BlockIO`: its read API -- ``frontends``,
    ``filter_of``, ``above_filters``, ``bitmaps_of``, ``cache_unsafe`` -- is
    what the daemon asks), ``jobs`` (the job manager).
    """

    def __init__(self, clock: Clock | None = None, locking: bool = True):
        self.graph = Graph(locking=locking)
        self.io = BlockIO(self.graph)
        self.jobs = JobManager(clock)

    # ------------------------------------------------------------------
    # Nodes

    def open(self, path: str, fmt: str | None = None, *, node_name: str | None = None,
             read_only: bool = False, cache: CacheMode | str = CacheMode.WRITEBACK) -> Node:
        """Open ``path`` and its backing chain; the top node is read-write
        unless ``read_only``. Returns the top node. ``cache="unsafe"``: flushes
        write metadata but never fsync (qemu-img's ``-t unsafe``)."""
        cache = coerce(CacheMode, cache)
        if cache not in ("writeback", "unsafe"):
            raise UsageError(f"invalid cache mode '{cache}' (writeback or unsafe)")
        with self.io:
            node = open_chain(path, fmt, read_only=read_only, graph=self.graph, name=node_name)
            if cache == "unsafe":
                self.io.set_cache_unsafe(node)
            return node

    def create(self, path: str, fmt: str, size: int | None, *, node_name: str | None = None,
               **opts: Any) -> Node:
        """Create an image (see :func:`blkjobs.formats.create_image` for the
        options, e.g. ``backing_file``) and open it read-write."""
        cache = opts.pop("cache", "writeback")
        create_image(path, fmt, size, **opts)
        return self.open(path, fmt, node_name=node_name, cache=cache)

    def node(self, name: str | Node) -> Node:
        """A node by node-name (``Cannot find device=<n> nor node-name=<n>``)."""
        return self.io.node(name)

    def attach(self, node: str | Node) -> Frontend:
        """A front end for live I/O on ``node`` (it takes write permission)."""
        with self.io:
            return self.io.attach(self.node(node))

    def close(self) -> None:
        """Cancel what still runs, wait for it, close front ends and nodes."""
        for job in self.jobs.jobs():
            try:
                if not job.is_completed:
                    self.jobs.cancel_job(job, True)
            except JobError:
                pass
        # then nothing may stay suspended (after the cancel: a job held at a
        # break point must not run on to its end and complete)
        if self.io.breaks is not None:
            self.io.breaks.close()
        try:
            self.jobs.wait_until(lambda: all(j.is_completed or not j.started
                                             for j in self.jobs.jobs()), 30)
        except TimeoutError:
            pass
        for fe in self.io.frontends():
            fe.close()
        with self.io:
            self.graph.close()

    def blkdebug(self, node: str | Node, rules: list[Any]) -> None:
        """Inject faults into ``node`` (see :mod:`blkjobs.jobs.blkdebug`): its driver is
        wrapped so that matching requests fail with the rule's errno."""
        with self.io:
            node = self.node(node)
            rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
            if isinstance(node.driver, Blkdebug):
                node.driver.rules = rules
            else:
                node.driver = Blkdebug(node.driver, rules)

    def blkdebug_qemu(self, node: str | Node, rules: QemuRules) -> None:
        """QEMU's blkdebug rule semantics on ``node`` (see
        :mod:`blkjobs.jobs.blkdebug_qemu`; the daemon's ``blkdebug`` nodes)."""
        with self.io:
            node = self.node(node)
            node.driver = QemuBlkdebug(node.driver, rules, node.name)

    # -- blkdebug break points (see blkjobs.jobs.blkdebug) ----------------
    def _blkdebug_breaks(self) -> Breaks:
        b: Breaks | None = self.io.breaks
        if b is None:
            b = self.io.breaks = Breaks(self.io.lock)
        return b

    def blkdebug_break(self, node: str | Node, event: str, tag: str) -> None:
        """Suspend the next request raising ``event`` on ``node`` before it
        runs, under ``tag`` (qemu-io's ``break EVENT TAG``; fires once)."""
        breaks = self._blkdebug_breaks()
        with self.io:
            node = self.node(node)
            if not isinstance(node.driver, Blkdebug):
                node.driver = Blkdebug(node.driver, [])
            node.driver.breaks, node.driver.node_name = breaks, node.name
            breaks.add(node.driver, event, tag)

    def blkdebug_wait_break(self, tag: str, timeout: float = 60.0) -> Suspended:
        """Wait until a request is suspended at ``tag``; returns it (a
        ``blkdebug.Suspended``). ``timeout`` is a safety net: TimeoutError."""
        return self._blkdebug_breaks().wait(tag, timeout)

    def blkdebug_is_suspended(self, tag: str) -> bool:
        return self._blkdebug_breaks().is_suspended(tag)

    def blkdebug_resume(self, tag: str) -> None:
        """Let one request suspended at ``tag`` run (UsageError: none is)."""
        self._blkdebug_breaks().resume(tag)

    def blkdebug_remove_break(self, tag: str) -> None:
        """Drop the break points ``tag`` and resume what they hold."""
        self._blkdebug_breaks().remove(tag)

    # ------------------------------------------------------------------
    # Dirty bitmaps

    def block_dirty_bitmap_add(self, node: str | Node, name: str, granularity: int = 65536,
                               persistent: bool = False, disabled: bool = False
                               ) -> DirtyBitmap:
        """A new dirty bitmap of ``node`` recording its writes from now on.
        ``persistent``: stored in the node's qcow2 image (raw: refused), so
        it survives ``close`` and the process, and qemu-img sees it;
        ``disabled``: not recording until :meth:`DirtyBitmap.enable`. A
        qcow2 image's persistent bitmaps are the node's bitmaps from
        :meth:`open` on. See docs/bitmaps.md."""
        with self.io:
            return self.io.add_bitmap(self.node(node), name, granularity,
                                      persistent=persistent, disabled=disabled)

    def block_dirty_bitmap_remove(self, node: str | Node, name: str) -> None:
        with self.io:
            self.io.remove_bitmap(self.node(node), name)

    def bitmap(self, node: str | Node, name: str) -> DirtyBitmap:
        """The dirty bitmap ``name`` of ``node`` (``Bitmap '<n>' could not be found``)."""
        with self.io:
            return self.io.bitmap(self.node(node), name)

    def bitmaps(self, node: str | Node) -> list[DirtyBitmap]:
        """The dirty bitmaps of ``node``, persistent ones included."""
        with self.io:
            return list(self.io.bitmaps_of(self.node(node)).values())

    def block_dirty_bitmap_clear(self, node: str | Node, name: str) -> None:
        """Forget every dirty bit of bitmap ``name`` (:meth:`DirtyBitmap.clear`)."""
        with self.io:
            self.io.bitmap(self.node(node), name).clear()

    def block_dirty_bitmap_enable(self, node: str | Node, name: str) -> None:
        with self.io:
            self.io.bitmap(self.node(node), name).enable()

    def block_dirty_bitmap_disable(self, node: str | Node, name: str) -> None:
        with self.io:
            self.io.bitmap(self.node(node), name).disable()

    def block_dirty_bitmap_merge(self, node: str | Node, target: str,
                                 sources: list[str]) -> None:
        """Add the dirty bits of bitmaps ``sources`` of ``node`` to ``target``."""
        with self.io:
            n = self.node(node)
            self.io.bitmap(n, target).merge(*[self.io.bitmap(n, s) for s in sources])

    def dirty_extents(self, node: str | Node, name: str, offset: int = 0,
                      length: int | None = None) -> list[tuple[int, int]]:
        """The dirty extents ``(offset, length)`` of bitmap ``name``
        (:meth:`DirtyBitmap.dirty_extents`), read under the I/O lock."""
        with self.io:
            return list(self.io.bitmap(self.node(node), name).dirty_extents(offset, length))

    # ------------------------------------------------------------------
    # Starting jobs

    def _job_id(self, job_id: str | None, device: Node) -> str:
        return job_id if job_id is not None else device.name

    def _launch(self, driver: BlockJob, job_id: str, *, txn: JobTxn | None, speed: int,
                auto_finalize: bool, auto_dismiss: bool, start: bool) -> Job:
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        # a bad filter-node-name fails before a job exists or setup holds anything
        with self.io:
            self.graph.check_name(driver.filter_node_name)
        job = self.jobs.create(driver, job_id, txn=txn, auto_finalize=auto_finalize,
                               auto_dismiss=auto_dismiss, speed=speed)
        try:
            driver.setup(job)
        except BaseException:
            self.jobs.abandon(job)
            raise
        if start:
            self.jobs.start(job)
        return job

    def backup(self, device: str | Node, target: str | Node, sync: SyncMode | str, *,
               job_id: str | None = None, speed: int = 0, bitmap: str | None = None,
               bitmap_mode: BitmapMode | str | None = None, compress: bool = False,
               on_source_error: ErrorPolicy | str = ErrorPolicy.REPORT,
               on_target_error: ErrorPolicy | str = ErrorPolicy.REPORT,
               on_cbw_error: OnCbwError | str = OnCbwError.BREAK_GUEST_WRITE,
               auto_finalize: bool = True,
               auto_dismiss: bool = True, filter_node_name: str | None = None,
               txn: JobTxn | None = None, start: bool = True) -> Job:
        """``blockdev-backup``: a point-in-time copy of ``device`` onto
        ``target`` (see docs/jobs.md §1). Returns the job (running unless
        ``start=False``; a ``txn`` member waits for :meth:`transaction`).
        The options that are enumerations take the :mod:`blkjobs.options`
        member or its QMP string."""
        sync, bitmap_mode = coerce(SyncMode, sync), coerce(BitmapMode, bitmap_mode)
        on_source_error = coerce(ErrorPolicy, on_source_error)
        on_target_error = coerce(ErrorPolicy, on_target_error)
        on_cbw_error = coerce(OnCbwError, on_cbw_error)
        drv = BackupJob.create(self.io, device, target, sync, bitmap=bitmap,
                               bitmap_mode=bitmap_mode, compress=compress,
                               on_source_error=on_source_error,
                               on_target_error=on_target_error, on_cbw_error=on_cbw_error,
                               filter_node_name=filter_node_name)
        drv.filter_node_name = filter_node_name
        return self._launch(drv, self._job_id(job_id, drv.src), txn=txn, speed=speed,
                            auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                            start=start)

    def mirror(self, device: str | Node, target: str | Node, sync: SyncMode | str, *,
               job_id: str | None = None, speed: int = 0, replaces: str | None = None,
               granularity: int | None = None, buf_size: int | None = None,
               on_source_error: ErrorPolicy | str = ErrorPolicy.REPORT,
               on_target_error: ErrorPolicy | str = ErrorPolicy.REPORT,
               copy_mode: CopyMode | str = CopyMode.BACKGROUND, target_is_zero: bool = False,
               auto_finalize: bool = True, auto_dismiss: bool = True,
               filter_node_name: str | None = None, txn: JobTxn | None = None,
               start: bool = True, unmap: bool = True) -> Job:
        """``blockdev-mirror`` (docs/jobs.md §2): keeps ``target`` in sync with
        ``device`` until completed (pivot) or cancelled."""
        sync, copy_mode = coerce(SyncMode, sync), coerce(CopyMode, copy_mode)
        on_source_error = coerce(ErrorPolicy, on_source_error)
        on_target_error = coerce(ErrorPolicy, on_target_error)
        drv = MirrorJob.create(self.io, device, target, sync, replaces=replaces,
                               granularity=granularity, buf_size=buf_size,
                               on_source_error=on_source_error,
                               on_target_error=on_target_error, copy_mode=copy_mode,
                               target_is_zero=target_is_zero, unmap=unmap)
        drv.filter_node_name = filter_node_name
        return self._launch(drv, self._job_id(job_id, drv.src), txn=txn, speed=speed,
                            auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                            start=start)

    def stream(self, device: str | Node, *, base: str | None = None,
               base_node: str | None = None, bottom: str | None = None,
               backing_file: str | None = None, job_id: str | None = None,
               speed: int = 0, on_error: ErrorPolicy | str = ErrorPolicy.REPORT,
               auto_finalize: bool = True,
               auto_dismiss: bool = True, filter_node_name: str | None = None,
               txn: JobTxn | None = None, start: bool = True) -> Job:
        """``block-stream`` (docs/jobs.md §3): pull the chain above the base into
        ``device``, then back it directly onto the base."""
        on_error = coerce(ErrorPolicy, on_error)
        drv = StreamJob.create(self.io, device, base=base, base_node=base_node, bottom=bottom,
                               backing_file=backing_file, on_error=on_error)
        drv.filter_node_name = filter_node_name
        return self._launch(drv, self._job_id(job_id, drv.top), txn=txn, speed=speed,
                            auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                            start=start)

    def commit(self, device: str | Node, *, base_node: str | None = None,
               base: str | None = None, top_node: str | None = None,
               top: str | None = None, backing_file: str | None = None,
               job_id: str | None = None, speed: int = 0,
               on_error: ErrorPolicy | str = ErrorPolicy.REPORT,
               auto_finalize: bool = True, auto_dismiss: bool = True,
               filter_node_name: str | None = None, txn: JobTxn | None = None,
               start: bool = True) -> Job:
        """``block-commit`` (docs/jobs.md §4): intermediate commit, or active
        commit (mirror-like, needs ``job_complete``) when top is the active
        layer."""
        on_error = coerce(ErrorPolicy, on_error)
        drv = make_commit(self.io, device, base_node=base_node, base=base, top_node=top_node,
                          top=top, backing_file=backing_file, on_error=on_error)
        drv.filter_node_name = filter_node_name
        return self._launch(drv, self._job_id(job_id, self.node(device)), txn=txn,
                            speed=speed, auto_finalize=auto_finalize,
                            auto_dismiss=auto_dismiss, start=start)

    def transaction(self, actions: list[tuple[str, dict[str, Any]]],
                    completion_mode: CompletionMode | str = CompletionMode.INDIVIDUAL
                    ) -> list[Job]:
        """Start several jobs atomically. ``actions``: ("backup" | "mirror" |
        "stream" | "commit", keyword arguments of that method). If one fails
        to start, the ones created so far are rolled back and its error is
        raised. ``grouped``: the jobs finish together or all abort (backup
        only)."""
        mode = CompletionMode(completion_mode)
        if mode is CompletionMode.GROUPED:
            for kind, _ in actions:
                if kind != "backup":
                    raise JobError(f"Action 'block-{kind}' does not support transaction "
                                   "property completion-mode = grouped")
        txn = JobTxn(mode)
        starters: dict[str, Callable[..., Job]] = {
            "backup": self.backup, "mirror": self.mirror, "stream": self.stream,
            "commit": self.commit}
        jobs = []
        try:
            for kind, kw in actions:
                if kind not in starters:
                    raise UsageError(f"unknown transaction action '{kind}'")
                jobs.append(starters[kind](**kw, txn=txn, start=False))
        except BaseException:
            self.jobs.rollback_txn(txn)
            raise
        self.jobs.start_txn(txn)
        return jobs

    # ------------------------------------------------------------------
    # Verbs (docs/job-model.md §4) and queries

    def job(self, id: str) -> Job:
        """The job ``id`` (``Job not found``)."""
        return self.jobs.find_job(id)

    def job_cancel(self, id: str, force: bool = True) -> None:
        """Cancel the job. ``force=False``: a soft cancel (a READY mirror then
        completes without pivoting; refused while the user paused the job),
        QMP's ``block-job-cancel``; ``True``: ``job-cancel``."""
        with self.jobs.lock:
            job = self.job(id)
            if not force and job.user_paused:
                raise JobError(f"The block job for device '{id}' is currently paused")
            self.jobs.cancel_job(job, force)

    def job_pause(self, id: str) -> None:
        self.jobs.user_pause(self.job(id))

    def job_resume(self, id: str) -> None:
        self.jobs.user_resume(self.job(id))

    def job_complete(self, id: str) -> None:
        self.jobs.complete_job(self.job(id))

    def job_finalize(self, id: str) -> None:
        self.jobs.finalize_job(self.job(id))

    def job_dismiss(self, id: str) -> None:
        self.jobs.dismiss_job(self.job(id))

    def job_set_speed(self, id: str, speed: int) -> None:
        """The job's rate limit in bytes/s (0: unlimited)."""
        self.jobs.set_speed(self.job(id), speed)

    def job_change(self, id: str, type: str, **options: Any) -> None:
        """Change a running job's options (mirror: ``copy_mode``); ``type``
        must be the job's type."""
        self.jobs.change_job(self.job(id), {"type": type, **options})

    def query_jobs(self) -> list[dict[str, Any]]:
        return self.jobs.query_jobs()

    def query_block_jobs(self) -> list[dict[str, Any]]:
        return self.jobs.query_block_jobs()

    # ------------------------------------------------------------------
    # Events and waiting

    def add_listener(self, listener: Callable[[Event], None]) -> Callable[[Event], None]:
        return self.jobs.add_listener(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self.jobs.remove_listener(listener)

    def listen(self, names: list[str] | None = None) -> EventListener:
        """A new :class:`EventListener` receiving events from now on."""
        lst = EventListener(names)
        self.jobs.add_listener(lst)
        return lst

    def wait_job(self, job: Job | str, timeout: float | None = None) -> JobOutcome:
        """Wait until the job concludes, however long it runs; return its
        outcome. With ``timeout`` (seconds), TimeoutError when it has not
        concluded by then (the job goes on). A job that waits for a verb
        (``auto_finalize=False`` pending, a mirror ready) waits for it here."""
        if isinstance(job, str):
            job = self.jobs.find_job(job)
        self.jobs.wait_until(lambda: job.outcome is not None, timeout)
        assert job.outcome is not None
        return job.outcome

    def wait_status(self, job: Job, *statuses: str, timeout: float | None = None) -> None:
        """Wait until ``job`` is in one of ``statuses`` (wire names); with
        ``timeout``, TimeoutError when it is not by then."""
        want = set(statuses)
        self.jobs.wait_until(lambda: job.status.value in want, timeout)

