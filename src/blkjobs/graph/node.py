"""Nodes and the graph: drivers stacked through backing links.

A :class:`Node` wraps one open :class:`~blkjobs.formats.base.Driver` and an
optional backing child. It answers "what does the guest see here" for the
whole chain below it: :meth:`Node.readinto` resolves UNALLOCATED ranges in the
backing node (zeroes past the backing node's end), :meth:`Node.block_status`
reports the layer (depth) that provides each run, and :meth:`Node.write` does
copy-on-write from the backing chain for partially written clusters by
passing the driver a ``fill`` hook that reads the backing node.

Names follow QEMU: given ones, or ``#blockN`` for unnamed nodes (N counts per
graph). A backing link is a :class:`~.perm.Permission` the parent holds on
its child: consistent read, sharing everything but write and resize (QEMU's
default for backing children). A job that must write a backing node (commit)
relaxes it first with ``parent.backing_perm.update(shared=ALL)``.

Writes go through a node only while some user holds WRITE on it
(:meth:`Node.take`), which also takes the QEMU lock bytes in the file. A
*filter node* (:meth:`Graph.add_filter`: a job's copy-before-write,
mirror_top or copy-on-read node) has no file of its own: its ``file`` child
does the I/O, and it is transparent to reads, writes and block status. The
I/O layer keeps its write hooks on it; see :mod:`blkjobs.graph.io`.
"""
from __future__ import annotations

import _thread
import fcntl
import os

from ..errors import ImageError, UsageError
from ..formats import cache, open_image
from ..formats.base import Kind
from .lock import NO_SHARE, FileLock
from .lock import _set as _lock_set
from .perm import ALL, Perm, Permission, PermissionConflict, perm_names, stop_zero_copy

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

BACKING_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
#: what allows writing data: a copy that leaves the guest view as it was
#: (stream pulling the chain into its top) needs only write-unchanged
_WRITES = Perm.WRITE | Perm.WRITE_UNCHANGED
_ZEROES = bytes(1 << 20)


class Graph:
    """A set of named nodes. State is per object (no globals).

    Locks (``locking``): each node's lock bytes are the union of its users'
    permissions plus what QEMU's format layer takes on the file (see
    :meth:`Node.lock_bits`). ``format_locks`` (the default, everywhere: the
    commands, the library and the daemon): also what QEMU's qcow2 driver
    takes on its file, so no other process writes a qcow2 image whose
    metadata we hold in memory. ``share_writes=False`` is a qemu-img style
    command: every image it opens refuses other writers (its readers need a
    stable view). ``force_share`` (``-U``) makes read-only nodes share
    everything and take nothing but consistent read."""

    def __init__(self, locking: bool = True, share_writes: bool = True,
                 force_share: bool = False, format_locks: bool = True):
        self.nodes: dict[str, Node] = {}
        self.locking = locking
        self.share_writes = share_writes
        self.force_share = force_share
        self.format_locks = format_locks
        self._counter = 0

    def auto_name(self) -> str:
        while True:
            self._counter += 1
            name = f"#block{self._counter}"
            if name not in self.nodes:
                return name

    def check_name(self, name: str | None) -> None:
        """Raise the error :meth:`add` would give for ``name`` (None: an
        automatic name, always fine)."""
        if name is None:
            return
        if name in self.nodes:
            raise UsageError(f"Duplicate nodes with node-name='{name}'")
        if not name or name.startswith("#"):
            raise UsageError(f"Invalid node-name: '{name}'")

    def add(self, driver: Any, name: str | None = None, fmt: str | None = None) -> Node:
        self.check_name(name)
        if name is None:
            name = self.auto_name()
        node = Node(self, name, driver, fmt or driver.format_name)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise UsageError(f"Cannot find node '{name}'") from None

    def parents(self, node: Node) -> list[Node]:
        """Nodes using ``node`` as backing or (filters) as file child."""
        return [n for n in self.nodes.values() if n.backing is node or n.file is node]

    def add_filter(self, drv: str, child: Node, name: str | None = None,
                   perm: int | None = None) -> Node:
        """A filter node of driver ``drv`` above ``child`` (nothing is
        re-pointed to it here). It holds what its users may need on the
        child: consistent read, and write unless the child is read-only or a
        user shares no write (QEMU's filter asks what its parents need); or
        ``perm`` (commit's filter: nothing, as QEMU's commit_top)."""
        from .filter import FilterDriver    # a job's filter: not for a command's chain
        node = self.add(FilterDriver(drv, child), name)
        try:
            if perm is None:
                w = not child.read_only and all(p.shared & Perm.WRITE for p in child.users())
                perm = Perm.CONSISTENT_READ | (Perm.WRITE if w else Perm(0))
            node.file_perm = child.take(f"node '{node.name}' (file)", perm, ALL)
        except BaseException:
            del self.nodes[node.name]
            raise
        node.file = child
        return node

    def close(self) -> None:
        for n in list(self.nodes.values()):
            n.close()


