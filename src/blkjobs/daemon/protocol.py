"""The QMP wire protocol: framing, the JSON dialect, greeting, requests.

Input is QEMU's JSON dialect, read the way ``qobject/json-lexer.c``,
``json-streamer.c`` and ``json-parser.c`` do it (QEMU 7.2, checked against
qemu-storage-daemon), so errors read the same:

* a :class:`JsonStreamer` is fed bytes as they arrive; it splits tokens and
  counts braces/brackets; a message ends when the counts are back at zero
  (objects may come back to back, with any whitespace between them). It keeps
  its state between reads, so each byte is scanned a bounded number of
  times (runs of complete tokens by two regex scans, the rest byte-wise);
* strings may use single quotes (``'it\\'s'``), our only extension;
* a bad byte ends the message with ``JSON parse error, stray '<token so far>'``;
  the lexer then skips to the next structural or control character;
* QEMU's limits (:data:`MAX_TOKEN_SIZE`, :data:`MAX_TOKENS`,
  :data:`MAX_DEPTH`) end the message with ``JSON token size limit exceeded``,
  ``JSON token count limit exceeded`` or ``JSON nesting depth limit
  exceeded``; reading goes on with the next token;
* a malformed message gets ``JSON parse error, <what the parser expected>``
  from :func:`parse`, which needs no recursion at any depth allowed.

Output is ASCII JSON (non-ASCII escaped), one object per message, ended by
CRLF (:func:`encode`). :func:`check_request` validates the top level of a
request in QEMU's order (``qapi/qmp-dispatch.c``).
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import BlkjobsError

#: QEMU's json-streamer limits (qobject/json-streamer.c, json-lexer.c): the
#: bytes of one token and of all the tokens of a message, tokens per message,
#: nesting depth (objects and arrays together).
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKENS = 2 << 20
MAX_DEPTH = 1024


class QMPError(BlkjobsError):
    """A command failed: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


def encode(obj: dict[str, Any]) -> bytes:
    """One message as the server writes it: ASCII JSON + CRLF. Values nested
    deeper than Python's recursion limit allows (an ``id`` may nest up to
    :data:`MAX_DEPTH`) are written without recursion."""
    try:
        text = json.dumps(obj, ensure_ascii=True)
    except RecursionError:
        text = _dumps_deep(obj)
    return text.encode("ascii") + b"\r\n"


def _dumps_deep(obj: Any) -> str:
    """``json.dumps(obj, ensure_ascii=True)`` without recursion."""
    out: list[str] = []
    # work items: a value to write, or a literal string (str in a 1-tuple)
    todo: list[Any] = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, tuple):
            out.append(item[0])
        elif isinstance(item, dict):
            parts: list[Any] = [("{",)]
            for k, (key, v) in enumerate(item.items()):
                parts.append((("" if k == 0 else ", ") + json.dumps(str(key)) + ": ",))
                parts.append(v)
            parts.append(("}",))
            todo.extend(reversed(parts))
        elif isinstance(item, list):
            parts = [("[",)]
            for k, v in enumerate(item):
                if k:
                    parts.append((", ",))
                parts.append(v)
            parts.append(("]",))
            todo.extend(reversed(parts))
        else:
            out.append(json.dumps(item, ensure_ascii=True))
    return "".join(out)


