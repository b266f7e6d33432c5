"""I/O through the graph: the internal block-I/O layer the jobs use.

One :class:`BlockIO` per :class:`~blkjobs.engine.Engine` (``eng.io``); the
facade creates it and hands it to every job driver. It owns the I/O lock
and everything guest I/O and the jobs share below the job core:

* the **I/O lock** (:attr:`BlockIO.lock`, a condition; ``with io:`` takes
  it): every front-end request, every graph change and every job's planning
  step holds it; the C engine copies without it. It is never held while
  taking the job manager's lock;
* **front ends** (:meth:`attach`, :meth:`frontends`) and the guest path
  (:meth:`guest_read`, :meth:`guest_write`, :meth:`guest_flush`): a write
  travels down the chain of filter nodes above the image node, each
  filter's :meth:`~.frontend.Filter.write` passing it to its ``next``
  (nbdkit's filters, QEMU's ``bs->file``), then marks the node's dirty
  bitmaps; a read is mapped under the lock and its bytes read outside it
  (:mod:`.readplan`), tracked in flight (``NodeState.reading``: writes to
  its range, quiesce and close wait);
* **filters** (:meth:`add_filter`, :meth:`remove_filter`,
  :meth:`above_filters`, :meth:`filter_of`) and **repointing** parents
  (:meth:`repoint`, :meth:`undo_repoint`: a mirror's pivot);
* **quiescing** (:meth:`quiesce`/:meth:`unquiesce`: writes to a node wait);
* **unfilled ranges** (:meth:`mark_unfilled`, :meth:`mark_filled`,
  :meth:`wait_filled`): clusters a job's batch allocated and has not
  written yet; reads and flushes wait for them. :class:`InFlight` is the
  sorted range set behind them (and behind every job's in-flight copies);
* **claims** (:meth:`claim`, :meth:`release_claims`, :meth:`check_busy`:
  docs/jobs.md §5) and dropping nodes that left a chain (:meth:`drop_unused`);
* **dirty bitmaps** by node (:class:`~.dirty_bitmap.DirtyBitmap`, :meth:`bitmaps_of`,
  :meth:`add_bitmap`, :meth:`remove_bitmap`, :meth:`bitmap`);
* the **cache mode** of a node (:meth:`set_cache_unsafe`, :meth:`cache_unsafe`).

Per-node state lives on the node (``Node.io_state``, a :class:`NodeState`):
it goes away with the node, so a later node can never inherit it.

Read API for the layers above (the daemon): :meth:`frontends`,
:meth:`filter_of`, :meth:`above_filters`, :meth:`bitmaps_of`,
:meth:`cache_unsafe`, ``Node.claimed_by``; all take the lock themselves or
are plain reads of one attribute.
"""
from __future__ import annotations

import threading
from collections.abc import Callable     # (threading and typing import collections anyway)
from typing import Any

from ..errors import JobError
from .dirty_bitmap import DirtyBitmap as DirtyBitmap  # re-exported (blkjobs.DirtyBitmap)
from .frontend import Filter, Frontend, WriteRequest
from .inflight import InFlight as InFlight  # re-exported (the jobs' import)
from .inflight import Reads
from . import readplan
from .node import Graph, Node
from .pbitmap import add_persistent, load_persistent, store_persistent


class NodeState:
    """What the I/O layer keeps per node, on the node (``Node.io_state``):
    it goes away with the node, so a later node can never inherit it (an
    ``id(node)`` key can: ids are reused once a node is freed)."""

    __slots__ = ("unsafe", "filter", "bitmaps", "loaded", "quiesced", "unfilled",
                 "writing", "reading", "serial", "write_waiters")

    def __init__(self) -> None:
        #: opened cache=unsafe: never fsync'ed
        self.unsafe = False
        #: a filter node's hooks (None: none, or removed)
        self.filter: Filter | None = None
        #: dirty bitmaps by name
        self.bitmaps: dict[str, DirtyBitmap] = {}
        #: the image's persistent bitmaps were added to ``bitmaps``
        self.loaded = False
        #: nesting count of quiesce()
        self.quiesced = 0
        #: guest ranges of clusters a job's batch allocated and has not
        #: filled yet (see blockcopy.Mover); reads reaching the node wait
        self.unfilled: InFlight | None = None
        #: guest writes being done on the node (they passed every filter;
        #: one may be suspended inside the driver, the I/O lock let go)
        self.writing: InFlight | None = None
        #: guest reads being done on the node outside the I/O lock
        #: (:meth:`BlockIO.guest_read`): writes landing in their range and
        #: closing the node wait for them
        self.reading: Reads | None = None
        #: ranges jobs are copying into the node (:meth:`BlockIO.serialize`):
        #: a guest write reaching the node waits until they landed
        self.serial: list[InFlight] = []
        #: jobs waiting in :meth:`BlockIO.wait_writes` right now
        self.write_waiters = 0

    def before_close(self) -> None:
        """The node is being closed (``Node.close``): reads still in flight
        on it end first (they read its file descriptor)."""
        r = self.reading
        if r is not None:
            with r.cond:
                r.drain()


