"""Command handlers: QMP commands mapped onto the :class:`~blkjobs.engine.Engine`.

:class:`Commands` is the composition of one mixin per concept:

* :class:`~.nodes.NodeCommands` (``nodes.py``): the monitor's view of
  nodes, ``blockdev-add``/``blockdev-del``, ``query-named-block-nodes`` and
  the lookups (``Cannot find device='x' nor node-name='x'``);
* :class:`~.jobcmds.JobCommands` (``jobcmds.py``): backup, mirror, stream,
  commit, the job queries and verbs;
* :class:`~.create.CreateCommands` (``create.py``): ``blockdev-create``;
* :class:`~.graphcmds.GraphCommands` (``graphcmds.py``): snapshots, resize,
  write thresholds, ``query-block``, ``x-debug-query-block-graph``;
* :class:`~.reopen.ReopenCommands` (``reopen.py``): ``blockdev-reopen``,
  ``blockdev-snapshot-sync``;
* :class:`~.drive.DriveCommands` (``drive.py``): ``drive-backup``,
  ``drive-mirror``;
* :class:`~.blkdebug_qmp.BlkdebugCommands`: blkdebug break points;
* :class:`~.introspect.IntrospectCommands`: version and schema queries;

and, here, the session (``quit``), error classes (an exception's
``qmp_class``), dirty-bitmap commands beyond add/remove, ``x-blkjobs-write``
and ``transaction`` with bitmap actions rolled back exactly and
``blockdev-backup`` jobs started only at commit.

Handlers run one at a time (the server serializes them), like QMP commands
under QEMU's big lock. They may block briefly on the Engine's locks.
"""
from __future__ import annotations

