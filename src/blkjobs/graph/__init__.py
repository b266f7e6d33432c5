"""Graph layer: named nodes over format drivers, backing chains, permissions,
QEMU-compatible file locks and transactional graph changes.

* :func:`open_chain` / :class:`Graph` / :class:`Node` — see :mod:`.node`;
* :class:`Perm`, :class:`Permission`, :class:`PermissionConflict` — :mod:`.perm`;
* :class:`GraphTransaction`, :class:`ReplaceNode`, :class:`SetBacking`,
  :class:`DropNode` — :mod:`.txn`.
"""
from .chain import open_chain, resolve_backing
from .node import Graph, Node
from .perm import ALL, Perm, Permission, PermissionConflict
from .txn import DropNode, GraphTransaction, ReplaceNode, SetBacking

__all__ = ["Graph", "Node", "open_chain", "resolve_backing", "ALL", "Perm", "Permission",
           "PermissionConflict", "GraphTransaction", "ReplaceNode", "SetBacking", "DropNode"]
