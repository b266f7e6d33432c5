"""Command handlers: QMP commands mapped onto the :class:`~blkjobs.engine.Engine`.

The jobs, verbs, queries and events are the Engine's; this module adds only
what QMP needs on top of it:

* the **monitor's view of nodes**. The Engine's graph has one node per
  *image* (format driver over its file); QEMU has a format node over a
  protocol (``file``) node. :class:`MonitorNode` records the protocol nodes
  (named, or auto-named ``#blockN`` when defined inline) and which nodes the
  monitor owns (``blockdev-add``) so that ``blockdev-del`` and
  ``query-named-block-nodes`` answer like QEMU. A ``file`` node can be a
  format node's ``file`` child; used alone as a job's device or target it is
  refused (blkjobs opens images, not bare protocol nodes);
* argument translation (QMP names -> the Engine's keyword names), QEMU's
  lookup errors (``Cannot find device='x' nor node-name='x'``) and error
  classes (an exception's ``qmp_class``);
* dirty-bitmap commands beyond add/remove, and ``transaction`` with bitmap
  actions rolled back exactly and ``blockdev-backup`` jobs started only at
  commit.

Handlers run one at a time (the server serializes them), like QMP commands
under QEMU's big lock. They may block briefly on the Engine's locks.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import BlkjobsError
from ..formats import open_image
from ..graph import ALL, Node, Perm
from ..job import CompletionMode, JobTxn
from . import blkdebug_qmp
from .blkdebug_qmp import BlkdebugCommands
from .introspect import QEMU_VERSION, IntrospectCommands, version  # noqa: F401
from .protocol import QMPError

#: Largest ``x-blkjobs-write`` request: its buffer is allocated at once.
X_WRITE_MAX = 64 << 20

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*", re.ASCII)
_DRIVERS = ("file", "raw", "qcow2", "blkdebug")
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


def _qmp_error(e: BaseException) -> QMPError:
    if isinstance(e, QMPError):
        return e
    if isinstance(e, OSError):
        where = f"'{e.filename}': " if e.filename else ""
        return QMPError(f"Could not open {where}{e.strerror or e}")
    return QMPError(str(e), getattr(e, "qmp_class", "GenericError"))


def _kw(args: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """QMP argument names -> the Engine's keyword names."""
    return {k.replace("-", "_"): v for k, v in args.items() if k not in drop}


