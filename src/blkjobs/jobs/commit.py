"""commit (``block-commit``, docs/jobs.md §4).

* Intermediate commit (:class:`CommitJob`): the data of ``top`` and every
  image down to (excluding) ``base`` is moved into ``base`` through the C
  engine; ``prepare`` relinks top's overlay onto base (header rewritten);
  ``commit`` drops top and the intermediates from the graph (files stay).
* Active commit (:class:`ActiveCommitJob`): ``top`` is the active layer (the
  device, or a node with a front end writing to it). It is the mirror
  machinery from top into base with type ``commit``: READY, then
  ``job_complete`` pivots every user of top onto base.

Base is reopened read-write for the job (and back in ``clean``); the backing
link of the node right above base is relaxed to share writes meanwhile.

Both copy with write-behind (``Mover(write_behind=True)``): a commit is only done
once base is flushed, so writeback starts while the data is copied and the
final fsync finds little left to write (``convert -t writeback``'s way).
"""
from __future__ import annotations

import logging


from ..errors import CopyError, JobError
from ..graph import GraphTransaction, Node, Perm, Permission
from ..graph.frontend import Filter
from ..graph.io import BlockIO
from ..graph.node import BACKING_SHARED
from ..graph.perm import ALL
from ..jobmodel import ErrorAction, Job
from .base import BlockJob, check_policy
from .blockcopy import Mover
from .mirror import MirrorJob
from .ranges import batch_unit, select_window
from .stream import find_in_chain, lookup_node

_log = logging.getLogger(__name__)



class DeviceNotFound(JobError):
    qmp_class = "DeviceNotFound"


class _BaseAccess:
    """Write access to a backing node for the length of a job."""

    def __init__(self, io: BlockIO, base: Node):
        self.io, self.base = io, base
        self.was_ro = False
        self.relaxed: Permission | None = None
        self.perm: Permission | None = None

    def open(self, owner: str) -> None:
        base = self.base
        if base.read_only:
            base.reopen(False)
            self.was_ro = True
        for p in self.io.graph.parents(base):
            if p.backing_perm is not None:
                p.backing_perm.update(shared=ALL)
                self.relaxed = p.backing_perm
        self.perm = base.take(owner, Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
                              ALL)

    def release_write(self) -> None:
        if self.perm is not None:
            self.perm.release()
            self.perm = None

    def close(self) -> None:
        self.release_write()
        if self.relaxed is not None and not self.relaxed.released:
            try:
                self.relaxed.update(shared=BACKING_SHARED)
            except Exception:
                _log.debug("sharing '%s' again failed", self.base.name, exc_info=True)
        self.relaxed = None
        if self.was_ro and not self.io.frontends(self.base) \
                and self.base.name in self.io.graph.nodes:
            try:
                self.base.reopen(True)
            except Exception:
                _log.debug("reopening '%s' read-only failed", self.base.name, exc_info=True)
            self.was_ro = False


def make_commit(io: BlockIO, device: str | Node, *, base_node: str | None = None,
                base: str | None = None, top_node: str | None = None, top: str | None = None,
                backing_file: str | None = None, on_error: str = "report") -> BlockJob:
    """Validate (docs/jobs.md §4, exact messages) and build the right driver."""
    dev = io.graph.nodes.get(device) if isinstance(device, str) else device
    if dev is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    if io.graph.parents(dev):
        # QEMU looks the device up as a root node: not an overlay's backing,
        # nor below another job's filter
        raise JobError("Need a root block node")
    check_policy("on-error", on_error)
    # QEMU's order (qmp_block_commit): top, then base, then "into itself"
    if top_node is not None and top is not None:
        raise JobError("'top-node' and 'top' are mutually exclusive")
    chain = dev.chain()
    top_n: Node | None
    if top_node is not None:
        top_n = lookup_node(io, top_node)
        if top_n not in chain:
            raise JobError(f"'{top_node}' is not in this backing file chain")
    elif top is not None:
        top_n = dev if dev.filename == top else find_in_chain(dev, top)
        if top_n is None:
            raise JobError(f"Top image file {top} not found")
    else:
        top_n = dev
    if base_node is not None and base is not None:
        raise JobError("'base-node' and 'base' are mutually exclusive")
    base_n: Node | None
    if base_node is not None:
        base_n = lookup_node(io, base_node)
        if base_n not in top_n.chain():
            raise JobError(f"'{base_node}' is not in this backing file chain")
    elif base is not None:
        base_n = find_in_chain(top_n, base)
        if base_n is None:
            raise JobError(f"Can't find '{base}' in the backing chain")
    else:
        # QEMU's bdrv_find_base: top itself when it has no backing (so its
        # "There is no backimg image" cannot happen; "into itself" instead)
        base_n = top_n.chain()[-1]
    if base_n is top_n:
        raise JobError("cannot commit an image into itself")
    active = top_n is dev or bool(io.frontends(top_n))
    if active and backing_file is not None:
        if top_n is dev:
            raise JobError("'backing-file' specified, but 'top' is the active layer")
        raise JobError("'backing-file' specified, but 'top' has a writer on it")
    tchain = top_n.chain()
    nodes = tchain[:tchain.index(base_n)]          # top .. above base
    for n in nodes + [base_n]:
        io.check_busy(n)
    if active:
        if any(not p.is_filter for p in io.graph.parents(top_n)):
            raise JobError("Need a root block node")
        return ActiveCommitJob(io, top_n, base_n, nodes, on_error)
    return CommitJob(io, top_n, base_n, nodes, backing_file, on_error)


