"""Reshaping and inspecting the graph over QMP: ``blockdev-snapshot``,
``block_resize``, ``block-set-write-threshold`` (with its
``BLOCK_WRITE_THRESHOLD`` event), ``query-block`` and
``x-debug-query-block-graph``, as qemu-storage-daemon 7.2 answers them
(blockdev.c, block/write-threshold.c, block.c's bdrv_get_xdbg_block_graph).

* ``blockdev-snapshot {node, overlay}``: ``overlay`` (a monitor node without
  a backing node) gets ``node`` as its backing node in memory, its header
  untouched (it names the backing file already); ``node`` is then reopened
  read-only, as QEMU's external_snapshot_commit does (a failure to do so is
  ignored, as there). The checks are QEMU's, in its order.
* ``block_resize``: format nodes through their driver; a ``file`` node under
  a qcow2 node is refused with QEMU's permission-conflict text, one alone is
  truncated. Nodes that are some node's backing carry QEMU's op blocker
  (``Device '<device>' is in use``, ``(null)`` when no ``device`` was given).
* write thresholds on format nodes are kept on the Engine's graph nodes and
  checked by every write, write-zeroes and discard that reaches the node: a
  front end's (an export's, ``x-blkjobs-write``) or a job's. On a protocol
  node (``file``, host offsets of the image file) the value is kept on the
  monitor node and, once a format node sits on it, armed on that graph
  node's ``set_file_threshold`` (raw: its requests; qcow2: the file growing
  by allocation); the event names the protocol node.
* ``query-block`` lists BlockBackends: qemu-storage-daemon has none unless
  exports exist, nor does blkjobs: ``[]``.
* ``x-debug-query-block-graph``: :mod:`.block_graph` (BlockBackends of
  exports and mirror targets, backup and mirror jobs, then the nodes in
  creation order: each ``file`` node before its format node, the backing
  files a qcow2 node opened by itself after it; QEMU's permissions). Here:
  the node order and the BlockBackends' order (:meth:`_note_backend`).
"""
from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from typing import Any

from ..formats.qcow2.resize import resize as qcow2_resize
from ..graph import Node
from .block_graph import BlockGraph
from .protocol import QMPError

BLOCK_WRITE_THRESHOLD = "BLOCK_WRITE_THRESHOLD"
#: the order BlockBackends were made in (exports, mirror targets)
_BACKENDS = itertools.count(1)