def error_reply(e: QMPError, req_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": e.cls, "desc": e.desc}}
    if has_id:
        out["id"] = req_id
    return out


def greeting(version: dict[str, Any]) -> dict[str, Any]:
    return {"QMP": {"version": version, "capabilities": []}}


# --------------------------------------------------------------------------
# Lexer + streamer (json-lexer.c, json-streamer.c), incremental over bytes
#
# The lexer keeps its state between feeds (inside a string, a number, a
# keyword, or recovering from an error), so the work is linear in the bytes,
# whatever the size of a message and however it is split into reads. Runs of
# complete tokens go in bulk (JsonStreamer._run: ~2x faster on a message of
# 2 Mi tokens), the rest byte-wise, to the same tokens and errors. Limits
# are QEMU's: a token longer than MAX_TOKEN_SIZE bytes is cut there, a message
# whose tokens add up to MAX_TOKEN_SIZE or more, has MAX_TOKENS tokens or more,
# or nests deeper than MAX_DEPTH (objects and arrays together) is refused with
# QEMU's error, and the lexer carries on from the next byte.

_PUNCT = frozenset(b"{}[],:")
_KEYWORDS = {"true": True, "false": False, "null": None}
_SIMPLE_ESC = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
               ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_WS = re.compile(rb"[ \t\r\n]*")
#: The body of a string: any byte 0x20-0xFD but the quote and the backslash,
#: or a backslash and such a byte (escapes are checked by the parser).
_STR_BODY = {q: re.compile(rb"(?:[^%s\\\x00-\x1f\xfe\xff]++|\\[^\x00-\x1f\xfe\xff])*+"
                           % re.escape(bytes([q]))) for q in b"\"'"}
_NUM_BODY = re.compile(rb"[0-9.eE+-]*")
_KW_BODY = re.compile(rb"[A-Za-z0-9]*")
#: After a lexical error QEMU skips bytes up to a structural character, a
#: control character other than tab, or 0xFE/0xFF (not consumed).
_RECOVER = re.compile(rb"[\t\x20-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]*")


#: :meth:`JsonStreamer._run`'s tokens, each after white space: punctuation
#: (group 1), a whole string in either quote (2: _STR_BODY's bodies), a
#: number (3) or a keyword (4) (their first bytes as _between_tokens takes
#: them, their bodies _NUM_BODY's and _KW_BODY's); _RUN: a run of them.
_TOKEN_PARTS = (rb"[{}\[\],:]",
                rb"\x22(?:[^\x22\\\x00-\x1f\xfe\xff]++|\\[^\x00-\x1f\xfe\xff])*+\x22"
                rb"|'(?:[^'\\\x00-\x1f\xfe\xff]++|\\[^\x00-\x1f\xfe\xff])*+'",
                rb"[-0-9][0-9.eE+-]*+", rb"[A-Za-z][A-Za-z0-9]*+")
_TOKEN = re.compile(rb"[ \t\r\n]*+(?:" + b"|".join(b"(%s)" % p for p in _TOKEN_PARTS) + b")")
# (without groups: Python 3.11's re fails on groups repeated possessively)
_RUN = re.compile(rb"(?:[ \t\r\n]*+(?:" + b"|".join(b"(?:%s)" % p for p in _TOKEN_PARTS)
                  + b"))*+")
_PUNCT_KIND = {bytes([c]): chr(c) for c in b"{}[],:"}


def _skip(rx: re.Pattern[bytes], data: bytes, i: int, end: int) -> int:
    """Where ``rx`` (which matches the empty string too) stops in data[i:end]."""
    m = rx.match(data, i, end)
    assert m is not None
    return m.end()


class JsonStreamer:
    """Feed bytes with :meth:`feed`; it returns the finished messages, each
    ``(tokens, None)`` (give the tokens to :func:`parse`) or ``(None,
    error_text)``. Work per feed is linear in the bytes fed."""

    #: the common tokens in bulk (:meth:`_run`); False: byte-wise only
    #: (the reference the tests hold the bulk path to)
    bulk = True

    def __init__(self) -> None:
        # lexer
        self._kind: str | None = None      # "str", "num", "kw", "recover" or None
        self._quote = 0
        self._parts: list[bytes] = []      # the token so far
        self._tlen = 0
        self._carry = b""                  # a backslash that ended the last feed
        # streamer
        self._tokens: list[tuple[str, Any]] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    def feed(self, data: bytes) -> list[tuple[list | None, str | None]]:
        out: list[tuple[list | None, str | None]] = []
        if self._carry:
            data, self._carry = self._carry + data, b""
        i, n = 0, len(data)
        while i < n:        # each step consumes bytes, or changes the state
            kind = self._kind
            if kind is None:
                if self.bulk:
                    i = self._run(data, i, out)
                if i < n:
                    i = self._between_tokens(data, i, out)
            elif kind == "recover":
                i = _skip(_RECOVER, data, i, n)
                if i < n:
                    self._kind = None
            elif kind == "str":
                i = self._in_string(data, i, out)
            else:
                i = self._in_word(data, i, kind, out)
        return out

    def _run(self, data: bytes, i: int, out: list) -> int:
        """The common case in bulk: the complete tokens from ``i`` on --
        punctuation, strings of plain bytes and escapes, numbers and
        keywords -- up to the first byte that needs the byte-wise states (a
        string, number or keyword that data cuts off, a token over the size
        limit, a stray byte, a number that does not convert), split by a
        regex scan and streamed as :meth:`_between_tokens` and the states
        after it would, one by one. Returns where the byte-wise lexer goes
        on."""
        n = len(data)
        end = _skip(_RUN, data, i, len(data))
        if end == i:
            return i
        toks = _TOKEN.findall(data, i, end)
        if end == n and toks[-1][2:] != (b"", b""):
            # a number or keyword that data cuts off (maybe longer): the
            # byte-wise lexer takes it from its first byte
            _, _, num, kw = toks.pop()
            end -= len(num or kw)
        batch: list[tuple[str, Any, int]] = []
        add = batch.append
        for punct, string, num, kw in toks:
            if punct:
                add((_PUNCT_KIND[punct], None, 1))
                continue
            tok = string or num or kw
            if len(tok) > MAX_TOKEN_SIZE:
                break
            if string:
                add(("str", string, len(string)))
            elif kw:
                add(("kw", kw.decode("ascii"), len(kw)))
            elif num.isdigit():
                add(("num", int(num), len(num)))
            else:
                text = num.decode("ascii")
                try:
                    value: Any = int(text) if text.lstrip("-").isdigit() else float(text)
                except ValueError:
                    break       # the byte-wise lexer says what is stray
                add(("num", value, len(text)))
        self._stream(batch, out)
        if len(batch) == len(toks):
            return end
        # where the tokens taken end (the run's end, unless cut short)
        for k, m in enumerate(_TOKEN.finditer(data, i, end)):
            if k == len(batch) - 1:
                return m.end()
        return i

    def _between_tokens(self, data: bytes, i: int, out: list) -> int:
        """Skip white space; take a structural character, or start a string,
        a number or a keyword (the state says which); a stray byte is a
        lexical error. Returns where to go on."""
        i = _skip(_WS, data, i, len(data))
        if i >= len(data):
            return i
        c = data[i]
        if c in _PUNCT:
            self._token(chr(c), None, 1, out)
            return i + 1
        if c == 0x22 or c == 0x27:
            self._kind, self._quote = "str", c
            self._parts, self._tlen = [data[i:i + 1]], 1
            return i + 1
        if c == 0x2D or 0x30 <= c <= 0x39:
            self._kind = "num"
        elif 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A:
            self._kind = "kw"
        else:
            self._stray(data[i:i + 1], out)
            return i + 1
        self._parts, self._tlen = [], 0
        return i

    def _in_string(self, data: bytes, i: int, out: list) -> int:
        """Inside a string: take its body up to the closing quote, the token
        size limit or the end of ``data`` (a backslash there waits for the
        next feed); a control character or 0xFE/0xFF is a lexical error."""
        n = len(data)
        end = min(n, i + MAX_TOKEN_SIZE + 1 - self._tlen)
        j = _skip(_STR_BODY[self._quote], data, i, end)
        self._parts.append(data[i:j])
        self._tlen += j - i
        if j == end:
            if self._tlen > MAX_TOKEN_SIZE:
                self._too_long(out)
            return j
        c = data[j]
        if c == self._quote:
            self._parts.append(data[j:j + 1])
            raw = b"".join(self._parts)
            self._kind, self._parts = None, []
            self._token("str", raw, self._tlen + 1, out)
            return j + 1
        if c == 0x5C and j + 1 == end:
            if end == n:            # the escaped byte comes with the next feed
                self._carry = data[j:]
                return n
            self._tlen += 1         # QEMU cuts the token right after the backslash
            self._too_long(out)
            return end
        # a control character (maybe escaped) or 0xFE/0xFF
        bad = j + 2 if c == 0x5C else j + 1
        self._parts.append(data[j:bad])
        self._stray(b"".join(self._parts), out)
        return bad

    def _in_word(self, data: bytes, i: int, kind: str, out: list) -> int:
        """Inside a number or a keyword: take its characters up to the token
        size limit or the end of ``data``; the first other byte ends it."""
        end = min(len(data), i + MAX_TOKEN_SIZE + 1 - self._tlen)
        body = _NUM_BODY if kind == "num" else _KW_BODY
        j = _skip(body, data, i, end)
        self._parts.append(data[i:j])
        self._tlen += j - i
        if j == end:
            if self._tlen > MAX_TOKEN_SIZE:
                self._too_long(out)
            return j
        text = b"".join(self._parts).decode("ascii")
        self._kind, self._parts = None, []
        if kind == "kw":
            self._token("kw", text, len(text), out)
            return j
        try:
            value: Any = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            self._stray(text.encode(), out)
        else:
            self._token("num", value, len(text), out)
        return j

    def _too_long(self, out: list) -> None:
        self._kind, self._parts = None, []
        self._reset()
        out.append((None, "JSON token size limit exceeded"))

    # -- streamer (json-streamer.c) -----------------------------------------
    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._braces = self._brackets = 0

    def _stray(self, raw: bytes, out: list) -> None:
        self._kind, self._parts = "recover", []
        self._reset()
        out.append((None, f"JSON parse error, stray '{raw.decode('utf-8', 'replace')}'"))

    def _token(self, kind: str, value: Any, length: int, out: list) -> None:
        self._stream(((kind, value, length),), out)

    def _stream(self, batch: Any, out: list) -> None:
        """Tokens ``(kind, value, length)`` in order into the message being
        built; a message ends when its braces and brackets are closed (a
        scalar alone is one), or at a limit (QEMU's error)."""
        tokens, size = self._tokens, self._size
        braces, brackets = self._braces, self._brackets
        for kind, value, length in batch:
            if kind == "{":
                braces += 1
            elif kind == "}":
                braces -= 1
            elif kind == "[":
                brackets += 1
            elif kind == "]":
                brackets -= 1
            err = None
            if size + length + 1 > MAX_TOKEN_SIZE:
                err = "JSON token size limit exceeded"
            elif len(tokens) + 1 > MAX_TOKENS:
                err = "JSON token count limit exceeded"
            elif braces + brackets > MAX_DEPTH:
                err = "JSON nesting depth limit exceeded"
            if err is not None:
                tokens, size, braces, brackets = [], 0, 0, 0
                out.append((None, err))
                continue
            tokens.append((kind, value))
            size += length
            if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
                continue
            out.append((tokens, None))
            tokens, size, braces, brackets = [], 0, 0, 0
        self._tokens, self._size = tokens, size
        self._braces, self._brackets = braces, brackets


# --------------------------------------------------------------------------
# Parser (json-parser.c messages), iterative: any depth the streamer lets
# through parses without Python recursion.


class _ParseError(Exception):
    pass


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseError("invalid UTF-8 sequence in string") from None


def _hex4(b: bytes, i: int) -> int:
    t = b[i:i + 4]
    if len(t) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in t):
        return -1
    return int(t, 16)


