"""stream (``block-stream``, docs/jobs.md §3): pull the chain into the top.

``run`` walks the disk in batches; for each batch the :class:`~.base.Mover`
copies into the top image (through ``allocate()`` and the C engine) every
run that a layer strictly between the top and the base provides, zero
clusters included; runs the top already has, or that come from the base or
below, are skipped. The top serialises as QEMU's copy-on-read requests do
(``BlockIO.serialize``/``wait_writes``): a guest write reaching the top waits
while its range is being streamed (the copy would overwrite it), and a batch
waits for guest writes already being done on its range, even one suspended
inside the driver; reads and flushes wait for the
clusters allocated and not yet filled (``BlockIO.mark_unfilled``); a batch
that does not land gives its clusters back (``Mover._give_back``).

``prepare`` (the only graph change): the top backs directly onto the base
(or onto nothing) and its header records the new backing file. ``abort``
changes nothing: the data already copied stays, the chain is unchanged.
The former intermediates leave the graph at ``commit`` (files untouched).
"""
from __future__ import annotations

import logging

from ..errors import CopyError, JobError
from ..graph import ALL, GraphTransaction, Node, Perm, Permission
from ..graph.frontend import Filter
from ..graph.io import BlockIO, InFlight
from ..jobmodel import ErrorAction, Job
from .base import BlockJob, check_policy
from .blockcopy import Mover
from .ranges import batch_unit, select_window

_log = logging.getLogger(__name__)


def lookup_node(io: BlockIO, name: str) -> Node:
    """A node by node-name only, with QEMU's ``bdrv_lookup_bs(NULL, name)``
    text (used for base-node, bottom, top-node)."""
    node = io.graph.nodes.get(name)
    if node is None:
        raise JobError(f"Cannot find device='' nor node-name='{name}'")
    return node


def find_in_chain(top: Node, filename: str) -> Node | None:
    """A node strictly below ``top`` opened from ``filename`` (exact name,
    or the same file)."""
    import os
    for n in top.chain()[1:]:
        if n.filename == filename:
            return n
    for n in top.chain()[1:]:
        try:
            if os.path.samefile(n.filename, filename):
                return n
        except OSError:
            pass
    return None


#: what a stream lets others do with the nodes it removes from the chain
_INTERMEDIATE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


