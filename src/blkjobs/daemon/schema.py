"""Argument checking for every command, with QEMU's visitor messages.

The schema is data written in QAPI's own notation: a struct is a list of
``(name, type)`` pairs, ``'*name'`` marks an optional member, a type is a
built-in name (``str``, ``int``, ``bool``, ``size``, ``uint32``, ``any``), an
:class:`Enum`, a :class:`Struct`, a :class:`Union` (flat, with a
discriminator), an :class:`Alternate` or a one-element list (``[T]``).

:func:`check` walks a value the way ``qapi/qobject-input-visitor.c`` does,
so the first error is the one QEMU reports, with the same text:

* members in declaration order: ``Parameter '<name>' is missing``, then
  ``Invalid parameter type for '<name>', expected: <json type>``;
* after the members, ``Parameter '<name>' is unexpected`` for the rest;
* a bad enum value: ``Parameter '<name>' does not accept value '<v>'``.

Names are full paths (``file.filename``, ``actions[0].type``) except in the
enum message, where QEMU prints the member's own name (``'null'`` for a list
element); this is QEMU's behaviour, kept on purpose.

Defaults are not filled in here: handlers use ``args.get(name, default)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .protocol import QMPError

INT64 = (-(1 << 63), (1 << 63) - 1)
_RANGES = {"int": INT64, "int64": INT64, "size": (0, (1 << 64) - 1),
           "uint16": (0, (1 << 16) - 1),
           "uint32": (0, (1 << 32) - 1), "uint64": (0, (1 << 64) - 1)}
_RANGE_NAMES = {"uint16": "uint16_t", "uint32": "uint32_t"}
_UINT64 = ("size", "uint64")


@dataclass
class Enum:
    name: str
    values: tuple[str, ...]


@dataclass
class Struct:
    name: str
    members: list[tuple[str, Any]]

    def names(self) -> set[str]:
        return {m.lstrip("*") for m, _ in self.members}


@dataclass
class Union:
    """A flat union: ``base`` members (one of them the discriminator), then
    the members of the variant the discriminator selects."""

    name: str
    base: Struct
    discriminator: str
    variants: dict[str, Struct] = field(default_factory=dict)


@dataclass
class Alternate:
    """One of several types, chosen by the JSON type of the value."""

    name: str
    choices: list[Any]


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    return "null"


def _bad_type(path: str, expected: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{path or 'null'}', expected: {expected}")


def check(value: Any, typ: Any, path: str = "", name: str | None = None) -> None:
    """Raise :class:`QMPError` at the first violation (see module docstring)."""
    if isinstance(typ, list):
        if not isinstance(value, list):
            raise _bad_type(path, "array")
        for i, v in enumerate(value):
            check(v, typ[0], f"{path}[{i}]", None)
        return
    if isinstance(typ, Struct):
        if not isinstance(value, dict):
            raise _bad_type(path, "object")
        _check_members(value, typ.members, path)
        _check_unexpected(value, typ.names(), path)
        return
    if isinstance(typ, Union):
        if not isinstance(value, dict):
            raise _bad_type(path, "object")
        _check_members(value, typ.base.members, path)
        variant = typ.variants.get(value[typ.discriminator])
        names = typ.base.names()
        if variant is not None:
            _check_members(value, variant.members, path)
            names |= variant.names()
        _check_unexpected(value, names, path)
        return
    if isinstance(typ, Alternate):
        kind = _json_kind(value)
        for choice in typ.choices:
            if _accepts(choice, kind):
                check(value, choice, path, name)
                return
        raise _bad_type(path, typ.name)
    if isinstance(typ, Enum):
        if not isinstance(value, str):
            raise _bad_type(path, "string")
        if value not in typ.values:
            raise QMPError(f"Parameter '{name if name is not None else 'null'}' does not "
                           f"accept value '{value}'")
        return
    if typ == "any":
        return
    if typ == "str":
        if not isinstance(value, str):
            raise _bad_type(path, "string")
        return
    if typ == "bool":
        if not isinstance(value, bool):
            raise _bad_type(path, "boolean")
        return
    if typ == "null":
        if value is not None:
            raise _bad_type(path, "null")
        return
    if typ in _UINT64:
        # QEMU's qobject_input_type_uint64: a negative int64 is taken modulo
        # 2**64 (by _check_members), anything else out of range is refused
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad_type(path, "integer")
        if isinstance(value, float) or not INT64[0] <= value < 1 << 64:
            raise QMPError(f"Parameter '{path or 'null'}' expects uint64")
        return
    if typ in _RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad_type(path, "integer")
        lo, hi = _RANGES[typ]
        if not lo <= value <= hi:
            raise QMPError(f"Parameter '{name or 'null'}' expects "
                           f"{_RANGE_NAMES.get(typ, typ)}")
        return
    raise AssertionError(f"unknown schema type {typ!r}")


def _accepts(typ: Any, kind: str) -> bool:
    if isinstance(typ, (Struct, Union)):
        return kind == "object"
    if isinstance(typ, list):
        return kind == "array"
    if isinstance(typ, Enum) or typ == "str":
        return kind == "string"
    if typ == "null":
        return kind == "null"
    if typ == "bool":
        return kind == "boolean"
    if typ in _RANGES:
        return kind == "integer"
    return True


def _check_members(value: dict, members: list[tuple[str, Any]], path: str) -> None:
    for m, typ in members:
        opt = m.startswith("*")
        key = m.lstrip("*")
        sub = f"{path}.{key}" if path else key
        if key not in value:
            if not opt:
                raise QMPError(f"Parameter '{sub}' is missing")
            continue
        check(value[key], typ, sub, key)
        if typ in _UINT64 and value[key] < 0:
            value[key] += 1 << 64


def _check_unexpected(value: dict, names: set[str], path: str) -> None:
    for key in value:
        if key not in names:
            raise QMPError(f"Parameter '{f'{path}.{key}' if path else key}' is unexpected")


# --------------------------------------------------------------------------
# Types (qapi/block-core.json, job.json, transaction.json, control.json)

OnError = Enum("BlockdevOnError", ("report", "ignore", "enospc", "stop", "auto"))
SyncMode = Enum("MirrorSyncMode", ("top", "full", "none", "incremental", "bitmap"))
BitmapSyncMode = Enum("BitmapSyncMode", ("on-success", "never", "always"))
CopyMode = Enum("MirrorCopyMode", ("background", "write-blocking"))
OnCbwError = Enum("OnCbwError", ("break-guest-write", "break-snapshot"))
JobType = Enum("JobType", ("commit", "stream", "mirror", "backup", "create", "amend",
                           "snapshot-load", "snapshot-save", "snapshot-delete"))
Capability = Enum("QMPCapability", ("oob",))
CompletionMode = Enum("ActionCompletionMode", ("individual", "grouped"))
#: The drivers blkjobs opens; other QEMU drivers are valid names that the
#: handler refuses (see commands.py).
BlockdevDriver = Enum("BlockdevDriver", (
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "io_uring", "iscsi", "luks",
    "nbd", "nfs", "null-aio", "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate",
    "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi",
    "vhdx", "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk",
    "vpc", "vvfat"))

BlockdevCacheOptions = Struct("BlockdevCacheOptions", [("*direct", "bool"),
                                                       ("*no-flush", "bool")])
BlockdevOptions = Union("BlockdevOptions", Struct("BlockdevOptionsBase", [
    ("driver", BlockdevDriver), ("*node-name", "str"),
    ("*discard", Enum("BlockdevDiscardOptions", ("ignore", "unmap"))),
    ("*cache", BlockdevCacheOptions), ("*read-only", "bool"), ("*auto-read-only", "bool"),
    ("*force-share", "bool"),
    ("*detect-zeroes", Enum("BlockdevDetectZeroesOptions", ("off", "on", "unmap"))),
    ("*active", "bool")]), "driver")
BlockdevRef = Alternate("BlockdevRef", [BlockdevOptions, "str"])
BlockdevRefOrNull = Alternate("BlockdevRefOrNull", [BlockdevOptions, "str", "null"])
_OverlapMode = Enum("Qcow2OverlapCheckMode", ("none", "constant", "cached", "all"))
Qcow2OverlapChecks = Alternate("Qcow2OverlapChecks", [
    Struct("Qcow2OverlapCheckFlags", [("*template", _OverlapMode)] + [
        (f"*{k}", "bool") for k in (
            "main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
            "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory")]),
    _OverlapMode])
_KeySecret = [("*key-secret", "str")]
BlockdevQcow2Encryption = Union("BlockdevQcow2Encryption", Struct("", [
    ("format", Enum("BlockdevQcow2EncryptionFormat", ("aes", "luks")))]), "format", {
    "aes": Struct("QCryptoBlockOptionsQCow", _KeySecret),
    "luks": Struct("QCryptoBlockOptionsLUKS", _KeySecret)})
BlockdevOptions.variants.update({
    "file": Struct("BlockdevOptionsFile", [
        ("filename", "str"), ("*pr-manager", "str"),
        ("*locking", Enum("OnOffAuto", ("auto", "on", "off"))),
        ("*aio", Enum("BlockdevAioOptions", ("threads", "native", "io_uring"))),
        ("*aio-max-batch", "int"), ("*drop-cache", "bool"),
        ("*x-check-cache-dropped", "bool")]),
    "raw": Struct("BlockdevOptionsRaw", [("file", BlockdevRef), ("*offset", "int"),
                                         ("*size", "int")]),
    "qcow2": Struct("BlockdevOptionsQcow2", [
        ("file", BlockdevRef), ("*backing", BlockdevRefOrNull), ("*lazy-refcounts", "bool"),
        ("*pass-discard-request", "bool"), ("*pass-discard-snapshot", "bool"),
        ("*pass-discard-other", "bool"), ("*discard-no-unref", "bool"),
        ("*overlap-check", Qcow2OverlapChecks), ("*cache-size", "int"),
        ("*l2-cache-size", "int"), ("*l2-cache-entry-size", "int"),
        ("*refcount-cache-size", "int"), ("*cache-clean-interval", "int"),
        ("*encrypt", BlockdevQcow2Encryption),
        ("*data-file", BlockdevRef)]),
})

_InetSocketAddress = Struct("InetSocketAddress", [
    ("host", "str"), ("port", "str"), ("*numeric", "bool"), ("*to", "int"),
    ("*ipv4", "bool"), ("*ipv6", "bool"), ("*keep-alive", "bool"), ("*mptcp", "bool")])
SocketAddress = Union("SocketAddress", Struct("SocketAddressBase", [
    ("type", Enum("SocketAddressType", ("inet", "unix", "vsock", "fd")))]), "type", {
    "inet": _InetSocketAddress,
    "unix": Struct("UnixSocketAddress", [("path", "str"), ("*abstract", "bool"),
                                         ("*tight", "bool")]),
    "vsock": Struct("VsockSocketAddress", [("cid", "str"), ("port", "str")]),
    "fd": Struct("FdSocketAddress", [("str", "str")])})
BlockdevOptions.variants["nbd"] = Struct("BlockdevOptionsNbd", [
    ("server", SocketAddress), ("*export", "str"), ("*tls-creds", "str"),
    ("*tls-hostname", "str"), ("*x-dirty-bitmap", "str"), ("*reconnect-delay", "int"),
    ("*open-timeout", "int")])

BlkdebugEvent = Enum("BlkdebugEvent", (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none"))
BlkdebugIOType = Enum("BlkdebugIOType", ("read", "write", "write-zeroes", "discard", "flush",
                                         "block-status"))
BlockPermission = Enum("BlockPermission", ("consistent-read", "write", "write-unchanged",
                                           "resize"))
BlockdevOptions.variants["blkdebug"] = Struct("BlockdevOptionsBlkdebug", [
    ("image", BlockdevRef), ("*config", "str"), ("*align", "int"), ("*max-transfer", "int"),
    ("*opt-write-zero", "int"), ("*max-write-zero", "int"), ("*opt-discard", "int"),
    ("*max-discard", "int"),
    ("*inject-error", [Struct("BlkdebugInjectErrorOptions", [
        ("event", BlkdebugEvent), ("*state", "int"), ("*iotype", BlkdebugIOType),
        ("*errno", "int"), ("*sector", "int"), ("*once", "bool"), ("*immediately", "bool")])]),
    ("*set-state", [Struct("BlkdebugSetStateOptions", [
        ("event", BlkdebugEvent), ("*state", "int"), ("new_state", "int")])]),
    ("*take-child-perms", [BlockPermission]), ("*unshare-child-perms", [BlockPermission])])

_JOB_COMMON = [("*speed", "int"), ("*auto-finalize", "bool"), ("*auto-dismiss", "bool"),
               ("*filter-node-name", "str")]

BlockdevBackup = Struct("BlockdevBackup", [
    ("*job-id", "str"), ("device", "str"), ("sync", SyncMode), ("*speed", "int"),
    ("*bitmap", "str"), ("*bitmap-mode", BitmapSyncMode), ("*compress", "bool"),
    ("*on-source-error", OnError), ("*on-target-error", OnError),
    ("*on-cbw-error", OnCbwError), ("*auto-finalize", "bool"), ("*auto-dismiss", "bool"),
    ("*filter-node-name", "str"), ("*discard-source", "bool"),
    ("*x-perf", Struct("BackupPerf", [("*use-copy-range", "bool"), ("*max-workers", "int"),
                                      ("*max-chunk", "int64"),
                                      ("*min-cluster-size", "size")])),
    ("target", "str")])

BlockDirtyBitmap = Struct("BlockDirtyBitmap", [("node", "str"), ("name", "str")])
BlockDirtyBitmapAdd = Struct("BlockDirtyBitmapAdd", [
    ("node", "str"), ("name", "str"), ("*granularity", "uint32"), ("*persistent", "bool"),
    ("*disabled", "bool")])
BlockDirtyBitmapMerge = Struct("BlockDirtyBitmapMerge", [
    ("node", "str"), ("target", "str"),
    ("bitmaps", [Alternate("BlockDirtyBitmapOrStr", ["str", BlockDirtyBitmap])])])

TransactionAction = Union("TransactionAction", Struct("TransactionActionBase", [
    ("type", Enum("TransactionActionKind", (
        "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable", "block-dirty-bitmap-merge", "blockdev-backup",
        "blockdev-snapshot", "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync",
        "drive-backup"))),
    ("data", "any")]), "type")
#: ``data`` of each action kind (checked as ``actions[i].data``).
ACTION_DATA: dict[str, Struct] = {
    "abort": Struct("Abort", []),
    "block-dirty-bitmap-add": BlockDirtyBitmapAdd,
    "block-dirty-bitmap-remove": BlockDirtyBitmap,
    "block-dirty-bitmap-clear": BlockDirtyBitmap,
    "block-dirty-bitmap-enable": BlockDirtyBitmap,
    "block-dirty-bitmap-disable": BlockDirtyBitmap,
    "block-dirty-bitmap-merge": BlockDirtyBitmapMerge,
    "blockdev-backup": BlockdevBackup,
}

# --- graph commands (blockdev-create, snapshots, reopen, resize, threshold) ---
NewImageMode = Enum("NewImageMode", ("existing", "absolute-paths"))
PreallocMode = Enum("PreallocMode", ("off", "metadata", "falloc", "full"))
#: Only the variants blkjobs creates; the other drivers are refused by the handler.
BlockdevCreateOptions = Union("BlockdevCreateOptions", Struct("BlockdevCreateOptionsBase", [
    ("driver", BlockdevDriver)]), "driver", {
    "file": Struct("BlockdevCreateOptionsFile", [
        ("filename", "str"), ("size", "size"), ("*preallocation", PreallocMode),
        ("*nocow", "bool"), ("*extent-size-hint", "size")]),
    "qcow2": Struct("BlockdevCreateOptionsQcow2", [
        ("file", BlockdevRef), ("*data-file", BlockdevRef), ("*data-file-raw", "bool"),
        ("*extended-l2", "bool"), ("size", "size"),
        ("*version", Enum("BlockdevQcow2Version", ("v2", "v3"))), ("*backing-file", "str"),
        ("*backing-fmt", BlockdevDriver),
        # encryption is refused by blkjobs: the union without its variants
        ("*encrypt", Union("QCryptoBlockCreateOptions", Struct("QCryptoBlockOptionsBase", [
            ("format", Enum("QCryptoBlockFormat", ("qcow", "luks")))]), "format")),
        ("*cluster-size", "size"),
        ("*preallocation", PreallocMode), ("*lazy-refcounts", "bool"),
        ("*refcount-bits", "int"),
        ("*compression-type", Enum("Qcow2CompressionType", ("zlib", "zstd")))])})
BlockdevSnapshot = Struct("BlockdevSnapshot", [("node", "str"), ("overlay", "str")])
BlockdevSnapshotSync = Struct("BlockdevSnapshotSync", [
    ("*device", "str"), ("*node-name", "str"), ("snapshot-file", "str"),
    ("*snapshot-node-name", "str"), ("*format", "str"),
    ("*mode", NewImageMode)])
DriveBackup = Struct("DriveBackup", BlockdevBackup.members[:-1] + [
    ("target", "str"), ("*format", "str"), ("*mode", NewImageMode)])
DriveMirror = Struct("DriveMirror", [
    ("*job-id", "str"), ("device", "str"), ("target", "str"), ("*format", "str"),
    ("*node-name", "str"), ("*replaces", "str"), ("sync", SyncMode), ("*mode", NewImageMode),
    ("*speed", "int"), ("*granularity", "uint32"), ("*buf-size", "int"),
    ("*on-source-error", OnError), ("*on-target-error", OnError), ("*unmap", "bool"),
    ("*copy-mode", CopyMode), ("*auto-finalize", "bool"), ("*auto-dismiss", "bool")])
GRAPH_COMMANDS: dict[str, Any] = {
    "blockdev-create": Struct("", [("job-id", "str"), ("options", BlockdevCreateOptions)]),
    "blockdev-snapshot": BlockdevSnapshot,
    "blockdev-snapshot-sync": BlockdevSnapshotSync,
    "blockdev-reopen": Struct("", [("options", [BlockdevOptions])]),
    "block_resize": Struct("", [("*device", "str"), ("*node-name", "str"), ("size", "int")]),
    "block-set-write-threshold": Struct("", [("node-name", "str"),
                                             ("write-threshold", "uint64")]),
    "query-block": None,
    "x-debug-query-block-graph": None,
    "drive-backup": DriveBackup,
    "drive-mirror": DriveMirror,
}
ACTION_DATA["drive-backup"] = DriveBackup
ACTION_DATA["blockdev-snapshot"] = BlockdevSnapshot

# NBD exports and the TLS objects they use (qapi/block-export.json,
# sockets.json, qom.json); handlers in export_commands.py
SocketAddressLegacy = Union("SocketAddressLegacy", Struct("q_obj_SocketAddressLegacy-base", [
    ("type", Enum("SocketAddressType", ("inet", "unix", "vsock", "fd")))]), "type", {
    "inet": Struct("InetSocketAddressWrapper", [("data", Struct("InetSocketAddress", [
        ("host", "str"), ("port", "str"), ("*numeric", "bool"), ("*to", "uint16"),
        ("*ipv4", "bool"), ("*ipv6", "bool"), ("*keep-alive", "bool"),
        ("*mptcp", "bool")]))]),
    "unix": Struct("UnixSocketAddressWrapper", [("data", Struct("UnixSocketAddress", [
        ("path", "str"), ("*abstract", "bool"), ("*tight", "bool")]))]),
    "vsock": Struct("VsockSocketAddressWrapper", [("data", Struct("VsockSocketAddress", [
        ("cid", "str"), ("port", "str")]))]),
    "fd": Struct("FdSocketAddressWrapper", [("data", Struct("FdSocketAddress", [
        ("str", "str")]))])})
BlockExportRemoveMode = Enum("BlockExportRemoveMode", ("safe", "hard"))
BlockExportOptions = Union("BlockExportOptions", Struct("q_obj_BlockExportOptions-base", [
    ("type", Enum("BlockExportType", ("nbd", "vhost-user-blk", "fuse", "vduse-blk"))),
    ("id", "str"), ("*fixed-iothread", "bool"), ("*iothread", "str"), ("node-name", "str"),
    ("*writable", "bool"), ("*writethrough", "bool"), ("*allow-inactive", "bool")]), "type", {
    "nbd": Struct("BlockExportOptionsNbd", [
        ("*name", "str"), ("*description", "str"),
        ("*bitmaps", [BlockDirtyBitmapMerge.members[2][1][0]]),
        ("*allocation-depth", "bool")])})
ObjectOptions = Union("ObjectOptions", Struct("q_obj_ObjectOptions-base", [
    ("qom-type", Enum("ObjectType", (
        "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus",
        "can-host-socketcan", "colo-compare", "cryptodev-backend", "cryptodev-backend-builtin",
        "cryptodev-backend-lkcf", "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer",
        "filter-dump", "filter-mirror", "filter-redirector", "filter-replay",
        "filter-rewriter", "input-barrier", "input-linux", "iothread", "main-loop",
        "memory-backend-epc", "memory-backend-file", "memory-backend-memfd",
        "memory-backend-ram", "pef-guest", "pr-manager-helper", "qtest", "rng-builtin",
        "rng-egd", "rng-random", "secret", "secret_keyring", "sev-guest", "thread-context",
        "s390-pv-guest", "throttle-group", "tls-creds-anon", "tls-creds-psk",
        "tls-creds-x509", "tls-cipher-suites", "x-remote-object", "x-vfio-user-server"))),
    ("id", "str")]), "qom-type", {
    "tls-creds-x509": Struct("TlsCredsX509Properties", [
        ("*verify-peer", "bool"), ("*dir", "str"),
        ("*endpoint", Enum("QCryptoTLSCredsEndpoint", ("client", "server"))),
        ("*priority", "str"), ("*loaded", "bool"), ("*sanity-check", "bool"),
        ("*passwordid", "str")])})
EXPORT_COMMANDS: dict[str, Any] = {
    "nbd-server-start": Struct("NbdServerOptionsLegacy", [
        ("*handshake-max-seconds", "uint32"), ("*tls-creds", "str"), ("*tls-authz", "str"),
        ("*max-connections", "uint32"), ("addr", SocketAddressLegacy)]),
    "nbd-server-stop": None,
    "nbd-server-add": Struct("NbdServerAddOptions", [
        ("*name", "str"), ("*description", "str"), ("device", "str"), ("*writable", "bool"),
        ("*bitmap", "str")]),
    "nbd-server-remove": Struct("", [("name", "str"), ("*mode", BlockExportRemoveMode)]),
    "block-export-add": BlockExportOptions,
    "block-export-del": Struct("", [("id", "str"), ("*mode", BlockExportRemoveMode)]),
    "query-block-exports": None,
    "object-add": ObjectOptions,
    "object-del": Struct("", [("id", "str")]),
}

_ID = [("id", "str")]
_DEV = [("device", "str")]

#: Command name -> argument type (None: takes no arguments).
COMMANDS: dict[str, Any] = {
    "qmp_capabilities": Struct("", [("*enable", [Capability])]),
    "query-version": None,
    "query-commands": None,
    "query-qmp-schema": None,
    "quit": None,
    "blockdev-add": BlockdevOptions,
    "blockdev-del": Struct("", [("node-name", "str")]),
    "query-named-block-nodes": Struct("", [("*flat", "bool")]),
    "blockdev-backup": BlockdevBackup,
    "blockdev-mirror": Struct("", [
        ("*job-id", "str"), ("device", "str"), ("target", "str"), ("*replaces", "str"),
        ("sync", SyncMode), ("*speed", "int"), ("*granularity", "uint32"),
        ("*buf-size", "int"), ("*on-source-error", OnError), ("*on-target-error", OnError),
        ("*filter-node-name", "str"), ("*copy-mode", CopyMode), ("*auto-finalize", "bool"),
        ("*auto-dismiss", "bool"), ("*target-is-zero", "bool")]),
    "block-stream": Struct("", [
        ("*job-id", "str"), ("device", "str"), ("*base", "str"), ("*base-node", "str"),
        ("*backing-file", "str"), ("*backing-mask-protocol", "bool"), ("*bottom", "str"),
        ("*speed", "int"), ("*on-error", OnError), ("*filter-node-name", "str"),
        ("*auto-finalize", "bool"), ("*auto-dismiss", "bool")]),
    "block-commit": Struct("", [
        ("*job-id", "str"), ("device", "str"), ("*base-node", "str"), ("*base", "str"),
        ("*top-node", "str"), ("*top", "str"), ("*backing-file", "str"),
        ("*backing-mask-protocol", "bool"), ("*speed", "int"), ("*on-error", OnError),
        ("*filter-node-name", "str"), ("*auto-finalize", "bool"),
        ("*auto-dismiss", "bool")]),
    "query-jobs": None,
    "query-block-jobs": None,
    "job-pause": Struct("", _ID),
    "job-resume": Struct("", _ID),
    "job-cancel": Struct("", _ID),
    "job-complete": Struct("", _ID),
    "job-finalize": Struct("", _ID),
    "job-dismiss": Struct("", _ID),
    "block-job-set-speed": Struct("", _DEV + [("speed", "int")]),
    "block-job-cancel": Struct("", _DEV + [("*force", "bool")]),
    "block-job-pause": Struct("", _DEV),
    "block-job-resume": Struct("", _DEV),
    "block-job-complete": Struct("", _DEV),
    "block-job-finalize": Struct("", _ID),
    "block-job-dismiss": Struct("", _ID),
    "block-job-change": Union("BlockJobChangeOptions", Struct("", [
        ("id", "str"), ("type", JobType)]), "type", {
        "mirror": Struct("", [("copy-mode", CopyMode)])}),
    "block-dirty-bitmap-add": BlockDirtyBitmapAdd,
    "block-dirty-bitmap-remove": BlockDirtyBitmap,
    "block-dirty-bitmap-clear": BlockDirtyBitmap,
    "block-dirty-bitmap-enable": BlockDirtyBitmap,
    "block-dirty-bitmap-disable": BlockDirtyBitmap,
    "block-dirty-bitmap-merge": BlockDirtyBitmapMerge,
    "x-debug-block-dirty-bitmap-sha256": BlockDirtyBitmap,
    # blkjobs' own (unstable): guest-like writes for tests, see commands.py
    "x-blkjobs-write": Struct("", [("node", "str"), ("offset", "int"), ("length", "int"),
                                   ("*pattern", "int"), ("*flush", "bool")]),
    # blkjobs' own (unstable): blkdebug break points, see blkdebug_commands.py
    "x-blkjobs-blkdebug-break": Struct("", [("node", "str"), ("event", BlkdebugEvent),
                                            ("tag", "str")]),
    "x-blkjobs-blkdebug-wait-break": Struct("", [("tag", "str"), ("*timeout", "int")]),
    "x-blkjobs-blkdebug-resume": Struct("", [("tag", "str")]),
    "x-blkjobs-blkdebug-remove-break": Struct("", [("tag", "str")]),
    "transaction": Struct("", [
        ("actions", [TransactionAction]),
        ("*properties", Struct("TransactionProperties", [
            ("*completion-mode", CompletionMode)]))]),
    **GRAPH_COMMANDS,
    **EXPORT_COMMANDS,
}


def check_arguments(command: str, args: dict[str, Any]) -> None:
    """Check ``args`` of ``command`` (known to exist) before it runs."""
    typ = COMMANDS[command]
    if typ is None:
        for key in args:
            raise QMPError(f"Parameter '{key}' is unexpected")
        return
    check(args, typ)
    if command == "transaction":
        for i, action in enumerate(args["actions"]):
            data = ACTION_DATA.get(action["type"])
            if data is not None:
                check(action["data"], data, f"actions[{i}].data", "data")
