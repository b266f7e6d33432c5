"""The fixed-newstyle option haggling of an NBD server connection.

:func:`negotiate` reads options until the client picks an export
(``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME``) or leaves (``NBD_OPT_ABORT``,
EOF): it returns the export, or None. Error replies carry a message, as
qemu-nbd's do.
"""
from __future__ import annotations

import struct
import ssl
from typing import Any, Protocol

from ..native.nbdserve import HS_GO, HS_HANGUP, HS_INFO
from . import proto as P

#: a server.Export (server.py imports this module: see Connection)
Export = Any


class Connection(Protocol):
    """What the handshake and transmission need of a server connection
    (``server.Connection``; a Protocol because server.py imports these
    modules, docs/architecture.md)."""

    server: Any
    sock: Any
    #: what sends the replies instead of the socket (the C data path's
    #: session: one send lock for its threads and Python's), or None
    sender: Any
    structured: bool
    no_zeroes: bool
    tls_done: bool
    closing: bool
    c_path: bool
    contexts: list[str]
    contexts_export: str | None

    def send(self, *parts: bytes | bytearray | memoryview) -> None: ...

    def send_later(self, data: bytes) -> None: ...

    def flush_later(self) -> None: ...

    def recv(self, n: int) -> bytes: ...

    def recv_into(self, mv: memoryview) -> None: ...

    def buffered(self) -> int: ...

    def start_tls(self, ctx: ssl.SSLContext) -> None: ...

    def abort(self) -> None: ...

    def attach(self, exp: Any) -> bool: ...

    def c_handshake(self) -> Any: ...

    def c_step(self, hs: Any) -> int: ...


class _OptError(Exception):
    def __init__(self, rtype: int, message: str):
        super().__init__(message)
        self.rtype = rtype


class _Abort(Exception):
    """Close the connection (no reply possible)."""


def _send(conn: Connection, option: int, rtype: int, data: bytes = b"") -> None:
    conn.send_later(P.option_reply(option, rtype, data))


def _string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise _OptError(P.REP_ERR_INVALID, f"{what}: option too short")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if n > P.MAX_STRING or pos + n > len(data):
        raise _OptError(P.REP_ERR_INVALID, f"{what}: bad length {n}")
    try:
        return data[pos:pos + n].decode(), pos + n
    except UnicodeDecodeError:
        raise _OptError(P.REP_ERR_INVALID, f"{what}: not UTF-8") from None


def negotiate(conn: Connection) -> Export | None:
    """The export the client picked, or None (see the module docstring).
    Replies are queued (``send_later``) and go out together when the
    client is to answer, and before this returns."""
    try:
        return _negotiate(conn)
    finally:
        conn.flush_later()


