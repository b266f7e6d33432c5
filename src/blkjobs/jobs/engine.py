"""The public library API: :class:`Engine`.

An Engine owns one block graph, one job manager and the live-I/O front ends::

    eng = Engine()
    src = eng.open("disk.qcow2", node_name="disk")          # read-write
    eng.create("backup.qcow2", "qcow2", src.size, node_name="bk")
    vm = eng.attach(src)                                     # the VM's writes
    job = eng.backup("disk", "bk", sync="full", job_id="b0")
    eng.wait_job(job)                                        # -> JobOutcome
    eng.close()

Jobs are started by QEMU's option names (``docs/jobs.md``; QMP dashes become
underscores): :meth:`backup`, :meth:`mirror`, :meth:`stream`, :meth:`commit`;
:meth:`transaction` starts several at once. Every verb of ``docs/job-model.md``
is a method of the same name (``job_cancel``, ``block_job_cancel``, ...), as
are ``query_jobs``/``query_block_jobs``. Events reach listeners added with
:meth:`add_listener` (or collected by :meth:`listen`).

Concurrency: the job core's lock orders job state; the engine adds one I/O
lock (:attr:`io`, a condition) that every front-end request, every graph
change and every job's planning step takes. The C engine copies without it.
The I/O lock is never held while taking the job core's lock.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import JobError, UsageError
from ..formats import create_image
from ..graph import Graph, Node
from ..job import (CompletionMode, Event, EventListener, Job, JobManager, JobOutcome,
                   JobTxn)
from ..job.events import Clock
from ..native.bitmap import Bitmap
from ..options import (BitmapMode, CacheMode, CopyMode, ErrorPolicy, OnCbwError, SyncMode,
                       coerce)
from .base import InFlight
from .frontend import Filter, Frontend


class DirtyBitmap:
    """A named dirty bitmap on a node (``block-dirty-bitmap-add``).

    Front-end writes to the node mark it while ``enabled``. A backup freezes
    it (``busy``): new writes then go to a hidden ``successor`` until the job
    hands the bitmap over (see ``docs/jobs.md``, bitmap-mode).
    """

    def __init__(self, node: Node, name: str, granularity: int):
        self.node = node
        self.name = name
        self.bitmap = Bitmap(node.size, granularity)
        self.enabled = True
        self.busy = False
        self.successor: Bitmap | None = None

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity

    def mark(self, offset: int, length: int) -> None:
        if self.successor is not None:
            self.successor.set(offset, length)
        elif self.enabled:
            self.bitmap.set(offset, length)

    def count(self) -> int:
        return self.bitmap.count()


class NodeState:
    """What the engine keeps per node, on the node (``Node.engine_state``):
    it goes away with the node, so a later node can never inherit it (an
    ``id(node)`` key can: ids are reused once a node is freed)."""

    __slots__ = ("unsafe", "filters", "bitmaps", "quiesced", "unfilled")

    def __init__(self) -> None:
        #: opened cache=unsafe: never fsync'ed
        self.unsafe = False
        #: a filter node's write hooks
        self.filters: list[Filter] = []
        #: dirty bitmaps by name
        self.bitmaps: dict[str, DirtyBitmap] = {}
        #: nesting count of quiesce()
        self.quiesced = 0
        #: guest ranges of clusters a job's batch allocated and has not
        #: filled yet (see Mover); reads reaching the node wait for them
        self.unfilled: InFlight | None = None


class Engine:
    """Graph + jobs + front ends. See the module docstring.

    ``clock``: the job core's clock (tests pass a fake one). ``locking``:
    take QEMU's file lock bytes on open images.
    """

    def __init__(self, clock: Clock | None = None, locking: bool = True):
        self.graph = Graph(locking=locking)
        self.jobs = JobManager(clock)
        #: The I/O lock (see the module docstring).
        self.io = threading.Condition(threading.RLock())
        self._frontends: list[Frontend] = []
        self._fe_count = 0
        #: nodes claimed by jobs (each node records its job: Node.claimed_by)
        self._claims: set[Node] = set()
        #: how many nodes have unfilled ranges (NodeState.unfilled): reads
        #: skip the chain walk when none has
        self._n_unfilled = 0

    # ------------------------------------------------------------------
    # Nodes

    @staticmethod
    def state(node: Node) -> NodeState:
        """The engine's per-node record of ``node`` (created on first use)."""
        st = node.engine_state
        if st is None:
            st = node.engine_state = NodeState()
        return st

    def open(self, path: str, fmt: str | None = None, *, node_name: str | None = None,
             read_only: bool = False, cache: CacheMode | str = CacheMode.WRITEBACK) -> Node:
        """Open ``path`` and its backing chain; the top node is read-write
        unless ``read_only``. Returns the top node. ``cache="unsafe"``: flushes
        write metadata but never fsync (qemu-img's ``-t unsafe``)."""
        cache = coerce(CacheMode, cache)
        if cache not in ("writeback", "unsafe"):
            raise UsageError(f"invalid cache mode '{cache}' (writeback or unsafe)")
        with self.io:
            node = self.graph.open_chain(path, fmt, read_only=read_only, name=node_name)
            if cache == "unsafe":
                self.state(node).unsafe = True
                if hasattr(node.driver, "unsafe"):
                    node.driver.unsafe = True
            return node

    def cache_unsafe(self, node: Node) -> bool:
        st = node.engine_state
        return st is not None and st.unsafe

    def create(self, path: str, fmt: str, size: int | None, *, node_name: str | None = None,
               **opts: Any) -> Node:
        """Create an image (see :func:`blkjobs.formats.create_image` for the
        options, e.g. ``backing_file``) and open it read-write."""
        cache = opts.pop("cache", "writeback")
        create_image(path, fmt, size, **opts)
        return self.open(path, fmt, node_name=node_name, cache=cache)

    def node(self, name: str | Node) -> Node:
        """A node by node-name (``Cannot find device=<n> nor node-name=<n>``)."""
        if isinstance(name, Node):
            return name
        node = self.graph.nodes.get(name)
        if node is None:
            raise JobError(f"Cannot find device={name} nor node-name={name}")
        return node

    def attach(self, node: str | Node) -> Frontend:
        """A front end for live I/O on ``node`` (it takes write permission)."""
        with self.io:
            node = self.node(node)
            self._fe_count += 1
            fe = Frontend(self, node, f"frontend{self._fe_count}")
            self._frontends.append(fe)
            return fe

    def frontends(self, node: Node | None = None) -> list[Frontend]:
        with self.io:
            # a front end writing through filters above ``node`` uses it too
            return [f for f in self._frontends
                    if node is None or f.node is node or f.node.below_filters() is node]

    def close(self) -> None:
        """Cancel what still runs, wait for it, close front ends and nodes."""
        if self.__dict__.get("_breaks") is not None:
            self._breaks.close()        # nothing may stay suspended
        for job in self.jobs.jobs():
            try:
                if not job.is_completed:
                    self.jobs.cancel_job(job, True)
            except JobError:
                pass
        try:
            self.jobs.wait_until(lambda: all(j.is_completed or not j.started
                                             for j in self.jobs._jobs), 30)
        except TimeoutError:
            pass
        for fe in list(self._frontends):
            fe.close()
        with self.io:
            self.graph.close()

    def blkdebug(self, node: str | Node, rules: list[Any]) -> None:
        """Inject faults into ``node`` (see :mod:`.blkdebug`): its driver is
        wrapped so that matching requests fail with the rule's errno."""
        from .blkdebug import Blkdebug, Rule
        with self.io:
            node = self.node(node)
            rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
            if isinstance(node.driver, Blkdebug):
                node.driver.rules = rules
            else:
                node.driver = Blkdebug(node.driver, rules)

    def blkdebug_remove(self, node: str | Node) -> None:
        from .blkdebug import Blkdebug
        with self.io:
            node = self.node(node)
            if isinstance(node.driver, Blkdebug):
                node.driver = node.driver.inner

    # -- blkdebug break points (see .blkdebug) ----------------------------
    def _blkdebug_breaks(self) -> Any:
        from .blkdebug import Breaks
        b = self.__dict__.get("_breaks")
        if b is None:
            b = self._breaks = Breaks(self.io)
        return b

    def blkdebug_break(self, node: str | Node, event: str, tag: str) -> None:
        """Suspend the next request raising ``event`` on ``node`` before it
        runs, under ``tag`` (qemu-io's ``break EVENT TAG``; fires once)."""
        from .blkdebug import Blkdebug
        breaks = self._blkdebug_breaks()
        with self.io:
            node = self.node(node)
            if not isinstance(node.driver, Blkdebug):
                node.driver = Blkdebug(node.driver, [])
            node.driver.breaks, node.driver.node_name = breaks, node.name
            breaks.add(node.driver, event, tag)

    def blkdebug_wait_break(self, tag: str, timeout: float = 60.0) -> Any:
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

    def block_dirty_bitmap_add(self, node: str | Node, name: str,
                               granularity: int = 65536) -> DirtyBitmap:
        with self.io:
            node = self.node(node)
            bms = self.state(node).bitmaps
            if name in bms:
                raise JobError(f"Bitmap already exists: {name}")
            bm = bms[name] = DirtyBitmap(node, name, granularity)
            return bm

    def block_dirty_bitmap_remove(self, node: str | Node, name: str) -> None:
        with self.io:
            bm = self.bitmap(node, name)
            if bm.busy:
                raise JobError(f"Bitmap '{name}' is currently in use by another operation "
                               "and cannot be used")
            del self.state(bm.node).bitmaps[name]

    def bitmap(self, node: str | Node, name: str) -> DirtyBitmap:
        node = self.node(node)
        bm = self.bitmaps_of(node).get(name)
        if bm is None:
            raise JobError(f"Bitmap '{name}' could not be found")
        return bm

    def bitmaps_of(self, node: Node) -> dict[str, DirtyBitmap]:
        """The dirty bitmaps of ``node`` by name (the engine's own dict)."""
        return self.state(node).bitmaps

    # ------------------------------------------------------------------
    # Filters and the guest write path (used by frontend and jobs)

    def add_filter(self, node: Node, f: Filter, drv: str, name: str | None = None, *,
                   perm=None, keep: tuple[Node, ...] = ()) -> Node:
        """Insert a filter node of driver ``drv`` (named ``name``, else
        ``#blockN``) above ``node``, with ``f``'s write hooks: every parent of
        ``node`` -- front ends (the guest, exports), overlays backed by it,
        filters stacked on it -- now uses the filter, but those in ``keep``
        (QEMU leaves a parent the filter reaches, e.g. a backup's fleecing
        target backed by its source, where it is). ``perm``: what the filter
        holds on ``node`` (see Graph.add_filter). Returns the filter node;
        :meth:`remove_filter` takes it out again."""
        with self.io:
            fnode = self.graph.add_filter(drv, node, name, perm)
            self.state(fnode).filters = [f]
            try:
                self._relink(node, fnode, skip=(fnode, *keep))
            except BaseException:
                self.remove_filter(fnode)
                raise
            return fnode

    def _relink(self, old: Node, new: Node, skip: tuple[Node, ...] = ()) -> None:
        """Parents of ``old`` (but those in ``skip``) use ``new`` instead (I/O
        lock held): a filter node going in or out."""
        for p in self.graph.parents(old):
            if p in skip:
                continue
            if p.file is old:
                held = p.file_perm
                p.file, p.file_perm = new, new.take(held.owner, held.perm, held.shared)
                held.release()
            else:
                p.attach_backing(new)
        self._repoint(old, new)

    def above_filters(self, node: Node) -> Node:
        """The top-most filter node stacked above ``node`` (``node`` itself
        without one): where a device of ``node`` attaches now."""
        with self.io:
            while True:
                up = [p for p in self.graph.parents(node) if p.is_filter and p.file is node]
                if not up:
                    return node
                node = up[0]

    def remove_filter(self, fnode: Node) -> None:
        """Take a filter node out: its front ends move to what is below it
        now (after a mirror pivot: the target), its hooks stop."""
        with self.io:
            if fnode.file is None:
                return          # removed already
            self.state(fnode).filters = []
            self._relink(fnode, fnode.file)
            fnode.close()

    def quiesce(self, node: Node) -> None:
        """Hold off front-end writes to ``node`` (nested) until :meth:`unquiesce`.
        When it returns no write is in progress on ``node``."""
        with self.io:
            self.state(node).quiesced += 1

    def unquiesce(self, node: Node) -> None:
        with self.io:
            st = self.state(node)
            st.quiesced = max(0, st.quiesced - 1)
            self.io.notify_all()

    def filters(self, node: Node) -> list[Filter]:
        """The write hooks of a filter node (empty: none, or removed)."""
        st = node.engine_state
        return st.filters if st is not None else []

    @staticmethod
    def _levels(fe: Frontend) -> list[Node]:
        """The front end's node, the filters below it, the image node."""
        levels = [fe.node]
        while levels[-1].is_filter:
            levels.append(levels[-1].file)
        return levels

    # Clusters allocated before their data lands (a job's batch in the C
    # engine): a read reaching them would see zeroes or stale bytes where the
    # chain below has the data, and a flush would make them durable unfilled.
    def mark_unfilled(self, node: Node, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Register guest ranges of ``node`` allocated but not yet written
        (I/O lock held); returns the tokens for :meth:`mark_filled`."""
        st = self.state(node)
        uf = st.unfilled
        if uf is None:
            uf = st.unfilled = InFlight(self.io)
            self._n_unfilled += 1
        return [uf.add(s, n) for s, n in ranges]

    def mark_filled(self, node: Node, tokens: list[tuple[int, int]]) -> None:
        """The ranges landed, or were given back (I/O lock held)."""
        st = self.state(node)
        uf = st.unfilled
        for r in tokens:
            uf.remove(r)
        if not uf.total:
            st.unfilled = None
            self._n_unfilled -= 1

    def wait_filled(self, node: Node, offset: int, length: int,
                    exclude: Node | None = None) -> None:
        """Wait (I/O lock held, released meanwhile) until no node of
        ``node``'s chain but ``exclude`` has a cluster in [offset,
        offset+length) allocated and unfilled: what a read through the
        chain must do first."""
        count = self._n_unfilled
        if count and not (count == 1 and exclude is not None
                          and _unfilled(exclude) is not None):
            for n in node.chain():
                uf = _unfilled(n)
                if uf is not None and n is not exclude:
                    uf.wait_clear(offset, length)

    def _guest_read(self, fe: Frontend, offset: int, buf) -> None:
        with self.io:
            self.wait_filled(self._levels(fe)[-1], offset, len(buf))
            fe.node.readinto(offset, buf)

    def _guest_flush(self, fe: Frontend) -> None:
        with self.io:
            node = self._levels(fe)[-1]
            uf = _unfilled(node)
            if uf is not None:
                uf.wait_clear(0, node.size)
            fe.node.flush()

    def _guest_write(self, fe: Frontend, op: str, offset: int, length: int,
                     do: Callable[[Node], None], data: Any = None) -> None:
        with self.io:
            while True:
                levels = self._levels(fe)
                if not any(_quiesced(n) for n in levels):
                    break
                self.io.wait(1.0)
            node = levels[-1]
            filters = [f for n in levels for f in self.filters(n)]
            for f in filters:
                f.before_write(node, op, offset, length)
            do(node)
            for f in filters:
                f.after_write(node, op, offset, length, data)
            st = node.engine_state
            for bm in (st.bitmaps.values() if st is not None else ()):
                bm.mark(offset, length)
        for f in filters:
            f.notify()

    def _repoint(self, old: Node, new: Node) -> list[tuple[Frontend, Node]]:
        """Move every front end of ``old`` to ``new`` (I/O lock held);
        returns what to undo."""
        moved = []
        for fe in self._frontends:
            if fe.node is old:
                fe._move(new)
                moved.append((fe, old))
        return moved

    # ------------------------------------------------------------------
    # Node claims (docs/jobs.md §5) and dropping nodes that left a chain

    def check_busy(self, node: Node) -> None:
        """QEMU's op blocker text for a node another job claimed."""
        job = node.claimed_by
        if job is not None:
            raise JobError(f"Node '{node.name}' is busy: block device is in use by block "
                           f"job: {job.type}")

    def claim(self, job: Job, nodes: list[Node]) -> None:
        """Block ``nodes`` for other jobs until :meth:`release_claims`
        (nothing is claimed when one of them is busy)."""
        with self.io:
            for n in nodes:
                if n.claimed_by is not job:
                    self.check_busy(n)
            for n in nodes:
                n.claimed_by = job
                self._claims.add(n)

    def release_claims(self, job: Job) -> None:
        with self.io:
            for n in [n for n in self._claims if n.claimed_by is job]:
                n.claimed_by = None
                self._claims.discard(n)

    def drop_unused(self, nodes: list[Node]) -> None:
        """Close the nodes (top-most first) that no node, front end or other
        user references any more: they left the chain. Files are untouched.
        A node someone else holds (a QMP monitor's ``blockdev-add``: owner
        ``'monitor'``) stays, parentless, until that user lets it go."""
        with self.io:
            for n in nodes:
                if n.name not in self.graph.nodes or self.graph.parents(n):
                    continue
                if self.frontends(n) or any(p.owner != "open" for p in n.users()):
                    continue
                n.close()

    # ------------------------------------------------------------------
    # Starting jobs

    def _job_id(self, job_id: str | None, device: Node) -> str:
        return job_id if job_id is not None else device.name

    def _launch(self, driver: Any, job_id: str, *, txn: JobTxn | None, speed: int,
                auto_finalize: bool, auto_dismiss: bool, start: bool) -> Job:
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        # a bad filter-node-name fails before a job exists or setup holds anything
        with self.io:
            self.graph.check_name(getattr(driver, "filter_node_name", None))
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
        from .backup import BackupJob
        sync, bitmap_mode = coerce(SyncMode, sync), coerce(BitmapMode, bitmap_mode)
        on_source_error = coerce(ErrorPolicy, on_source_error)
        on_target_error = coerce(ErrorPolicy, on_target_error)
        on_cbw_error = coerce(OnCbwError, on_cbw_error)
        drv = BackupJob.create(self, device, target, sync, bitmap=bitmap,
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
               start: bool = True) -> Job:
        """``blockdev-mirror`` (docs/jobs.md §2): keeps ``target`` in sync with
        ``device`` until completed (pivot) or cancelled."""
        from .mirror import MirrorJob
        sync, copy_mode = coerce(SyncMode, sync), coerce(CopyMode, copy_mode)
        on_source_error = coerce(ErrorPolicy, on_source_error)
        on_target_error = coerce(ErrorPolicy, on_target_error)
        drv = MirrorJob.create(self, device, target, sync, replaces=replaces,
                               granularity=granularity, buf_size=buf_size,
                               on_source_error=on_source_error,
                               on_target_error=on_target_error, copy_mode=copy_mode,
                               target_is_zero=target_is_zero)
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
        from .stream import StreamJob
        on_error = coerce(ErrorPolicy, on_error)
        drv = StreamJob.create(self, device, base=base, base_node=base_node, bottom=bottom,
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
        from .commit import make_commit
        on_error = coerce(ErrorPolicy, on_error)
        drv = make_commit(self, device, base_node=base_node, base=base, top_node=top_node,
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
        starters = {"backup": self.backup, "mirror": self.mirror, "stream": self.stream,
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

    def job_cancel(self, id: str) -> None:
        self.jobs.job_cancel(id)

    def job_pause(self, id: str) -> None:
        self.jobs.job_pause(id)

    def job_resume(self, id: str) -> None:
        self.jobs.job_resume(id)

    def job_complete(self, id: str) -> None:
        self.jobs.job_complete(id)

    def job_finalize(self, id: str) -> None:
        self.jobs.job_finalize(id)

    def job_dismiss(self, id: str) -> None:
        self.jobs.job_dismiss(id)

    def block_job_cancel(self, device: str, force: bool = False) -> None:
        self.jobs.block_job_cancel(device, force)

    def block_job_pause(self, device: str) -> None:
        self.jobs.block_job_pause(device)

    def block_job_resume(self, device: str) -> None:
        self.jobs.block_job_resume(device)

    def block_job_complete(self, device: str) -> None:
        self.jobs.block_job_complete(device)

    def block_job_finalize(self, id: str) -> None:
        self.jobs.block_job_finalize(id)

    def block_job_dismiss(self, id: str) -> None:
        self.jobs.block_job_dismiss(id)

    def block_job_set_speed(self, device: str, speed: int) -> None:
        self.jobs.block_job_set_speed(device, speed)

    def block_job_change(self, id: str, type: str, **options: Any) -> None:
        self.jobs.block_job_change(id, type, **options)

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

    def wait_job(self, job: Job | str, timeout: float = 60.0) -> JobOutcome:
        """Wait until the job concludes; return its outcome (TimeoutError
        when it does not within ``timeout``)."""
        if isinstance(job, str):
            job = self.jobs.find_job(job)
        self.jobs.wait_until(lambda: job.outcome is not None, timeout)
        assert job.outcome is not None
        return job.outcome

    def wait_status(self, job: Job, *statuses: str, timeout: float = 60.0) -> None:
        """Wait until ``job`` is in one of ``statuses`` (wire names), or
        TimeoutError."""
        want = set(statuses)
        self.jobs.wait_until(lambda: job.status.value in want, timeout)


def _unfilled(node: Node) -> InFlight | None:
    st = node.engine_state
    return st.unfilled if st is not None else None


def _quiesced(node: Node) -> int:
    st = node.engine_state
    return st.quiesced if st is not None else 0
