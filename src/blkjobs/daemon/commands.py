"""Command handlers: QMP commands mapped onto the :class:`~blkjobs.engine.Engine`.

:class:`Commands` is the composition of one mixin per concept:

* :class:`~.node_commands.NodeCommands` (``node_commands.py``): the monitor's view of
  nodes, ``blockdev-add``/``blockdev-del``, ``query-named-block-nodes`` and
  the lookups (``Cannot find device='x' nor node-name='x'``);
* :class:`~.job_commands.JobCommands` (``job_commands.py``): backup, mirror, stream,
  commit, the job queries and verbs;
* :class:`~.create_commands.CreateCommands` (``create_commands.py``): ``blockdev-create``;
* :class:`~.graph_commands.GraphCommands` (``graph_commands.py``): snapshots, resize,
  write thresholds, ``query-block``, ``x-debug-query-block-graph``;
* :class:`~.reopen_commands.ReopenCommands` (``reopen_commands.py``): ``blockdev-reopen``,
  ``blockdev-snapshot-sync``;
* :class:`~.drive_commands.DriveCommands` (``drive_commands.py``): ``drive-backup``,
  ``drive-mirror``;
* :class:`~.blkdebug_commands.BlkdebugCommands`: blkdebug break points;
* :class:`~.introspect.IntrospectCommands`: version and schema queries;
* :class:`~.bitmap_commands.BitmapCommands`: ``block-dirty-bitmap-*``;
* :class:`~.export_commands.ExportCommands`: NBD server and exports;

and, here, the session (``quit``), error classes (an exception's
``qmp_class``), ``x-blkjobs-write`` and ``transaction`` with bitmap actions rolled back exactly,
``blockdev-snapshot``/``blockdev-snapshot-sync`` unlinked on rollback and
``blockdev-backup`` jobs started only at commit.

Handlers run one at a time (the server serializes them), like QMP commands
under QEMU's big lock. They may block briefly on the Engine's locks.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import BlkjobsError
from ..graph import Node
from ..jobmodel import CompletionMode, JobTxn
from .bitmap_commands import BitmapCommands
from .blkdebug_commands import BlkdebugCommands
from .create_commands import CreateCommands
from .drive_commands import DriveCommands
from .export_commands import ExportCommands
from .graph_commands import GraphCommands
from .reopen_commands import ReopenCommands
from .introspect import QEMU_VERSION, IntrospectCommands, version  # noqa: F401
from .job_commands import JobCommands
from .node_commands import MonitorNode, NodeCommands
from .protocol import QMPError

#: Largest ``x-blkjobs-write`` request: its buffer is allocated at once.
X_WRITE_MAX = 64 << 20


def _qmp_error(e: BaseException) -> QMPError:
    if isinstance(e, QMPError):
        return e
    if isinstance(e, OSError):
        where = f"'{e.filename}': " if e.filename else ""
        return QMPError(f"Could not open {where}{e.strerror or e}")
    return QMPError(str(e), getattr(e, "qmp_class", "GenericError"))


class Commands(NodeCommands, JobCommands, CreateCommands, GraphCommands, ReopenCommands,
               DriveCommands, BitmapCommands, BlkdebugCommands, IntrospectCommands,
               ExportCommands):
    """Every command of ``schema.COMMANDS``. :meth:`run` dispatches one
    (arguments already checked) and returns its result; errors are raised
    as :class:`QMPError`. ``quit_cb`` is called by ``quit``."""

    def __init__(self, engine, quit_cb: Callable[[], None] | None = None):
        self.eng = engine
        self.quit_cb = quit_cb
        self.nodes: dict[str, MonitorNode] = {}
        #: Auto-named file nodes of images the monitor did not define (the
        #: backing files a qcow2 node opened by itself), by graph node.
        #: (Weakly keyed: a freed node's id may be reused by a new one.)
        self._implicit_files: weakref.WeakKeyDictionary[Node, MonitorNode] = \
            weakref.WeakKeyDictionary()

    def run(self, name: str, args: dict[str, Any]) -> Any:
        fn = getattr(self, "cmd_" + name.replace("-", "_"))
        self._prune()
        with self.eng.io:
            self._prune_drive_targets()
        try:
            return fn(args) if name == "blockdev-add" else fn(**args)
        except (BlkjobsError, OSError, QMPError) as e:
            raise _qmp_error(e) from None

    # ------------------------------------------------------------------
    # Session

    def cmd_quit(self) -> dict[str, Any]:
        if self.quit_cb is not None:
            self.quit_cb()
        return {}

    def cmd_x_blkjobs_write(self, node: str, offset: int, length: int,
                            pattern: int = 0, flush: bool = True) -> dict[str, Any]:
        """Unstable, blkjobs only: write ``length`` bytes of ``pattern`` at
        ``offset`` as a guest would (through the jobs' write filters, marking
        dirty bitmaps). A daemon without exports has no other guest write
        path; tests use it for copy-before-write and incremental backups.
        ``flush`` (default true): flush after it, as a guest would (which
        stores persistent bitmaps); false leaves them in use."""
        if not 0 <= pattern <= 255:
            raise QMPError("Parameter 'pattern' expects a byte value (0..255)")
        # QEMU's request checks (block/io.c), before any buffer is allocated
        if offset < 0:
            raise QMPError(f"offset is negative: {offset}")
        if length < 0:
            raise QMPError(f"length is negative: {length}")
        if length > X_WRITE_MAX:
            raise QMPError(f"length({length}) exceeds maximum({X_WRITE_MAX})")
        g = self._lookup(node)
        if offset > g.size - length:
            raise QMPError(f"offset({offset}) + length({length}) exceeds the size of "
                           f"node '{node}' ({g.size})")
        # as the guest device of ``node`` would: through the filter nodes
        # jobs put above it since
        fe = self.eng.attach(self.eng.io.above_filters(g))
        try:
            fe.write(offset, bytes([pattern]) * length)
            if flush:
                fe.flush()
        finally:
            fe.close()
        return {}

    # ------------------------------------------------------------------
    # transaction (docs/qmp.md §7, docs/job-model.md §8)

    def cmd_transaction(self, actions: list[dict[str, Any]],
                        properties: dict[str, Any] | None = None) -> dict[str, Any]:
        mode = CompletionMode((properties or {}).get("completion-mode", "individual"))
        txn = JobTxn(mode)
        undo: list[Callable[[], None]] = []
        commit: list[Callable[[], None]] = []
        try:
            for action in actions:
                kind, data = action["type"], action["data"]
                if kind == "abort":
                    raise QMPError("Transaction aborted using Abort action")
                if mode is CompletionMode.GROUPED and kind not in ("blockdev-backup",
                                                                  "drive-backup"):
                    raise QMPError(f"Action '{kind}' does not support Transaction property "
                                   "completion-mode = grouped")
                if kind == "blockdev-backup":
                    self._start_backup(data, txn=txn)
                elif kind == "drive-backup":
                    self._start_drive_backup(data, txn=txn)
                elif kind.startswith("block-dirty-bitmap-"):
                    undo.append(self._bitmap_action(kind, data))
                elif kind == "blockdev-snapshot":
                    with self.eng.io:
                        old, new = self._snapshot_link(**data)
                    undo.append(functools.partial(new.attach_backing, None))
                    commit.append(functools.partial(self._reopen_ro, old))
                elif kind == "blockdev-snapshot-sync":
                    with self.eng.io:
                        old, new = self._snapshot_sync_prepare(data)
                    # the overlay has no user but the transaction: it goes
                    # at the end either way (qemu-storage-daemon without exports)
                    undo.append(functools.partial(self._snapshot_sync_end, new, None))
                    commit.append(functools.partial(self._snapshot_sync_end, new, old))
                else:
                    raise QMPError(f"Action '{kind}' is not supported by blkjobs")
        except BaseException:
            self.eng.jobs.rollback_txn(txn)
            with self.eng.io:
                for fn in reversed(undo):
                    fn()
            raise
        with self.eng.io:
            for fn in commit:
                fn()
        self.eng.jobs.start_txn(txn)
        return {}
