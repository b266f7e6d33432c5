"""Sizes shown in ``blkjobs bench``'s labels (fio style: ``4k``, ``1M``) and
messages (``1.5 GiB``), and comma lists of values. Sizes are parsed by
:func:`blkjobs.units.parse_size`, qemu-img's grammar, as everywhere else.
"""
from __future__ import annotations

from ..errors import UsageError


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
