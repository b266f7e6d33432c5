"""Block nodes over QMP: ``blockdev-add``, ``blockdev-del``,
``query-named-block-nodes`` and the lookups every other command uses.

The **monitor's view of nodes**. The Engine's graph has one node per
*image* (format driver over its file); QEMU has a format node over a
protocol (``file``) node. :class:`MonitorNode` records the protocol nodes
(named, or auto-named ``#blockN`` when defined inline) and which nodes the
monitor owns (``blockdev-add``) so that ``blockdev-del`` and
``query-named-block-nodes`` answer like QEMU. A ``file`` node can be a
format node's ``file`` child; used alone as a job's device or target it is
refused (blkjobs opens images, not bare protocol nodes).

Mixed into :class:`~.commands.Commands`, which sets ``eng``, ``nodes`` and
``_implicit_files``.
"""
from __future__ import annotations

import logging
import os
import re
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import BlkjobsError
from ..formats import open_image
from ..formats import cache
from ..formats.base import FormatOpenError, open_cached
from ..graph import ALL, Node, Perm, open_chain, resolve_backing
from ..units import sector_size
from . import blkdebug_commands, nbd_client
from .protocol import QMPError

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*", re.ASCII)
_DRIVERS = ("file", "raw", "qcow2", "blkdebug", "nbd")
#: owner of the hold the monitor keeps on each node it added (blockdev-add)
MONITOR = "monitor"


def _check_qcow2_magic(path: str) -> None:
    """QEMU's qcow2_do_open text for a file that is not qcow2 (a short file
    reads as zeros there, so it fails the same way)."""
    with open(path, "rb") as f:
        if f.read(4) != b"QFI\xfb":
            raise QMPError("Image is not in qcow2 format")


class MonitorNode:
    """A node as the monitor sees it (see the module docstring).

    ``gnode`` is the Engine's graph node for format nodes (None for ``file``
    nodes); ``owned``: added by ``blockdev-add`` at the top level;
    ``children``: monitor nodes created inline for it (dropped with it).
    """

    def __init__(self, name: str, drv: str, filename: str, read_only: bool, owned: bool,
                 gnode: Node | None = None):
        self.name = name
        self.drv = drv
        self.filename = filename
        self.read_only = read_only
        self.owned = owned
        self.gnode = gnode
        self.file: MonitorNode | None = None      # format node -> its file node
        self.parent: MonitorNode | None = None    # file node -> its format node
        self.children: list[MonitorNode] = []
        self.qrules: Any = None                   # a blkdebug node's rules
        #: a protocol node's write threshold (block-set-write-threshold);
        #: under a format node its graph node watches it (file_threshold)
        self.write_threshold = 0
        #: the options it was last opened or reopened with (blockdev-add,
        #: blockdev-reopen); its cache mode (inherited by the file node made
        #: inline for it) and detect-zeroes, as query-named-block-nodes shows
        self.opts: dict[str, Any] = {}
        self.cache = {"direct": False, "no-flush": False}
        self.detect_zeroes = "off"
        self.unmap = False                        # discard=unmap

    def set_options(self, opts: dict[str, Any], inherited: dict[str, bool] | None) -> None:
        """Record ``opts`` (``inherited``: the parent's cache mode, for a
        node that inherits from it)."""
        self.opts = dict(opts)
        self.cache = {"direct": False, "no-flush": False, **(inherited or {}),
                      **opts.get("cache", {})}
        self.detect_zeroes = opts.get("detect-zeroes", "off")
        if "discard" in opts:           # left out of a reopen: kept, as in QEMU
            self.unmap = opts["discard"] == "unmap"
        if self.gnode is not None:      # what a front end's requests do there
            self.gnode.unmap, self.gnode.detect_zeroes = self.unmap, self.detect_zeroes
            if self.gnode.format == "qcow2":
                self.gnode.driver.qemu_discard = True    # a request's, as QEMU's



def _direct(opts: dict[str, Any], fnode: MonitorNode) -> bool:
    """The ``cache.direct`` of the file a format node is added over: an
    inline file's own, else the format node's (inherited, as in QEMU); a
    file node added before by name keeps its own."""
    fref = opts["file"]
    if isinstance(fref, dict):
        return bool({**opts.get("cache", {}), **fref.get("cache", {})}.get("direct", False))
    return bool(fnode.cache.get("direct", False))


