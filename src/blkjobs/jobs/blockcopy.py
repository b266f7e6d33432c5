"""Block copy: moving guest ranges through the C copy engine (:class:`Mover`),
the one data path of all four jobs (QEMU keeps it apart from the jobs too,
in ``block/block-copy.c``).

How a range moves (:meth:`Mover.move`):

1. With the I/O lock held, ask the source for its layout
   (``Node.block_status``: which layer provides each run, and where in that
   layer's file) and classify each run with the job's ``select`` function
   (:mod:`.ranges`): ``copy`` (data), ``zero`` (make it read as zero) or
   ``skip``.
2. Allocate the target clusters the copied runs touch (``allocate()`` of the
   target driver; raw: identity). Parts of an allocated cluster that are not
   copied are filled from the source's guest view, so a fresh cluster never
   exposes stale bytes.
3. Queue (src host offset, dst host offset, length, kind, layer fd) items into
   the C engine and let it move the bytes with the GIL released; the I/O lock
   is *not* held meanwhile. Compressed source clusters (no host offset)
   go through Python; for a compressed target the planning reads the
   source, and the chunks read are compressed once the lock is let go (on
   every core, :meth:`TargetWrites.compress_pending`) and stored in order
   under the lock again.

A caller that must keep guest writes off a range until its copy landed
(backup's copy-before-write, stream, write-blocking mirror) registers the
range in an :class:`~blkjobs.graph.io.InFlight` under the I/O lock before
step 1; guest writes wait for it (see :mod:`blkjobs.graph.frontend`).

What it needs of the graph's I/O layer (:class:`~blkjobs.graph.io.BlockIO`):
the lock, ``wait_filled``/``mark_unfilled``/``mark_filled`` and
``cache_unsafe``.

Lock order: the I/O lock is never held while taking the job manager's lock
(hooks run under the manager lock and may take the I/O lock).

Moved here from ``jobs/base.py`` (with the batching constants).
"""
from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import Cancelled, CopyError
from ..graph import Node
from ..graph.io import BlockIO
from ..jobmodel import Job
from ..native.copy import COPY, COPY_SPARSE, CopyEngine, RunResult
from ..native.ratelimit import TokenBucket
from .blkdebug import quiet_breaks
from .blockcopy_batch import _TOP_DATA, FAST_MAX, PLAN_BATCH, BatchPlanning
from .blockcopy_writes import PLAN_CHUNK, Stats, TargetWrites
from .ranges import Select, merge, subtract

KiB, MiB = 1 << 10, 1 << 20
#: Default job cluster (backup: max(64 KiB, target cluster size)).
JOB_CLUSTER = 64 * KiB
#: Bytes handed to the engine per batch (the unit of progress and pausing).
BATCH = 64 * MiB


#: Planning holds the I/O lock for at most this much guest range, or this
#: many areas (scattered granules: ~4 us each on the fast path), at a time.
PLAN_AREAS = 64


class Ticket:
    """One batch handed to the C engine by :meth:`Mover.start`. ``undo``:
    what its planning's allocations made undefined in the target until
    written (see ``Qcow2Driver.allocate``), put back when the batch does not
    land; ``unfilled``: those ranges' ``BlockIO.mark_unfilled`` tokens, held
    until the batch lands or is undone (reads wait for them)."""

    __slots__ = ("off", "length", "stats", "ce", "undo", "unfilled", "done0")

    def __init__(self, off: int, length: int):
        self.off, self.length = off, length
        self.stats = Stats()
        self.ce: CopyEngine | None = None
        #: the engine's ``done`` count before this batch (engines are reused)
        self.done0 = 0
        self.undo: list[tuple[int, int, int, int]] = []
        self.unfilled: list[tuple[int, int]] = []


class _Suspend(Exception):
    """A blkdebug break point holds the request being planned (nothing of it
    was done yet): :meth:`Mover.start_areas` waits outside the I/O lock and
    plans it again."""

    def __init__(self, held: Any):
        super().__init__(held.tag)
        self.held = held