def _string(raw: bytes) -> str:
    """A string token's value (QEMU's parse_string)."""
    body = raw[1:-1]
    if b"\\" not in body:
        return _utf8(body)
    out: list[str] = []
    pos = 0
    while True:
        k = body.find(b"\\", pos)
        if k < 0:
            out.append(_utf8(body[pos:]))
            return "".join(out)
        if k > pos:
            out.append(_utf8(body[pos:k]))
        e = body[k + 1]
        if e in _SIMPLE_ESC:
            out.append(_SIMPLE_ESC[e])
            pos = k + 2
            continue
        if e != 0x75:       # 'u'
            raise _ParseError("invalid escape sequence in string")
        cp = _hex4(body, k + 2)
        end = k + 6
        if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == b"\\u":
            lo = _hex4(body, end + 2)
            if 0xDC00 <= lo <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (lo & 0x3FF)
                end += 6
            else:
                cp = -1
        if cp < 0 or 0xD800 <= cp <= 0xDFFF:
            raise _ParseError(f"{body[k:end].decode('utf-8', 'replace')} is not a valid "
                              "Unicode character")
        out.append(chr(cp))
        pos = end


def _pair_key(toks: list, i: int) -> tuple[str, int]:
    """The key and ':' of an object member at ``i``; returns (key, index of
    its value)."""
    n = len(toks)
    if i >= n:
        raise _ParseError("premature EOI")
    kind, raw = toks[i]
    if kind != "str":
        raise _ParseError("key is not a string in object")
    key = _string(raw)
    if i + 1 >= n:
        raise _ParseError("premature EOI")
    if toks[i + 1][0] != ":":
        raise _ParseError("missing : in object pair")
    if i + 2 >= n:
        raise _ParseError("premature EOI")
    return key, i + 2


