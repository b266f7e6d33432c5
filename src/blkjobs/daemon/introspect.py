"""``query-qmp-schema``, ``query-commands`` and ``query-version``.

``query-qmp-schema`` answers in QEMU's ``SchemaInfo`` form (qapi/
introspect.json), built from the very tables the daemon checks arguments
with (:data:`.schema.COMMANDS`), plus the return types of the commands and
the events (this module), so it describes exactly what this daemon
implements:

* every command of ``COMMANDS`` (and nothing else), with its argument type
  and return type; ``query-commands`` lists the same names;
* the events blkjobs emits (``JOB_STATUS_CHANGE`` and the ``BLOCK_JOB_*``
  ones);
* as QEMU does: type names other than the built-ins are masked as numbers
  (``"0"`` is the empty object, the arguments of commands without any),
  every integer type is the built-in ``int``, an optional member has
  ``"default": null``, a flat union is an object with ``tag`` and
  ``variants``, enums have both ``members`` and ``values``;
* results list the members blkjobs sends: QEMU's optional members it
  never sends (``encrypted``, ``snapshots``, ``bps_max``...) are left out;
* ``BlockdevOptions`` lists only the variants blkjobs opens (``file``,
  ``raw``, ``qcow2``, ``blkdebug``); its ``driver`` enum keeps every QEMU
  driver name, because the daemon accepts those names and refuses them
  with its own error rather than the schema's.

``query-version`` (see :data:`QEMU_VERSION`): the QEMU release whose QMP
surface is implemented, since management software gates features on those
numbers, and a ``package`` string saying plainly that this is blkjobs and
not QEMU.
"""
from __future__ import annotations

from typing import Any

from .. import __version__
from .schema import (ACTION_DATA, COMMANDS, Alternate, BlockPermission, Enum, Struct,
                     TransactionAction, Union)
from .schema import JobType as _JobType

#: The QEMU release whose QMP surface blkjobs implements (docs/qmp.md is
#: written against QEMU 10.1: ``on-cbw-error``, ``target-is-zero``,
#: ``active``), micro 0.
QEMU_VERSION = {"major": 10, "minor": 1, "micro": 0}


def version() -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION),
            "package": f"blkjobs {__version__} (not QEMU: a block-job daemon implementing "
                       f"a subset of QEMU {QEMU_VERSION['major']}.{QEMU_VERSION['minor']}'s "
                       "QMP)"}


# --------------------------------------------------------------------------
# Return types and events (qapi/block-core.json, job.json, control.json)

JobType = _JobType
JobStatus = Enum("JobStatus", ("undefined", "created", "running", "paused", "ready",
                               "standby", "waiting", "pending", "aborting", "concluded",
                               "null"))
IoStatus = Enum("BlockDeviceIoStatus", ("ok", "failed", "nospace"))
Empty = Struct("", [])

VersionInfo = Struct("VersionInfo", [
    ("qemu", Struct("VersionTriple", [("major", "int"), ("minor", "int"), ("micro", "int")])),
    ("package", "str")])
JobInfo = Struct("JobInfo", [
    ("id", "str"), ("type", JobType), ("status", JobStatus), ("current-progress", "int"),
    ("total-progress", "int"), ("*error", "str")])
BlockJobInfo = Union("BlockJobInfo", Struct("BlockJobInfoBase", [
    ("type", JobType), ("device", "str"), ("len", "int"), ("offset", "int"), ("busy", "bool"),
    ("paused", "bool"), ("speed", "int"), ("io-status", IoStatus), ("ready", "bool"),
    ("status", JobStatus), ("auto-finalize", "bool"), ("auto-dismiss", "bool"),
    ("*error", "str")]), "type", {
    "mirror": Struct("BlockJobInfoMirror", [("actively-synced", "bool")])})