class Mover(TargetWrites, BatchPlanning):
    """Moves guest ranges of ``src`` (read through its chain) into ``dst``.

    ``select`` classifies the source's runs (see :func:`select_full`,
    :func:`select_window`). ``compress``: write compressed clusters (qcow2
    targets). ``detect_zeroes``: whole target clusters of copied data that
    hold only zeroes become zero clusters instead of allocated ones (stream,
    commit: QEMU's copy-on-read and ``qemu-img rebase`` leave no data there;
    a raw target gets holes from the engine's zero scan anyway). The target
    driver must stay the same object while the mover lives (the engine holds
    its fd).
    """

    def __init__(self, io: BlockIO, src: Node, dst: Node, select: Select, *,
                 bucket: TokenBucket | None = None, compress: bool = False,
                 threads: int = 4, write_behind: bool = False, detect_zeroes: bool = False):
        self.io = io
        self.detect_zeroes = detect_zeroes
        self._scan_buf: bytearray | None = None
        self._deflater: Any = None          # compress, zlib: see compress_pending
        self._cpool: Any = None             # compress: the compressing worker(s)
        self.src, self.dst = src, dst
        self.select = select
        self.compress = compress
        self.bucket = bucket
        self.threads = threads
        #: start writeback of each request once written (the C engine's
        #: write_behind), unless the target is cache=unsafe: a job that ends
        #: with a flush (commit) then waits for the tail of the copy only
        self.write_behind = write_behind
        self._pool: list[CopyEngine] = []
        #: engines of the batches in flight (read by :meth:`throttled` from
        #: the monitor's thread: the lock keeps an engine open while read)
        self._running: set[CopyEngine] = set()
        self._run_lock = threading.Lock()
        self._dst_raw = dst.driver.cluster_size == 0
        #: zeroes may be written as holes / zero clusters that free their
        #: host clusters (QEMU's BDRV_REQ_MAY_UNMAP; a mirror's ``unmap``)
        self.may_unmap = True
        #: no host file (an NBD export) or encrypted data (its host bytes are
        #: ciphertext): everything is written through the driver
        self._dst_remote = not dst.driver.host_file or dst.driver.encrypted
        self._tls = threading.local()       # see plan (blkdebug break points)
        #: bytes that batches which did not land wrote into the target and
        #: that stayed there (no allocation put back), by batch offset; an
        #: entry goes when a batch over that offset lands (a retry)
        self._stray: dict[int, int] = {}

    @property
    def stray_written(self) -> int:
        """Bytes in the target written by batches that failed or were
        abandoned (not in any job's progress, which counts landed batches)."""
        return sum(self._stray.values())

    # -- the C engines ------------------------------------------------------
    # One engine per batch in flight (a pipeline of two batches: one copies
    # while the next is planned and queued), kept in a small pool.
    def _engine(self) -> CopyEngine:
        if self._pool:
            return self._pool.pop()
        return CopyEngine(self.src.driver.data_fd, self.dst.driver.data_fd, threads=self.threads,
                          request_size=2 * MiB, zero_block=4096 if self._dst_raw else 0,
                          target_is_zero=False, may_unmap=self.may_unmap,
                          allow_copy_range=False, bucket=self.bucket,
                          write_behind=self.write_behind and not self.io.cache_unsafe(self.dst),
                          src_path=self.src.filename, dst_path=self.dst.filename)

    def close(self) -> None:
        while self._pool:
            self._pool.pop().close()
        if self._cpool is not None:
            self._cpool.shutdown()
            self._cpool = None

    # -- fault injection (blkdebug nodes) -----------------------------------
    def _check_inject(self, op: str, node: Node, off: int, length: int) -> None:
        if node.driver.injects_faults:
            err = node.driver.inject_check(op, off, length)
            if err:
                side = "source" if op == "read" else "target"
                raise CopyError(err, "error reading" if op == "read" else "error writing",
                                path=node.filename, side=side, offset=off)

    # -- planning (I/O lock held) -------------------------------------------
    def plan(self, off: int, length: int, stats: Stats,
             undo: list[tuple[int, int, int, int]] | None = None) -> list[tuple]:
        """Classify, allocate, do the Python-side parts; return engine items.
        ``undo``: see ``Qcow2Driver.allocate``."""
        src, dst = self.src, self.dst
        length = min(length, src.size - off, dst.size - off)
        if length <= 0:
            return []
        # Another job's batch may have allocated clusters in the source's
        # chain it has not filled yet (a stream into the node a backup reads):
        # the engine would copy them by host offset. Not our own target's (our
        # batches never share a cluster, and only this thread lands them).
        cs = dst.driver.cluster_size or 1
        a = off - off % cs
        self.io.wait_filled(src, a, min(-(-(off + length) // cs) * cs, dst.size) - a,
                             exclude=dst)
        # the fast path of small ranges: not with fault injection (checked per
        # planned run; a blkdebug node may be set up while the job runs) nor
        # compression (written cluster by cluster)
        if (length <= FAST_MAX and not self.compress
                and not src.driver.injects_faults
                and not dst.driver.injects_faults):
            item = self._plan_fast(off, length, stats, undo)
            if item is not None:
                self.dst.note_write(off, length)
                return [item]
        chain = src.chain()
        runs = src.block_status(off, length)
        breaks = self.io.breaks
        if (breaks is not None and breaks.rules) or any(
                n.driver.wants_events for n in (*chain, dst)):
            runs = list(runs)
            # the blkdebug events this request raised already (it is planned
            # again after a break point held it): set by start_areas
            passed = getattr(self._tls, "passed", None)
            self._raise_events(chain, runs, off, length, set() if passed is None else passed)
        copy, py, zero = self._classify(runs, chain, stats)
        if copy or py or zero:
            self._check_inject("write", dst, off, length)
        items: list[tuple] = []
        if self.compress:
            self._write_zeroes(zero, off, length, items)
            self._read_compressed(merge([(s, n) for s, n, _ in copy] + py))
            return items
        if (self.detect_zeroes and copy and not self._dst_raw
                and not dst.driver.injects_faults and self._zero_clusters_ok()):
            copy = self._split_zeroes(copy, zero, stats)
        # Where the target is in the source's chain (stream, commit), what
        # the source reads changes once a target cluster is allocated: the
        # rest of each cluster to allocate is classified, and the data the
        # Python side moves is read, before anything is written.
        fill = self._fill(copy, py) if copy and not self._dst_raw else []
        bufs = []
        for s, n in py:
            buf = bytearray(n)
            self._src(src.readinto, s, buf)
            bufs.append((s, buf))
        # Zeroes first: their clusters are never ones we allocate below.
        self._write_zeroes(zero, off, length, items)
        for s, n, _ in copy:        # written by the engine, below Node.write
            dst.note_write(s, n)
        if copy:
            if self._dst_raw:
                for s, n, (fd, host) in copy:
                    items.append((host, s, n, COPY_SPARSE, fd))
            else:
                items += self._alloc_items(copy, fill, undo)
        for s, buf in bufs:
            self._tgt(dst.write, s, buf)
        return items

    def _classify(self, runs: list[dict], chain: list[Node], stats: Stats) -> tuple[
            list[tuple[int, int, tuple[int, int]]], list[tuple[int, int]],
            list[tuple[int, int]]]:
        """The source's runs by what ``select`` makes of them: copied by the
        engine by host offset ``(start, len, (fd, host))``, moved through
        buffers (compressed or remote runs), or zeroed; skipped ones only
        counted."""
        copy: list[tuple[int, int, tuple[int, int]]] = []
        py: list[tuple[int, int]] = []
        zero: list[tuple[int, int]] = []
        for r in runs:
            what = self.select(r)
            s, n = r["start"], r["length"]
            if what == "skip":
                stats.skipped += n
                stats.skips.append((s, n))
            elif what == "copy":
                self._check_inject("read", chain[r["depth"]], s, n)
                if (r["compressed"] or "offset" not in r or self.compress or self._dst_remote
                        or not chain[r["depth"]].driver.host_file):
                    py.append((s, n))       # through buffers (also NBD nodes: no fd)
                else:
                    copy.append((s, n, (chain[r["depth"]].driver.data_fd, r["offset"])))
                stats.copied += n
            else:
                zero.append((s, n))
                stats.zeroed += n
        return copy, py, zero

    def _raise_events(self, chain: list[Node], runs: list[dict], off: int,
                      length: int, passed: set) -> None:
        """The blkdebug events of the request planned (see :mod:`.blkdebug`),
        in order, before any of it is done: raises _Suspend when a break point
        holds one. ``passed``: events raised already (not again), updated."""
        def raise_(drv: Any, events: list[str], s: int, n: int) -> None:
            if not drv.injects_faults:
                return
            take = drv.take_break
            for ev in events:
                key = (id(drv), ev, s)
                if key in passed:
                    continue
                passed.add(key)
                held = take((ev,), s, n)
                if held:
                    raise _Suspend(held)

        copy: list[tuple[int, int, None]] = []
        zero: list[tuple[int, int]] = []
        for r in runs:
            what = self.select(r)
            if what == "copy":
                # each layer above the one holding the run leaves it to its
                # backing file: QEMU's read_backing_aio on its file's blkdebug
                for above in chain[:r["depth"]]:
                    raise_(above.driver, ["read_backing_aio"], r["start"], r["length"])
                raise_(chain[r["depth"]].driver, ["read_aio"], r["start"], r["length"])
                copy.append((r["start"], r["length"], None))
            elif what == "zero":
                zero.append((r["start"], r["length"]))
        if not self.dst.driver.injects_faults:
            return
        events = []
        if copy and not self._dst_raw and not self.compress and any(
                not (r["depth"] == 0 and r["data"] and "offset" in r and not r["compressed"])
                for s, n in self._need(copy) for r in self.dst.block_status(s, n)):
            events.append("cluster_alloc")
        if copy:
            events += ["pwritev", "write_compressed" if self.compress else "write_aio"]
        if zero and subtract(merge(zero), self._dst_reads_zero(off, length)):
            events += ["pwritev", "pwritev_zero"]
        raise_(self.dst.driver, events, off, length)

    def _plan_fast(self, off: int, length: int, stats: Stats,
                   undo: list[tuple[int, int, int, int]] | None) -> tuple | None:
        """One item for a small range the source's top layer holds as plain
        data and the target can take in place (a granule a guest wrote while
        a mirror runs), or, being one whole target cluster, in a cluster
        allocated for it (an incremental backup's changed cluster): two
        lookups (and the allocation) instead of block status and run
        arithmetic. None: use the general path."""
        if self.select(_TOP_DATA) != "copy":
            return None
        hs = self.src.driver.host_run(off, length)
        if hs is None:
            return None
        hd = self.dst.driver.host_run(off, length, for_write=True)
        if hd is None:
            hd = self._alloc_whole_cluster(off, length, undo)
            if hd is None:
                return None
        stats.copied += length
        return (hs, hd, length, COPY_SPARSE if self._dst_raw else COPY, self.src.driver.data_fd)

    def _alloc_whole_cluster(self, off: int, length: int,
                             undo: list[tuple[int, int, int, int]] | None) -> int | None:
        """The host offset of a target cluster allocated for [off, off+length)
        when that is exactly one whole cluster (the copy fills all of it: no
        rest to fill from the source) of a qcow2 target; None otherwise.
        Not where whole zero clusters are to be detected (stream, commit:
        the general path's _split_zeroes)."""
        drv = self.dst.driver
        cs = drv.cluster_size
        if (self._dst_raw or self._dst_remote or self.detect_zeroes or off % cs
                or (length != cs and off + length != self.dst.size) or length > cs):
            return None
        m = drv.allocate(off, length, undo)
        if len(m) != 1 or m[0].length != length:
            return None     # (cannot happen) the general path allocates in place
        return m[0].host_offset

    # -- moving --------------------------------------------------------------
    def start(self, off: int, length: int) -> Ticket:
        """Plan [off, off+length) (I/O lock taken here) and queue it into a
        free engine, which starts copying at once. Raises CopyError when the
        planning failed (nothing is queued then)."""
        return self.start_areas([(off, length)])

    def start_areas(self, areas: list[tuple[int, int]]) -> Ticket:
        """:meth:`start` for several areas in one batch (scattered dirty
        granules: one engine round trip for all of them)."""
        t = Ticket(areas[0][0], sum(n for _, n in areas))
        items: list[tuple] = []
        # The I/O lock is held for up to PLAN_CHUNK bytes or PLAN_AREAS areas
        # at a time, not for the whole batch: planning a thousand scattered
        # granules takes milliseconds, and every guest write needs the lock.
        # (The areas are in flight or their bits taken: a write racing with
        # the planning is seen by the caller.)
        pieces = [(o, min(PLAN_CHUNK, off + length - o)) for off, length in areas
                  for o in range(off, off + length, PLAN_CHUNK)]
        i = 0
        passed: set = set()         # blkdebug events piece i raised already
        ce: CopyEngine | None = None
        try:
            while i < len(pieces):
                held = None
                with self.io, quiet_breaks():
                    budget, k = PLAN_CHUNK, 0
                    batch = len(pieces) - i > 1 and self._batchable()
                    while i < len(pieces) and k < PLAN_AREAS and budget > 0:
                        if batch:
                            m = self._batch(pieces[i:i + PLAN_BATCH], t, items)
                            if m:
                                i += m
                                break       # one batch per hold of the lock
                        o, n = pieces[i]
                        undo: list[tuple[int, int, int, int]] = []
                        try:
                            self._tls.passed = passed
                            items += self.plan(o, n, t.stats, undo)
                        except _Suspend as e:
                            held = e.held
                            break
                        finally:    # before the lock is let go (also in a
                            self._keep_undo(t, undo)    # wait of the next plan)
                        budget -= n
                        i += 1
                        k += 1
                        passed = set()
                # compressed target: what this hold read compresses now,
                # without the lock (stored in order under it)
                self.compress_pending()
                if held is not None:
                    # a break point holds piece i: what was planned before it
                    # goes to the engine now (it must not wait with it)
                    if items:
                        if ce is None:
                            ce = self._engine()
                            t.done0 = ce.status().done
                        ce.add(items)
                        ce.run(0)
                        items = []
                    self.io.breaks.suspend(held)
        except BaseException:
            self.drop_pending()
            self._drop(ce, t)       # what the planned part allocated is put back
            raise
        if items:
            try:
                if ce is None:
                    ce = self._engine()
                    t.done0 = ce.status().done
                ce.add(items)
                ce.run(0)               # wake the workers; they keep going
            except BaseException:       # an error already (the first requests)
                self._drop(ce, t)
                raise
        t.ce = ce
        if ce is not None:
            with self._run_lock:
                self._running.add(ce)
        return t

    def _batch(self, pieces: list[tuple[int, int]], t: Ticket, items: list[tuple]) -> int:
        """:meth:`_plan_many` into ticket ``t``: how many pieces it took."""
        undo: list[tuple[int, int, int, int]] = []
        try:
            return self._plan_many(pieces, t.stats, undo, items)
        finally:
            self._keep_undo(t, undo)

    def _keep_undo(self, t: Ticket, undo: list[tuple[int, int, int, int]]) -> None:
        """What a planning's allocations made undefined goes with the batch;
        readers wait for it until it lands (I/O lock held). The driver holds
        those clusters already (``allocate`` with ``undo``: a flush meanwhile
        writes their old entries, even one inside the allocation itself);
        :meth:`_landed` releases them, :meth:`_give_back` puts them back."""
        if undo:
            t.undo += undo
            t.unfilled += self.io.mark_unfilled(self.dst, [(s, n) for s, n, _, _ in undo])

    def throttled(self) -> bool:
        """The copy waits in the rate limiter: some requests do, and none is
        being copied (QEMU's job sleeping in its rate limit: not busy)."""
        with self._run_lock:
            sts = [ce.status() for ce in self._running]
        return any(st.throttled for st in sts) and \
            all(st.in_flight == st.throttled for st in sts)

    def finish(self, t: Ticket, job: Job | None = None) -> Stats:
        """Wait until the ticket's batch landed. Raises CopyError (side
        source/target) or Cancelled (the job was force-cancelled)."""
        ce, t.ce = t.ce, None
        if ce is None:
            self._landed(t)
            return t.stats
        try:
            while True:
                res = ce.run(0.05)
                if res == RunResult.DONE:
                    break
                if job is not None and job.is_cancelled:
                    ce.cancel()
                    ce.drain()
                    raise Cancelled()
        except BaseException:
            self._drop(ce, t)
            raise
        with self._run_lock:
            self._running.discard(ce)
        self._pool.append(ce)
        self._landed(t)
        return t.stats

    def _landed(self, t: Ticket) -> None:
        if self._stray:
            for k in [k for k in self._stray if t.off <= k < t.off + t.length]:
                del self._stray[k]
        undo, t.undo = t.undo, []
        if t.unfilled or undo:
            with self.io:
                if undo:    # the data is written: the new entries may reach the disk
                    self.dst.driver.release_allocated(undo)
                if t.unfilled:
                    self.io.mark_filled(self.dst, t.unfilled)
            t.unfilled = []

    def abandon(self, t: Ticket) -> None:
        """Stop a started batch and forget it (its area must be redone)."""
        ce, t.ce = t.ce, None
        self._drop(ce, t)

    def _drop(self, ce: CopyEngine | None, t: Ticket) -> None:
        """A batch that will not land: stop its engine (nothing of it stays
        queued or in flight; the engine is not reused) and give back what its
        planning allocated."""
        if ce is not None:
            ce.cancel()
            ce.drain()
            written = ce.status().done - t.done0
            with self._run_lock:
                self._running.discard(ce)
            ce.close()
            if written > 0 and not t.undo:      # put back below otherwise
                self._stray[t.off] = written
        self._give_back(t)

    def _give_back(self, t: Ticket) -> None:
        """A batch that did not land (failed, cancelled, abandoned; the engine
        is drained): what its allocations changed in the target is put back
        (unallocated clusters, zero clusters, extended-L2 subclusters). Left
        as allocated, they would read as zeroes (or stale bytes) where the
        target used to read through to its backing file -- in a stream's top,
        what the guest sees -- and a retry would take them as copied.
        (``undo_allocate`` also ends the driver's hold on them.)"""
        undo, t.undo = t.undo, []
        unfilled, t.unfilled = t.unfilled, []
        if undo:
            with self.io:
                try:
                    self.dst.driver.undo_allocate(undo)
                except OSError as e:
                    raise CopyError(e.errno or 5, "error writing", path=self.dst.filename,
                                    side="target", offset=undo[0][0]) from None
                finally:
                    self.io.mark_filled(self.dst, unfilled)

    def move(self, off: int, length: int, job: Job | None = None) -> Stats:
        """Copy [off, off+length) now (start + finish)."""
        return self.finish(self.start(off, length), job)

    def flush(self) -> None:
        """Make the target durable (qcow2: metadata of allocate() first).

        The data goes to disk first with an fsync *without* the I/O lock
        (seconds after a bulk copy; guest writes through a front end must not
        wait for it), then the driver's ordered flush runs under the lock
        and only has what was written since."""
        with self.io:
            unsafe = self.io.cache_unsafe(self.dst)
            if unsafe and not self.dst.driver.has_metadata:
                return          # raw, cache=unsafe: nothing to write, no fsync
        if not unsafe and self.dst.driver.host_file:
            try:
                os.fsync(self.dst.driver.data_fd)
            except OSError as e:
                raise CopyError(e.errno or 5, "error writing", path=self.dst.filename,
                                side="target") from None
        with self.io:
            self._tgt(self.dst.flush)
