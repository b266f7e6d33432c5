"""NBD protocol constants and wire formats (the NBD project's proto.md).

Shared by the server (:mod:`.server`) and any client: nothing here knows
about the daemon or the block graph (``errors`` only). All integers are big-endian.
"""
from __future__ import annotations

import errno
import struct

from ..errors import BlkjobsError

# -- handshake ------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9

#: handshake flags (server -> client, u16)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
#: client flags (client -> server, u32)
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags (u16, per export)
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission -----------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# errors on the wire (Linux numbers, as the protocol fixes them)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# qemu:dirty-bitmap:NAME flags
STATE_DIRTY = 1 << 0

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_DIRTY_BITMAP = "qemu:dirty-bitmap:"

#: Largest request (READ/WRITE payload) a server accepts, and largest
#: block size it advertises: qemu-nbd's NBD_MAX_BUFFER_SIZE.
MAX_BUFFER_SIZE = 32 << 20
#: An export's size is a whole number of these (QEMU's BDRV_SECTOR_SIZE:
#: qemu-nbd exports a node's length as its block layer gives it).
SECTOR = 512
#: Longest export name or option string (the protocol's limit).
MAX_STRING = 4096
#: Largest option payload a server reads (qemu's limit on options too).
MAX_OPTION = 4096 * 4 + 64

#: Largest number of extents in one block-status reply (clients ask again).
MAX_EXTENTS = 1 << 16


class NBDRequestError(BlkjobsError):
    """A request failed with ``errno`` (a NBD error number, sent to the peer)."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


OPTION_NAMES = {OPT_EXPORT_NAME: "export name", OPT_ABORT: "abort", OPT_LIST: "list",
                OPT_STARTTLS: "starttls", OPT_INFO: "info", OPT_GO: "go",
                OPT_STRUCTURED_REPLY: "structured reply",
                OPT_LIST_META_CONTEXT: "list meta context",
                OPT_SET_META_CONTEXT: "set meta context"}

# -- wire structs -------------------------------------------------------------
HANDSHAKE = struct.Struct(">QQH")            # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct(">QII")               # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")        # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")           # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")         # magic, error, handle
CHUNK = struct.Struct(">IHHQI")              # magic, flags, type, handle, length
EXPORT_INFO = struct.Struct(">HQH")          # INFO_EXPORT: type, size, flags
BLOCK_SIZE_INFO = struct.Struct(">HIII")     # INFO_BLOCK_SIZE: type, min, preferred, max
EXTENT = struct.Struct(">II")                # length, flags


def option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, rtype, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk(handle: int, ctype: int, payload: bytes | bytearray | memoryview = b"",
          done: bool = True) -> bytes:
    """A structured reply chunk's header followed by ``payload`` (copied:
    use :func:`chunk_header` to send a large payload without a copy)."""
    return chunk_header(handle, ctype, len(payload), done) + bytes(payload)


def chunk_header(handle: int, ctype: int, length: int, done: bool = True) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, ctype,
                      handle, length)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return chunk(handle, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg)


def block_status_chunk(handle: int, context_id: int, extents: list[tuple[int, int]],
                       done: bool = True) -> bytes:
    payload = struct.pack(">I", context_id) + b"".join(EXTENT.pack(n, f)
                                                        for n, f in extents)
    return chunk(handle, REPLY_TYPE_BLOCK_STATUS, payload, done)
