"""Graph layer: named nodes over format drivers, backing chains, permissions,
QEMU-compatible file locks and transactional graph changes.

* :func:`open_chain` / :class:`Graph` / :class:`Node` — see :mod:`.node`;
* :class:`Perm`, :class:`Permission`, :class:`PermissionConflict` — :mod:`.perm`;
* :class:`GraphTransaction`, :class:`ReplaceNode`, :class:`SetBacking`,
  :class:`DropNode` — :mod:`.txn`.

The names are imported on first use: a module that needs only
:mod:`.lock` (a raw -> raw convert takes the image locks and nothing else
of the graph) does not pay for the node, chain and transaction modules
(start-up time is part of every copy).
"""
from __future__ import annotations

TYPE_CHECKING = False    # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from .chain import open_chain as open_chain, resolve_backing as resolve_backing
    from .node import Graph as Graph, Node as Node
    from .perm import (ALL as ALL, Perm as Perm, Permission as Permission,
                       PermissionConflict as PermissionConflict)
    from .txn import (DropNode as DropNode, GraphTransaction as GraphTransaction,
                      ReplaceNode as ReplaceNode, SetBacking as SetBacking)

_WHERE = {"open_chain": "chain", "resolve_backing": "chain", "Graph": "node", "Node": "node",
          "ALL": "perm", "Perm": "perm", "Permission": "perm", "PermissionConflict": "perm",
          "DropNode": "txn", "GraphTransaction": "txn", "ReplaceNode": "txn",
          "SetBacking": "txn"}

__all__ = ["Graph", "Node", "open_chain", "resolve_backing", "ALL", "Perm", "Permission",
           "PermissionConflict", "GraphTransaction", "ReplaceNode", "SetBacking", "DropNode"]


def __getattr__(name: str) -> object:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # plain import statements: importlib (with warnings, 1.5 M instructions)
    # is imported by no command on plain file names otherwise
    if mod == "chain":
        from . import chain as m
    elif mod == "node":
        from . import node as m     # type: ignore[no-redef]
    elif mod == "perm":
        from . import perm as m     # type: ignore[no-redef]
    else:
        from . import txn as m      # type: ignore[no-redef]
    value = getattr(m, name)
    globals()[name] = value
    return value