class Node:
    def __init__(self, graph: Graph, name: str, driver: Any, fmt: str):
        self.graph = graph
        self.name = name
        #: a formats.base.Driver, a filter's FilterDriver, or a Blkdebug
        #: wrapper around a Driver (it forwards attributes): duck-typed
        self.driver: Any = driver
        self.format = fmt
        self.backing: Node | None = None
        self.backing_perm: Permission | None = None
        #: a filter's child (see Graph.add_filter); None for image nodes
        self.file: Node | None = None
        self.file_perm: Permission | None = None
        self._perms: list[Permission] = []
        #: the job blocking this node for other jobs (BlockIO.claim), or None
        #: (a blkjobs.jobmodel Job: the graph does not import the job core)
        self.claimed_by: Any = None
        self.is_filter: bool = driver.is_filter
        # no lock bytes where there is no host file (an NBD export)
        self._lock = (FileLock(driver.fd, driver.filename)
                      if graph.locking and not self.is_filter
                      and driver.host_file else None)
        self._closed = False
        #: per-node state of the I/O layer over the graph (graph/io.py's
        #: ``NodeState``: filter hooks, bitmaps, cache mode...). It lives and
        #: dies with the node: never keyed by ``id(node)``, which is reused.
        self.io_state: Any = None
        #: QMP's block-set-write-threshold: 0 (off), or the offset writes may
        #: reach; ``threshold_cb(node, amount_exceeded, threshold)`` is called
        #: once, by the first write that goes past it (then it is 0 again)
        self.write_threshold = 0
        self.threshold_cb = None
        #: the same for the node's image file (QEMU's threshold on the
        #: protocol node under a format node), in host offsets: see
        #: set_file_threshold
        self.file_threshold = 0
        self.file_threshold_cb: Callable[[Node, int, int], None] | None = None
        #: what a front end's requests do here (QEMU's node options, set by
        #: the daemon's blockdev-add and blockdev-reopen): ``unmap`` False
        #: (``discard=ignore``) drops discards; ``detect_zeroes`` "on"/"unmap"
        #: writes zeroes as a write-zeroes (may-unmap with "unmap")
        self.unmap = True
        self.detect_zeroes = "off"
        #: readers that may send this node's file bytes after their read is
        #: over, and their lock (perm.add_zero_copy_reader)
        self._zc_readers: set[Any] = set()
        self._zc_lock = _thread.allocate_lock()

    def note_write(self, offset: int, length: int) -> None:
        """A write, write-zeroes or discard of [offset, offset+length) is
        about to reach this node: its write threshold is checked (QEMU's
        bdrv_write_threshold_check_write) and its dirty bitmaps marked, for
        a job's writes as for a guest's (QEMU's bdrv_set_dirty)."""
        st = self.io_state
        for bm in (st.bitmaps.values() if st is not None else ()):
            bm.mark(offset, length)
        thr = self.write_threshold
        if thr and offset + length > thr:
            self.write_threshold = 0
            if self.threshold_cb is not None:
                self.threshold_cb(self, offset + length - thr, thr)
        if self.file_threshold:
            if self.format == "raw":        # host offsets are guest offsets
                self._file_reached(offset + length)
            else:           # a reopen may have replaced the driver
                self._hook_file_growth()

    def set_file_threshold(self, thr: int, cb: Callable[[Node, int, int], None]) -> None:
        """A write threshold on this node's image file (0: off): ``cb(node,
        amount_exceeded, threshold)`` is called once, when a write first
        reaches past host offset ``thr``, as QEMU's threshold on a protocol
        node. raw: the write's own range. qcow2: the file's growth, when an
        allocation (data cluster, L2 table, refcount block) takes clusters
        past ``thr`` -- before they are written, as QEMU checks a request
        before it runs; the amount is the new end of the clusters in use."""
        self.file_threshold, self.file_threshold_cb = thr, cb
        if thr and self.format != "raw":
            self._hook_file_growth()

    def _hook_file_growth(self) -> None:
        self.driver.watch_file_growth(self._file_reached)   # a blkdebug wrapper: its driver's

    def _file_reached(self, end: int) -> None:
        thr = self.file_threshold
        if thr and end > thr:
            self.file_threshold = 0
            if self.file_threshold_cb is not None:
                self.file_threshold_cb(self, end - thr, thr)

    # -- basic facts ---------------------------------------------------
    @property
    def filename(self) -> str:
        name: str = self.driver.filename
        return name

    @property
    def size(self) -> int:
        size: int = self.driver.size
        return size

    @property
    def read_only(self) -> bool:
        ro: bool = self.driver.read_only
        return ro

    def chain(self) -> list[Node]:
        """This node and its backing chain (a filter: itself, its child's)."""
        out: list[Node] = []
        n: Node | None = self
        while n is not None:
            out.append(n)
            n = n.file if n.is_filter else n.backing
        return out

    def below_filters(self) -> Node:
        """The first node at or below this one that is not a filter."""
        n = self
        while n.is_filter:
            n = n._child()
        return n

    def _child(self) -> Node:
        """A filter's child (its ``file``); a filter already taken out of
        the graph has none."""
        if self.file is None:
            raise ImageError(f"filter node '{self.name}' has been removed from the graph")
        return self.file

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.format} '{self.filename}'>"

    # -- permissions ---------------------------------------------------
    def take(self, owner: str, perm: int, shared: int = ALL) -> Permission:
        """Take ``perm`` for ``owner``, sharing ``shared`` with other users.
        Raises PermissionConflict (and changes nothing) on a conflict with
        another user of this node or with another process's locks."""
        perm, shared = Perm(perm), Perm(shared)
        if perm & (Perm.WRITE | Perm.RESIZE) and self.read_only:
            raise PermissionConflict(f"Block node '{self.name}' is read-only; "
                                     f"{owner} cannot take {perm_names(perm)}")
        self._check_conflict(perm, shared, owner)
        p = Permission(self, owner, perm, shared)
        self._perms.append(p)
        try:
            self._apply_locks()
            stop_zero_copy(self, owner, perm)
        except BaseException:
            self._perms.remove(p)
            # let go of what the failed apply took; take nothing (the node's
            # own format bits -- a read-write qcow2 holds write -- may be
            # what conflicts: the first error stands, said once)
            if self._lock is not None and not self._closed:
                self._lock.drop_unwanted(*self.lock_bits())
            raise
        return p

    def _check_conflict(self, perm: int, shared: int, owner: str,
                        ignore: Permission | None = None) -> None:
        for o in self._perms:
            if o is ignore:
                continue
            if perm & ~o.shared:
                raise PermissionConflict(
                    f"Conflicts with use by {o.owner} of node '{self.name}', which does not "
                    f"allow '{perm_names(perm & ~o.shared)}' (requested by {owner})")
            if o.perm & ~shared:
                raise PermissionConflict(
                    f"{owner} cannot unshare '{perm_names(o.perm & ~shared)}' on node "
                    f"'{self.name}': used by {o.owner}")

    def cumulative(self) -> tuple[int, int]:
        perm: int = 0
        shared: int = ALL
        for p in self._perms:
            perm |= p.perm
            shared &= p.shared
        return perm, shared

    def lock_bits(self) -> tuple[int, int]:
        """(perm, unshared) this node holds in QEMU's lock bytes of its file:
        its users' permissions, and (``graph.format_locks``) what QEMU's
        format layer adds: a qcow2 node (its file holds metadata) always
        reads consistently and shares neither write nor resize, and a
        writable one holds write and resize, whether or not a user writes
        (qemu-storage-daemon's blockdev-add does the same). A qemu-img style graph (``share_writes=False``) refuses
        other writers on every node; ``force_share`` (-U, read-only nodes)
        shares everything."""
        perm, shared = self.cumulative()
        unshared = ALL & ~shared
        if self.read_only and self.graph.force_share:
            return perm & Perm.CONSISTENT_READ, Perm(0)
        if self.format == "qcow2" and self.graph.format_locks:
            perm |= Perm.CONSISTENT_READ
            if not self.read_only:
                perm |= Perm.WRITE | Perm.RESIZE
            unshared |= NO_SHARE
        if not self.graph.share_writes:
            unshared |= NO_SHARE
        return Perm(perm), Perm(unshared)

    def _apply_locks(self) -> None:
        if self._lock is None or self._closed:
            return
        self._lock.apply(*self.lock_bits())

    def users(self) -> list[Permission]:
        return list(self._perms)

    def _require(self, bit: int, what: str) -> None:
        """Some user holds one of the permissions in ``bit``."""
        if not any(p.perm & bit for p in self._perms):
            raise PermissionConflict(f"{what} on node '{self.name}' needs the "
                                     f"'{perm_names(bit & Perm.WRITE or bit)}' permission: "
                                     "take it first")

    def hold_open(self, backing: Node | None = None) -> Node:
        """Take the "open" permission a node added for a user holds (read,
        everything shared) and attach ``backing``; on failure close the node
        and re-raise. Returns the node."""
        try:
            self.take("open", Perm.CONSISTENT_READ, ALL)
            if backing is not None:
                self.attach_backing(backing)
        except BaseException:
            self.close()
            raise
        return self

    # -- backing link ----------------------------------------------------
    def _link(self, child: Node | None) -> Permission | None:
        if child is None:
            return None
        return child.take(f"node '{self.name}' (backing)", Perm.CONSISTENT_READ, BACKING_SHARED)

    def attach_backing(self, child: Node | None) -> None:
        """Set the in-memory backing link (no header change)."""
        perm = self._link(child)
        if self.backing_perm is not None:
            self.backing_perm.release()
        self.backing, self.backing_perm = child, perm

    # -- I/O through the chain ---------------------------------------------
    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """The guest view of [offset, offset+len(buf)) through the chain."""
        if self.is_filter:
            self._child().readinto(offset, buf)
            return
        mv = memoryview(buf).cast("B")
        if offset + len(mv) > self.size:
            raise UsageError(f"read beyond the end of node '{self.name}'")
        if self.backing is None:
            self.driver.readinto(offset, mv)
            return
        # a blkdebug layer under this image hears of reads left to the backing
        # file (QEMU's read_backing_aio), which do not pass it
        note = self.driver.backing_read if self.driver.wants_events else None
        for m in self.driver.map_host(offset, len(mv)):
            v = mv[m.start - offset:m.start - offset + m.length]
            if m.kind == Kind.UNALLOCATED:
                if note is not None:
                    note(m.start, m.length)
                self.backing._read_below(m.start, v)
            else:
                self.driver.readinto(m.start, v)

    def _read_below(self, offset: int, mv: memoryview) -> None:
        """Like readinto, but zeroes past this node's end (backing shorter
        than the overlay)."""
        n = max(0, min(len(mv), self.size - offset))
        if n:
            self.readinto(offset, mv[:n])
        pos = n
        while pos < len(mv):
            k = min(len(mv) - pos, len(_ZEROES))
            mv[pos:pos + k] = _ZEROES[:k]
            pos += k

    def read(self, offset: int, length: int) -> bytes:
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)

    def _fill(self) -> Callable[[int, bytearray | memoryview], None] | None:
        if self.backing is None:
            return None
        below = self.backing
        return lambda off, buf: below._read_below(off, memoryview(buf).cast("B"))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write with copy-on-write from the backing chain."""
        self._require(_WRITES, "write")
        self.note_write(offset, memoryview(data).nbytes)
        if self.is_filter:
            self._child().write(offset, data)
        elif self.backing is None:
            self.driver.write(offset, data)
        else:
            self.driver.write(offset, data, fill=self._fill())

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._require(_WRITES, "write_zeroes")
        self.note_write(offset, length)
        if self.is_filter:
            self._child().write_zeroes(offset, length, may_unmap)
        elif self.backing is None:
            self.driver.write_zeroes(offset, length, may_unmap)
        else:
            self.driver.write_zeroes(offset, length, may_unmap, fill=self._fill())

    def discard(self, offset: int, length: int) -> None:
        self._require(Perm.WRITE, "discard")
        self.note_write(offset, length)
        if self.is_filter:
            self._child().discard(offset, length)
        else:
            self.driver.discard(offset, length)

    def flush(self) -> None:
        if self.is_filter:
            self._child().flush()
        else:
            self.driver.flush()

    def block_status(self, offset: int = 0, length: int | None = None) -> list[dict[str, Any]]:
        """Runs of [offset, offset+length) through the chain, as ``qemu-img
        map --output json`` prints them: start, length, depth, present, zero,
        data, compressed, and offset (host offset in the file of the node at
        ``depth``) when the data has one. Fault injection may fail it (OSError)."""
        length, d = self.size - offset if length is None else length, self.driver
        if d.injects_faults and (e := d.inject_check("block-status", offset, length)):
            raise OSError(e, os.strerror(e))
        out: list[dict[str, Any]] = []
        self._status(offset, min(length, self.size - offset), 0, out)
        return out

    def _status(self, offset: int, length: int, depth: int, out: list[dict[str, Any]]) -> None:
        if self.is_filter:      # transparent, but a level of chain(): depth + 1
            self._child()._status(offset, length, depth + 1, out)
            return
        for m in self.driver.map_host(offset, length):
            if m.kind == Kind.UNALLOCATED and self.backing is not None:
                bsize = self.backing.size
                inside = max(0, min(m.start + m.length, bsize) - m.start)
                if inside:
                    self.backing._status(m.start, inside, depth + 1, out)
                if inside < m.length:       # zeroes past a short backing node's end
                    hides = any(n.size > m.start + inside for n in self.backing.chain()[1:])
                    _emit(out, m.start + inside, m.length - inside, depth + 1,
                          False, True, False, False, None, eof=hides)
                continue
            if m.kind == Kind.DATA:
                _emit(out, m.start, m.length, depth, True, False, True, False, m.host_offset)
            elif m.kind == Kind.COMPRESSED:
                _emit(out, m.start, m.length, depth, True, False, True, True, None)
            elif m.kind == Kind.ZERO:   # zero_data: NBD's x-dirty-bitmap hack
                _emit(out, m.start, m.length, depth, True, True, getattr(m, "zero_data", False), False, m.host_offset)
            else:       # not allocated, nothing below: zeroes (null-co: unknown, says QEMU)
                _emit(out, m.start, m.length, depth, False,
                      self.driver.read_zeroes, False, False, m.host_offset)

    # -- lifecycle ---------------------------------------------------------
    def reopen(self, read_only: bool) -> None:
        """Reopen the driver read-only or read-write (e.g. a commit base);
        permissions and locks move to the new file description."""
        if read_only == self.read_only:
            return
        # the file is opened anew and the old description closed: no
        # zero-copy reader may still send from it
        stop_zero_copy(self, "reopen", ALL)
        if read_only:
            perm, _ = self.cumulative()
            if perm & (Perm.WRITE | Perm.RESIZE):
                raise PermissionConflict(f"node '{self.name}' is still used for writing")
        self.driver.flush()
        spec = self.driver.spec_name
        with cache.reopening(self.driver):      # the new fd keeps O_DIRECT / O_DSYNC
            if spec is not None:       # a json:/--image-opts name: opened the same way again
                from .blockspec import open_spec, parse
                new = open_spec(parse(spec, self.format), read_only)[0]
                if new.injects_faults:
                    new = new.inner     # type: ignore[attr-defined]   # the wrapper stays, below
            else:
                new = open_image(self.filename, self.format, read_only=read_only)
        # a fault-injection wrapper (blkdebug: rules, break points) stays, around the new driver
        wrapper = self.driver if self.driver.injects_faults else None
        old = wrapper.inner if wrapper is not None else self.driver
        if wrapper is not None:
            wrapper.inner = new
        else:
            self.driver = new
        if self._lock is not None:
            newlock = FileLock(new.fd, new.filename)
            # Our old description still holds the same bytes: move them over
            # (what a writable node holds is computed for the new driver).
            held = set(self._lock.held)
            self._lock.release()
            try:
                newlock.apply(*self.lock_bits())
            except BaseException:
                new.close()
                if wrapper is not None:
                    wrapper.inner = old
                else:
                    self.driver = old
                for b in sorted(held):
                    _lock_set(old.fd, fcntl.F_RDLCK, b)
                self._lock.held = held
                raise
            self._lock = newlock
        old.close()

    def close(self) -> None:
        """Close this node and drop it from the graph (its backing node stays)."""
        if self._closed:
            return
        if self.io_state is not None:       # reads outside the I/O lock end first
            self.io_state.before_close()
        if self.backing_perm is not None:
            self.backing_perm.release()
            self.backing_perm = None
        self.backing = None
        if self.file_perm is not None:
            self.file_perm.release()
            self.file_perm = None
        self.file = None
        if self._lock is not None:
            self._lock.release()
        self._closed = True
        try:
            self.driver.close()
        finally:
            # Even when the driver's flush failed: its fd is closed, and a
            # node left in the graph would do I/O on whatever file the OS
            # gives that number next. The error is raised after this.
            if self.graph.nodes.get(self.name) is self:
                del self.graph.nodes[self.name]

    def close_chain(self) -> None:
        for n in self.chain():
            n.close()


def _emit(out: list[dict[str, Any]], start: int, length: int, depth: int, present: bool,
          zero: bool, data: bool, compressed: bool, offset: int | None,
          eof: bool = False) -> None:
    """``eof``: zeroes past the end of the node at ``depth`` (shorter than
    its overlay) that hide a longer node below it. Not "present", yet that
    node provides them (QEMU counts them as allocated there)."""
    if length <= 0:
        return
    if out:
        p = out[-1]
        if (p["depth"], p["present"], p["zero"], p["data"], p["compressed"],
                p.get("eof", False)) == (depth, present, zero, data, compressed, eof) \
                and p["start"] + p["length"] == start \
                and (offset is None) == ("offset" not in p) \
                and (offset is None or p["offset"] + p["length"] == offset):
            p["length"] += length
            return
    e: dict[str, Any] = {"start": start, "length": length, "depth": depth, "present": present,
                         "zero": zero, "data": data, "compressed": compressed}
    if offset is not None:
        e["offset"] = offset
    if eof:
        e["eof"] = True
    out.append(e)