ImageInfoSpecific = Union("ImageInfoSpecific", Struct("ImageInfoSpecificBase", [
    ("type", Enum("ImageInfoSpecificKind", ("qcow2", "vmdk", "luks", "rbd", "file")))]),
    "type", {"qcow2": Struct("ImageInfoSpecificQCow2Wrapper", [
        ("data", Struct("ImageInfoSpecificQCow2", [
            ("compat", "str"), ("*data-file", "str"), ("*data-file-raw", "bool"),
            ("*extended-l2", "bool"), ("*lazy-refcounts", "bool"), ("*corrupt", "bool"),
            ("refcount-bits", "int"),
            ("*bitmaps", [Struct("Qcow2BitmapInfo", [
                ("name", "str"), ("granularity", "uint32"),
                ("flags", [Enum("Qcow2BitmapInfoFlags", ("in-use", "auto"))])])]),
            ("compression-type", Enum("Qcow2CompressionType", ("zlib", "zstd")))]))])})
ImageInfo = Struct("ImageInfo", [
    ("filename", "str"), ("format", "str"), ("*dirty-flag", "bool"), ("*actual-size", "int"),
    ("virtual-size", "int"), ("*cluster-size", "int"), ("*backing-filename", "str"),
    ("*full-backing-filename", "str"), ("*backing-filename-format", "str"),
    ("*format-specific", ImageInfoSpecific)])
ImageInfo.members.insert(-1, ("*backing-image", ImageInfo))
BlockDeviceInfo = Struct("BlockDeviceInfo", [
    ("file", "str"), ("*node-name", "str"), ("ro", "bool"), ("drv", "str"),
    ("*backing_file", "str"), ("backing_file_depth", "int"), ("active", "bool"),
    ("encrypted", "bool"),
    ("detect_zeroes", Enum("BlockdevDetectZeroesOptions", ("off", "on", "unmap"))),
    ("bps", "int"), ("bps_rd", "int"), ("bps_wr", "int"), ("iops", "int"), ("iops_rd", "int"),
    ("iops_wr", "int"), ("image", ImageInfo),
    ("cache", Struct("BlockdevCacheInfo", [("writeback", "bool"), ("direct", "bool"),
                                           ("no-flush", "bool")])),
    ("write_threshold", "int"),
    ("*dirty-bitmaps", [Struct("BlockDirtyInfo", [
        ("*name", "str"), ("count", "int"), ("granularity", "uint32"), ("recording", "bool"),
        ("busy", "bool"), ("persistent", "bool")])])])

SchemaMetaType = Enum("SchemaMetaType", ("builtin", "enum", "array", "object", "alternate",
                                         "command", "event"))
SchemaInfo = Union("SchemaInfo", Struct("SchemaInfoBase", [
    ("name", "str"), ("meta-type", SchemaMetaType), ("*features", ["str"])]), "meta-type", {
    "builtin": Struct("SchemaInfoBuiltin", [("json-type", Enum("JSONType", (
        "string", "number", "int", "boolean", "null", "object", "array", "value")))]),
    "enum": Struct("SchemaInfoEnum", [
        ("members", [Struct("SchemaInfoEnumMember", [("name", "str"),
                                                     ("*features", ["str"])])]),
        ("values", ["str"])]),
    "array": Struct("SchemaInfoArray", [("element-type", "str")]),
    "object": Struct("SchemaInfoObject", [
        ("members", [Struct("SchemaInfoObjectMember", [
            ("name", "str"), ("type", "str"), ("*default", "any"), ("*features", ["str"])])]),
        ("*tag", "str"),
        ("*variants", [Struct("SchemaInfoObjectVariant", [("case", "str"),
                                                          ("type", "str")])])]),
    "alternate": Struct("SchemaInfoAlternate", [
        ("members", [Struct("SchemaInfoAlternateMember", [("type", "str")])])]),
    "command": Struct("SchemaInfoCommand", [("arg-type", "str"), ("ret-type", "str"),
                                            ("*allow-oob", "bool")]),
    "event": Struct("SchemaInfoEvent", [("arg-type", "str")]),
})