class StreamJob(BlockJob):
    job_type = "stream"
    mover: Mover

    @classmethod
    def create(cls, io: BlockIO, device: str | Node, *, base: str | None = None,
               base_node: str | None = None, bottom: str | None = None,
               backing_file: str | None = None, on_error: str = "report") -> StreamJob:
        top = io.node(device)
        if base is not None and base_node is not None:
            raise JobError("'base' and 'base-node' cannot be specified at the same time")
        if base is not None and bottom is not None:
            raise JobError("'base' and 'bottom' cannot be specified at the same time")
        if bottom is not None and base_node is not None:
            raise JobError("'bottom' and 'base-node' cannot be specified at the same time")
        check_policy("on-error", on_error)
        base_n: Node | None = None
        if base is not None:
            base_n = find_in_chain(top, base)
            if base_n is None:
                raise JobError(f"Can't find '{base}' in the backing chain")
        elif base_node is not None:
            base_n = lookup_node(io, base_node)
            if base_n not in top.chain()[1:]:
                raise JobError(f"Node '{base_node}' is not a backing image of '{top.name}'")
        elif bottom is not None:
            b = lookup_node(io, bottom)
            if b not in top.chain():
                raise JobError(f"Node '{bottom}' is not in a chain starting from '{top.name}'")
            base_n = b.backing
        if backing_file is not None and base_n is None:
            raise JobError("backing file specified, but streaming the entire chain")
        chain = top.chain()
        stop = chain.index(base_n) if base_n is not None else len(chain)
        for n in chain[:stop]:       # QEMU: from the device down to the base
            io.check_busy(n)
        return cls(io, top, base_n, backing_file, on_error, chain[1:stop])

    def __init__(self, io: BlockIO, top: Node, base: Node | None, backing_file: str | None,
                 on_error: str, intermediates: list[Node]):
        super().__init__(io)
        self.top, self.base = top, base
        self.backing_file = backing_file
        self.on_source_error = self.on_target_error = on_error
        self.on_error = on_error
        self.intermediates = intermediates
        depth = top.chain().index(base) if base is not None else None
        # write-behind: the job ends with a flush of top; pulling a 4 GiB
        # VM-shaped base into an empty overlay: 1.9-8.0 s -> 1.4-1.7 s
        self.mover = Mover(io, top, top, select_window(1, depth), bucket=self.bucket,
                           write_behind=True, detect_zeroes=True)
        #: the ranges being streamed: serialising at the top
        #: (``BlockIO.serialize``), so guest writes reaching the top wait
        self.inflight = InFlight(io.lock)
        #: the copy-on-read filter node's hooks (none: the top serialises)
        self.filter = Filter()
        self.failed_ignored: BaseException | None = None
        self._was_ro = False
        self._perm: Permission | None = None
        self._held: list = []

    def setup(self, job: Job) -> None:
        """QEMU's permissions (block/stream.c): the top is written with data
        the guest already sees there (write unchanged), sharing all but
        resize; each intermediate is read by the job and must not change
        (nothing taken, sharing only consistent read and write unchanged).
        So an overlay above the top and a second stream on a disjoint part of
        the chain coexist. A refused start leaves nothing held."""
        owner = f"stream job '{job.id}'"
        with self.io:
            try:
                self.io.claim(job, [self.top] + self.intermediates)
                if self.top.read_only:
                    self.top.reopen(False)
                    self._was_ro = True
                self._perm = self.top.take(owner, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
                                           ALL & ~Perm.RESIZE)
                for n in self.intermediates:
                    self._held.append(n.take(owner, Perm(0), _INTERMEDIATE_SHARED))
                # the filter passes on what its users do: write unchanged
                # (copy-on-read), and write when the top may be written at
                # all (not when it is an overlay's backing: stream of an
                # intermediate node)
                perm = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
                if all(p.shared & Perm.WRITE for p in self.top.users()):
                    perm |= Perm.WRITE
                self.insert_filter(self.top, self.filter, "copy-on-read", perm=perm)
                self.io.serialize(self.top, self.inflight)
            except BaseException:
                self._let_go(job)
                raise
        job.progress.update(0, self.top.size)

    def _claim(self, job: Job) -> tuple[int, int] | None:
        if self._retry:
            area = self._retry.pop(0)
        elif self._pos < self.top.size:
            n = min(self.batch_size(job, batch_unit(self.top)), self.top.size - self._pos)
            area = (self._pos, n)
            self._pos += n
        else:
            return None
        with self.io:
            # a guest write already past the top's check (suspended in the
            # driver) lands first; later ones wait for the copy
            self.io.wait_writes(self.top, *area)
            self.inflight.add(*area)
        return area

    def _release(self, area: tuple[int, int], stats) -> None:
        with self.io:
            self.inflight.remove((area[0], area[0] + area[1]))
        if stats is None:
            self._retry.append(area)
        else:
            self._job.progress.advance(area[1])

    def _on_error(self, job: Job, err: CopyError, area: tuple[int, int]) -> ErrorAction:
        # every error of stream is a "read" (docs/jobs.md §3)
        action = job.handle_error("read", err, self.on_error)
        if action is ErrorAction.IGNORE:
            # go on streaming, but the job fails at the end (and keeps its backing)
            self._retry.remove(area)
            job.progress.advance(area[1])
            self.failed_ignored = err
        return action

    def run(self, job: Job) -> None:
        self._job, self._pos = job, 0
        self._retry: list[tuple[int, int]] = []
        self.copy_loop(job, self.mover, self._claim, self._release, self._on_error)
        self.mover.flush()
        if self.failed_ignored is not None:
            raise self.failed_ignored

    def prepare(self, job: Job) -> None:
        with self.io:
            with GraphTransaction() as gt:       # commits, or aborts on an exception
                gt.set_backing(self.top, self.base, filename=self.backing_file)

    def commit(self, job: Job) -> None:
        with self.io:
            self._release_intermediates()
            self.io.drop_unused(self.intermediates)

    def _release_intermediates(self) -> None:
        for p in self._held:
            p.release()
        self._held = []

    def _let_go(self, job: Job) -> None:
        """Everything setup took (I/O lock held; what it did not get is
        skipped)."""
        self.io.unserialize(self.top, self.inflight)
        self.remove_filter()
        self._release_intermediates()
        self.io.release_claims(job)
        if self._perm is not None:
            self._perm.release()
            self._perm = None
        if self._was_ro and not self.io.frontends(self.top):
            try:
                self.top.reopen(True)
            except Exception:
                _log.debug("reopening '%s' read-only failed", self.top.name, exc_info=True)
            self._was_ro = False

    def clean(self, job: Job) -> None:
        with self.io:
            self._let_go(job)
        self.mover.close()
