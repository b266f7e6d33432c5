"""mirror (``blockdev-mirror``, docs/jobs.md §2) and the machinery of active commit.

A ``mirror_top`` filter node above the source (its hooks: :class:`MirrorFilter`)
sees every guest write: in ``background`` copy mode it marks them dirty
(after the write landed, so a copy racing with it is redone) -- to the
sub-block, see :mod:`.dirty`: a 4 KiB write costs 4 KiB of copying, not a
granule; in ``write-blocking`` mode it waits for in-flight copies of the
range, then writes the new data to the target before the guest's request
completes.

``run`` copies dirty chunks in batches through the C engine (bits are taken
-- cleared -- before the read, so a racing write re-dirties them). When only
a little is left (at most one batch), the last pass runs with guest writes
to the source held off (quiesced), so the job reaches READY under any write
rate; the flush that READY needs runs after writes are let through again. A
background mirror that has copied a whole disk's worth without getting there
(the guest dirties faster than we copy) mirrors guest writes synchronously
until READY, then goes back to background: it converges under any write
rate. Then it keeps copying new writes. ``complete`` (or a soft cancel in
ready) first catches up (copy and flush while the guest writes), then does a
final pass with the source quiesced and returns, keeping the source quiesced
until finalization: ``prepare`` pivots (the target replaces the source in
every parent: graph parents and front ends) and drops the filter node, so
writes go to the new node; ``clean`` lets writes through again (and drops
the filter when there was no pivot). Copies use write-behind, so the
flushes the guest may wait for find little left to write.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import CopyError, JobError
from ..graph import GraphTransaction, Node, Perm, Permission
from ..graph.frontend import Filter
from ..graph.io import BlockIO, InFlight
from ..jobmodel import ErrorAction, Job
from ..native.bitmap import Bitmap
from .base import BlockJob, check_policy
from .blockcopy import BATCH, KiB, MiB, Mover, Stats
from .dirty import PartlyDirty
from .ranges import Select, select_full, select_window

_log = logging.getLogger(__name__)



class MirrorFilter(Filter):
    def __init__(self, m: MirrorJob):
        self.m = m

    def before_write(self, node: Node, op: str, offset: int, length: int) -> None:
        if self.m.blocking:
            self.m.inflight.wait_clear(offset, length)

    def after_write(self, node: Node, op: str, offset: int, length: int,
                    data=None) -> None:
        m = self.m
        if m.blocking and not m.sync_failed:
            try:
                if data is None:        # zero / discard: what the guest now sees
                    data = bytearray(length)
                    m.src.readinto(offset, data)
                if op != "write" and not any(data):
                    m.dst.write_zeroes(offset, length)
                else:
                    m.dst.write(offset, data)
                m.sync_bytes += length
                return
            except Exception:
                _log.debug("write-blocking copy of %d+%d failed; copied later", offset, length,
                           exc_info=True)
                m.sync_failed = True        # actively-synced is lost; copy it later
        m.parts.mark_written(offset, length)

    def notify(self) -> None:
        job = self.m.job
        # A busy job looks at the bitmap again before it sleeps: only wake an
        # idle one. Read without the lock on purpose: a stale value costs at
        # most one sleep. Once READY the job polls every READY_POLL instead,
        # so writes coalesce into batches rather than waking it once each.
        if job is not None and not job.busy and not job.is_ready:
            job.kick()


class Claim(list[tuple[int, int]]):
    """The ranges of one batch, and how many bytes of whole granules they
    stand for (the unit of the dirty count and of progress)."""

    __slots__ = ("whole",)
    whole: int


#: How often a READY mirror copies what the guest wrote meanwhile.
READY_POLL_NS = 20_000_000
#: Batch size while guest writes wait for in-flight copies (write-blocking,
#: or escalated). A 50 MB/s 4 KiB writer during the bulk copy of 4 GiB got
#: 3 MB/s with 64 MiB batches (READY after 2.2 s), 33 with 8 MiB (3.5 s),
#: 46 with 4 MiB (5.7 s), 50 with 2 MiB (14 s).
BLOCKING_BATCH = 4 * MiB
#: Completion catches up (copy + flush without holding guest writes off)
#: again while a flush took at least this long, at most this many times.
CATCH_UP_FLUSH = 0.05
CATCH_UP_PASSES = 4


class MirrorJob(BlockJob):
    job_type = "mirror"
    filter_drv = "mirror_top"      # QEMU's driver name, for active commit too
    src: Node
    dst: Node
    mover: Mover

    @classmethod
    def create(cls, io: BlockIO, device: str | Node, target: str | Node, sync: str, *,
               replaces: str | None = None, granularity: int | None = None,
               buf_size: int | None = None, on_source_error: str = "report",
               on_target_error: str = "report", copy_mode: str = "background",
               target_is_zero: bool = False, unmap: bool = True) -> MirrorJob:
        src, dst = io.node(device), io.node(target)
        if sync in ("incremental", "bitmap"):
            raise JobError(f"Sync mode '{sync}' not supported")
        if sync not in ("full", "top", "none"):
            raise JobError(f"Parameter 'sync' does not accept value '{sync}'")
        if copy_mode not in ("background", "write-blocking"):
            raise JobError(f"Parameter 'copy-mode' does not accept value '{copy_mode}'")
        check_policy("on-source-error", on_source_error)
        check_policy("on-target-error", on_target_error)
        if granularity is not None:
            if not 512 <= granularity <= 64 * MiB:
                raise JobError("Parameter 'granularity' expects a value in range [512B, 64MB]")
            if granularity & (granularity - 1):
                raise JobError("Parameter 'granularity' expects a power of 2")
        else:
            cs = dst.driver.cluster_size
            granularity = min(max(cs, 4 * KiB), 64 * KiB) if cs else 64 * KiB
        if buf_size is not None and buf_size < 0:
            raise JobError("Invalid parameter 'buf-size'")
        if any(not p.is_filter for p in io.graph.parents(src)):
            raise JobError("Need a root block node")
        if src is dst:
            raise JobError("Can't mirror node into itself")
        rep = None
        if replaces is not None:
            rep = io.node(replaces)
            if rep.size != src.size:
                raise JobError("cannot replace image with a mirror image of different size")
        # QEMU's blockdev-mirror: sync=top of a node without a backing file
        # is full, but without zeroing the target first (that is decided
        # for full alone): what the node does not allocate is neither copied
        # nor counted in the progress, only what a guest writes later
        zero_target = True
        if sync == "top" and src.backing is None:
            sync, zero_target = "full", False
        select = select_window(0, 1) if sync == "top" else select_full
        job = cls(io, src, dst, sync, select, granularity, copy_mode, target_is_zero,
                  on_source_error, on_target_error, rep, zero_target=zero_target)
        job.mover.may_unmap = unmap     # false: zeroes keep the target's clusters
        return job

    def __init__(self, io: BlockIO, src: Node, dst: Node, sync: str, select: Select,
                 granularity: int, copy_mode: str, target_is_zero: bool,
                 on_source_error: str, on_target_error: str, replaces: Node | None = None,
                 zero_target: bool = True):
        super().__init__(io)
        self.src, self.dst, self.sync = src, dst, sync
        self.select = select
        self.granularity = granularity
        self.copy_mode = copy_mode
        self.target_is_zero = target_is_zero
        #: sync=full writes the whole target (QEMU's zero_target); False:
        #: only what the chain allocates (a top without a backing file)
        self.zero_target = zero_target
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.replaces = replaces
        self.dirty = Bitmap(src.size, granularity)
        self.parts = PartlyDirty(self.dirty, src.size)
        self.inflight = InFlight(io.lock)
        self.filter = MirrorFilter(self)
        # write-behind: a mirror ends with flushes (READY, completion) that the
        # guest may wait for; data already on its way to disk shortens them
        self.mover = Mover(io, src, dst, select, bucket=self.bucket, write_behind=True)
        self.job: Job | None = None
        self.sync_bytes = 0             # written synchronously by the filter
        self.sync_failed = False
        self.final_synced = False
        #: background mode that did not converge in a whole pass over the
        #: disk: guest writes are mirrored synchronously until READY
        self.escalated = False
        #: completion's graph change was made (the target replaced the source)
        self.pivoted = False
        self.copied = 0
        self._pos = 0
        self._perm: Permission | None = None
        self._quiesced = False

    @property
    def blocking(self) -> bool:
        """Guest writes are mirrored synchronously (write-blocking, or an
        escalated background mirror before READY)."""
        return self.copy_mode == "write-blocking" or self.escalated

    # ------------------------------------------------------------------
    def take_target(self, job: Job) -> None:
        self._perm = self.dst.take(f"{self.job_type} job '{job.id}'",
                                   Perm.CONSISTENT_READ | Perm.WRITE,
                                   Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)

    def setup(self, job: Job) -> None:
        self.job = job
        with self.io:
            self.take_target(job)
            self.insert_filter(self.src, self.filter, self.filter_drv)

    def initial_dirty(self) -> None:
        """The sync mode's initial dirty set (I/O lock held)."""
        if self.sync == "none":
            return
        # (guest writes since setup may have marked granules partly dirty:
        # these become wholly dirty here)
        if self.sync == "full" and not self.target_is_zero and self.zero_target:
            self.parts.mark_whole(0, self.src.size)
            return
        if not self.zero_target:
            for r in self.src.block_status():
                if r["present"] or r.get("eof"):
                    self.parts.mark_whole(r["start"], r["length"])
            return
        for r in self.src.block_status():
            what = self.select(r)
            if what == "copy" or (what == "zero" and not self.target_is_zero):
                self.parts.mark_whole(r["start"], r["length"])

    def _progress(self, job: Job) -> None:
        with self.io:
            extra, self.sync_bytes = self.sync_bytes, 0
            left = self.dirty.count() + self.inflight.total
        if extra:
            job.progress.advance(extra)
        cur = job.progress.current
        job.progress.update(total=cur + left)

    def _claim_any(self, job: Job) -> Claim | None:
        """Dirty areas from the cursor on, up to one batch: scattered
        granules travel together."""
        left = self.batch_size(job, self.granularity)
        if self.blocking:
            # guest writes wait for the batch their range is in flight in
            left = max(self.granularity, min(left, BLOCKING_BATCH))
        areas = Claim()
        areas.whole = 0
        with self.io:
            wrapped = False
            while left >= self.granularity and len(areas) < 1024:
                area = self.dirty.take_dirty_area(self._pos, left)
                if area is None:
                    if wrapped or not self._pos:
                        break
                    wrapped, self._pos = True, 0
                    continue
                if self.inflight.busy(*area):
                    # dirtied again while a batch still copies it: that
                    # batch may have read the old data and land after a
                    # copy of the new data made now (QEMU's mirror waits
                    # on such conflicts too). It waits for that batch.
                    self.dirty.set(*area)
                    self._pos = area[0]
                    break
                k = len(areas)
                self.parts.split(*area, areas)
                for r in areas[k:]:
                    self.inflight.add(*r)
                areas.whole += area[1]
                left -= area[1]
                end = area[0] + area[1]
                self._pos = 0 if end >= self.src.size else end
                if self._pos == 0:
                    if wrapped:
                        break
                    wrapped = True
        return areas or None

    def _claim(self, job: Job) -> Claim | None:
        """The background loop's next area; None to leave the loop: nothing
        dirty, or little enough left to converge with writes held off, or a
        completion / soft cancel to serve."""
        if not job.is_ready:
            if self.dirty.count() <= BATCH:
                return None
        elif job.should_complete or job.cancel_requested:
            return None
        return self._claim_any(job)

    def _release(self, areas: Claim, stats: Stats | None) -> None:
        job = self.job
        assert job is not None          # set by setup(); copies run only in run()
        with self.io:
            for a, n in areas:
                self.inflight.remove((a, a + n))
            if stats is None or job.is_cancelled:
                for a, n in areas:
                    self.parts.mark_whole(a, n)
                if stats is None:
                    self.sync_failed = True
                return
        job.progress.advance(areas.whole)
        # bytes really copied: a guest's small writes cost what they wrote
        self.copied += sum(n for _, n in areas)
        if not job.is_ready and not self.escalated and self.copied >= self.src.size:
            # Writes dirty data faster than we copy it: mirror them
            # synchronously until in sync, so the job converges.
            with self.io:
                self.escalated = True
        self._progress(job)

    def _catch_up(self, job: Job) -> None:
        """Before a completion holds guest writes off: copy what is dirty
        now and flush, while the guest still writes; again while a flush took
        long enough (CATCH_UP_FLUSH) for much to pile up meanwhile and the
        flushes still get shorter, at most CATCH_UP_PASSES times. The guest
        then waits only for the last little pass and its flush, not for the
        fsync of everything written since READY (measured with a 50 MB/s
        4 KiB writer on 4 GiB: a 0.5-0.75 s stall became 60 ms)."""
        last = float("inf")
        for _ in range(CATCH_UP_PASSES):
            with self.io:
                budget = [self.dirty.count()]

            def claim(job: Job) -> Claim | None:    # used in this pass only
                if budget[0] <= 0:                  # noqa: B023
                    return None
                areas = self._claim_any(job)
                if areas:
                    budget[0] -= areas.whole        # noqa: B023
                return areas

            self.copy_loop(job, self.mover, claim, self._release)
            t = time.monotonic()
            self._flush(job)
            took = time.monotonic() - t
            if took < CATCH_UP_FLUSH or took > 0.7 * last:
                return          # short enough, or no longer getting shorter
            last = took

    def _drain_all(self, job: Job) -> None:
        """With the source quiesced: copy everything still dirty, flush."""
        self.copy_loop(job, self.mover, self._claim_any, self._release)
        self._flush(job)

    def _flush(self, job: Job) -> None:
        while True:
            try:
                self.mover.flush()
                return
            except CopyError as e:
                action = self.policy_action(job, e, self.on_target_error)
                if action is ErrorAction.REPORT:
                    raise
                if action is ErrorAction.STOP:
                    job.pause_point()
                else:
                    return

    def run(self, job: Job) -> None:
        if self.src.size != self.dst.size:
            raise JobError("Source and target image have different sizes")
        with self.io:
            # a guest write in flight since before the filter went in (held
            # in the driver) would land unseen by it: it lands first
            self.io.wait_writes(self.src)
            self.initial_dirty()
        self._progress(job)
        while True:
            self.copy_loop(job, self.mover, self._claim, self._release)
            job.pause_point()
            if not job.is_ready:
                if self.dirty.count() > BATCH:
                    continue
                # the last bit with guest writes held off: converges. The
                # flush comes after: guest writes go on meanwhile (they are
                # tracked), as in QEMU, which flushes before READY without
                # draining the guest. Fsync of a freshly copied disk takes
                # long; a guest stalled for it noticed (460 ms at 1 GiB).
                self.io.quiesce(self.src)
                try:
                    self.copy_loop(job, self.mover, self._claim_any, self._release)
                finally:
                    self.io.unquiesce(self.src)
                self._flush(job)
                self._progress(job)
                job.set_ready(idle=not self.dirty.count())
                with self.io:
                    self.escalated = False
                continue
            if job.should_complete or (job.cancel_requested and not job.is_cancelled):
                self._catch_up(job)
                self.io.quiesce(self.src)
                self._quiesced = True       # until clean: writes wait for the pivot
                self._drain_all(job)
                self._progress(job)
                self.final_synced = True
                return
            if self.dirty.count() < BATCH:
                # In sync but for recent writes: let them gather for a slice
                # (QEMU's mirror also iterates in slices). complete, cancel
                # and pause wake the job at once.
                self._progress(job)
                job.sleep(READY_POLL_NS)

    # ------------------------------------------------------------------
    def complete(self, job: Job) -> None:
        pass        # run() notices should_complete

    def cancel(self, job: Job, force: bool) -> bool:
        return force or not job.is_ready

    def change(self, job: Job, options: dict[str, Any]) -> None:
        if options.get("type") != self.job_type:
            raise JobError(f"Job type does not match: {options.get('type')}")
        mode = options.get("copy-mode", options.get("copy_mode", self.copy_mode))
        if mode not in ("background", "write-blocking"):
            raise JobError(f"Parameter 'copy-mode' does not accept value '{mode}'")
        if self.copy_mode == "write-blocking" and mode == "background":
            raise JobError("Change of copy-mode from 'write-blocking' to 'background' is "
                           "not allowed")
        with self.io:
            self.copy_mode = mode

    def query(self, job: Job) -> dict[str, Any]:
        if self.job_type != "mirror":
            return {}
        return {"actively-synced": bool(self.copy_mode == "write-blocking" and job.is_ready
                                        and not self.sync_failed)}

    # ------------------------------------------------------------------
    def pivot_nodes(self) -> tuple[Node, Node]:
        """(node replaced, node replacing it)."""
        return (self.replaces or self.src), self.dst

    def prepare(self, job: Job) -> None:
        if not (job.should_complete and self.final_synced):
            return
        old, new = self.pivot_nodes()
        with self.io:
            if old.name not in self.io.graph.nodes:
                raise JobError(f"Node name '{old.name}' not found")
            self._release_target()
            gt = GraphTransaction()
            moved = []
            try:
                gt.replace_node(old, new)
                moved = self.io.repoint(old, new)
            except BaseException:
                self.io.undo_repoint(moved)
                gt.abort()
                raise JobError(f"Can no longer replace '{old.name}' by '{new.name}'") from None
            gt.commit()
            self.pivoted = True
            # the filter is dropped in the same step: the guest now writes
            # straight to the new node (docs/jobs.md §2, prepare 1 and 4)
            self.remove_filter()

    def _release_target(self) -> None:
        if self._perm is not None:
            self._perm.release()
            self._perm = None

    def clean(self, job: Job) -> None:
        with self.io:
            self.remove_filter()
            self._release_target()
            if self._quiesced:
                self._quiesced = False
                self.io.unquiesce(self.src)
        self.mover.close()
        self.job = None
