"""backup (``blockdev-backup``, docs/jobs.md §1): a point-in-time copy.

At creation the copy-before-write filter (:mod:`.cbw`) goes onto the source
and a named bitmap is frozen. ``run`` walks the copy bitmap (job-cluster
granularity) in batches: each batch is claimed (cleared + registered in
flight, under the I/O lock) and moved by the C engine (:class:`~.base.Mover`);
a failed batch is re-dirtied before its error goes through the policy.
``commit``/``abort`` hand the bitmap over; ``clean`` removes the filter.
There is no graph change.
"""
from __future__ import annotations

import logging
from typing import Any

from ..errors import CopyError, JobError
from ..graph import ALL, Node, Perm, Permission
from ..graph.io import BlockIO, DirtyBitmap, InFlight
from ..graph.node import BACKING_SHARED
from ..jobmodel import ErrorAction, Job
from ..native.bitmap import Bitmap
from .base import BlockJob, check_policy
from .blockcopy import JOB_CLUSTER, Mover, Stats
from .cbw import CbwFilter
from .ranges import merge, select_full, select_window

_log = logging.getLogger(__name__)

SYNC_MODES = ("full", "top", "none", "incremental", "bitmap")
BITMAP_MODES = ("on-success", "never", "always")
#: Most dirty areas one batch takes (see BackupJob._claim).
CLAIM_AREAS = 1024

