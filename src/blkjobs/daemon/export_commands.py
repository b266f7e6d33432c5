"""NBD exports over QMP: ``nbd-server-start``/``stop``, ``block-export-add``/
``del``, ``query-block-exports``, ``nbd-server-add``/``remove``, and the
``tls-creds-x509`` objects (``object-add``/``object-del``) TLS needs.

The protocol is :mod:`blkjobs.nbd`; this mixin serves a node through a
graph front end (:class:`NodeBackend`): an NBD client's writes take the
guest path, so a backup copies before they land, a mirror tracks them (and
its pivot moves the export to the target), the node's bitmaps are dirtied.
The export attaches above the node's job filters, as a device would.

The NBD server has its own threads (one per client, see
:mod:`blkjobs.nbd.server`); the handlers call it directly.
``BLOCK_EXPORT_DELETED`` is emitted once an export is gone: at once
without clients, else when its last client left.
"""
from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from typing import Any

from ..formats.raw import Raw
from ..graph import Node
from ..graph.frontend import Frontend
from ..graph.perm import add_zero_copy_reader, drop_zero_copy_reader
from ..nbd import proto as P
from ..nbd.proto import NBDRequestError
from ..nbd.server import Export, NBDServer
from .protocol import QMPError


class NodeBackend:
    """An NBD :class:`~blkjobs.nbd.server.Backend` over a graph front end."""

    def __init__(self, io: Any, fe: Frontend, bitmaps: dict[str, Any], unmap: bool = False,
                 detect_zeroes: Callable[[], str] = lambda: "off"):
        self.io = io
        self.fe = fe
        self.bitmaps = bitmaps          # name -> DirtyBitmap
        #: the node's ``discard=unmap``: else a TRIM does nothing (QEMU's
        #: default ``discard=ignore``; qemu-nbd's ``--discard``)
        self.unmap = unmap
        #: the node's ``detect-zeroes`` now (blockdev-reopen may change it)
        self.detect_zeroes = detect_zeroes

    @property
    def size(self) -> int:
        """The node's length as QEMU's block layer gives it (a qcow2 image
        whose header's size is not a whole number of sectors ends at the
        last whole one: the driver's size, Qcow2.size; qemu-nbd exports a
        1600-byte qcow2 as 1536 bytes). The export rounds the rest up
        (nbd.server.Export.size). A raw file's node is rounded up too
        (Raw.size: a 1000-byte file is 1024); the export serves its data
        up to the end of the file and pads the rest itself (reads as
        zeroes, block status ``hole,zero``) until a write grows the file
        (:meth:`write`). A raw file's node without filters above it: the
        file's length, one ``fstat`` (the node's size is that rounded up,
        never less: the minimum is the length; asked per GO and per batch
        of requests: two ``fstat`` calls each were seven of a one-read session's
        nine)."""
        drv = self.fe.node.driver
        if type(drv) is Raw:
            flen: int = drv.file_length
            return flen
        size: int = self.fe.size
        length = self._file_length()
        if length is not None:
            size = min(size, length)
        return size

    def _file_length(self) -> int | None:
        """A raw file's length (None: not a raw file's node)."""
        length: int | None = self.fe.node.below_filters().driver.file_length
        return length     # (Raw's alone: the Driver contract's default is None)

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.fe.readinto(offset, buf)

    def plan_reads(self, reqs: list[tuple[int, int]]) -> list[Any]:
        """The C data path's reads (:mod:`blkjobs.nbd.fastpath`): mapped
        to file segments and tracked as ``readinto``'s are."""
        return self.io.guest_read_segments(self.fe, reqs)

    def end_reads(self, tokens: list[Any]) -> None:
        self.io.guest_read_end(tokens)

    def zero_copy(self, reader: Any) -> bool:
        """The reads planned from now on may be sent zero-copy by
        ``reader`` (:mod:`blkjobs.nbd.fastpath`): the node's chain cannot
        change meanwhile, and a grant that could change it stops
        ``reader`` first (:func:`blkjobs.graph.perm.add_zero_copy_reader`:
        every image node of the chain, under the I/O lock -- the chain does
        not change meanwhile)."""
        with self.io.lock:
            if self.fe.closed:
                return False
            return add_zero_copy_reader(
                [n for n in self.fe.node.below_filters().chain() if not n.is_filter], reader)

    @staticmethod
    def drop_zero_copy(node: Any, reader: Any) -> None:
        """``reader`` sends nothing zero-copy from ``node`` any more."""
        drop_zero_copy_reader(node, reader)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        """A write; into the padding past the end of a raw file it grows
        the file to the write's end, as qemu-nbd 7.2 does (QEMU's file
        driver writes there: a 1000-byte file written at 1010-1014 is 1014
        bytes after, the bytes between zeroes; tests/test_nbd_unaligned.py).
        Past the end of another node (only one whose size is no whole
        number of sectors has any padding) zeroes are accepted and dropped,
        data refused (ENOSPC)."""
        n = len(data)
        dz = self.detect_zeroes()
        if dz != "off" and _all_zero(data):
            # QEMU's detect-zeroes: a zero write, unmapping only with
            # detect-zeroes=unmap on a discard=unmap node
            self._zeroes(offset, n, may_unmap=dz == "unmap" and self.unmap)
        else:
            inside = self._inside(offset, n)
            if inside < n and any(memoryview(data)[inside:]):
                raise NBDRequestError(P.ENOSPC, "cannot write data past the end of the "
                                                "image")
            if inside:
                self.fe.write(offset, data if inside == n else memoryview(data)[:inside])
        if fua:
            self.fe.flush()

    def _inside(self, offset: int, length: int) -> int:
        """How much of ``length`` bytes from ``offset`` the node can take:
        a raw file's node all (writes grow the file), another node up to
        its size."""
        return max(0, min(length, self.fe.size - offset))

    def _zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zeroes; the part past the end of a raw file grows it unless it
        may be unmapped, as QEMU's file driver does (ZERO_RANGE past the
        end extends the file; a punched hole keeps its size)."""
        end = offset + self._inside(offset, length)
        flen = self._file_length()
        if flen is None or end <= flen or may_unmap:
            if end > offset:    # (Raw.write_zeroes stops at the end of the file)
                self.fe.write_zeroes(offset, end - offset, may_unmap=may_unmap)
            return
        if flen > offset:
            self.fe.write_zeroes(offset, flen - offset, may_unmap=False)
        start = max(offset, flen)
        self.fe.write(start, bytes(end - start))

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool,
                     fast: bool) -> None:
        self._zeroes(offset, length, may_unmap=may_trim)
        if fua:
            self.fe.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        n = self._inside(offset, length)
        if self.unmap and n:    # (a raw file's hole keeps its length)
            self.fe.discard(offset, n)
        if fua:
            self.fe.flush()

    def flush(self) -> None:
        self.fe.flush()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        with self.io:
            runs = self.fe.node.block_status(offset, length)
        return [(r["length"], (0 if r["data"] else P.STATE_HOLE)
                 | (P.STATE_ZERO if r["zero"] else 0)) for r in runs]

    def bitmap_status(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        bm = self.bitmaps.get(name)
        if bm is None:
            raise NBDRequestError(P.EINVAL, f"no bitmap '{name}'")
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        with self.io:
            for start, n in bm.bitmap.areas(offset, length):
                s, e = max(start, offset), min(start + n, end)
                if e <= s:
                    continue
                if s > pos:
                    out.append((s - pos, 0))
                out.append((e - s, P.STATE_DIRTY))
                pos = e
        if pos < end:
            out.append((end - pos, 0))
        return out


def _all_zero(data: bytes | bytearray | memoryview) -> bool:
    b = data if isinstance(data, (bytes, bytearray)) else data.tobytes()
    return b.count(0) == len(b)


class BlockExport:
    """A ``block-export-add``: the NBD export and what it holds."""

    def __init__(self, id: str, node: Node, exp: Export, fe: Frontend, busy: list[Any]):
        self.id = id
        self.node = node
        self.exp = exp
        self.fe = fe
        self.busy_bitmaps = busy


def _tls_context(obj: dict[str, Any]) -> ssl.SSLContext:
    """QEMU's tls-creds-x509 directory layout: ca-cert.pem, server-cert.pem,
    server-key.pem; verify-peer (default on) asks for a client certificate
    signed by the CA."""
    d = obj.get("dir", "")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    files = {k: os.path.join(d, f"{k}.pem") for k in ("ca-cert", "server-cert", "server-key")}
    for path in files.values():
        if not os.access(path, os.R_OK):
            raise QMPError(f"Unable to access credentials {path}: No such file or directory")
    try:
        ctx.load_verify_locations(files["ca-cert"])
        ctx.load_cert_chain(files["server-cert"], files["server-key"])
    except (ssl.SSLError, OSError) as e:
        raise QMPError(f"Unable to load credentials in {d}: {e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if obj.get("verify-peer", True) else ssl.CERT_NONE
    return ctx


class ExportCommands:
    """Mixin of :class:`~.commands.Commands` (see the module docstring)."""

    eng: Any
    _nbd: NBDServer | None = None
    _nbd_paths: list[str]
    _exports: dict[str, BlockExport]
    _objects: dict[str, dict[str, Any]]

    _lookup: Callable[[str], Node]                  # Commands'
    _note_backend: Callable[[Any], None]            # GraphCommands'
    nodes: dict[str, Any]                           # Commands' monitor nodes

    def _export_state(self) -> None:
        if not hasattr(self, "_exports"):
            self._exports, self._objects, self._nbd_paths = {}, {}, []

    # -- objects ---------------------------------------------------------------
    def cmd_object_add(self, **args: Any) -> dict[str, Any]:
        self._export_state()
        oid = args["id"]
        if oid in self._objects:
            raise QMPError(f"attempt to add duplicate property '{oid}' to object "
                           "(type 'container')")
        if args["qom-type"] != "tls-creds-x509":
            raise QMPError(f"blkjobs does not support objects of type '{args['qom-type']}'")
        obj = {k: v for k, v in args.items()}
        obj.setdefault("endpoint", "client")
        if obj["endpoint"] == "server":
            obj["ssl"] = _tls_context(obj)
        else:       # kept for QEMU's checks only: blkjobs has no NBD client here
            ca = os.path.join(obj.get("dir", ""), "ca-cert.pem")
            if not os.access(ca, os.R_OK):
                raise QMPError(f"Unable to access credentials {ca}: No such file or directory")
        self._objects[oid] = obj
        return {}

    def cmd_object_del(self, id: str) -> dict[str, Any]:
        self._export_state()
        if id not in self._objects:
            raise QMPError(f"object '{id}' not found")
        # a running server keeps the SSL context it started with (QEMU: a reference)
        del self._objects[id]
        return {}

    # -- the server -------------------------------------------------------------
    def cmd_nbd_server_start(self, addr: dict[str, Any], **args: Any) -> dict[str, Any]:
        self._export_state()
        if self._nbd is not None:
            raise QMPError("NBD server already running")
        tls = None
        tls_id = args.get("tls-creds")
        if tls_id is not None:
            obj = self._objects.get(tls_id)
            if obj is None:
                raise QMPError(f"No TLS credentials with id '{tls_id}'")
            if obj["endpoint"] != "server":
                raise QMPError("Expecting TLS credentials with a server endpoint")
            tls = obj["ssl"]
        if args.get("tls-authz") is not None:
            raise QMPError("blkjobs does not support 'tls-authz'")
        kind, data = addr["type"], addr["data"]
        if kind not in ("unix", "inet"):
            raise QMPError(f"blkjobs does not support NBD addresses of type '{kind}'")
        srv = NBDServer(tls, args.get("max-connections", 0),
                        handshake_timeout=float(args.get("handshake-max-seconds", 10)))
        try:
            self._listen(srv, kind, data)
        except OSError as e:
            srv.close()
            where = data.get("path") or f"{data.get('host')}:{data.get('port')}"
            raise QMPError(f"Failed to bind socket to {where}: {e.strerror or e}") from None
        self._nbd = srv
        return {}

    def _listen(self, srv: NBDServer, kind: str, data: dict[str, Any]) -> None:
        if kind == "unix":
            if data.get("abstract"):
                raise OSError(0, "abstract sockets are not supported")
            srv.listen_unix(data["path"])
            self._nbd_paths.append(data["path"])
        else:
            port = data["port"]
            if not str(port).isdigit():
                raise OSError(0, f"invalid port '{port}'")
            srv.listen_tcp(data["host"], int(port))

    def nbd_port(self) -> int | None:
        """The TCP port the NBD server listens on (for port 0)."""
        srv = getattr(self, "_nbd", None)
        ports = srv.ports() if srv is not None else []
        return ports[0] if ports else None

    def cmd_nbd_server_stop(self) -> dict[str, Any]:
        self._export_state()
        if self._nbd is None:
            raise QMPError("NBD server not running")
        for be in list(self._exports.values()):
            if be.exp.on_gone is not None:      # still served by this server
                self._remove_export(be, hard=True)
        self._stop_server()
        return {}

    def _stop_server(self) -> None:
        srv, self._nbd = self._nbd, None
        if srv is not None:
            srv.close()
        for path in self._nbd_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._nbd_paths.clear()

    async def close_exports(self) -> None:
        """The daemon stops: drop the clients, release the front ends."""
        await asyncio.to_thread(self._close_exports)

    def _close_exports(self) -> None:
        self._export_state()
        srv = self._nbd
        if srv is not None:
            for be in list(self._exports.values()):
                srv.remove_export(be.exp, hard=True)
        self._stop_server()

    # -- exports -----------------------------------------------------------------
    def cmd_block_export_add(self, **args: Any) -> dict[str, Any]:
        self._export_state()
        if args["type"] != "nbd":
            raise QMPError(f"blkjobs does not support exports of type '{args['type']}'")
        eid = args["id"]
        if eid in self._exports:
            raise QMPError(f"Block export id '{eid}' is already in use")
        node_name = args["node-name"]
        if node_name not in self.eng.graph.nodes:      # QEMU's bdrv_lookup_bs(NULL, ...)
            raise QMPError(f"Cannot find device='' nor node-name='{node_name}'")
        node = self._lookup(node_name)
        if self._nbd is None:
            raise QMPError("NBD server not running")
        for key in ("iothread", "fixed-iothread", "writethrough", "allocation-depth"):
            if args.get(key):
                raise QMPError(f"blkjobs does not support '{key}' for NBD exports")
        name = args.get("name", args["node-name"])
        if len(name) > P.MAX_STRING:
            raise QMPError(f"export name '{name}' too long")
        desc = args.get("description", "")
        if len(desc) > P.MAX_STRING:
            raise QMPError(f"description '{desc}' too long")
        if name in self._nbd.exports:
            raise QMPError(f"NBD server already has export named '{name}'")
        writable = bool(args.get("writable", False))
        self._add_export(eid, node, name, desc, writable, args.get("bitmaps", []))
        return {}

    def _find_bitmaps(self, node: Node, refs: list[Any], writable: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ref in refs:
            if isinstance(ref, str):
                bm = None
                for n in node.below_filters().chain():
                    bm = self.eng.io.bitmaps_of(n).get(ref)
                    if bm is not None:
                        break
                if bm is None:
                    raise QMPError(f"Bitmap '{ref}' is not found")
            else:
                g = self._lookup(ref["node"])
                bm = self.eng.io.bitmaps_of(g).get(ref["name"])
                if bm is None:
                    raise QMPError(f"Bitmap '{ref['name']}' is not found")
            if bm.busy:
                raise QMPError(f"Bitmap '{bm.name}' is currently in use by another operation "
                               "and cannot be used")
            if not writable and not node.read_only and bm.enabled:
                raise QMPError(f"Enabled bitmap '{bm.name}' incompatible with readonly export")
            if bm.name in out:
                raise QMPError(f"Bitmap '{bm.name}' is specified twice")
            out[bm.name] = bm
        return out

    def _add_export(self, eid: str, node: Node, name: str, desc: str, writable: bool,
                    bitmap_refs: list[Any]) -> None:
        assert self._nbd is not None
        io = self.eng.io
        with io:
            if writable and node.read_only:
                raise QMPError("Block node is read-only")
            if writable:
                self._check_cbw_conflict(node)
            bms = self._find_bitmaps(node, bitmap_refs, writable)
            fe = io.attach(io.above_filters(node), writable=writable)
            for bm in bms.values():
                bm.busy = True
        # max-connections=1: no multi-conn either (QEMU's rule)
        backend = NodeBackend(io, fe, bms, self._discard_unmap(node),
                              lambda: self._detect_zeroes(fe.node))
        exp = Export(name, backend, writable, desc, tuple(bms),
                     multi_conn=self._nbd.max_connections != 1)
        be = BlockExport(eid, node, exp, fe, list(bms.values()))
        exp.on_gone = lambda _e: self._export_gone(be)
        self._exports[eid] = be
        self._note_backend(be)              # its BlockBackend (graph_commands.py)
        self._nbd.add_export(exp)

    def _check_cbw_conflict(self, node: Node) -> None:
        """QEMU attaches an export's BlockBackend to the node named, under a
        running backup's copy-before-write filter, which shares no write on
        it: a writable export there is a permission conflict."""
        for job in self.eng.jobs.jobs():
            f = job.driver.fnode if job.type == "backup" else None
            if f is not None and not job.is_completed and job.driver.src is node:
                raise QMPError(f"Permission conflict on node '{node.name}': permissions "
                               "'write' are both required by an unnamed block device (uses "
                               f"node '{node.name}' as 'root' child) and unshared by node "
                               f"'{f.name}' (uses node '{node.name}' as 'file' child).")

    def _discard_unmap(self, node: Node) -> bool:
        """The exported node's blockdev-add ``discard=unmap`` (a job's
        filter: the node's below it)."""
        for n in (node, node.below_filters()):
            mn = self.nodes.get(n.name)
            if mn is not None:
                return bool(mn.unmap)
        return False

    def _detect_zeroes(self, node: Node) -> str:
        """The exported node's ``detect-zeroes`` (as ``_discard_unmap``)."""
        for n in (node, node.below_filters()):
            mn = self.nodes.get(n.name)
            if mn is not None:
                return str(mn.detect_zeroes)
        return "off"

    def _export_gone(self, be: BlockExport) -> None:
        """The export's last client left after its removal (in the thread
        that saw it go: a client's, or the command worker)."""
        self._exports.pop(be.id, None)
        with self.eng.io:
            for bm in be.busy_bitmaps:
                bm.busy = False
        be.fe.close()
        jobs = self.eng.jobs
        with jobs.lock:
            jobs._emit("BLOCK_EXPORT_DELETED", {"id": be.id})

    def _remove_export(self, be: BlockExport, hard: bool) -> None:
        if self._nbd is not None:
            self._nbd.remove_export(be.exp, hard)

    def cmd_block_export_del(self, id: str, mode: str = "safe") -> dict[str, Any]:
        self._export_state()
        be = self._exports.get(id)
        if be is None:
            raise QMPError(f"Export '{id}' is not found")
        if be.exp.shutting_down:
            raise QMPError(f"Export '{id}' is already shutting down")
        if mode == "safe" and be.exp.clients and self._nbd is not None:
            self._nbd.settle(be.exp)        # clients that already hung up leave first
        if mode == "safe" and be.exp.clients:
            raise QMPError(f"export '{id}' still in use")
        self._remove_export(be, hard=mode == "hard")
        return {}

    def cmd_query_block_exports(self) -> list[dict[str, Any]]:
        self._export_state()
        # newest first, as QEMU lists them; the node the export uses now (a
        # job's filter above it, a mirror's target after the pivot)
        return [{"type": "nbd", "id": be.id, "node-name": be.fe.node.name,
                 "shutting-down": be.exp.shutting_down}
                for be in reversed(list(self._exports.values()))]

    def _check_export_users(self, g: Node) -> None:
        """``blockdev-del`` of an exported node: the export's BlockBackend
        holds it in QEMU (``Node x is in use``)."""
        for be in list(getattr(self, "_exports", {}).values()):
            if g is be.fe.node or g is be.fe.node.below_filters():
                raise QMPError(f"Node {g.name} is in use")

    # -- the legacy spellings ----------------------------------------------------------
    def cmd_nbd_server_add(self, device: str, **args: Any) -> dict[str, Any]:
        self._export_state()
        self._lookup(device)
        if self._nbd is None:
            raise QMPError("NBD server not running")
        name = args.get("name", device)
        opts: dict[str, Any] = {"type": "nbd", "id": name, "node-name": device, "name": name,
                                "writable": args.get("writable", False)}
        if "description" in args:
            opts["description"] = args["description"]
        if "bitmap" in args:
            opts["bitmaps"] = [args["bitmap"]]
        return self.cmd_block_export_add(**opts)

    def cmd_nbd_server_remove(self, name: str, mode: str = "safe") -> dict[str, Any]:
        self._export_state()
        for be in list(self._exports.values()):
            if be.exp.name == name and not be.exp.shutting_down:
                return self.cmd_block_export_del(be.id, mode)
        raise QMPError(f"Export '{name}' is not found")