class NodeCommands:
    """The node commands and lookups (mixed into Commands)."""

    eng: Any
    nodes: dict[str, MonitorNode]
    _implicit_files: weakref.WeakKeyDictionary[Node, MonitorNode]
    # from the bitmap commands
    _bitmaps_of: Callable[[Node], dict]
    _bitmap_info: Callable[[Any], dict[str, Any]]
    _dirty_bitmaps_info: Callable[[Node], list[dict[str, Any]]]
    # from the export commands (export_commands.py)
    _check_export_users: Callable[[Node], None]
    # from the graph commands (graph_commands.py)
    _arm_file_threshold: Callable[[MonitorNode], None]

    # ------------------------------------------------------------------
    # Node lookups

    def _lookup(self, name: str) -> Node:
        """A graph node for a job (QEMU's bdrv_lookup_bs message)."""
        node = self.eng.graph.nodes.get(name)
        if node is None:
            mn = self.nodes.get(name)
            if mn is not None and mn.gnode is None:
                raise QMPError(f"Node '{name}' is a protocol node: blkjobs runs jobs on "
                               "format nodes (add a 'raw' node on top of it)")
            raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def _check_new_name(self, name: str) -> None:
        if not _NAME_RE.fullmatch(name):
            raise QMPError(f"Invalid node-name: '{name}'")
        if name in self.nodes or name in self.eng.graph.nodes:
            raise QMPError(f"Duplicate nodes with node-name='{name}'")
        if len(name) >= 32:
            raise QMPError("Node name too long")

    def _auto_name(self) -> str:
        while True:
            name = self.eng.graph.auto_name()
            if name not in self.nodes:
                return name

    # ------------------------------------------------------------------
    # blockdev-add / blockdev-del

    def cmd_blockdev_add(self, opts: dict[str, Any]) -> dict[str, Any]:
        if opts.get("node-name") is None:
            raise QMPError("'node-name' must be specified for the root node")
        with self.eng.io:
            self._add(opts, owned=True)
        return {}

    def _add(self, opts: dict[str, Any], owned: bool) -> MonitorNode:
        drv = opts["driver"]
        if drv not in _DRIVERS:
            raise QMPError(f"Driver '{drv}' is not supported by blkjobs "
                           f"(supported: {', '.join(_DRIVERS)})")
        ro = bool(opts.get("read-only", False))
        if opts.get("force-share") and not ro:
            raise QMPError("force-share=on can only be used with read-only images")
        if drv == "file":
            return self._add_file(opts, owned, ro)
        if drv == "blkdebug":
            return blkdebug_commands.add(self, opts, owned)
        if drv == "nbd":        # a protocol node: no file node below it
            g = nbd_client.open_node(self, opts, ro)
            if owned:
                g.take(MONITOR, Perm(0), ALL)
            mn = self.nodes[g.name] = MonitorNode(g.name, "nbd", g.filename, ro, owned, g)
            return mn
        for key in ("offset", "size", "encrypt") + (("data-file",) if drv != "qcow2" else ()):
            if key in opts:
                raise QMPError(f"blkjobs does not support '{key}' for driver '{drv}'")
        created: list[MonitorNode] = []
        try:
            fref = opts["file"]
            if isinstance(fref, str):
                fnode = self._file_node(fref, drv)
            else:       # an inline nbd file opens as its qcow2 node (QEMU's inheritance)
                fnode = self._add({"read-only": ro, **fref} if fref.get("driver") == "nbd"
                                  else fref, owned=False)
                created.append(fnode)
            name = opts.get("node-name")      # None: the graph picks "#blockN"
            if name is not None:
                self._check_new_name(name)
            backing = opts.get("backing", ...) if drv == "qcow2" else None
            bnode: Node | None = None
            if isinstance(backing, str):
                bnode = self._lookup(backing)
            elif isinstance(backing, dict):
                bmn = self._add({"read-only": True, **backing}, owned=False)  # QEMU's default
                created.append(bmn)
                bnode = bmn.gnode
            if drv == "qcow2" and fnode.drv != "nbd":
                _check_qcow2_magic(fnode.filename)
            dfile = self._data_file(opts.get("data-file"))
            try:
                if fnode.drv == "nbd":
                    gnode = nbd_client.qcow2_node(self, fnode.gnode, opts, name, ro)
                else:
                    gnode = self._open_over(opts, fnode, name, dfile, backing is ...)
            except FormatOpenError as e:        # QEMU's text names no file
                raise QMPError(e.reason) from None
            if backing is not ...:
                gnode.hold_open(bnode)
        except BaseException:
            for mn in reversed(created):
                self._drop(mn)
            raise
        if fnode.drv == "blkdebug":
            blkdebug_commands.install(self.eng, gnode, fnode.qrules)
        if owned:
            # The monitor's reference (QEMU's monitor-owned node): a job that
            # drops the node out of a chain leaves it open and listed,
            # parentless, until blockdev-del; implicit nodes go with their
            # last user (Engine.drop_unused).
            gnode.take(MONITOR, Perm(0), ALL)
        return self._add_format(gnode, opts, fnode, created, owned)

    def _open_over(self, opts: dict[str, Any], fnode: MonitorNode, name: str | None,
                   dfile: str | None, chain: bool) -> Node:
        """Open the image of format node ``opts`` over ``fnode``: with the
        backing chain its header names (``chain``) or alone. The file
        node's cache.direct: its fd (and the backing files the image opens
        itself, which inherit it) get O_DIRECT."""
        drv, ro = opts["driver"], bool(opts.get("read-only", False))
        with cache.opening(cache.O_DIRECT if _direct(opts, fnode) else 0):
            if chain:
                return open_chain(fnode.filename, drv, read_only=ro, graph=self.eng.graph,
                                  name=name, data_file=dfile)
            return self.eng.graph.add(open_image(fnode.filename, drv, read_only=ro,
                                                 data_file=dfile), name, drv)

    def _file_node(self, ref: str, drv: str) -> MonitorNode:
        """The existing node ``ref`` as the file of a new ``drv`` node."""
        fnode = self.nodes.get(ref)
        if fnode is None:
            raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        if fnode.drv not in ("file", "blkdebug") and (drv, fnode.drv) != ("qcow2", "nbd"):
            raise QMPError(f"blkjobs stacks '{drv}' only on a 'file' node, "
                           f"not on '{ref}' ({fnode.drv})")
        if fnode.parent is not None:
            raise QMPError(f"Node '{ref}' already has a parent")
        return fnode

    def _data_file(self, ref: Any) -> str | None:
        """The file a qcow2 node's ``data-file`` names: an existing ``file``
        node or one defined inline (blkjobs takes no other data file)."""
        if ref is None:
            return None
        if isinstance(ref, str):
            n = self.nodes.get(ref)
            if n is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            if n.drv == "file":
                return n.filename
        elif ref.get("driver") == "file" and isinstance(ref.get("filename"), str):
            return ref["filename"]
        raise QMPError("blkjobs takes a qcow2 data-file only as a 'file' node")

    def _add_format(self, gnode: Node, opts: dict[str, Any], fnode: MonitorNode,
                    created: list[MonitorNode], owned: bool) -> MonitorNode:
        """The monitor's view of a format node just opened over ``fnode``."""
        mn = MonitorNode(gnode.name, opts["driver"], fnode.filename,
                         bool(opts.get("read-only", False)), owned, gnode)
        mn.file, fnode.parent = fnode, mn
        mn.children = created
        mn.set_options(opts, None)
        if isinstance(opts["file"], dict):      # made inline: inherits the cache mode
            fnode.set_options(opts["file"], mn.cache)
        self.nodes[mn.name] = mn
        self._arm_file_threshold(fnode)      # its block-set-write-threshold, if any
        if not gnode.read_only:     # QEMU's open: the image's bitmaps in use on disk
            gnode.driver.activate_bitmaps()
        return mn

    def _add_file(self, opts: dict[str, Any], owned: bool, ro: bool) -> MonitorNode:
        path = opts["filename"]
        try:
            with cache.opening(cache.O_DIRECT if opts.get("cache", {}).get("direct") else 0):
                fd = open_cached(path, os.O_RDONLY if ro else os.O_RDWR)
        except OSError as e:
            raise QMPError(f"Could not open '{path}': {e.strerror}") from None
        except BlkjobsError as e:       # a file system that refuses O_DIRECT
            raise QMPError(str(e)) from None
        os.close(fd)
        name = opts.get("node-name")
        if name is not None:
            self._check_new_name(name)
        else:
            name = self._auto_name()
        mn = MonitorNode(name, "file", path, ro, owned)
        mn.set_options(opts, None)
        self.nodes[name] = mn
        return mn

    def _prune(self) -> None:
        """Forget format nodes the Engine closed: images defined inline that
        left the chain (a stream's or commit's intermediates); their file
        nodes go with them. Monitor-owned nodes stay open (MONITOR hold)."""
        with self.eng.io:
            for mn in list(self.nodes.values()):
                g = mn.gnode
                if g is not None and self.eng.graph.nodes.get(g.name) is not g:
                    self._drop(mn)

    def _drop(self, mn: MonitorNode) -> None:
        """Forget ``mn`` and close its image (and what was defined inline for it)."""
        self.nodes.pop(mn.name, None)
        if mn.gnode is not None:
            below = mn.gnode.chain()[1:]
            self._bitmaps_of(mn.gnode).clear()
            try:
                mn.gnode.close()
            except (OSError, BlkjobsError) as e:
                # As QEMU's bdrv_close: the node goes all the same (its file
                # is closed); the failed flush is only reported.
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                logging.getLogger(__name__).warning(
                    "node '%s' ('%s'): flush on close failed: %s; the node was closed",
                    mn.name, mn.filename, why)
            # backing files the image opened by itself leave with it
            self.eng.io.drop_unused([n for n in below if n.name not in self.nodes])
        if mn.file is not None:
            if mn.file.owned:
                mn.file.parent = None   # keeps its threshold (write_threshold)
            else:
                self._drop(mn.file)
        for child in mn.children:
            if child is not mn.file:
                self._drop(child)

    def _in_use(self, mn: MonitorNode) -> bool:
        if mn.gnode is None or mn.parent is not None:      # a file (or nbd) node below a format
            return mn.parent is not None
        g, eng = mn.gnode, self.eng
        # Read from the engine and the node (never changed): filters on the node
        # (a backup's copy-before-write) and the job claiming it.
        return (any(p.owner not in ("open", MONITOR) for p in g.users())
                or bool(eng.graph.parents(g))
                or eng.io.filter_of(g) is not None or g.claimed_by is not None
                or bool(eng.io.frontends(g)))

    def _check_job_blockers(self, *nodes: Node) -> None:
        """The op blockers jobs put on nodes (QEMU's block_job_add_bdrv):
        what a stream or commit claimed, a backup's target, a mirror's
        source. Checked by blockdev-del and before a new backup or mirror."""
        for g in nodes:
            self.eng.io.check_busy(g)
            for job in reversed(self.eng.jobs.jobs()):
                d = job.driver
                if job.is_completed:
                    continue
                if (job.type == "backup" and d.dst is g) or \
                        (job.type == "mirror" and d.src is g):
                    raise QMPError(f"Node '{g.name}' is busy: block device is in use by "
                                   f"block job: {job.type}")

    def _check_blockers(self, g: Node) -> None:
        """QEMU's op blockers on ``blockdev-del`` (``Node 'x' is busy: ...``),
        checked before ownership and the reference count as QEMU does: a
        mirror's target has the job's BlockBackend (``Node x is in use``);
        then the jobs' blockers (the newest first): a backup's target, a
        mirror's source, what a stream or commit claimed; then being an
        overlay's backing."""
        self._check_export_users(g)
        for job in self.eng.jobs.jobs():
            d = job.driver
            if job.is_completed or job.type not in ("backup", "mirror"):
                continue
            if job.type == "mirror" and d.dst is g:
                raise QMPError(f"Node {g.name} is in use")
        self._check_job_blockers(g)
        for p in self.eng.graph.parents(g):
            if not p.is_filter and p.backing is g:
                raise QMPError(f"Node '{g.name}' is busy: node is used as backing hd of "
                               f"'{p.name}'")

    def cmd_blockdev_del(self, **args: Any) -> dict[str, Any]:
        node_name = args["node-name"]
        with self.eng.io:
            mn = self.nodes.get(node_name)
            g = mn.gnode if mn is not None else self.eng.graph.nodes.get(node_name)
            if mn is None and g is None:
                raise QMPError(f"Failed to find node with node-name='{node_name}'")
            if g is not None:
                self._check_blockers(g)
            if mn is None or not mn.owned:
                raise QMPError(f"Node {node_name} is not owned by the monitor")
            if self._in_use(mn):
                raise QMPError(f"Block device {node_name} is in use")
            self._drop(mn)
        return {}

    # ------------------------------------------------------------------
    # query-named-block-nodes

    def cmd_query_named_block_nodes(self, flat: bool = False) -> list[dict[str, Any]]:
        out = []
        with self.eng.io:
            files = {id(mn.gnode): mn.file for mn in self.nodes.values()
                     if mn.gnode is not None and mn.file is not None}
            # newest first, like QEMU's list of named nodes
            for g in reversed(list(self.eng.graph.nodes.values())):
                out.append(self._node_info(g, flat))
                if g.is_filter or g.format == "nbd":   # a job's filter, or a protocol node
                    continue
                fmn = files.get(id(g))
                if fmn is None:
                    fmn = self._implicit_files.get(g)
                    if fmn is None or fmn.gnode is not None:
                        fmn = MonitorNode(self._auto_name(), "file", g.filename, g.read_only,
                                          False)
                        self._implicit_files[g] = fmn
                out.append(self._file_info(fmn))
            for mn in self.nodes.values():
                if mn.drv == "file" and mn.parent is None:
                    out.append(self._file_info(mn))
        return out

    @staticmethod
    def _common(name: str, drv: str, filename: str, ro: bool, image: dict) -> dict[str, Any]:
        return {"file": filename, "node-name": name, "ro": ro, "drv": drv,
                "encrypted": False, "detect_zeroes": "off", "bps": 0, "bps_rd": 0,
                "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0, "image": image,
                "cache": {"writeback": True, "direct": False, "no-flush": False},
                "write_threshold": 0, "backing_file_depth": 0, "active": True}

    def _image_info(self, g: Node, flat: bool) -> dict[str, Any]:
        img: dict[str, Any] = {"filename": g.filename, "format": g.format,
                               "virtual-size": g.size, "dirty-flag": False}
        if g.is_filter:     # as QEMU shows a filter: its child's image below it
            try:
                img["actual-size"] = os.stat(g.filename).st_blocks * 512
            except OSError:
                pass
            below = g.below_filters()
            if below.driver.cluster_size:
                img["cluster-size"] = below.driver.cluster_size
            if not flat and g.file is not None:
                img["backing-image"] = self._image_info(g.file, flat)
            return img
        if g.format == "nbd":       # as QEMU shows a protocol node without a file
            return {"virtual-size": g.size, "filename": g.filename, "format": "nbd"}
        try:
            img["actual-size"] = os.stat(g.filename).st_blocks * 512
        except OSError:
            pass
        if g.driver.cluster_size:
            img["cluster-size"] = g.driver.cluster_size
        fs = g.driver.info()      # qcow2: compat, refcount-bits... as QEMU's ImageInfo
        if fs:
            img["format-specific"] = fs
        bf = g.driver.backing_filename
        if bf:
            img["backing-filename"] = bf
            if g.backing is not None:
                img["full-backing-filename"] = g.backing.filename
            if g.driver.backing_format:
                img["backing-filename-format"] = g.driver.backing_format
        if g.backing is not None and not flat:
            img["backing-image"] = self._image_info(g.backing, flat)
        return img

    def _node_info(self, g: Node, flat: bool) -> dict[str, Any]:
        info = self._common(g.name, g.format, g.filename, g.read_only,
                            self._image_info(g, flat))
        mn = self.nodes.get(g.name)
        if mn is not None and mn.gnode is g:
            self._show_options(info, mn)
        # QEMU counts the depth while nesting backing-image: 0 when flat
        info["backing_file_depth"] = 0 if flat else len(g.chain()) - 1
        thr = g.write_threshold          # an int64 in QEMU's BlockDeviceInfo
        info["write_threshold"] = thr - (1 << 64) if thr >= 1 << 63 else thr
        if g.backing is not None:
            bf = g.driver.backing_filename
            # QEMU names the backing node's file once the link was changed
            # (blockdev-reopen, blockdev-snapshot onto another image)
            if not bf or os.path.realpath(resolve_backing(g.filename, bf)) != \
                    os.path.realpath(g.backing.filename):
                bf = g.backing.filename
            info["backing_file"] = bf
        bms = self._dirty_bitmaps_info(g)
        if bms:
            info["dirty-bitmaps"] = bms
        return info

    def _file_info(self, mn: MonitorNode) -> dict[str, Any]:
        try:
            st = os.stat(mn.filename)
            # QEMU counts a protocol node's length in 512-byte sectors
            size, actual = sector_size(st.st_size), st.st_blocks * 512
        except OSError:
            size, actual = 0, 0
        info = self._common(mn.name, mn.drv, mn.filename, mn.read_only,
                            {"filename": mn.filename, "format": mn.drv, "virtual-size": size,
                             "actual-size": actual, "dirty-flag": False})
        thr = mn.write_threshold
        info["write_threshold"] = thr - (1 << 64) if thr >= 1 << 63 else thr
        self._show_options(info, mn)
        return info

    @staticmethod
    def _show_options(info: dict[str, Any], mn: MonitorNode) -> None:
        info["detect_zeroes"] = mn.detect_zeroes
        info["cache"] = {"writeback": True, **mn.cache}
