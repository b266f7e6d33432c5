"""``x-debug-query-block-graph``, as QEMU 7.2's bdrv_get_xdbg_block_graph
builds it: the BlockBackends (type ``block-backend``, unnamed), then the
block jobs (``block-job``, named by their id), then every node
(``block-driver``) in creation order; each entry numbered from 1 when first
met (as an entry or as an edge's child), its edges after it; both lists come
out reversed (QEMU prepends).

**Entries.** BlockBackends, in the order they were made: an NBD export's
(``root`` on the node named, as QEMU attaches it even under a job's filter;
moved onto a job's filter put in later)
and a mirror job's target. Jobs, newest first: ``backup`` and ``mirror``
with QEMU's edges (``main node`` to the job's filter, ``source``,
``target``). Nodes: the monitor's (file and format nodes), the images a
qcow2 node opened by itself (with an auto-named file node each) and the
jobs' filters: a backup's ``copy-before-write`` (children ``file`` and
``target``), a mirror's ``mirror_top`` (child ``backing``), other jobs'
filters with ``file``.

**Permissions** are QEMU's, computed from the top down as its block layer
does: the users' edges have fixed ones (a writable export takes write and
consistent read, sharing all but resize; a mirror's target BlockBackend
write, sharing write-unchanged; ...); an edge below a node gets what the
node's parents take and share together (their union, and the intersection),
passed through by filters (``raw``, ``blkdebug``, the mirror's filter),
with the metadata rules for a qcow2 node's ``file`` (consistent read; write
and resize when the node is writable; never shares write or resize) and
``backing`` (consistent read if a parent reads; shares write and resize only
if all parents do) and copy-before-write's (its ``file`` shares neither
write nor resize; its ``target`` takes write).

Stream and commit jobs are not listed (their filters are, as nodes).
"""
from __future__ import annotations

from typing import Any

from ..graph import Node, Perm

_ALL = Perm(0xF)
_CR, _W, _WU, _RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE
_PERM_ORDER = ((_RS, "resize"), (_WU, "write-unchanged"), (_W, "write"),
               (_CR, "consistent-read"))


def perm_names(p: int) -> list[str]:
    return [name for bit, name in _PERM_ORDER if p & bit]


class _Entry:
    """A BlockBackend or a block job: a name and fixed edges."""

    def __init__(self, kind: str, name: str, edges: list[tuple[Any, str, Any]]):
        self.kind, self.name, self.edges = kind, name, edges


def _fixed(perm: int, shared: int) -> tuple[str, int, int]:
    return ("fixed", perm, shared)