def state(node: Node) -> NodeState:
    """The I/O layer's record of ``node`` (created on first use)."""
    st: NodeState | None = node.io_state
    if st is None:
        st = node.io_state = NodeState()
    return st


def _unfilled(node: Node) -> InFlight | None:
    st = node.io_state
    return st.unfilled if st is not None else None


def _quiesced(node: Node) -> int:
    st = node.io_state
    return st.quiesced if st is not None else 0


def _levels(node: Node) -> list[Node]:
    """``node``, the filters below it, the image node."""
    levels = [node]
    while levels[-1].is_filter:
        levels.append(levels[-1]._child())
    return levels


class BlockIO:
    """The I/O layer of one graph. See the module docstring."""

    def __init__(self, graph: Graph):
        self.graph = graph
        #: The I/O lock (see the module docstring).
        self.lock = threading.Condition(threading.RLock())
        self._frontends: list[Frontend] = []
        self._fe_count = 0
        #: nodes claimed by jobs (each node records its job: Node.claimed_by)
        self._claims: set[Node] = set()
        #: how many nodes have unfilled ranges (NodeState.unfilled): reads
        #: skip the chain walk when none has
        self._n_unfilled = 0
        #: the blkdebug break points (``jobs.blkdebug.Breaks``, set by the
        #: facade when the first is set; None: never): the block copy raises
        #: their events while planning
        self.breaks: Any = None

    def __enter__(self) -> BlockIO:
        self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    # ------------------------------------------------------------------
    # Lookups

    def node(self, name: str | Node) -> Node:
        """A node by node-name (``Cannot find device=<n> nor node-name=<n>``)."""
        if isinstance(name, Node):
            return name
        node = self.graph.nodes.get(name)
        if node is None:
            raise JobError(f"Cannot find device={name} nor node-name={name}")
        return node

    def set_cache_unsafe(self, node: Node) -> None:
        """``node`` was opened cache=unsafe: flushes write metadata but never
        fsync (qemu-img's ``-t unsafe``)."""
        state(node).unsafe = True
        node.driver.set_unsafe(True)

    def cache_unsafe(self, node: Node) -> bool:
        st = node.io_state
        return st is not None and st.unsafe

    # ------------------------------------------------------------------
    # Front ends and the guest path

    def attach(self, node: Node, writable: bool = True) -> Frontend:
        """A front end for live I/O on ``node`` (it takes write permission
        unless not ``writable``)."""
        with self.lock:
            self._fe_count += 1
            fe = Frontend(self, node, f"frontend{self._fe_count}", writable)
            self._frontends.append(fe)
            return fe

    def detach(self, fe: Frontend) -> None:
        """``fe`` closed (I/O lock held)."""
        self._frontends.remove(fe)

    def frontends(self, node: Node | None = None) -> list[Frontend]:
        """The open front ends (of ``node``, or of a filter above it)."""
        with self.lock:
            return [f for f in self._frontends
                    if node is None or f.node is node or f.node.below_filters() is node]

    def guest_read(self, fe: Frontend, offset: int, buf: bytearray | memoryview) -> None:
        """A front end's read: it waits for clusters a job allocated in its
        range and has not filled, then reads the image node below the
        filters. The chain is mapped under the I/O lock and the bytes are
        read outside it (:mod:`.readplan`: raw files and NBD nodes whole,
        qcow2 nodes' host clusters; other drivers read under the lock),
        tracked in each chain node's ``NodeState.reading`` meanwhile: a
        write landing in its range (:meth:`_land`), a pivot
        (:meth:`quiesce`) and closing the node (``Node.close``) wait for
        it, so the node stays open and the bytes stable under the read; a
        qcow2 image's freed clusters wait too (its read pins)."""
        mv = memoryview(buf).cast("B")
        n = len(mv)
        with self.lock:
            img = _levels(fe.node)[-1]
            self.wait_filled(img, offset, n)
            rp = readplan.plan(img, offset, mv)
            if rp.empty:
                rp.release()
                return
            tracked = [(r, r.add(offset, n)) for r in map(self._reads, img.chain())]
        try:
            rp.run()
        finally:
            rp.release()
            for r, t in tracked:        # (without the lock: Reads.remove)
                r.remove(t)

    def guest_read_segments(self, fe: Frontend, reqs: list[tuple[int, int]]
                            ) -> list[readplan.Planned | None]:
        """:meth:`guest_read`'s mapping of many reads done outside Python
        (the NBD export's C data path) in one lock hold: per read its file
        segments, tracked and pinned until :meth:`guest_read_end`, or None
        (use :meth:`guest_read`: clusters unfilled, a driver reads itself)."""
        with self.lock:
            if self._n_unfilled or fe.closed:
                return [None] * len(reqs)
            img = _levels(fe.node)[-1]
            return readplan.plan_batch(img, reqs, [self._reads(n) for n in img.chain()])

    guest_read_end = staticmethod(readplan.end_batch)

    def _reads(self, node: Node) -> Reads:
        st = state(node)
        if st.reading is None:
            st.reading = Reads(self.lock)
        return st.reading

    def wait_reads(self, node: Node) -> None:
        """Wait until the reads in flight on ``node`` now (outside the I/O
        lock, :meth:`guest_read`) are done; later ones are not waited for."""
        with self.lock:
            st = node.io_state
            if st is not None and st.reading is not None:
                st.reading.drain()

    def guest_flush(self, fe: Frontend) -> None:
        """A front end's flush: the guest's completed writes made durable.
        It does not wait for a job's batches in flight (clusters allocated,
        not yet written): the driver that allocates them (qcow2) holds their
        L2 entries off the disk until they land, so the flush cannot name
        unwritten data (docs/qcow2.md, what a flush may write), and a guest
        write into such a cluster waits for it before it completes."""
        with self.lock:
            fe.node.flush()     # (bitmaps are stored at close, as QEMU stores them)

    def guest_write(self, fe: Frontend, op: str, offset: int, length: int,
                    do: Callable[[Node], None], data: Any = None) -> None:
        """A front end's write, write-zeroes or discard (``op``): it waits
        while a node on its way is quiesced, travels down the filter chain
        (:meth:`_write_down`), lands on the image node (``do(node)``), marks
        that node's dirty bitmaps; then the filters it passed are notified,
        outside the lock."""
        with self.lock:
            while True:
                levels = _levels(fe.node)
                if not any(_quiesced(n) for n in levels):
                    break
                self.lock.wait(1.0)
            req = WriteRequest(op, offset, length, data, levels[-1])
            self._write_down(fe.node, req, do)
            st = req.node.io_state
            for bm in (st.bitmaps.values() if st is not None else ()):
                bm.mark(offset, length)
        for f in req.passed:
            f.notify()

    def _write_down(self, node: Node, req: WriteRequest, do: Callable[[Node], None]) -> None:
        """``req`` reaches ``node``: a filter node hands it to its hooks with
        the way on (``next``: the node below); the image node does it."""
        if not node.is_filter:
            self._land(node, req, do)
            return
        if node.file is None:
            # taken out (its job ended) while the request waited in a filter
            # above it: the request goes on to the image node it aimed at
            self._land(req.node, req, do)
            return

        def next(r: WriteRequest) -> None:
            # node.file is read now, not before the hooks: a hook may wait
            # (the I/O lock let go) while this filter is taken out
            self._write_down(node.file if node.file is not None else r.node, r, do)

        f = self.filter_of(node)
        if f is None:
            next(req)
            return
        req.passed.append(f)
        f.write(req, next)

    def _land(self, node: Node, req: WriteRequest, do: Callable[[Node], None]) -> None:
        """The image node does ``req``: QEMU's serialising requests. It waits
        while a job copies into an overlapping range (:meth:`serialize`) or
        a guest read of it is in flight outside the lock (:meth:`guest_read`),
        then is tracked in ``writing`` until done, so a job about to copy a
        range waits for it (:meth:`wait_writes`) even when it is suspended
        inside the driver with the I/O lock let go (a break point now; slow
        I/O once drivers let go of the lock). Without it, a stream could
        allocate and copy a cluster while a guest write to that cluster is
        between its filter and the driver, and land over the guest's data."""
        st = state(node)
        off, n = req.offset, req.length
        self._reads(node).wait_clear(off, n, lambda: any(s.busy(off, n) for s in st.serial))
        writing = st.writing
        if writing is None:
            writing = st.writing = InFlight(self.lock)
        r = writing.add(off, n)
        try:
            do(node)
        finally:
            writing.remove(r)

    def serialize(self, node: Node, inflight: InFlight) -> None:
        """Guest writes reaching ``node`` wait for the ranges in ``inflight``
        (a job's copies into ``node``) from now on (I/O lock held). The job
        takes a range with :meth:`wait_writes` first."""
        state(node).serial.append(inflight)

    def unserialize(self, node: Node, inflight: InFlight) -> None:
        """Undo :meth:`serialize` (I/O lock held; a no-op if not there)."""
        st = node.io_state
        if st is not None and inflight in st.serial:
            st.serial.remove(inflight)
            self.lock.notify_all()

    def wait_writes(self, node: Node, offset: int = 0, length: int | None = None) -> None:
        """Wait (I/O lock held, released meanwhile) until no guest write to
        [offset, offset+length) (default: anywhere) is being done on
        ``node``. A job calls it before it registers the range in a
        serialising ``InFlight`` (both under one hold of the lock): later
        writes wait for the job, earlier ones are waited for. QEMU's drain,
        when the whole node is asked for."""
        st = node.io_state
        w = st.writing if st is not None else None
        if w is None:
            return

        def busy() -> bool:
            return bool(w.count) if length is None else w.busy(offset, length)

        if not busy():
            return
        assert st is not None
        st.write_waiters += 1
        self.lock.notify_all()          # observers (tests) of write_waiters
        try:
            while busy():
                self.lock.wait(1.0)
        finally:
            st.write_waiters -= 1

    # ------------------------------------------------------------------
    # Filters and repointing parents

    def add_filter(self, node: Node, f: Filter, drv: str, name: str | None = None, *,
                   perm: int | None = None, keep: tuple[Node, ...] = ()) -> Node:
        """Insert a filter node of driver ``drv`` (named ``name``, else
        ``#blockN``) above ``node``, with ``f``'s write hooks: every parent of
        ``node`` -- front ends (the guest, exports), overlays backed by it,
        filters stacked on it -- now uses the filter, but those in ``keep``
        (QEMU leaves a parent the filter reaches, e.g. a backup's fleecing
        target backed by its source, where it is). ``perm``: what the filter
        holds on ``node`` (see Graph.add_filter). Returns the filter node;
        :meth:`remove_filter` takes it out again."""
        with self.lock:
            fnode = self.graph.add_filter(drv, node, name, perm)
            state(fnode).filter = f
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
                assert held is not None     # a filter holds its file child's permission
                p.file, p.file_perm = new, new.take(held.owner, held.perm, held.shared)
                held.release()
            else:
                p.attach_backing(new)
        self.repoint(old, new)

    def above_filters(self, node: Node) -> Node:
        """The top-most filter node stacked above ``node`` (``node`` itself
        without one): where a device of ``node`` attaches now."""
        with self.lock:
            while True:
                up = [p for p in self.graph.parents(node) if p.is_filter and p.file is node]
                if not up:
                    return node
                node = up[0]

    def remove_filter(self, fnode: Node) -> None:
        """Take a filter node out: its front ends move to what is below it
        now (after a mirror pivot: the target), its hooks stop."""
        with self.lock:
            if fnode.file is None:
                return          # removed already
            state(fnode).filter = None
            self._relink(fnode, fnode.file)
            fnode.close()

    def filter_of(self, node: Node) -> Filter | None:
        """The write hooks of a filter node (None: none, or removed)."""
        st = node.io_state
        return st.filter if st is not None else None

    def repoint(self, old: Node, new: Node) -> list[tuple[Frontend, Node]]:
        """Move every front end of ``old`` to ``new`` (I/O lock held);
        returns what :meth:`undo_repoint` needs."""
        moved = []
        for fe in self._frontends:
            if fe.node is old:
                fe._move(new)
                moved.append((fe, old))
        return moved

    def undo_repoint(self, moved: list[tuple[Frontend, Node]]) -> None:
        """Put the front ends :meth:`repoint` moved back (I/O lock held)."""
        for fe, back in moved:
            fe._move(back)

    # ------------------------------------------------------------------
    # Quiescing

    def quiesce(self, node: Node) -> None:
        """Hold off front-end writes to ``node`` (nested) until :meth:`unquiesce`.
        When it returns no write is in progress on ``node``: writes already
        past the check (one may be suspended inside the driver, the lock let
        go) are waited for, and so are reads in flight outside the lock, as
        QEMU's drain waits for requests in flight."""
        with self.lock:
            state(node).quiesced += 1
            self.wait_writes(_levels(node)[-1])
            self.wait_reads(_levels(node)[-1])

    def unquiesce(self, node: Node) -> None:
        with self.lock:
            st = state(node)
            st.quiesced = max(0, st.quiesced - 1)
            self.lock.notify_all()

    # ------------------------------------------------------------------
    # Clusters allocated before their data lands (a job's batch in the C
    # engine): a read reaching them would see zeroes or stale bytes where the
    # chain below has the data, and a flush would make them durable unfilled.

    def mark_unfilled(self, node: Node, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Register guest ranges of ``node`` allocated but not yet written
        (I/O lock held); returns the tokens for :meth:`mark_filled`."""
        st = state(node)
        uf = st.unfilled
        if uf is None:
            uf = st.unfilled = InFlight(self.lock)
            self._n_unfilled += 1
        return [uf.add(s, n) for s, n in ranges]

    def mark_filled(self, node: Node, tokens: list[tuple[int, int]]) -> None:
        """The ranges landed, or were given back (I/O lock held)."""
        st = state(node)
        uf = st.unfilled
        assert uf is not None       # mark_unfilled() gave out the tokens
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

    # ------------------------------------------------------------------
    # Node claims (docs/jobs.md §5) and dropping nodes that left a chain

    def check_busy(self, node: Node) -> None:
        """QEMU's op blocker text for a node another job claimed."""
        job = node.claimed_by
        if job is not None:
            raise JobError(f"Node '{node.name}' is busy: block device is in use by block "
                           f"job: {job.type}")

    def claim(self, job: Any, nodes: list[Node]) -> None:
        """Block ``nodes`` for other jobs until :meth:`release_claims`
        (nothing is claimed when one of them is busy). ``job``: the
        :class:`~blkjobs.jobmodel.Job` (its ``type`` is in the busy text)."""
        with self.lock:
            for n in nodes:
                if n.claimed_by is not job:
                    self.check_busy(n)
            for n in nodes:
                n.claimed_by = job
                self._claims.add(n)

    def release_claims(self, job: Any) -> None:
        with self.lock:
            for n in [n for n in self._claims if n.claimed_by is job]:
                n.claimed_by = None
                self._claims.discard(n)

    def drop_unused(self, nodes: list[Node]) -> None:
        """Close the nodes (top-most first) that no node, front end or other
        user references any more: they left the chain. Files are untouched.
        A node someone else holds (a QMP monitor's ``blockdev-add``: owner
        ``'monitor'``) stays, parentless, until that user lets it go."""
        with self.lock:
            for n in nodes:
                if n.name not in self.graph.nodes or self.graph.parents(n):
                    continue
                if self.frontends(n) or any(p.owner != "open" for p in n.users()):
                    continue
                n.close()

    # ------------------------------------------------------------------
    # Dirty bitmaps

    def bitmaps_of(self, node: Node) -> dict[str, DirtyBitmap]:
        """The dirty bitmaps of ``node`` by name (the layer's own dict); a
        qcow2 node's persistent bitmaps are in it from its first use."""
        st = state(node)
        if not st.loaded:
            st.loaded = True
            load_persistent(node, st.bitmaps)
        return st.bitmaps

    def bitmap(self, node: Node, name: str) -> DirtyBitmap:
        bm = self.bitmaps_of(node).get(name)
        if bm is None:
            raise JobError(f"Bitmap '{name}' could not be found")
        return bm

    def add_bitmap(self, node: Node, name: str, granularity: int, persistent: bool = False,
                   disabled: bool = False) -> DirtyBitmap:
        """A new bitmap (QEMU's checks and texts; ``persistent``: stored in
        the node's qcow2 image, see :mod:`.pbitmap`)."""
        with self.lock:
            bms = self.bitmaps_of(node)
            if name in bms:
                raise JobError(f"Bitmap already exists: {name}")
            if persistent:
                bm: DirtyBitmap = add_persistent(node, name, granularity, disabled)
            else:
                bm = DirtyBitmap(node, name, granularity)
                bm.enabled = not disabled
            bms[name] = bm
            return bm

    def remove_bitmap(self, node: Node, name: str) -> None:
        with self.lock:
            bm = self.bitmap(node, name)
            if bm.busy:
                raise JobError(f"Bitmap '{name}' is currently in use by another operation "
                               "and cannot be used")
            if bm.readonly:     # an inconsistent one is removed (QEMU's order)
                raise JobError(f"Bitmap '{name}' is readonly and cannot be modified")
            del state(bm.node).bitmaps[name]
            if bm.persistent:
                bm.drop()   # type: ignore[attr-defined]

    def store_bitmaps(self, node: Node) -> None:
        """Write ``node``'s persistent bitmaps to its image now (in-use flags
        cleared; the next write sets them again): what a flush does. Not
        while a backup holds one (its successor would be stored half)."""
        with self.lock:
            store_persistent(node, self.bitmaps_of(node))
