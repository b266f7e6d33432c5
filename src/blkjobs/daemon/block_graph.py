"""``x-debug-query-block-graph``, as QEMU 7.2's bdrv_get_xdbg_block_graph
builds it: the BlockBackends (type ``block-backend``, unnamed), then the
block jobs (``block-job``, named by their id), then every node
(``block-driver``) in creation order; each entry numbered from 1 when first
met (as an entry or as an edge's child), its edges after it; both lists come
out reversed (QEMU prepends).

**Entries.** BlockBackends, in the order they were made: an NBD export's
(``root`` on the node named, as QEMU attaches it even under a job's filter;
moved onto a job's filter put in later)
and the jobs' own (a mirror's target, a stream's, a commit's). Jobs,
newest first, with QEMU's edges (``main node`` to the job's filter,
``source``, ``target``...). Nodes: the monitor's (file and format nodes), the images a
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

Stream and commit jobs are listed as QEMU lists them: a stream with its
``copy-on-read`` filter (child ``file``), a BlockBackend on it and the edges
``main node``, ``active node``, ``intermediate node``; a commit with its
``commit_top`` filter (child ``backing``, taking nothing), BlockBackends on
the base and the top and the edges ``main node`` (the device),
``intermediate node``, ``base``; an active commit as a mirror into the base
(``main node``, ``source``, ``target``, ``intermediate node``; its filter
takes no consistent read and shares write).
"""
from __future__ import annotations

from typing import Any

from ..engine import BlockJob
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
        for job in self._block_jobs("mirror", "stream", "commit"):
            bbs.extend((seq.get(job, 0), e) for e in self._job_backends(job))
        bbs.sort(key=lambda b: b[0])
        return [(e, "block-backend") for _, e in bbs]

    def _block_jobs(self, *types: str) -> list[Any]:
        return [j for j in self.cmds.eng.jobs.jobs()
                if j.type in types and not j.is_completed
                and j.driver.fnode is not None]

    def _job_backends(self, job: Any) -> list[_Entry]:
        """A job's own BlockBackends, oldest first: a mirror's (an active
        commit's) target; a stream's on its filter; a commit's on its base,
        then on its top. (A base smaller than the top, which QEMU takes
        resize on, is not compared.)"""
        d = job.driver
        if job.type == "stream":
            roots: list[tuple[Node, int, int]] = [(d.fnode, _CR, _CR | _W | _WU)]
        elif job.type == "mirror":
            roots = [(d.dst, _W, _WU)]
        elif d.mirrors_into_base:                # active commit: a mirror into base
            roots = [(d.dst, _W, _CR | _W | _WU)]
        else:
            roots = [(d.base, _CR | _W, _CR | _WU),
                     (d.top, 0, _ALL)]
        return [_Entry("block-backend", "", [(self.view(n), "root", _fixed(p, s))])
                for n, p, s in roots]

    def _jobs(self) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        for job in self._block_jobs("backup", "mirror", "stream", "commit"):  # newest first
            out.append((_Entry("block-job", job.id, self._job_edges(job)), "block-job"))
        return out

    def _job_edges(self, job: Any) -> list[tuple[Any, str, Any]]:
        """A job's edges, newest first, with QEMU's names and permissions
        (block_job_add_bdrv in backup.c, mirror.c, stream.c, commit.c)."""
        d = job.driver
        top = self.view(d.fnode)
        mid = _fixed(0, _W | _WU)          # commit's intermediate nodes
        if job.type == "backup":
            return [(self.view(d.dst), "target", _fixed(0, _ALL)),
                    (top, "main node", _fixed(0, _ALL))]
        if job.type == "stream":
            return [*[(self.view(n), "intermediate node", _fixed(0, _CR | _WU))
                      for n in reversed(d.intermediates)],
                    (self.view(d.top), "active node", _fixed(0, _CR | _W | _WU)),
                    (top, "main node", _fixed(0, _ALL))]
        if job.type == "commit" and not d.mirrors_into_base:
            return [(self.view(d.base), "base", _fixed(0, _ALL)),
                    *[(self.view(n), "intermediate node", mid) for n in reversed(d.nodes)],
                    (self.view(self._root(d.fnode)), "main node", _fixed(0, _ALL))]
        edges = [(self.view(d.dst), "target", _fixed(0, _ALL)),
                 (self.view(d.src), "source", _fixed(0, _CR | _W | _WU)),
                 (top, "main node", _fixed(_CR, _CR | _W | _WU))]
        if job.type == "commit":            # active commit: the nodes above base
            edges[:0] = [(self.view(n), "intermediate node", mid) for n in reversed(d.nodes[1:])]
        return edges

    def _root(self, g: Node) -> Node:
        """The node at the top of ``g``'s graph (a commit's device)."""
        while True:
            up = self.cmds.eng.graph.parents(g)
            if not up:
                return g
            g = up[0]

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
            if owner is not None and owner.type == "commit":
                if owner.driver.mirrors_into_base:      # active commit's mirror_top
                    return [(child, "backing", ("commit-top",))]
                return [(child, "backing", _fixed(0, _ALL))]
            if owner is not None and owner.type == "stream":
                return [(child, "file", ("cor",))]
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
            if isinstance(job.driver, BlockJob) and job.driver.fnode is g \
                    and not job.is_completed:
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
        if rule[0] == "cor":                 # copy-on-read: writes unchanged data
            return perm & (_CR | _W | _RS) | _WU, shared & (_CR | _W | _RS) | _WU
        if rule[0] == "commit-top":          # mirror_top of an active commit
            return perm & ~_CR, shared | _W
        if rule[0] == "cow":
            return perm & _CR, (_W | _RS if shared & _W else 0) | _CR | _WU
        g: Node = rule[1]                    # format-file: qcow2 metadata
        perm |= _CR | (0 if g.read_only else _W | _RS)
        return perm, shared & ~(_W | _RS)