class GraphCommands:
    """The graph commands (mixed into Commands)."""

    eng: Any
    nodes: dict
    _implicit_files: Any
    # from NodeCommands
    _lookup: Callable[[str], Node]
    _auto_name: Callable[[], str]
    _check_job_blockers: Callable[..., None]

    # ------------------------------------------------------------------
    # blockdev-snapshot

    def cmd_blockdev_snapshot(self, node: str, overlay: str) -> dict[str, Any]:
        with self.eng.io:
            old, _ = self._snapshot_link(node, overlay)
            self._reopen_ro(old)
        return {}

    def _snapshot_link(self, node: str, overlay: str) -> tuple[Node, Node]:
        """blockdev-snapshot's checks and link (the prepare step of the
        transaction action; its commit is :meth:`_reopen_ro` of the old
        node, its abort unlinking the overlay)."""
        old = self._lookup(node)
        self._check_op_blockers(old)
        new = self._lookup(overlay)
        self._check_job_blockers(new)
        if new.backing is not None:
            raise QMPError("The overlay already has a backing image")
        if new.format != "qcow2":
            raise QMPError("The overlay does not support backing images")
        if new in old.chain():
            raise QMPError(f"Making '{old.name}' a backing child of '{new.name}' would "
                           "create a cycle")
        new.attach_backing(old)
        return old, new

    def _reopen_ro(self, g: Node) -> None:
        """The old active layer goes read-only, its file node with it; a
        failure is ignored, as QEMU's external_snapshot_commit does."""
        try:
            # its bitmaps stored first, as QEMU's qcow2_reopen_bitmaps_ro: the
            # node reopened read-only then lists them in format-specific
            g.driver.reopen_bitmaps_ro()
            g.reopen(read_only=True)
        except Exception:       # ignored, see the docstring
            return
        mn = self._monitor_view(g)
        if not isinstance(mn, Node):
            mn.read_only = True
            # the file node follows when it was made inline for the node (it
            # inherits its options); one added by name stays as it is, as
            # QEMU's reopen queue leaves a child that does not inherit
            if mn.file is not None and mn.file in mn.children:
                mn.file.read_only = True

    def _check_op_blockers(self, g: Node) -> None:
        """QEMU's op blockers of a node another node uses as its backing
        (bdrv_set_backing_hd) and of the nodes a job uses."""
        for p in self.eng.graph.parents(g):
            if not p.is_filter and p.backing is g:
                raise QMPError(f"Node '{g.name}' is busy: node is used as backing hd of "
                               f"'{p.name}'")
        self._check_job_blockers(g)

    # ------------------------------------------------------------------
    # block_resize

    def cmd_block_resize(self, size: int, device: str | None = None,
                         **args: Any) -> dict[str, Any]:
        name = args.get("node-name")
        with self.eng.io:
            g = self.eng.graph.nodes.get(name) if name else None
            mn = self.nodes.get(name) if name else None
            if g is None and (mn is None or mn.gnode is not None):
                raise QMPError(f"Cannot find device='{device or ''}' nor "
                               f"node-name='{name or ''}'")
            if size < 0:
                raise QMPError("Parameter 'size' expects a >0 size")
            if g is None:
                return self._resize_file(mn, size)
            try:
                self._check_op_blockers(g)
            except QMPError:
                raise QMPError(f"Device '{device if device is not None else '(null)'}' "
                               "is in use") from None
            if g.read_only:
                raise QMPError("Image is read-only")
            if g.format == "qcow2":
                # a longer backing node: the new area is zeroed (as QEMU)
                qcow2_resize(g.driver, size, g.backing.size if g.backing else None,
                             g._fill())
            else:
                os.ftruncate(g.driver.fd, size)
            g.driver.flush()
        return {}

    def _resize_file(self, mn: Any, size: int) -> dict[str, Any]:
        parent = mn.parent
        if parent is not None and parent.drv == "qcow2":
            raise QMPError(f"Permission conflict on node '{mn.name}': permissions 'resize' are "
                           "both required by an unnamed block device (uses node "
                           f"'{mn.name}' as 'root' child) and unshared by node "
                           f"'{parent.name}' (uses node '{mn.name}' as 'file' child).")
        if parent is not None:
            raise QMPError(f"blkjobs resizes the file of node '{parent.name}' through that "
                           "node: resize it instead")
        if mn.read_only:
            raise QMPError("Image is read-only")
        os.truncate(mn.filename, size)
        return {}

    # ------------------------------------------------------------------
    # block-set-write-threshold

    def cmd_block_set_write_threshold(self, **args: Any) -> dict[str, Any]:
        name, thr = args["node-name"], args["write-threshold"]
        with self.eng.io:
            g = self.eng.graph.nodes.get(name)
            if g is None:
                mn = self.nodes.get(name)
                if mn is None:
                    raise QMPError(f"Device '{name}' not found")
                # a protocol node (file, or blkdebug over one): kept on it
                # while it has no format node, else on the format node's file
                mn.write_threshold = thr
                if mn.parent is not None and mn.parent.gnode is not None:
                    self._arm_file_threshold(mn)
                return {}
            g.write_threshold = thr
            g.threshold_cb = self._threshold_exceeded
        return {}

    def _arm_file_threshold(self, fmn: Any) -> None:
        """Move the threshold of the protocol node ``fmn`` onto its format
        node's graph node (which watches its image file's host offsets)."""
        name = fmn.name

        def exceeded(g: Node, amount: int, thr: int) -> None:
            fmn.write_threshold = 0
            self.eng.jobs.events.emit(BLOCK_WRITE_THRESHOLD, {
                "node-name": name, "amount-exceeded": amount, "write-threshold": thr})
        fmn.parent.gnode.set_file_threshold(fmn.write_threshold, exceeded)

    def _threshold_exceeded(self, g: Node, amount: int, thr: int) -> None:
        self.eng.jobs.events.emit(BLOCK_WRITE_THRESHOLD, {
            "node-name": g.name, "amount-exceeded": amount, "write-threshold": thr})

    # ------------------------------------------------------------------
    # query-block, x-debug-query-block-graph

    def cmd_query_block(self) -> list[dict[str, Any]]:
        return []

    def cmd_x_debug_query_block_graph(self) -> dict[str, Any]:
        """QEMU's debug view of the graph with its users (block_graph.py)."""
        with self.eng.io:
            return BlockGraph(self).build()

    def _note_backend(self, owner: Any) -> None:
        """``owner`` (an export, a mirror job) made a BlockBackend now, or
        (a backup or mirror job) put its filter in: the graph lists the
        BlockBackends in that order, and an export made before a job's
        filter has its root moved onto it, as QEMU's bdrv_append does."""
        seq = self.__dict__.setdefault("_bb_seq", weakref.WeakKeyDictionary())
        seq[owner] = next(_BACKENDS)

    def _graph_order(self) -> list[Any]:
        """Monitor nodes (file nodes and format nodes) and the graph nodes
        the monitor did not define (implicit backing nodes, with an auto-
        named file node each; jobs' filters), in creation order."""
        order: list[Any] = []
        seen: set[int] = set()

        def add(x: Any) -> None:
            if id(x) not in seen:
                seen.add(id(x))
                order.append(x)

        monitor = {id(mn.gnode): mn for mn in self.nodes.values() if mn.gnode is not None}
        for mn in list(self.nodes.values()):
            add(mn)
            if mn.gnode is not None:
                # the backing files it opened by itself, down the chain
                for g in mn.gnode.chain()[1:]:
                    if id(g) not in monitor and not g.is_filter:
                        add(self._implicit_file(g))
                        add(g)
        for g in self.eng.graph.nodes.values():
            if id(g) not in monitor:
                if not g.is_filter:
                    add(self._implicit_file(g))
                add(g)
        return order

    def _implicit_file(self, g: Node) -> Any:
        fmn = self._implicit_files.get(g)
        if fmn is None or fmn.gnode is not None:
            cls = type(next(iter(self.nodes.values())))      # MonitorNode
            fmn = cls(self._auto_name(), "file", g.filename, g.read_only, False)
            self._implicit_files[g] = fmn
        return fmn

    def _monitor_view(self, g: Node) -> Any:
        for mn in self.nodes.values():
            if mn.gnode is g:
                return mn
        return g
