"""Sizes and rates in qemu-img's spelling -- 512, 4k, 4K, 1M, 1.5G, 1T, 512b --
and sizes shown to people. Suffixes are binary (k = 1024), as in qemu-img.
Below every layer (like :mod:`.errors`): the command line, image operations
and formats all use it."""
from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "e": 1 << 60}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?\s*$", re.I)


def parse_size(text: str, what: str = "size", minimum: int = 0,
               maximum: int = (1 << 63) - 1) -> int:
    """Parse a size; raise UsageError with a one-line message if invalid."""
    m = _RE.match(str(text))
    if not m:
        raise UsageError(f"invalid {what} '{text}': expected a number with an optional "
                         "suffix k, M, G, T (e.g. 4k, 1.5G)")
    num, unit = m.group(1), m.group(2).lower()
    value = float(num) * _UNITS[unit] if "." in num else int(num) * _UNITS[unit]
    if value != int(value):
        raise UsageError(f"invalid {what} '{text}': not a whole number of bytes")
    value = int(value)
    if value < minimum or value > maximum:
        raise UsageError(f"invalid {what} '{text}': must be between {minimum} and {maximum} bytes")
    return value


def human(n: float, binary: bool = True) -> str:
    """1536 -> '1.5 KiB' (qemu-img style)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] if binary else ["B", "kB", "MB", "GB", "TB", "PB"]
    base = 1024.0 if binary else 1000.0
    x = float(n)
    for u in units:
        if abs(x) < base or u == units[-1]:
            if u == "B":
                return f"{int(x)} B"
            return f"{x:.3g} {u}"
        x /= base
    return f"{n} B"
