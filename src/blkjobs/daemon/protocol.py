"""The QMP wire protocol: framing, the JSON dialect, greeting, requests.

Input is QEMU's JSON dialect, parsed the way ``qobject/json-lexer.c``,
``json-streamer.c`` and ``json-parser.c`` do it, so errors read the same:

* a :class:`JsonStreamer` is fed bytes as they arrive; it splits tokens and
  counts braces/brackets; a message ends when the counts are back at zero
  (objects may come back to back, with any whitespace between them);
* strings may use single quotes (``'it\\'s'``), our only extension;
* a bad character ends the message with ``JSON parse error, stray '<c>'``;
  a malformed message with ``JSON parse error, <what the parser expected>``.
  After an error the streamer starts afresh with the next token.

Output is ASCII JSON (non-ASCII escaped), one object per message, ended by
CRLF (:func:`encode`). :func:`check_request` validates the top level of a
request in QEMU's order (``qapi/qmp-dispatch.c``).
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import BlkjobsError

#: QEMU's json-streamer limits: nesting depth and tokens per message.
MAX_DEPTH = 1024
MAX_TOKENS = 2 * 1024 * 1024


class QMPError(BlkjobsError):
    """A command failed: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


def encode(obj: dict[str, Any]) -> bytes:
    """One message as the server writes it: ASCII JSON + CRLF."""
    return json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\r\n"


def error_reply(e: QMPError, req_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": e.cls, "desc": e.desc}}
    if has_id:
        out["id"] = req_id
    return out


def greeting(version: dict[str, Any]) -> dict[str, Any]:
    return {"QMP": {"version": version, "capabilities": []}}


# --------------------------------------------------------------------------
# Lexer: text -> tokens (kind, value)

_PUNCT = {"{": "{", "}": "}", "[": "[", "]": "]", ",": ",", ":": ":"}
_KEYWORDS = {"true": True, "false": False, "null": None}
_ESC = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
        "r": "\r", "t": "\t"}


class _Stray(Exception):
    def __init__(self, text: str):
        self.text = text


