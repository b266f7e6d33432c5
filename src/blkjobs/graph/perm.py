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
            # (what it gains: see Node._stop_zero_copy)
            self.node._stop_zero_copy(self.owner, new_perm & ~old[0])
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
