"""``blockdev-reopen`` and ``blockdev-snapshot-sync``, as
qemu-storage-daemon 7.2 does them (block.c's bdrv_reopen_*, blockdev.c's
external snapshot action).

``blockdev-reopen {options: [BlockdevOptions]}``: every entry names an
existing node and gives its options again; what blkjobs changes is
``read-only`` (absent: read-write; a format node's file node follows it)
and, for qcow2, ``backing`` (a node name, or null to detach; the image
header is not rewritten). As in QEMU, a qcow2 node that has a backing node
must say what it is now (``backing is missing for '<node>'``), ``driver``,
``file`` and ``filename`` cannot change, and the list is applied all or
nothing. An empty list does nothing (qemu-storage-daemon 7.2 aborts on it).

The other options QEMU lets a reopen change are accepted and recorded as
the node's options (``discard``, ``detect-zeroes``, ``cache``,
``auto-read-only``; qcow2's ``lazy-refcounts``, ``pass-discard-*``,
``overlap-check`` and cache sizes; file's ``drop-cache`` and
``x-check-cache-dropped``): ``query-named-block-nodes`` shows the new
``detect_zeroes`` and ``cache`` as QEMU does (a file node made inline for its
format node and not listed on its own inherits the cache mode).
``discard`` and ``detect-zeroes`` change what a front end's requests (an
NBD export's) do from the next request on, as at ``blockdev-add``
(graph/frontend.py): ``ignore`` drops discards and the may-unmap of
write-zeroes, ``detect-zeroes`` writes zeroes as a write-zeroes. A file
node's ``cache.direct`` (its own, or inherited from the format node it was
made inline for) switches O_DIRECT on or off on the image's open fd, as
qemu-storage-daemon reopens its fd; ``cache.no-flush`` is recorded only.
QEMU's refusals, with its texts:
``force-share``, ``locking``, ``aio``, ``aio-max-batch``, ``pr-manager``
given otherwise than before (``Cannot change the option '<k>'``),
``detect-zeroes`` ``unmap`` without ``discard`` ``unmap``, and a
``drop-cache`` given before left out now (``Option 'drop-cache' cannot be
reset to its default value``). Options no QEMU driver changes are refused
with one line.

``blockdev-snapshot-sync``: creates the overlay file (``mode``
``absolute-paths``, the default: backing file and format the old node's)
or opens it (``existing``), with QEMU's checks and texts, then does what
``blockdev-snapshot`` does. Like qemu-storage-daemon without exports, the
new overlay then has no parent and no monitor reference, so it is closed
again at once, and the old node stays behind read-only: the command is
for daemons with BlockBackends; here, create the overlay with
``blockdev-create`` or ``blockdev-add`` it, then ``blockdev-snapshot``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..formats import create_image, open_image
from ..graph import ALL, Node, Perm
from ..native import dio
from .protocol import QMPError

_REOPEN_KEYS = {"driver", "node-name", "file", "backing", "read-only", "filename"}
#: options any node may be given again with another value (recorded; see
#: the module docstring for what they change)
_COMMON = {"discard", "detect-zeroes", "cache", "auto-read-only"}
#: the same, per driver (QEMU's drivers accept a new value for them)
_MUTABLE = {
    "qcow2": {"lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
              "pass-discard-other", "overlap-check", "cache-size", "l2-cache-size",
              "refcount-cache-size", "cache-clean-interval"},
    "file": {"drop-cache", "x-check-cache-dropped"},
}
#: options that cannot change (QEMU: ``Cannot change the option '<k>'``):
#: given as they were given before (or left out as before); force-share
#: is compared with its value (false when not given)
_FIXED = ("locking", "aio", "aio-max-batch", "pr-manager")
#: options that, once given, must be given again (file-posix: ``Option
#: '<k>' cannot be reset to its default value``)
_NO_RESET = ("drop-cache",)


class ReopenCommands:
    """blockdev-reopen and blockdev-snapshot-sync (mixed into Commands)."""

    eng: Any
    nodes: dict
    _lookup: Callable[[str], Node]
    _check_op_blockers: Callable[[Node], None]
    _reopen_ro: Callable[[Node], None]
    _monitor_view: Callable[[Node], Any]
    _discard_unmap: Callable[[Node], bool]          # ExportCommands'

    # ------------------------------------------------------------------
    # blockdev-reopen

    def cmd_blockdev_reopen(self, options: list[dict[str, Any]]) -> dict[str, Any]:
        with self.eng.io:
            found = []
            for o in options:
                name = o.get("node-name")
                if name is None:
                    raise QMPError("node-name not specified")
                mn = self.nodes.get(name)
                if mn is None:
                    raise QMPError(f"Failed to find node with node-name='{name}'")
                found.append((mn, o))
            ro = self._ro_plan(found)
            backings = []
            for mn, o in found:
                backing = self._reopen_plan(mn, o)
                if backing is not ...:
                    backings.append((mn.gnode, backing))
            opts = self._options_plan(found)
            self._apply_ro(ro)
            for mn, o, inherited in opts:
                mn.set_options(o, inherited)
            self._apply_direct([mn for mn, _, _ in opts])
            # an export's TRIM follows its node's discard option from now on
            for be in getattr(self, "_exports", {}).values():
                be.exp.backend.unmap = self._discard_unmap(be.fe.node)
            for g, backing in backings:
                old = g.backing
                g.attach_backing(backing)
                if old is not None and old is not backing:
                    self.eng.io.drop_unused([n for n in old.chain()
                                             if n.name not in self.nodes])
        return {}

    @staticmethod
    def _ro_plan(found: list[tuple[Any, dict[str, Any]]]) -> dict[int, tuple[Any, bool]]:
        """The new read-only flags, as QEMU's reopen queue sets them: a file
        node given by name follows its format node to read-only but not
        back (then it must be made writable by a *later* entry, or the
        format node cannot be: ``Block node is read-only``); one given as
        an object gets that object's ``read-only``."""
        ro: dict[int, tuple[Any, bool]] = {}
        later: list[tuple[int, Any]] = []          # (entry index, format node)
        for i, (mn, o) in enumerate(found):
            r = bool(o.get("read-only", False))
            ro[id(mn)] = (mn, r)
            f, fref = mn.file, o.get("file")
            if f is None:
                continue
            if isinstance(fref, dict):          # inherits the parent's by default
                ro[id(f)] = (f, bool(fref.get("read-only", r)))
            elif r:
                ro[id(f)] = (f, True)
            else:
                ro.pop(id(f), None)          # re-queued as it is now
                if f.read_only:
                    later.append((i, mn))
        for i, mn in later:
            if not any(m is mn.file and not o.get("read-only", False)
                       for m, o in found[i + 1:]):
                raise QMPError("Block node is read-only")
        for mn, r in ro.values():
            parent = mn.parent
            if mn.drv == "file" and r and parent is not None and \
                    not ro.get(id(parent), (parent, parent.read_only))[1]:
                raise QMPError(f"Read-only block node '{mn.name}' cannot support read-write "
                               "users")
        return ro

    def _apply_direct(self, mns: list[Any]) -> None:
        """A file node's ``cache.direct`` now set otherwise than its fd's
        O_DIRECT: switched on the open file (``fcntl(F_SETFL)``, as QEMU's
        file driver reopens), with the node's front-end I/O drained
        (``quiesce``). A job copying meanwhile goes on: a request of its
        copy engine that the switch catches between its alignment check and
        its system call is done again in the new mode (csrc/dio.c)."""
        for mn in mns:
            fmt = mn.parent if mn.drv == "file" else None
            g = fmt.gnode if fmt is not None else None
            if g is None or not g.driver.host_file:
                continue
            fds = {g.driver.fd, g.driver.data_fd}
            want = bool(mn.cache.get("direct", False))
            if all(dio.is_direct(fd) == want for fd in fds):
                continue
            self.eng.io.quiesce(g)
            try:
                for fd in fds:
                    dio.set_direct(fd, want)
            except OSError as e:
                raise QMPError(f"Could not reopen file: {e.strerror}") from None
            finally:
                self.eng.io.unquiesce(g)

    @staticmethod
    def _apply_ro(ro: dict[int, tuple[Any, bool]]) -> None:
        done: list[Any] = []
        try:
            for mn, r in ro.values():
                if mn.gnode is not None and r != mn.gnode.read_only:
                    if r:       # bitmaps stored first (QEMU's qcow2_reopen_bitmaps_ro)
                        mn.gnode.driver.reopen_bitmaps_ro()
                    mn.gnode.reopen(read_only=r)
                    done.append(mn)
        except BaseException:
            for mn in reversed(done):
                mn.gnode.reopen(read_only=not mn.gnode.read_only)
            raise
        for mn, r in ro.values():
            mn.read_only = r

    def _reopen_plan(self, mn: Any, o: dict[str, Any]) -> Any:
        """Check one entry; the new backing node (None: none), or ... (kept)."""
        g = mn.gnode
        if g is not None and g.format == "qcow2" and "backing" not in o and \
                g.backing is not None:
            raise QMPError(f"backing is missing for '{mn.name}'")
        if o["driver"] != mn.drv:
            raise QMPError("Cannot change the option 'driver'")
        backing: Any = ...
        if g is not None and g.format == "qcow2":
            ref = o.get("backing", ...)
            if isinstance(ref, str):
                backing = self._lookup_reopen(ref)
                if g in backing.chain():
                    raise QMPError(f"Making '{backing.name}' a backing child of '{mn.name}' "
                                   "would create a cycle")
            elif ref is None:
                backing = None
            elif isinstance(ref, dict):
                raise QMPError("blkjobs does not open a new backing node in blockdev-reopen "
                               "(blockdev-add it, then name it)")
        if mn.drv == "file" and o.get("filename", mn.filename) != mn.filename:
            raise QMPError("Cannot change the option 'filename'")
        fref = o.get("file")
        if isinstance(fref, str):
            f = self.nodes.get(fref)
            if f is None:
                raise QMPError(f"Cannot find device='' nor node-name='{fref}'")
            if f is not mn.file:
                raise QMPError("blkjobs does not change a node's file child")
        elif isinstance(fref, dict):
            if mn.file is None or fref.get("driver") != mn.file.drv or \
                    fref.get("filename", mn.file.filename) != mn.file.filename or \
                    fref.get("node-name", mn.file.name) != mn.file.name:
                raise QMPError("blkjobs does not change a node's file child")
        return backing

    @staticmethod
    def _check_options(mn: Any, o: dict[str, Any]) -> None:
        """QEMU's checks of the options a node is reopened with."""
        if o.get("force-share", False) != mn.opts.get("force-share", False):
            raise QMPError("Cannot change the option 'force-share'")
        for k in _FIXED:
            if o.get(k) != mn.opts.get(k):
                raise QMPError(f"Cannot change the option '{k}'")
        for k in _NO_RESET:
            if k in mn.opts and k not in o:
                raise QMPError(f"Option '{k}' cannot be reset to its default value")
        # discard left out keeps the node's (QEMU parses it only when given)
        if o.get("detect-zeroes") == "unmap" and \
                o.get("discard", "unmap" if mn.unmap else "ignore") != "unmap":
            raise QMPError("setting detect-zeroes to unmap is not allowed without setting "
                           "discard operation to unmap")
        other = sorted(set(o) - _REOPEN_KEYS - _COMMON - set(_FIXED) - {"force-share"}
                       - _MUTABLE.get(mn.drv, set()))
        if other:
            raise QMPError(f"blkjobs' blockdev-reopen does not change '{other[0]}' "
                           f"for driver '{mn.drv}'")

    def _options_plan(self, found: list[tuple[Any, dict[str, Any]]]) -> list[tuple]:
        """Check every entry's options (and those of a file node given
        inline in one); what each node records: (node, options, the cache
        mode it inherits). As QEMU's reopen queue: a file node made inline
        for its format node and not listed on its own is reopened with it,
        inheriting its cache mode; one given inline, with its own options."""
        plan: dict[int, tuple] = {}
        listed = {id(mn) for mn, _ in found}
        for mn, o in found:
            self._check_options(mn, o)
            new = {"direct": False, "no-flush": False, **o.get("cache", {})}
            plan.setdefault(id(mn), (mn, o, None))
            f, fref = mn.file, o.get("file")
            if f is None:
                continue
            if isinstance(fref, dict):
                self._check_options(f, fref)
                plan[id(f)] = (f, fref, new)
            elif not f.owned and id(f) not in listed:
                plan[id(f)] = (f, f.opts, new)
        return list(plan.values())

    def _lookup_reopen(self, name: str) -> Node:
        g = self.eng.graph.nodes.get(name)
        if g is None:
            raise QMPError(f"Cannot find device='' nor node-name='{name}'")
        return g

    # ------------------------------------------------------------------
    # blockdev-snapshot-sync

    def cmd_blockdev_snapshot_sync(self, **a: Any) -> dict[str, Any]:
        with self.eng.io:
            old, new = self._snapshot_sync_prepare(a)
            try:
                self._reopen_ro(old)
            finally:
                # no BlockBackend above it and no monitor reference: it goes
                new.close()
        return {}

    def _snapshot_sync_prepare(self, a: dict[str, Any]) -> tuple[Node, Node]:
        """Create (or open) the overlay and link it over the old node: the
        prepare step of the command and of its transaction action (commit:
        the old node read-only; abort: unlinked; both then close the
        overlay, which nothing else holds). The file stays on disk either
        way, as QEMU leaves it."""
        device, node_name = a.get("device"), a.get("node-name")
        path, new_name = a["snapshot-file"], a.get("snapshot-node-name")
        fmt, mode = a.get("format", "qcow2"), a.get("mode", "absolute-paths")
        old = self.eng.graph.nodes.get(node_name) if node_name else None
        if old is None:
            raise QMPError(f"Cannot find device='{device or ''}' nor "
                           f"node-name='{node_name or ''}'")
        self._check_op_blockers(old)
        if node_name and not new_name:
            raise QMPError("New overlay node-name missing")
        if new_name and (new_name in self.nodes or new_name in self.eng.graph.nodes):
            raise QMPError("New overlay node-name already in use")
        if mode != "existing":
            if fmt == "raw":
                raise QMPError("Backing file not supported for file format 'raw'")
            if fmt != "qcow2":
                raise QMPError(f"blkjobs creates qcow2 overlays only, not '{fmt}'")
            try:
                create_image(path, "qcow2", old.size, backing_file=old.filename,
                             backing_format=old.format)
            except OSError as e:
                raise QMPError(f"Could not create '{path}': {e.strerror}") from None
        try:
            os.close(os.open(path, os.O_RDWR))
            drv = open_image(path, fmt, read_only=False)
        except OSError as e:
            raise QMPError(f"Could not open '{path}': {e.strerror}") from None
        new = self.eng.graph.add(drv, new_name, fmt)
        try:
            new.take("open", Perm.CONSISTENT_READ, ALL)
            if fmt != "qcow2":
                raise QMPError("The overlay does not support backing images")
            new.attach_backing(old)
        except BaseException:
            new.close()
            raise
        return old, new

    def _snapshot_sync_end(self, new: Node, old: Node | None) -> None:
        """The end of a ``blockdev-snapshot-sync`` transaction action:
        committed (``old`` given), the old node goes read-only; aborted,
        the overlay is unlinked. Then the overlay goes unless a job of the
        same transaction uses it (it then goes with the job)."""
        with self.eng.io:
            if old is not None:
                self._reopen_ro(old)
            else:
                new.attach_backing(None)
            self.eng.io.drop_unused([new])