class JsonStreamer:
    """Feed text with :meth:`feed`; it returns the finished messages, each
    ``(value, None)`` or ``(None, error_text)``.

    Tokens are complete only once the character after them arrived (numbers,
    keywords), so a partial token waits in ``_buf`` for the next feed.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._tokens: list[tuple[str, Any]] = []
        self._braces = 0
        self._brackets = 0

    def feed(self, text: str) -> list[tuple[Any, str | None]]:
        self._buf += text
        out: list[tuple[Any, str | None]] = []
        s, i, n = self._buf, 0, len(self._buf)
        while i < n:
            c = s[i]
            if c in " \t\r\n":
                i += 1
                continue
            if c in _PUNCT:
                self._token(c, None, out)
                i += 1
                continue
            if c in "\"'":
                j = self._scan_string(s, i)
                if j is None:
                    break           # incomplete: wait for more
                if isinstance(j, _Stray):
                    self._stray(j.text, out)
                    i = i + len(j.text)
                    continue
                end, value = j
                self._token("str", value, out)
                i = end
                continue
            if c == "-" or c.isdigit():
                j = i + 1
                while j < n and (s[j].isdigit() or s[j] in ".eE+-"):
                    j += 1
                if j == n:
                    break
                text = s[i:j]
                try:
                    value: Any = int(text) if text.lstrip("-").isdigit() else float(text)
                except ValueError:
                    self._stray(text, out)
                else:
                    self._token("num", value, out)
                i = j
                continue
            if c.isalpha():
                j = i + 1
                while j < n and s[j].isalnum():
                    j += 1
                if j == n:
                    break
                word = s[i:j]
                self._token("kw", word, out)
                i = j
                continue
            self._stray(c, out)
            i += 1
        self._buf = s[i:]
        return out

    @staticmethod
    def _scan_string(s: str, i: int):
        """(end, value), None if incomplete, or _Stray on a bad escape/char."""
        q = s[i]
        j, n = i + 1, len(s)
        parts: list[str] = []
        while j < n:
            c = s[j]
            if c == q:
                return j + 1, "".join(parts)
            if c == "\\":
                if j + 1 >= n:
                    return None
                e = s[j + 1]
                if e in _ESC:
                    parts.append(_ESC[e])
                    j += 2
                    continue
                if e == "u":
                    if j + 6 > n:
                        return None
                    hx = s[j + 2:j + 6]
                    try:
                        cp = int(hx, 16)
                    except ValueError:
                        return _Stray(s[i:j + 2])
                    # a surrogate pair becomes one character
                    if 0xD800 <= cp < 0xDC00 and s[j + 6:j + 8] == "\\u":
                        if j + 12 > n:
                            return None
                        try:
                            lo = int(s[j + 8:j + 12], 16)
                        except ValueError:
                            lo = 0
                        if 0xDC00 <= lo < 0xE000:
                            parts.append(chr(0x10000 + ((cp - 0xD800) << 10) + lo - 0xDC00))
                            j += 12
                            continue
                    parts.append(chr(cp))
                    j += 6
                    continue
                return _Stray(s[i:j + 2])
            if ord(c) < 0x20:
                return _Stray(s[i:j + 1])
            parts.append(c)
            j += 1
        return None

    # -- streamer (json-streamer.c) -----------------------------------------
    def _reset(self) -> None:
        self._tokens = []
        self._braces = self._brackets = 0

    def _stray(self, text: str, out: list) -> None:
        self._reset()
        out.append((None, f"JSON parse error, stray '{text}'"))

    def _token(self, kind: str, value: Any, out: list) -> None:
        if kind == "{":
            self._braces += 1
        elif kind == "}":
            self._braces -= 1
        elif kind == "[":
            self._brackets += 1
        elif kind == "]":
            self._brackets -= 1
        self._tokens.append((kind, value))
        if self._braces > MAX_DEPTH or self._brackets > MAX_DEPTH \
                or len(self._tokens) > MAX_TOKENS:
            self._reset()
            out.append((None, "JSON parse error, JSON nesting too deep or token count exceeded"))
            return
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 \
                and self._brackets >= 0:
            return
        tokens = self._tokens
        self._reset()
        try:
            value, _ = _parse_value(tokens, 0)
        except _ParseError as e:
            out.append((None, f"JSON parse error, {e}"))
            return
        out.append((value, None))


# --------------------------------------------------------------------------
# Parser (json-parser.c messages)


class _ParseError(Exception):
    pass


def _parse_value(toks: list, i: int) -> tuple[Any, int]:
    if i >= len(toks):
        raise _ParseError("premature EOI")
    kind, v = toks[i]
    if kind == "{":
        return _parse_object(toks, i + 1)
    if kind == "[":
        return _parse_array(toks, i + 1)
    if kind in ("str", "num"):
        return v, i + 1
    if kind == "kw":
        if v in _KEYWORDS:
            return _KEYWORDS[v], i + 1
        raise _ParseError(f"invalid keyword '{v}'")
    raise _ParseError("expecting value")


def _parse_pair(toks: list, i: int, obj: dict) -> int:
    if i >= len(toks):
        raise _ParseError("premature EOI")
    kind, key = toks[i]
    if kind != "str":
        raise _ParseError("key is not a string in object")
    i += 1
    if i >= len(toks):
        raise _ParseError("premature EOI")
    if toks[i][0] != ":":
        raise _ParseError("missing : in object pair")
    i += 1
    if i >= len(toks):
        raise _ParseError("premature EOI")
    value, i = _parse_value(toks, i)
    if key in obj:
        raise _ParseError("duplicate key")
    obj[key] = value
    return i


def _parse_object(toks: list, i: int) -> tuple[dict, int]:
    obj: dict[str, Any] = {}
    if i >= len(toks):
        raise _ParseError("premature EOI")
    if toks[i][0] == "}":
        return obj, i + 1
    i = _parse_pair(toks, i, obj)
    while True:
        if i >= len(toks):
            raise _ParseError("premature EOI")
        kind = toks[i][0]
        if kind == "}":
            return obj, i + 1
        if kind != ",":
            raise _ParseError("expected separator in dict")
        i = _parse_pair(toks, i + 1, obj)


def _parse_array(toks: list, i: int) -> tuple[list, int]:
    arr: list[Any] = []
    if i >= len(toks):
        raise _ParseError("premature EOI")
    if toks[i][0] == "]":
        return arr, i + 1
    v, i = _parse_value(toks, i)
    arr.append(v)
    while True:
        if i >= len(toks):
            raise _ParseError("premature EOI")
        kind = toks[i][0]
        if kind == "]":
            return arr, i + 1
        if kind != ",":
            raise _ParseError("expected separator in list")
        v, i = _parse_value(toks, i + 1)
        arr.append(v)


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