#: Command -> return type (absent: ``{}``, the empty object).
RETURNS: dict[str, Any] = {
    "query-version": VersionInfo,
    "query-commands": [Struct("CommandInfo", [("name", "str")])],
    "query-qmp-schema": [SchemaInfo],
    "query-named-block-nodes": [BlockDeviceInfo],
    "query-jobs": [JobInfo],
    "query-block-jobs": [BlockJobInfo],
    "x-debug-block-dirty-bitmap-sha256": Struct("BlockDirtyBitmapSha256", [("sha256", "str")]),
    "x-blkjobs-blkdebug-wait-break": Struct("XBlkjobsBlkdebugSuspended", [
        ("tag", "str"), ("event", "str"), ("node", "str"), ("offset", "int"),
        ("length", "int")]),
}

# --- graph commands (graph_commands.py) ---
GRAPH_RETURNS: dict[str, Any] = {
    "query-block": [Struct("BlockInfo", [
        ("device", "str"), ("*qdev", "str"), ("type", "str"), ("removable", "bool"),
        ("locked", "bool"), ("*inserted", BlockDeviceInfo), ("*tray_open", "bool"),
        ("*io-status", IoStatus)])],
    "x-debug-query-block-graph": Struct("XDbgBlockGraph", [
        ("nodes", [Struct("XDbgBlockGraphNode", [
            ("id", "uint64"), ("type", Enum("XDbgBlockGraphNodeType", (
                "block-backend", "block-job", "block-driver"))), ("name", "str")])]),
        ("edges", [Struct("XDbgBlockGraphEdge", [
            ("parent", "uint64"), ("child", "uint64"), ("name", "str"),
            ("perm", [BlockPermission]), ("shared-perm", [BlockPermission])])])]),
}
RETURNS.update(GRAPH_RETURNS)
GRAPH_EVENTS: dict[str, Struct] = {
    "BLOCK_WRITE_THRESHOLD": Struct("", [("node-name", "str"), ("amount-exceeded", "uint64"),
                                         ("write-threshold", "uint64")]),
}

_JOB_EVENT = [("type", JobType), ("device", "str"), ("len", "int"), ("offset", "int"),
              ("speed", "int")]
# NBD exports (export_commands.py)
RETURNS["query-block-exports"] = [Struct("BlockExportInfo", [
    ("id", "str"), ("type", Enum("BlockExportType", ("nbd", "vhost-user-blk", "fuse",
                                                     "vduse-blk"))),
    ("node-name", "str"), ("shutting-down", "bool")])]

#: The events the daemon emits, with their data.
EVENTS: dict[str, Struct] = {
    "JOB_STATUS_CHANGE": Struct("", [("id", "str"), ("status", JobStatus)]),
    "BLOCK_JOB_COMPLETED": Struct("", _JOB_EVENT + [("*error", "str")]),
    "BLOCK_JOB_CANCELLED": Struct("", _JOB_EVENT),
    "BLOCK_JOB_ERROR": Struct("", [
        ("device", "str"), ("operation", Enum("IoOperationType", ("read", "write"))),
        ("action", Enum("BlockErrorAction", ("ignore", "report", "stop")))]),
    "BLOCK_JOB_READY": Struct("", _JOB_EVENT),
    "BLOCK_JOB_PENDING": Struct("", [("type", JobType), ("id", "str")]),
    **GRAPH_EVENTS,
    "BLOCK_EXPORT_DELETED": Struct("", [("id", "str")]),
}

#: ``transaction``'s actions as QEMU describes them: a union on ``type``
#: whose variants wrap ``data`` (the checker reads ``data`` as ``any`` and
#: checks it per type, with the same :data:`.schema.ACTION_DATA`).
_TXN_ACTION = Union("TransactionAction", Struct("TransactionActionBase", [
    ("type", TransactionAction.base.members[0][1])]), "type", {
    kind: Struct(f"{kind}-wrapper", [("data", data)]) for kind, data in ACTION_DATA.items()})