class Commands(BlkdebugCommands, IntrospectCommands):
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
            return blkdebug_qmp.add(self, opts, owned)
        for key in ("offset", "size", "data-file", "encrypt"):
            if key in opts:
                raise QMPError(f"blkjobs does not support '{key}' for driver '{drv}'")
        created: list[MonitorNode] = []
        try:
            fref = opts["file"]
            if isinstance(fref, str):
                fnode = self.nodes.get(fref)
                if fnode is None:
                    raise QMPError(f"Cannot find device='{fref}' nor node-name='{fref}'")
                if fnode.drv not in ("file", "blkdebug"):
                    raise QMPError(f"blkjobs stacks '{drv}' only on a 'file' node, "
                                   f"not on '{fref}' ({fnode.drv})")
                if fnode.parent is not None:
                    raise QMPError(f"Node '{fref}' already has a parent")
            else:
                fnode = self._add(fref, owned=False)
                created.append(fnode)
            name = opts.get("node-name")      # None: the graph picks "#blockN"
            if name is not None:
                self._check_new_name(name)
            backing = opts.get("backing", ...) if drv == "qcow2" else None
            bnode: Node | None = None
            if isinstance(backing, str):
                bnode = self._lookup(backing)
            elif isinstance(backing, dict):
                bmn = self._add(backing, owned=False)
                created.append(bmn)
                bnode = bmn.gnode
            if drv == "qcow2":
                _check_qcow2_magic(fnode.filename)
            if backing is ...:
                gnode = self.eng.graph.open_chain(fnode.filename, drv, read_only=ro, name=name)
            else:
                gnode = self.eng.graph.add(open_image(fnode.filename, drv, read_only=ro),
                                           name, drv)
                try:
                    gnode.take("open", Perm.CONSISTENT_READ, ALL)
                    if bnode is not None:
                        gnode.attach_backing(bnode)
                except BaseException:
                    gnode.close()
                    raise
        except BaseException:
            for mn in reversed(created):
                self._drop(mn)
            raise
        if fnode.drv == "blkdebug":
            blkdebug_qmp.install(self.eng, gnode, fnode.qrules)
        if owned:
            # The monitor's reference (QEMU's monitor-owned node): a job that
            # drops the node out of a chain leaves it open and listed,
            # parentless, until blockdev-del; implicit nodes go with their
            # last user (Engine.drop_unused).
            gnode.take(MONITOR, Perm(0), ALL)
        mn = MonitorNode(gnode.name, drv, fnode.filename, ro, owned, gnode)
        mn.file, fnode.parent = fnode, mn
        mn.children = created
        self.nodes[mn.name] = mn
        return mn

    def _add_file(self, opts: dict[str, Any], owned: bool, ro: bool) -> MonitorNode:
        path = opts["filename"]
        try:
            fd = os.open(path, os.O_RDONLY if ro else os.O_RDWR)
        except OSError as e:
            raise QMPError(f"Could not open '{path}': {e.strerror}") from None
        os.close(fd)
        name = opts.get("node-name")
        if name is not None:
            self._check_new_name(name)
        else:
            name = self._auto_name()
        mn = MonitorNode(name, "file", path, ro, owned)
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
                print(f"blkjobs serve: warning: node '{mn.name}' ('{mn.filename}'): flush on "
                      f"close failed: {why}; the node was closed", file=sys.stderr, flush=True)
            # backing files the image opened by itself leave with it
            self.eng.io.drop_unused([n for n in below if n.name not in self.nodes])
        if mn.file is not None:
            if mn.file.owned:
                mn.file.parent = None
            else:
                self._drop(mn.file)
        for child in mn.children:
            if child is not mn.file:
                self._drop(child)

    def _in_use(self, mn: MonitorNode) -> bool:
        if mn.gnode is None:
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
                if (job.type == "backup" and getattr(d, "dst", None) is g) or \
                        (job.type == "mirror" and getattr(d, "src", None) is g):
                    raise QMPError(f"Node '{g.name}' is busy: block device is in use by "
                                   f"block job: {job.type}")

    def _check_blockers(self, g: Node) -> None:
        """QEMU's op blockers on ``blockdev-del`` (``Node 'x' is busy: ...``),
        checked before ownership and the reference count as QEMU does: a
        mirror's target has the job's BlockBackend (``Node x is in use``);
        then the jobs' blockers (the newest first): a backup's target, a
        mirror's source, what a stream or commit claimed; then being an
        overlay's backing."""
        for job in self.eng.jobs.jobs():
            d = job.driver
            if job.is_completed or job.type not in ("backup", "mirror"):
                continue
            if job.type == "mirror" and getattr(d, "dst", None) is g:
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
                if g.is_filter:     # a job's filter: no protocol node of its own
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
            if not flat:
                img["backing-image"] = self._image_info(g.file, flat)
            return img
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
        info["backing_file_depth"] = len(g.chain()) - 1
        if g.backing is not None:
            info["backing_file"] = g.driver.backing_filename or g.backing.filename
        bms = self._bitmaps_of(g)
        if bms:
            info["dirty-bitmaps"] = [self._bitmap_info(bm) for bm in bms.values()]
        return info

    def _file_info(self, mn: MonitorNode) -> dict[str, Any]:
        try:
            st = os.stat(mn.filename)
            size, actual = st.st_size, st.st_blocks * 512
        except OSError:
            size, actual = 0, 0
        return self._common(mn.name, mn.drv, mn.filename, mn.read_only,
                            {"filename": mn.filename, "format": mn.drv, "virtual-size": size,
                             "actual-size": actual, "dirty-flag": False})

    # ------------------------------------------------------------------
    # Jobs

    def _job_id(self, args: dict[str, Any]) -> str:
        # No BlockBackends here, so QEMU's default (the device name) is "".
        return args.pop("job-id", "")

    def _start_backup(self, args: dict[str, Any], txn: JobTxn | None = None):
        args = dict(args)
        src, dst = self._lookup(args.pop("device")), self._lookup(args.pop("target"))
        with self.eng.io:
            self._check_job_blockers(src, dst)
        job_id = self._job_id(args)
        kw = _kw(args, drop=("x-perf", "discard-source"))
        if args.get("discard-source"):
            raise QMPError("blkjobs does not support 'discard-source'")
        return self.eng.backup(src, dst, kw.pop("sync"), job_id=job_id, txn=txn,
                               start=txn is None, **kw)

    def cmd_blockdev_backup(self, **args: Any) -> dict[str, Any]:
        self._start_backup(args)
        return {}

    def cmd_blockdev_mirror(self, **args: Any) -> dict[str, Any]:
        src, dst = self._lookup(args.pop("device")), self._lookup(args.pop("target"))
        with self.eng.io:
            # QEMU's qmp_get_root_bs: no node parent at all, a job's filter
            # included; then the op blockers of the source and the target
            if self.eng.graph.parents(src):
                raise QMPError("Need a root block node")
            self._check_job_blockers(src, dst)
        job_id = self._job_id(args)
        kw = _kw(args)
        self.eng.mirror(src, dst, kw.pop("sync"), job_id=job_id, **kw)
        return {}

    def cmd_block_stream(self, **args: Any) -> dict[str, Any]:
        top = self._lookup(args.pop("device"))
        job_id = self._job_id(args)
        self.eng.stream(top, job_id=job_id, **_kw(args, drop=("backing-mask-protocol",)))
        return {}

    def cmd_block_commit(self, **args: Any) -> dict[str, Any]:
        dev = args.pop("device")
        if dev not in self.eng.graph.nodes:
            raise QMPError(f"Device '{dev}' not found", "DeviceNotFound")
        job_id = self._job_id(args)
        self.eng.commit(self.eng.graph.nodes[dev], job_id=job_id,
                        **_kw(args, drop=("backing-mask-protocol",)))
        return {}

    def cmd_query_jobs(self) -> list[dict[str, Any]]:
        return self.eng.query_jobs()

    def cmd_query_block_jobs(self) -> list[dict[str, Any]]:
        return self.eng.query_block_jobs()

    def _verb(self, fn: Callable, *a: Any) -> dict[str, Any]:
        fn(*a)
        return {}

    def cmd_job_pause(self, id: str):
        return self._verb(self.eng.jobs.job_pause, id)

    def cmd_job_resume(self, id: str):
        return self._verb(self.eng.jobs.job_resume, id)

    def cmd_job_cancel(self, id: str):
        return self._verb(self.eng.jobs.job_cancel, id)

    def cmd_job_complete(self, id: str):
        return self._verb(self.eng.jobs.job_complete, id)

    def cmd_job_finalize(self, id: str):
        return self._verb(self.eng.jobs.job_finalize, id)

    def cmd_job_dismiss(self, id: str):
        return self._verb(self.eng.jobs.job_dismiss, id)

    def cmd_block_job_set_speed(self, device: str, speed: int):
        return self._verb(self.eng.jobs.block_job_set_speed, device, speed)

    def cmd_block_job_cancel(self, device: str, force: bool = False):
        return self._verb(self.eng.jobs.block_job_cancel, device, force)

    def cmd_block_job_pause(self, device: str):
        return self._verb(self.eng.jobs.block_job_pause, device)

    def cmd_block_job_resume(self, device: str):
        return self._verb(self.eng.jobs.block_job_resume, device)

    def cmd_block_job_complete(self, device: str):
        return self._verb(self.eng.jobs.block_job_complete, device)

    def cmd_block_job_finalize(self, id: str):
        return self._verb(self.eng.jobs.block_job_finalize, id)

    def cmd_block_job_dismiss(self, id: str):
        return self._verb(self.eng.jobs.block_job_dismiss, id)

    def cmd_block_job_change(self, id: str, type: str, **options: Any):
        job = self.eng.jobs.find_block_job(id)
        if job.type != type:
            raise QMPError("Job type does not match")
        if job.type != "mirror":
            raise QMPError("Job type does not support change")
        self.eng.jobs.block_job_change(id, type, **options)
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
                elif kind.startswith("block-dirty-bitmap-"):
                    undo.append(self._bitmap_action(kind, data))
                else:
                    raise QMPError(f"Action '{kind}' is not supported by blkjobs")
        except BaseException:
            self.eng.jobs.rollback_txn(txn)
            with self.eng.io:
                for fn in reversed(undo):
                    fn()
            raise
        self.eng.jobs.start_txn(txn)
        return {}
