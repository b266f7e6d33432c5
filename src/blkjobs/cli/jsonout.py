"""``json.dumps``'s text, for the plain values our commands print (dicts,
lists and tuples of str, int, float, bool and None), without importing
:mod:`json`: its package loads the decoder, and with it ``re``, ``enum``,
``functools`` and ``collections`` -- ~26 M instructions, a quarter of a
``map --output=json`` of a small image, where scripts call ``info`` and
``map`` in loops. Strings are escaped by CPython's own C encoder
(``_json``), as ``json.dumps`` escapes them (``ensure_ascii``).
tests/test_jsonout.py holds it to ``json.dumps`` byte for byte."""
from __future__ import annotations

try:
    from _json import encode_basestring_ascii as _string
except ImportError:     # (an interpreter without the C accelerator)
    from json.encoder import py_encode_basestring_ascii as _string

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any


def dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps(obj, indent=indent)``."""
    out: list[str] = []
    _value(obj, out, None if indent is None else " " * indent, 0)
    return "".join(out)


def _value(o: Any, out: list[str], ind: str | None, level: int) -> None:
    if isinstance(o, str):
        out.append(_string(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        out.append(_float(o))
    elif isinstance(o, dict):
        _container("{", "}", [(_key(k), v) for k, v in o.items()], out, ind, level)
    elif isinstance(o, (list, tuple)):
        _container("[", "]", [(None, v) for v in o], out, ind, level)
    else:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _container(open_: str, close: str, items: list[tuple[str | None, Any]], out: list[str],
               ind: str | None, level: int) -> None:
    if not items:
        out.append(open_ + close)
        return
    if ind is None:
        sep, start, end = ", ", "", ""
    else:
        start = "\n" + ind * (level + 1)
        sep, end = "," + start, "\n" + ind * level
    out.append(open_ + start)
    for n, (key, v) in enumerate(items):
        if n:
            out.append(sep)
        if key is not None:
            out.append(key + ": ")
        _value(v, out, ind, level + 1)
    out.append(end + close)


def _key(k: Any) -> str:
    """A member's name as json writes it (keys that are not strings: as
    their JSON text, in quotes)."""
    if isinstance(k, str):
        return _string(k)
    if k is True or k is False or k is None:
        return '"' + {True: "true", False: "false", None: "null"}[k] + '"'
    if isinstance(k, int):
        return '"' + int.__repr__(k) + '"'
    if isinstance(k, float):
        return '"' + _float(k) + '"'
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


def _float(f: float) -> str:
    if f != f:
        return "NaN"
    if f == float("inf"):
        return "Infinity"
    if f == -float("inf"):
        return "-Infinity"
    return float.__repr__(f)