class BackupJob(BlockJob):
    job_type = "backup"
    src: Node
    dst: Node
    mover: Mover
    copy_bm: Bitmap

    # ------------------------------------------------------------------
    @classmethod
    def create(cls, io: BlockIO, device: str | Node, target: str | Node, sync: str, *,
               bitmap: str | None = None, bitmap_mode: str | None = None,
               compress: bool = False, on_source_error: str = "report",
               on_target_error: str = "report", on_cbw_error: str = "break-guest-write",
               filter_node_name: str | None = None) -> BackupJob:
        """Validate in QEMU's order (docs/jobs.md §1, exact messages); build the
        driver. Nothing changes until :meth:`setup`."""
        src, dst = io.node(device), io.node(target)
        if sync not in SYNC_MODES:
            raise JobError(f"Parameter 'sync' does not accept value '{sync}'")
        if bitmap_mode is not None and bitmap_mode not in BITMAP_MODES:
            raise JobError(f"Parameter 'bitmap-mode' does not accept value '{bitmap_mode}'")
        check_policy("on-source-error", on_source_error)
        check_policy("on-target-error", on_target_error)
        if on_cbw_error not in ("break-guest-write", "break-snapshot"):
            raise JobError(f"Parameter 'on-cbw-error' does not accept value '{on_cbw_error}'")
        if sync in ("bitmap", "incremental") and bitmap is None:
            raise JobError(f"must provide a valid bitmap name for '{sync}' sync mode")
        if sync == "incremental":
            if bitmap_mode not in (None, "on-success"):
                raise JobError("Bitmap sync mode must be 'on-success' when using sync mode "
                               "'incremental'")
            sync, bitmap_mode = "bitmap", "on-success"
        bm: DirtyBitmap | None = None
        if bitmap is not None:
            bm = io.bitmap(src, bitmap)
            if bitmap_mode is None:
                raise JobError("Bitmap sync mode must be given when providing a bitmap")
            bm.check()      # busy, read-only, inconsistent (a crash): QEMU's texts
            if sync == "none":
                raise JobError("sync mode 'none' does not produce meaningful bitmap outputs")
            if bitmap_mode == "never" and sync != "bitmap":
                raise JobError("Bitmap sync mode 'never' has no meaningful effect when "
                               f"combined with sync mode '{sync}'")
        elif bitmap_mode is not None:
            raise JobError("Cannot specify bitmap sync mode without a bitmap")
        if src is dst:
            raise JobError("Source and target cannot be the same")
        if compress and not dst.driver.can_compress:
            raise JobError(f"Compression is not supported for this drive {dst.name}")
        if src.size != dst.size:
            raise JobError("Source and target image have different sizes")
        # sync=top of a node without a backing file stays top (QEMU's
        # blockdev-backup; drive-backup makes it full): the clusters it does
        # not allocate are neither copied nor counted in the progress
        return cls(io, src, dst, sync, bm, bitmap_mode, compress, on_source_error,
                   on_target_error, on_cbw_error)

    def __init__(self, io: BlockIO, src: Node, dst: Node, sync: str, bm: DirtyBitmap | None,
                 bitmap_mode: str | None, compress: bool, on_source_error: str,
                 on_target_error: str, on_cbw_error: str):
        super().__init__(io)
        self.src, self.dst, self.sync = src, dst, sync
        self.bm, self.bitmap_mode = bm, bitmap_mode
        self.compress = compress
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.size = src.size
        self.cluster = max(JOB_CLUSTER, dst.driver.cluster_size)
        self.copy_bm = Bitmap(self.size, self.cluster)
        self.manifest: Bitmap | None = None
        self.inflight = InFlight(io.lock)
        self.done = 0                   # bytes copied (or found zero), both paths
        #: the job's progress, in QEMU's unit: whole clusters of the copy
        #: bitmap (a 1536-byte image is 64 KiB of work, as its one cluster)
        self.done_clusters = 0
        select = select_window(0, 1) if sync == "top" else select_full
        # write-behind: the job ends with a flush of the target (unless it is
        # cache=unsafe); durable 4 GiB backup: 3.2-8.1 s -> 1.5-1.7 s
        self.mover = Mover(io, src, dst, select, bucket=self.bucket, compress=compress,
                           write_behind=True)
        self.cbw_mover = Mover(io, src, dst, select, compress=compress)
        self.cbw = CbwFilter(self, on_cbw_error)
        self._perm: Permission | None = None
        self._relaxed: Permission | None = None     # the fleecing target's backing link
        self._job: Job | None = None
        self._pos = 0

    # ------------------------------------------------------------------
    def setup(self, job: Job) -> None:
        """At creation: take the target, freeze the bitmap, build the copy
        bitmap, insert the copy-before-write filter."""
        io = self.io
        with io:
            try:
                self._setup(job)
            except BaseException:
                self._let_go()         # a refused start holds nothing
                raise
        # sync=none too: every cluster is one a guest write may have to save
        job.progress.update(0, self.copy_bm.dirty_granules() * self.cluster)

    def _setup(self, job: Job) -> None:
        self._perm = self.dst.take(f"backup job '{job.id}'",
                                   Perm.CONSISTENT_READ | Perm.WRITE,
                                   Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        keep: tuple[Node, ...] = ()
        if self.dst.backing is self.src:
            # Image fleecing: the target is an overlay of the source. Its
            # backing link must let the guest write the source -- the job
            # saves the old data into the target first, so the target's view
            # stays the point in time (QEMU: a backing link shares write when
            # the overlay's users accept changing data, as the target's do).
            # The link stays on the source itself, not on the filter (QEMU
            # leaves parents the filter reaches where they are).
            link = self.dst.backing_perm
            assert link is not None         # a node with a backing node has its link
            link.update(shared=ALL)
            self._relaxed = link
            keep = (self.dst,)
        if self.sync in ("full", "top", "none"):
            # none: the background loop copies nothing, but a guest
            # write still saves every cluster it is the first to touch
            self.copy_bm.set_all()
        if self.bm is not None:
            self.bm.busy = True
            self.bm.successor = Bitmap(self.size, self.bm.granularity)
            self.manifest = self.bm.bitmap.copy()
            if self.sync == "bitmap":
                if (self.manifest.granularity == self.copy_bm.granularity
                        and self.manifest.size == self.copy_bm.size):
                    self.copy_bm.merge(self.manifest)   # one C call, not one per area
                else:
                    for a, n in self.manifest.areas():
                        self.copy_bm.set(a, n)
        self.insert_filter(self.src, self.cbw, "copy-before-write", keep=keep)

    def _sync_progress(self, job: Job) -> None:
        """current/total-progress as QEMU's block-copy keeps them: in whole
        clusters of the copy bitmap (copied, dirty, in flight); clusters
        found wholly unallocated (sync=top) leave the total."""
        cl = self.cluster
        with self.io:
            done = self.done_clusters
            # the ranges in flight are whole clusters but the image's last,
            # which only one of them can hold: their sum rounds up exactly
            left = self.copy_bm.dirty_granules() * cl + -(-self.inflight.total // cl) * cl
        job.progress.update(current=max(done, job.progress.current), total=done + left)

    def bytes_progress(self) -> tuple[int, int]:
        """(bytes copied, bytes of the image to copy in all): what the
        command line says a cancelled backup left in the target."""
        with self.io:
            left = self.copy_bm.count() + self.inflight.total
            return self.done, self.done + left

    def landed(self, areas: list[tuple[int, int]], stats: Stats) -> None:
        """Areas of the copy bitmap (whole clusters, the image's last one
        partial) copied by a batch or by copy-before-write: counted as bytes
        and as QEMU's progress, whole clusters less those wholly skipped
        (I/O lock held)."""
        cl, size = self.cluster, self.size
        self.done += sum(n for _, n in areas) - stats.skipped
        whole = sum(-(-(a + n) // cl) - a // cl for a, n in areas)
        for s, n in merge(stats.skips) if stats.skips else ():
            e = s + n
            whole -= max(0, (-(-e // cl) if e >= size else e // cl) - -(-s // cl))
        self.done_clusters += whole * cl

    @property
    def _job_cancelled(self) -> bool:
        return self._job is not None and self._job.is_cancelled

    def run(self, job: Job) -> None:
        self._job = job
        with self.io:
            # the point in time: a guest write in flight since before the
            # copy-before-write filter went in (held in the driver) lands
            # first, whole, rather than torn across clusters copied around it
            self.io.wait_writes(self.src)
        if self.sync == "none":
            try:
                while True:
                    job.sleep(100_000_000)
                    self._sync_progress(job)
                    self._check_cbw()
            finally:        # cancelled: what copy-before-write saved since
                self._sync_progress(job)
        self._pos = 0
        self.copy_loop(job, self.mover, self._claim, self._release)
        self._flush_target(job)
        self._sync_progress(job)
        self._check_cbw()

    def _claim(self, job: Job) -> list[tuple[int, int]] | None:
        """Dirty areas from the cursor on, up to one batch and CLAIM_AREAS
        areas: scattered clusters (an incremental backup's) travel together,
        one engine round trip for all of them, and the engine merges the
        ones adjacent in both files into one request."""
        self._check_cbw()
        left = self.batch_size(job, self.cluster)
        areas: list[tuple[int, int]] = []
        with self.io:
            wrapped = not self._pos
            while left >= self.cluster and len(areas) < CLAIM_AREAS:
                got = self.copy_bm.take_dirty_areas(self._pos, left, CLAIM_AREAS - len(areas))
                if not got:
                    if wrapped:
                        break
                    wrapped, self._pos = True, 0
                    continue
                for a, n in got:
                    self.inflight.add(a, n)
                    left -= n
                areas += got
                end = got[-1][0] + got[-1][1]
                self._pos = 0 if end >= self.size else end
                if self._pos == 0:
                    if wrapped:
                        break
                    wrapped = True
        return areas or None

    def _release(self, areas: list[tuple[int, int]], stats: Stats | None) -> None:
        assert self._job is not None    # set by run(), the only caller of the copy loop
        with self.io:
            for a, n in areas:
                self.inflight.remove((a, a + n))
            if stats is None or self._job_cancelled:
                for a, n in areas:
                    self.copy_bm.set(a, n)
            else:
                self.landed(areas, stats)
        self._sync_progress(self._job)

    def _flush_target(self, job: Job) -> None:
        while True:
            try:
                self.mover.flush()
                return
            except CopyError as e:
                action = self.policy_action(job, e)
                if action is ErrorAction.REPORT:
                    raise
                if action is ErrorAction.STOP:
                    job.pause_point()
                else:
                    return

    def _check_cbw(self) -> None:
        if self.cbw.snapshot_error is not None:
            raise self.cbw.snapshot_error

    # ------------------------------------------------------------------
    # Finalization (docs/jobs.md §1 "Bitmap modes")

    def _handover(self, success: bool) -> None:
        bm = self.bm
        if bm is None or bm.successor is None:
            return
        with self.io:
            succ, mode = bm.successor, self.bitmap_mode
            if mode == "on-success" and success:
                bm.bitmap = succ
            elif mode == "always":
                new = succ.copy()
                if not success and self.manifest is not None:
                    # the part of the manifest not copied before the failure
                    for a, n in self.copy_bm.areas():
                        for s, k in self.manifest.areas(a, n):
                            if s >= a + n:
                                break
                            new.set(s, min(k, a + n - s))
                bm.bitmap = new
            else:       # never, or on-success after a failure: nothing lost
                bm.bitmap.merge(succ)
            bm.successor = None
            bm.busy = False

    def commit(self, job: Job) -> None:
        self._handover(True)

    def abort(self, job: Job) -> None:
        self._handover(False)

    def _let_go(self) -> None:
        """Release what setup took (I/O lock held; what it did not get is
        skipped)."""
        self.remove_filter()
        if self._relaxed is not None:
            if not self._relaxed.released:
                try:
                    self._relaxed.update(shared=BACKING_SHARED)
                except Exception:       # someone writes the source now: leave it shared
                    _log.debug("sharing '%s' again failed", self.src.name, exc_info=True)
            self._relaxed = None
        if self._perm is not None:
            self._perm.release()
            self._perm = None
        if self.bm is not None and self.bm.successor is not None:
            self._handover(False)

    def clean(self, job: Job) -> None:
        with self.io:
            self._let_go()
        self.mover.close()
        self.cbw_mover.close()

    def query(self, job: Job) -> dict[str, Any]:
        return {}