def parse(toks: list) -> tuple[Any, str | None]:
    """One message's tokens -> ``(value, None)`` or ``(None, error_text)``."""
    try:
        return _parse(toks), None
    except _ParseError as e:
        return None, f"JSON parse error, {e}"


def _parse(toks: list) -> Any:
    n = len(toks)
    i = 0
    # open containers: [is_object, container, key of the member being parsed]
    stack: list[list] = []
    while True:
        # a value starts at i
        if i >= n:
            raise _ParseError("premature EOI")
        kind, v = toks[i]
        i += 1
        if kind == "{":
            if i >= n:
                raise _ParseError("premature EOI")
            if toks[i][0] != "}":
                key, i = _pair_key(toks, i)
                stack.append([True, {}, key])
                continue
            value: Any = {}
            i += 1
        elif kind == "[":
            if i >= n:
                raise _ParseError("premature EOI")
            if toks[i][0] != "]":
                stack.append([False, [], None])
                continue
            value = []
            i += 1
        elif kind == "str":
            value = _string(v)
        elif kind == "num":
            value = v
        elif kind == "kw":
            if v not in _KEYWORDS:
                raise _ParseError(f"invalid keyword '{v}'")
            value = _KEYWORDS[v]
        else:
            raise _ParseError("expecting value")
        # a value is complete: store it in its container, close finished ones
        while True:
            if not stack:
                return value
            frame = stack[-1]
            is_obj, cont = frame[0], frame[1]
            if is_obj:
                if frame[2] in cont:
                    raise _ParseError("duplicate key")
                cont[frame[2]] = value
            else:
                cont.append(value)
            if i >= n:
                raise _ParseError("premature EOI")
            k = toks[i][0]
            if k == ("}" if is_obj else "]"):
                stack.pop()
                value = cont
                i += 1
                continue
            if k != ",":
                raise _ParseError("expected separator in dict" if is_obj
                                  else "expected separator in list")
            if is_obj:
                frame[2], i = _pair_key(toks, i + 1)
            else:
                i += 1
            break


# --------------------------------------------------------------------------
# Requests (qmp-dispatch.c)

_TOP = ("execute", "exec-oob", "arguments", "id")


def check_request(msg: Any) -> tuple[str, dict[str, Any], bool]:
    """Validate the top level of a request; return (command, arguments,
    oob). Raises :class:`QMPError` with QEMU's texts."""
    if not isinstance(msg, dict):
        raise QMPError("QMP input must be a JSON object")
    for key in msg:
        if key not in _TOP:
            raise QMPError(f"QMP input member '{key}' is unexpected")
    oob = "exec-oob" in msg
    if oob and "execute" in msg:
        raise QMPError("QMP input must not contain both 'execute' and 'exec-oob'")
    name = msg.get("exec-oob" if oob else "execute")
    if name is None and not oob:
        raise QMPError("QMP input lacks member 'execute'")
    if not isinstance(name, str):
        raise QMPError(f"QMP input member '{'exec-oob' if oob else 'execute'}' must be a string")
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise QMPError("QMP input member 'arguments' must be an object")
    return name, args, oob