class BlockGraph:
    """One x-debug-query-block-graph answer for ``cmds`` (a Commands)."""

    def __init__(self, cmds: Any):
        self.cmds = cmds
        self.view = cmds._monitor_view
        self._cum: dict[int, tuple[int, int]] = {}
        self._into: dict[int, list[tuple[Any, Any]]] = {}     # child -> (parent, rule)

    def build(self) -> dict[str, Any]:
        items = self._backends() + self._jobs() + \
            [(x, "block-driver") for x in self.cmds._graph_order()]
        links = [(x, kind, self._links(x)) for x, kind in items]
        for x, _, ls in links:
            for child, _, rule in ls:
                self._into.setdefault(id(child), []).append((x, rule))
        ids: dict[int, int] = {}

        def num(x: Any) -> int:
            return ids.setdefault(id(x), len(ids) + 1)
        nodes, edges = [], []
        for x, kind, ls in links:
            nodes.append({"id": num(x), "type": kind, "name": x.name})
            for child, name, rule in ls:
                perm, shared = self._edge(x, rule)
                edges.append({"parent": num(x), "child": num(child), "name": name,
                              "perm": perm_names(perm), "shared-perm": perm_names(shared)})
        return {"nodes": nodes[::-1], "edges": edges[::-1]}

    # -- the users ------------------------------------------------------------
    def _backends(self) -> list[tuple[Any, str]]:
        """Exports' and mirror targets' BlockBackends, oldest first."""
        bbs: list[tuple[int, _Entry]] = []
        seq = getattr(self.cmds, "_bb_seq", {})
        for be in getattr(self.cmds, "_exports", {}).values():
            perm = _CR | (_W if be.exp.writable else 0)
            root: Any = be.node
            # a job's filter put in above it since: QEMU moved the root onto it
            for job in reversed(self._block_jobs("backup", "mirror")):      # oldest first
                if job.driver.src is root and seq.get(job, 0) > seq.get(be, 0):
                    root = job.driver.fnode
            bbs.append((seq.get(be, 0), _Entry("block-backend", "", [
                (self.view(root), "root", _fixed(perm, _CR | _W | _WU))])))
        for job in self._block_jobs("mirror"):
            bbs.append((seq.get(job, 0), _Entry("block-backend", "", [
                (self.view(job.driver.dst), "root", _fixed(_W, _WU))])))
        bbs.sort(key=lambda b: b[0])
        return [(e, "block-backend") for _, e in bbs]

    def _block_jobs(self, *types: str) -> list[Any]:
        return [j for j in self.cmds.eng.jobs.jobs()
                if j.type in types and not j.is_completed
                and getattr(j.driver, "fnode", None) is not None]

    def _jobs(self) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        for job in self._block_jobs("backup", "mirror"):        # newest first
            d = job.driver
            dst, src, top = self.view(d.dst), self.view(d.src), self.view(d.fnode)
            if job.type == "backup":
                edges = [(dst, "target", _fixed(0, _ALL)), (top, "main node", _fixed(0, _ALL))]
            else:
                edges = [(dst, "target", _fixed(0, _ALL)),
                         (src, "source", _fixed(0, _CR | _W | _WU)),
                         (top, "main node", _fixed(_CR, _CR | _W | _WU))]
            out.append((_Entry("block-job", job.id, edges), "block-job"))
        return out

    # -- the nodes' children ----------------------------------------------------
    def _links(self, x: Any) -> list[tuple[Any, str, Any]]:
        """(child, edge name, rule) in QEMU's order (the newest child first)."""
        if isinstance(x, _Entry):
            return x.edges
        g = x if isinstance(x, Node) else x.gnode
        if g is None:       # a file node, or a blkdebug node over one
            if x.drv == "blkdebug" and x.file is not None:
                return [(x.file, "image", ("pass",))]
            return []
        if g.is_filter:
            if g.file is None:
                return []
            child = self.view(g.file)
            owner = self._filter_job(g)
            if owner is not None and owner.type == "backup":
                return [(self.view(owner.driver.dst), "target", _fixed(_W, _CR | _W | _WU)),
                        (child, "file", ("cbw-file",))]
            if owner is not None and owner.type == "mirror":
                return [(child, "backing", ("pass",))]
            return [(child, "file", ("pass",))]
        out: list[tuple[Any, str, Any]] = []
        if g.backing is not None:
            out.append((self.view(g.backing), "backing", ("cow",)))
        f = x.file if not isinstance(x, Node) else self.cmds._implicit_files.get(g)
        if f is not None:
            out.append((f, "file", ("format-file", g) if g.format == "qcow2" else ("pass",)))
        return out

    def _filter_job(self, g: Node) -> Any:
        for job in self.cmds.eng.jobs.jobs():
            if getattr(job.driver, "fnode", None) is g and not job.is_completed:
                return job
        return None

    # -- permissions ----------------------------------------------------------
    def _cumulative(self, x: Any) -> tuple[int, int]:
        """What ``x``'s parents take (union) and share (intersection)."""
        key = id(x)
        if key not in self._cum:
            perm, shared = 0, int(_ALL)
            for parent, rule in self._into.get(key, []):
                p, s = self._edge(parent, rule)
                perm, shared = perm | p, shared & s
            self._cum[key] = (perm, shared)
        return self._cum[key]

    def _edge(self, parent: Any, rule: Any) -> tuple[int, int]:
        if rule[0] == "fixed":
            return rule[1], rule[2]
        perm, shared = self._cumulative(parent)
        if rule[0] == "pass":
            return perm, shared
        if rule[0] == "cbw-file":
            return perm, shared & ~(_W | _RS)
        if rule[0] == "cow":
            return perm & _CR, (_W | _RS if shared & _W else 0) | _CR | _WU
        g: Node = rule[1]                    # format-file: qcow2 metadata
        perm |= _CR | (0 if g.read_only else _W | _RS)
        return perm, shared & ~(_W | _RS)