_BUILTIN = {"str": "string", "any": "value", "bool": "boolean", "int": "int", "null": "null",
            "number": "number"}
_INTS = ("int", "int64", "size", "uint16", "uint32", "uint64")


class _Builder:
    """Names types as QEMU's introspection does (built-ins by name, the
    rest numbered in order of first use) and collects their entries."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.entries: list[dict[str, Any]] = []
        self.builtins: set[str] = set()
        self.arrays: set[str] = set()
        self.pending: list[tuple[str, Any]] = []

    def name(self, typ: Any) -> str:
        if typ is None:
            typ = Empty
        if isinstance(typ, str):
            b = "int" if typ in _INTS else typ
            self.builtins.add(b)
            return b
        if isinstance(typ, list):
            elem = self.name(typ[0])
            n = f"[{elem}]"
            if n not in self.arrays:
                self.arrays.add(n)
                self.pending.append((n, typ))
            return n
        if typ is TransactionAction:
            typ = _TXN_ACTION
        if isinstance(typ, Struct) and not typ.members:
            key = id(Empty)
        else:
            key = id(typ)
        if key not in self.names:
            self.names[key] = str(len(self.names))
            self.pending.append((self.names[key], typ))
        return self.names[key]

    @staticmethod
    def _member(m: str) -> tuple[str, bool]:
        return m.lstrip("*"), m.startswith("*")

    def _members(self, members: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m, t in members:
            name, opt = self._member(m)
            e: dict[str, Any] = {"name": name, "type": self.name(t)}
            if opt:
                e["default"] = None
            out.append(e)
        return out

    def entry(self, name: str, typ: Any) -> dict[str, Any]:
        if isinstance(typ, list):
            return {"name": name, "meta-type": "array", "element-type": self.name(typ[0])}
        if isinstance(typ, Enum):
            return {"name": name, "meta-type": "enum",
                    "members": [{"name": v} for v in typ.values], "values": list(typ.values)}
        if isinstance(typ, Alternate):
            return {"name": name, "meta-type": "alternate",
                    "members": [{"type": self.name(c)} for c in typ.choices]}
        if isinstance(typ, Union):
            return {"name": name, "meta-type": "object",
                    "members": self._members(typ.base.members), "tag": typ.discriminator,
                    "variants": [{"case": c, "type": self.name(v)}
                                 for c, v in typ.variants.items()]}
        assert isinstance(typ, Struct), typ
        return {"name": name, "meta-type": "object", "members": self._members(typ.members)}

    def drain(self) -> None:
        while self.pending:
            name, typ = self.pending.pop(0)
            self.entries.append(self.entry(name, typ))


def schema_info() -> list[dict[str, Any]]:
    """The ``query-qmp-schema`` answer (see the module docstring)."""
    b = _Builder()
    b.name(Empty)       # "0", as in QEMU
    top: list[dict[str, Any]] = []
    for cmd, arg in COMMANDS.items():
        top.append({"name": cmd, "meta-type": "command", "arg-type": b.name(arg),
                    "ret-type": b.name(RETURNS.get(cmd, Empty))})
    for ev, arg in EVENTS.items():
        top.append({"name": ev, "meta-type": "event", "arg-type": b.name(arg)})
    b.drain()
    builtins = [{"name": n, "meta-type": "builtin", "json-type": _BUILTIN[n]}
                for n in _BUILTIN if n in b.builtins]
    return top + b.entries + builtins


class IntrospectCommands:
    """Mixed into Commands: the session queries."""

    def cmd_query_version(self) -> dict[str, Any]:
        return version()

    def cmd_query_commands(self) -> list[dict[str, str]]:
        return [{"name": n} for n in COMMANDS]

    def cmd_query_qmp_schema(self) -> list[dict[str, Any]]:
        return schema_info()
