"""Sizes on the command line, the way fio and qemu-img write them: ``4k``,
``1M``, ``512``, ``1.5G``. Suffixes are binary (k = 1024), case-insensitive,
with an optional ``B``/``iB`` (``4KiB``). A shared parser may replace this one
(blkjobs.units) later; the bench package keeps its own to stay standalone.
"""
from __future__ import annotations

import re

from ..errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'4k' -> 4096. Raises UsageError naming ``what`` on a bad value."""
    m = _RE.match(str(text))
    if not m:
        raise UsageError(f"invalid {what} '{text}': use a number with an optional "
                         f"suffix k, M, G or T (e.g. 4k, 1M)")
    num, unit = m.group(1), m.group(2).lower()
    if m.group(3) and m.group(3).lower() == "ib" and not unit:
        raise UsageError(f"invalid {what} '{text}'")
    value = float(num) * _UNITS[unit]
    if value != int(value):
        raise UsageError(f"invalid {what} '{text}': not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """4096 -> '4k', 1048576 -> '1M', 1536 -> '1.5k' (for labels: fio style)."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= mult:
            v = n / mult
            return f"{v:g}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{int(n)}"


def format_bytes(n: float) -> str:
    """Human amount with binary units spelled out: '1.5 GiB'."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{int(n)} B"


def parse_list(text: str, conv, what: str) -> list:
    """'4k,1M' -> [conv('4k'), conv('1M')], duplicates dropped, order kept."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"invalid {what} list '{text}': empty item")
        v = conv(part)
        if v not in out:
            out.append(v)
    return out