import functools
import hashlib
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import BlkjobsError
from ..graph import Node
from ..job import CompletionMode, JobTxn
from .blkdebug_qmp import BlkdebugCommands
from .create import CreateCommands
from .drive import DriveCommands
from .graphcmds import GraphCommands
from .reopen import ReopenCommands
from .introspect import QEMU_VERSION, IntrospectCommands, version  # noqa: F401
from .jobcmds import JobCommands
from .nodes import MonitorNode, NodeCommands
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
               DriveCommands, BlkdebugCommands, IntrospectCommands):
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

    # ------------------------------------------------------------------
    # Dirty bitmaps

    def _bitmaps_of(self, g: Node) -> dict:
        # The Engine keeps a node's bitmaps on the node (read-only here,
        # except when the node itself goes away).
        return self.eng.io.bitmaps_of(g)

    def _bitmap(self, node: str, name: str):
        g = self._lookup(node)
        bm = self._bitmaps_of(g).get(name)
        if bm is None:
            raise QMPError(f"Dirty bitmap '{name}' not found")
        return bm

    @staticmethod
    def _check_usable(bm) -> None:
        if bm.busy:
            raise QMPError(f"Bitmap '{bm.name}' is currently in use by another operation "
                           "and cannot be used")

    @staticmethod
    def _bitmap_info(bm) -> dict[str, Any]:
        return {"name": bm.name, "count": bm.count(), "granularity": bm.granularity,
                "recording": bool(bm.enabled and not bm.busy or bm.successor is not None),
                "busy": bm.busy, "persistent": False}

    def _bitmap_add(self, node: str, name: str, granularity: int | None = None,
                    persistent: bool = False, disabled: bool = False) -> Callable[[], None]:
        g = self._lookup(node)
        if not name:
            raise QMPError("Bitmap name cannot be empty")
        if len(name) > 1023:
            raise QMPError("Bitmap name too long")
        if granularity is None:
            cs = g.driver.cluster_size
            # QEMU: the cluster size clamped to [4 KiB, 64 KiB]; 64 KiB when the
            # driver has none (raw over file, checked against qemu-storage-daemon)
            granularity = min(max(cs, 4096), 65536) if cs else 65536
        elif granularity < 512 or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
        if persistent:
            raise QMPError(f"Cannot store dirty bitmaps in {g.format} format "
                           "(blkjobs keeps bitmaps in memory only)")
        bm = self.eng.block_dirty_bitmap_add(g, name, granularity)
        bm.enabled = not disabled
        return lambda: self._bitmaps_of(g).pop(name, None)

    def _bitmap_remove(self, node: str, name: str) -> Callable[[], None]:
        bm = self._bitmap(node, name)
        self._check_usable(bm)
        bms = self._bitmaps_of(bm.node)
        del bms[name]
        return lambda: bms.setdefault(name, bm)

    def _bitmap_clear(self, node: str, name: str) -> Callable[[], None]:
        bm = self._bitmap(node, name)
        self._check_usable(bm)
        if bm.node.read_only:
            raise QMPError(f"Bitmap '{name}' is readonly and cannot be modified")
        old, bm.bitmap = bm.bitmap, bm.bitmap.copy()
        bm.bitmap.clear()

        def undo() -> None:
            bm.bitmap = old
        return undo

    def _bitmap_enable(self, node: str, name: str, enable: bool = True) -> Callable[[], None]:
        bm = self._bitmap(node, name)
        self._check_usable(bm)
        old, bm.enabled = bm.enabled, enable

        def undo() -> None:
            bm.enabled = old
        return undo

    def _bitmap_merge(self, node: str, target: str, bitmaps: list) -> Callable[[], None]:
        dst = self._bitmap(node, target)
        self._check_usable(dst)
        srcs = []
        for ref in bitmaps:
            src = self._bitmap(node, ref) if isinstance(ref, str) else \
                self._bitmap(ref["node"], ref["name"])
            if src.node.size != dst.node.size:
                raise QMPError("Bitmaps are incompatible and can't be merged")
            srcs.append(src)
        old = dst.bitmap
        new = old.copy()
        for src in srcs:
            for off, n in src.bitmap.areas():
                new.set(off, n)
        dst.bitmap = new

        def undo() -> None:
            dst.bitmap = old
        return undo

    def _bitmap_action(self, kind: str, data: dict[str, Any]) -> Callable[[], None]:
        with self.eng.io:
            if kind == "block-dirty-bitmap-add":
                return self._bitmap_add(**data)
            if kind == "block-dirty-bitmap-remove":
                return self._bitmap_remove(**data)
            if kind == "block-dirty-bitmap-clear":
                return self._bitmap_clear(**data)
            if kind == "block-dirty-bitmap-enable":
                return self._bitmap_enable(**data)
            if kind == "block-dirty-bitmap-disable":
                return self._bitmap_enable(**data, enable=False)
            if kind == "block-dirty-bitmap-merge":
                return self._bitmap_merge(**data)
        raise AssertionError(kind)

    def cmd_block_dirty_bitmap_add(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-add", a)
        return {}

    def cmd_block_dirty_bitmap_remove(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-remove", a)
        return {}

    def cmd_block_dirty_bitmap_clear(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-clear", a)
        return {}

    def cmd_block_dirty_bitmap_enable(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-enable", a)
        return {}

    def cmd_block_dirty_bitmap_disable(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-disable", a)
        return {}

    def cmd_block_dirty_bitmap_merge(self, **a: Any):
        self._bitmap_action("block-dirty-bitmap-merge", a)
        return {}

    def cmd_x_debug_block_dirty_bitmap_sha256(self, node: str, name: str):
        """Not QEMU's hash (that one hashes QEMU's in-memory HBitmap): the
        SHA-256 of our serialized bitmap. Equal bitmaps hash equal, which
        is what tests use it for."""
        with self.eng.io:
            bm = self._bitmap(node, name)
            return {"sha256": hashlib.sha256(bytes(bm.bitmap.to_bytes())).hexdigest()}

    def cmd_x_blkjobs_write(self, node: str, offset: int, length: int,
                            pattern: int = 0) -> dict[str, Any]:
        """Unstable, blkjobs only: write ``length`` bytes of ``pattern`` at
        ``offset`` as a guest would (through the jobs' write filters, marking
        dirty bitmaps). A daemon without exports has no other guest write
        path; tests use it for copy-before-write and incremental backups."""
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
