"""qcow2 (v2 and v3) driver: see :mod:`.driver` for the design notes.

* :class:`Qcow2` — open an image (``Qcow2(path, read_only=True)``);
* :func:`.create.create` — make a new image (its module is imported by
  those who create: opening an image does not need it);
* :func:`check` — ``qemu-img check`` compatible consistency check/repair
  (imported on first use: opening an image does not need it).
"""
from __future__ import annotations

from .driver import Qcow2
from .header import MAGIC

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

    from .check import check

__all__ = ["Qcow2", "check", "MAGIC", "probe"]


def __getattr__(name: str) -> Any:
    if name == "check":
        from .check import check
        return check
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def probe(head: bytes) -> bool:
    """True when the first bytes of a file carry the qcow2 magic."""
    return len(head) >= 4 and int.from_bytes(head[:4], "big") == MAGIC
