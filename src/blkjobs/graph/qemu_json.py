"""QEMU's JSON, as ``json:`` image names hold it: strings may be single-quoted
(QEMU's extension), and the errors are worded as QEMU words them."""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import ImageError


def parse_json(text: str) -> dict[str, Any]:
    """``json:`` options: QEMU's JSON, where strings may be single-quoted."""
    value = _Json(text).document()
    if not isinstance(value, dict):
        raise ImageError("Invalid JSON object given")
    return value


class _Json:
    """A JSON reader with QEMU's extension (``'...'`` strings) and its error
    texts."""
    _TOKEN = re.compile(r"\s*(?:([{}\[\]:,])|(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')"
                        r"|(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)"
                        r"|(\S))", re.S)

    def __init__(self, text: str):
        self.tokens: list[tuple[str, Any]] = []
        for m in self._TOKEN.finditer(text):
            punct, string, number, word, other = m.groups()
            if punct:
                self.tokens.append(("p", punct))
            elif string:
                self.tokens.append(("v", _unquote(string)))
            elif number:
                self.tokens.append(("v", float(number) if "." in number or "e" in number.lower()
                                    else int(number)))
            elif word:
                if word not in ("true", "false", "null"):
                    raise ImageError(_json_error(f"invalid keyword '{word}'"))
                self.tokens.append(("v", {"true": True, "false": False, "null": None}[word]))
            elif other:
                if other in "\"'":
                    raise ImageError(_json_error("premature EOI"))
                raise ImageError(_json_error(f"stray '{other}'"))
        self.pos = 0

    def document(self) -> Any:
        if not self.tokens:
            raise ImageError("Could not parse the JSON options: Expecting a JSON value")
        value = self.value()
        if self.pos != len(self.tokens):
            raise ImageError(_json_error("expecting value"))
        return value

    def _next(self) -> tuple[str, Any]:
        if self.pos >= len(self.tokens):
            raise ImageError(_json_error("premature EOI"))
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def value(self) -> Any:
        kind, v = self._next()
        if kind == "v":
            return v
        if v == "{":
            return self._object()
        if v == "[":
            return self._array()
        raise ImageError(_json_error("expecting value"))

    def _object(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tokens[self.pos:self.pos + 1] == [("p", "}")]:
            self.pos += 1
            return out
        while True:
            kind, key = self._next()
            if kind != "v" or not isinstance(key, str):
                raise ImageError(_json_error("key is not a string in object"))
            if self._next() != ("p", ":"):
                raise ImageError(_json_error("missing : in object pair"))
            out[key] = self.value()
            tok = self._next()
            if tok == ("p", "}"):
                return out
            if tok != ("p", ","):
                raise ImageError(_json_error("expected separator in dict"))

    def _array(self) -> list[Any]:
        out: list[Any] = []
        if self.tokens[self.pos:self.pos + 1] == [("p", "]")]:
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            tok = self._next()
            if tok == ("p", "]"):
                return out
            if tok != ("p", ","):
                raise ImageError(_json_error("expected separator in list"))


def _json_error(what: str) -> str:
    return f"Could not parse the JSON options: JSON parse error, {what}"


def _unquote(s: str) -> str:
    body = s[1:-1]
    if s[0] == "'":
        body = re.sub(r"\\'", "'", body).replace('"', '\\"')
    try:
        out = json.loads(f'"{body}"')
    except ValueError:
        raise ImageError(_json_error("invalid escape sequence in string")) from None
    return str(out)
