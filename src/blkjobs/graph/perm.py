"""Permissions on nodes, QEMU style.

Every user of a node (a parent node through its backing link, the opener,
a job) holds a :class:`Permission`: the operations it performs (``perm``)
and the ones it lets others perform (``shared``). Two users conflict when one
performs something the other does not share. Taking a conflicting permission
raises :class:`PermissionConflict` naming the node, the operation and the
other user; nothing changes then. Holders release (or update) explicitly.

The union of the permissions taken on a node is mirrored in QEMU's file
lock bytes (see :mod:`.lock`), so another QEMU process sees them too.
"""
from __future__ import annotations

from ..errors import BlkjobsError

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any


class Perm(int):
    """A set of the permission bits below: an int (``Perm(x)`` of any int;
    the bits are plain ints, combined with ``|``, ``&`` and ``~``). Not an
    ``enum.IntFlag``: building the flag class (and the combinations made
    at import) is ~1 M instructions of every image command's start-up, and
    nothing reads a member's name (:data:`PERM_NAMES` holds the texts)."""
    __slots__ = ()

    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


ALL = Perm(0xF)
NONE = Perm(0)
PERM_NAMES = {Perm.CONSISTENT_READ: "consistent read", Perm.WRITE: "write",
              Perm.WRITE_UNCHANGED: "write unchanged", Perm.RESIZE: "resize"}


def perm_names(p: int) -> str:
    return ", ".join(n for b, n in PERM_NAMES.items() if p & b) or "none"


class PermissionConflict(BlkjobsError):
    """A permission cannot be granted (held by another user or locked by
    another process)."""


class Permission:
    """One user's hold on a node. Create with :meth:`Node.take`."""

    def __init__(self, node, owner: str, perm: int, shared: int):
        self.node = node
        self.owner = owner
        self.perm = Perm(perm)
        self.shared = Perm(shared)
        self.released = False
        self.pending_release = False   # set by a graph change that will drop it at commit

    def update(self, perm: int | None = None, shared: int | None = None) -> None:
        """Change perm/shared atomically (on conflict nothing changes)."""
        new_perm = self.perm if perm is None else Perm(perm)
        new_shared = self.shared if shared is None else Perm(shared)
        self.node._check_conflict(new_perm, new_shared, self.owner, ignore=self)
        old = (self.perm, self.shared)
        self.perm, self.shared = new_perm, new_shared
        try:
            self.node._apply_locks()
            stop_zero_copy(self.node, self.owner, new_perm & ~old[0])     # (what it gains)
        except BaseException:
            self.perm, self.shared = old
            self.node._apply_locks()
            raise

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.node._perms.remove(self)
        self.node._apply_locks()

    def __repr__(self):
        return (f"Permission({self.node.name}, {self.owner!r}, perm={perm_names(self.perm)}, "
                f"shared={perm_names(self.shared)})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# -- zero-copy readers (docs/nbd.md, "Zero-copy reads") -----------------------
#: what may change a node's file bytes: its zero-copy readers stop before
#: any of these is granted
CHANGES = Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE


def zero_copy_stable(node: Any) -> bool:
    """Nothing in this process may change ``node``'s file bytes now: no
    user holds write, write-unchanged or resize. (Other processes may, where
    the lock bytes share write -- a raw file, as ``qemu-nbd -r`` shares it:
    their writes are not ordered with our reads, and a client sees the same
    either way; docs/nbd.md, "Zero-copy reads".)"""
    return not node._closed and not node.cumulative()[0] & CHANGES


def add_zero_copy_reader(nodes: Iterable[Any], reader: Any) -> bool:
    """Register ``reader`` -- one that may send file bytes after its read
    is over (the NBD export's zero-copy sessions: the socket holds the
    page-cache pages until the client reads them) -- on each of ``nodes``
    (adding them to ``reader.nodes``) if each is stable
    (:func:`zero_copy_stable`): True. Until it is dropped, granting write,
    write-unchanged or resize on such a node (``Node.take``,
    :meth:`Permission.update`, ``Node.reopen``) first calls ``reader.stop()``
    (no more such sends; None once the bytes sent are consumed, else why
    not) and fails with its text. The check and the registration are one
    step under the node's lock, and a grant adds its permission before it
    looks at the readers: a reader sees the grant or is seen by it."""
    for n in nodes:
        with n._zc_lock:
            if not zero_copy_stable(n):
                return False
            n._zc_readers.add(reader)
        reader.nodes.add(n)
    return True


def drop_zero_copy_reader(node: Any, reader: Any) -> None:
    with node._zc_lock:
        node._zc_readers.discard(reader)


def stop_zero_copy(node: Any, owner: str, perm: int) -> None:
    """Before ``perm`` is granted to ``owner`` on ``node``: if it may change
    the file, every zero-copy reader of the node stops and waits until what
    it sent is consumed, or the grant fails (PermissionConflict)."""
    if not perm & CHANGES or not node._zc_readers:
        return
    with node._zc_lock:
        readers = list(node._zc_readers)
    for r in readers:
        why = r.stop()
        if why is not None:
            raise PermissionConflict(f"{owner} cannot take '{perm_names(perm & CHANGES)}' "
                                     f"on node '{node.name}': {why}")
        drop_zero_copy_reader(node, r)