class CommitJob(BlockJob):
    job_type = "commit"
    mover: Mover

    def __init__(self, io: BlockIO, top: Node, base: Node, nodes: list[Node],
                 backing_file: str | None, on_error: str):
        super().__init__(io)
        self.top, self.base, self.nodes = top, base, nodes
        self.backing_file = backing_file
        self.on_error = on_error
        self.access = _BaseAccess(io, base)
        depth = top.chain().index(base)
        self.mover = Mover(io, top, base, select_window(0, depth), bucket=self.bucket,
                           write_behind=True, detect_zeroes=True)
        self._overlay_ro: Node | None = None

    def setup(self, job: Job) -> None:
        with self.io:
            self.io.claim(job, self.nodes + [self.base])
            try:
                self.access.open(f"commit job '{job.id}'")
                # above top: its overlay now reads through the filter, which
                # holds nothing on top (QEMU's commit_top): top may be an
                # intermediate node (top-node under an overlay)
                self.insert_filter(self.top, Filter(), "commit_top", perm=Perm(0))
            except BaseException:
                self.access.close()
                self.io.release_claims(job)
                raise
        job.progress.update(0, self.top.size)

    def _claim(self, job: Job) -> tuple[int, int] | None:
        if self._retry:
            return self._retry.pop(0)
        if self._pos >= self._size:
            return None
        n = min(self.batch_size(job, batch_unit(self.base)), self._size - self._pos)
        area = (self._pos, n)
        self._pos += n
        return area

    def _release(self, area: tuple[int, int], stats) -> None:
        if stats is None:
            self._retry.append(area)        # report fails; ignore/stop retry it
        else:
            self._job.progress.advance(area[1])

    def _on_error(self, job: Job, err: CopyError, area: tuple[int, int]) -> ErrorAction:
        return job.handle_error("read" if err.side == "source" else "write", err, self.on_error)

    def run(self, job: Job) -> None:
        self._job, self._pos = job, 0
        self._retry: list[tuple[int, int]] = []
        self._size = min(self.top.size, self.base.size)
        self.copy_loop(job, self.mover, self._claim, self._release, self._on_error)
        self.mover.flush()

    def prepare(self, job: Job) -> None:
        with self.io:
            # the overlays use the commit filter (or top, without one)
            above = self.fnode if self.fnode is not None else self.top
            overlays = [p for p in self.io.graph.parents(above) if not p.is_filter]
            self.access.release_write()
            with GraphTransaction() as gt:       # commits, or aborts on an exception
                for ov in overlays:
                    if ov.read_only:
                        ov.reopen(False)
                        self._overlay_ro = ov
                    gt.set_backing(ov, self.base, filename=self.backing_file)
            self.remove_filter()         # nothing uses it now: top leaves the chain

    def commit(self, job: Job) -> None:
        with self.io:
            self.io.drop_unused(self.nodes)

    def clean(self, job: Job) -> None:
        with self.io:
            self.remove_filter()         # after an abort: its parents back onto top
            self.access.close()
            if self._overlay_ro is not None:
                try:
                    self._overlay_ro.reopen(True)
                except Exception:
                    _log.debug("reopening '%s' read-only failed", self._overlay_ro.name,
                               exc_info=True)
            self.io.release_claims(job)
        self.mover.close()


class ActiveCommitJob(MirrorJob):
    """Active commit: a mirror from top into base, type ``commit``."""

    job_type = "commit"
    mirrors_into_base = True

    def __init__(self, io: BlockIO, top: Node, base: Node, nodes: list[Node], on_error: str):
        depth = top.chain().index(base)
        super().__init__(io, top, base, "top", select_window(0, depth), 64 << 10,
                         "background", False, on_error, on_error)
        self.mover.close()
        self.mover = Mover(io, top, base, select_window(0, depth), bucket=self.bucket,
                           write_behind=True, detect_zeroes=True)
        self.nodes = nodes
        self.access = _BaseAccess(io, base)
        self.base = base

    def take_target(self, job: Job) -> None:
        self.io.claim(job, self.nodes + [self.base])
        self.access.open(f"commit job '{job.id}'")

    def setup(self, job: Job) -> None:
        try:
            super().setup(job)
        except BaseException:
            with self.io:
                self.access.close()
                self.io.release_claims(job)
            raise

    def _release_target(self) -> None:
        self.access.release_write()

    def commit(self, job: Job) -> None:
        if self.pivoted:
            with self.io:
                # base took top's place: it keeps top's read-write mode, as
                # QEMU's base takes the overlay's flags (a management tool
                # writes to it next), whether or not a front end is on it
                if not self.nodes[0].read_only:
                    self.access.was_ro = False
                self.io.drop_unused(self.nodes)

    def clean(self, job: Job) -> None:
        super().clean(job)
        with self.io:
            self.access.close()
            self.io.release_claims(job)