def _negotiate(conn: Connection) -> Export | None:
    server = conn.server
    # the common options (nbdcopy's, qemu's, nbdinfo's: STRUCTURED_REPLY,
    # SET_META_CONTEXT and LIST_META_CONTEXT of base:allocation, GO and
    # INFO parsed) are answered in C; C leaves every other option, and any
    # it cannot answer alone, to the loop below
    hs = conn.c_handshake()
    if hs is None:
        conn.send(P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT,
                                   P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", conn.recv(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            return None                 # unknown client flags: hang up
        conn.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
    while True:
        if hs is not None:
            rc = conn.c_step(hs)
            if rc == HS_HANGUP:
                return None             # unknown client flags
            if rc in (HS_GO, HS_INFO):
                idx, info = hs.go
                wanted = {t for t in (P.INFO_NAME, P.INFO_DESCRIPTION) if info >> t & 1}
                option = P.OPT_GO if rc == HS_GO else P.OPT_INFO
                try:
                    exp = _go(conn, option, hs.names[idx], wanted)
                except _OptError as e:
                    _send(conn, option, e.rtype, str(e).encode())
                    continue
                if exp is not None:
                    return exp
                continue
        hdr = conn.recv(P.OPTION.size)      # EOFError: the client left
        magic, option, length = P.OPTION.unpack(hdr)
        if magic != P.IHAVEOPT:
            return None
        if length > P.MAX_OPTION:
            # drain it in pieces, then refuse
            left = length
            while left:
                left -= len(conn.recv(min(left, 65536)))
            _send(conn, option, P.REP_ERR_TOO_BIG,
                  f"option {option} of {length} bytes is too large".encode())
            continue
        data = conn.recv(length)
        if server.tls is not None and not conn.tls_done and option not in (
                P.OPT_STARTTLS, P.OPT_ABORT):
            if option == P.OPT_EXPORT_NAME:
                return None         # no way to refuse it: hang up
            _send(conn, option, P.REP_ERR_TLS_REQD,
                  f"Option {option:#x} not permitted before TLS".encode())
            continue
        try:
            exp = _option(conn, option, data)
        except _OptError as e:
            _send(conn, option, e.rtype, str(e).encode())
            exp = None
        except _Abort:
            return None
        if exp is not None:
            return exp


def _option(conn: Connection, option: int, data: bytes) -> Export | None:
    server = conn.server
    if option == P.OPT_ABORT:
        _send(conn, option, P.REP_ACK)
        raise _Abort()
    if option == P.OPT_STARTTLS:
        _starttls(conn, option, data)
        return None
    if option == P.OPT_LIST:
        if data:
            raise _OptError(P.REP_ERR_INVALID, "no payload expected")
        for exp in server.exports.values():
            name = exp.name.encode()
            _send(conn, option, P.REP_SERVER, struct.pack(">I", len(name)) + name
                  + exp.description.encode())
        _send(conn, option, P.REP_ACK)
        return None
    if option == P.OPT_STRUCTURED_REPLY:
        if data:
            raise _OptError(P.REP_ERR_INVALID, "no payload expected")
        if conn.structured:
            raise _OptError(P.REP_ERR_INVALID, "structured reply already negotiated")
        conn.structured = True
        _send(conn, option, P.REP_ACK)
        return None
    if option in (P.OPT_INFO, P.OPT_GO):
        return _info(conn, option, data)
    if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
        _meta(conn, option, data)
        return None
    if option == P.OPT_EXPORT_NAME:
        exp = server.exports.get(data.decode(errors="replace"))
        if exp is None:
            raise _Abort()
        if not conn.attach(exp):
            raise _Abort()
        reply = struct.pack(">QH", exp.size, exp.flags())
        if not conn.no_zeroes:
            reply += bytes(124)
        conn.send(reply)
        return exp
    raise _OptError(P.REP_ERR_UNSUP, f"Unsupported option {option:#x}")


def _starttls(conn: Connection, option: int, data: bytes) -> None:
    if data:
        raise _OptError(P.REP_ERR_INVALID, "no payload expected")
    if conn.server.tls is None:
        raise _OptError(P.REP_ERR_POLICY, "TLS not configured")
    if conn.tls_done:
        raise _OptError(P.REP_ERR_INVALID, "TLS already negotiated")
    _send(conn, option, P.REP_ACK)
    conn.start_tls(conn.server.tls)


def _info(conn: Connection, option: int, data: bytes) -> Export | None:
    name, pos = _string(data, 0, "export name")
    if pos + 2 > len(data):
        raise _OptError(P.REP_ERR_INVALID, "request too short")
    (n,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if pos + 2 * n != len(data):
        raise _OptError(P.REP_ERR_INVALID, "bad number of information requests")
    return _go(conn, option, name, set(struct.unpack_from(f">{n}H", data, pos)))


def _go(conn: Connection, option: int, name: str, wanted: set[int]) -> Export | None:
    """The replies to INFO or GO for export ``name`` (the information
    types the client asked for: ``wanted``); GO: the export, attached."""
    exp = conn.server.exports.get(name)
    if exp is None:
        raise _OptError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
    if P.INFO_NAME in wanted:
        _send(conn, option, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + exp.name.encode())
    if P.INFO_DESCRIPTION in wanted and exp.description:
        _send(conn, option, P.REP_INFO,
              struct.pack(">H", P.INFO_DESCRIPTION) + exp.description.encode())
    # always sent: min 1, preferred 4 KiB, max 32 MiB (as qemu-nbd)
    _send(conn, option, P.REP_INFO, P.BLOCK_SIZE_INFO.pack(
        P.INFO_BLOCK_SIZE, 1, 4096, P.MAX_BUFFER_SIZE))
    _send(conn, option, P.REP_INFO, P.EXPORT_INFO.pack(P.INFO_EXPORT, exp.size,
                                                       exp.flags()))
    if option == P.OPT_INFO:
        _send(conn, option, P.REP_ACK)
        return None
    if not conn.attach(exp):
        raise _OptError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
    if conn.contexts and conn.contexts_export != name:
        conn.contexts = []          # negotiated for another export
    _send(conn, option, P.REP_ACK)
    return exp


def _meta(conn: Connection, option: int, data: bytes) -> None:
    if not conn.structured:
        raise _OptError(P.REP_ERR_INVALID, "structured replies not negotiated")
    name, pos = _string(data, 0, "export name")
    if pos + 4 > len(data):
        raise _OptError(P.REP_ERR_INVALID, "request too short")
    (nq,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(nq):
        q, pos = _string(data, pos, "query")
        queries.append(q)
    if pos != len(data):
        raise _OptError(P.REP_ERR_INVALID, "trailing data")
    exp = conn.server.exports.get(name)
    if exp is None:
        raise _OptError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
    offered = exp.contexts()
    if option == P.OPT_LIST_META_CONTEXT and not queries:
        chosen = offered
    else:
        chosen = []
        for q in queries:
            for c in offered:
                if c in chosen:
                    continue
                if option == P.OPT_LIST_META_CONTEXT and _prefix_match(q, c):
                    chosen.append(c)
                elif c == q:
                    chosen.append(c)
    if option == P.OPT_SET_META_CONTEXT:
        conn.contexts = list(chosen)
        conn.contexts_export = name
    for i, c in enumerate(chosen):
        cid = i + 1 if option == P.OPT_SET_META_CONTEXT else 0
        _send(conn, option, P.REP_META_CONTEXT, struct.pack(">I", cid) + c.encode())
    _send(conn, option, P.REP_ACK)


def _prefix_match(query: str, context: str) -> bool:
    """LIST_META_CONTEXT's wildcards: ``base:`` or ``qemu:`` (a namespace),
    ``qemu:dirty-bitmap:`` (every bitmap), or the exact name."""
    if query == context:
        return True
    if query in ("base:", "qemu:", P.CONTEXT_DIRTY_BITMAP):
        return context.startswith(query)
    return False
