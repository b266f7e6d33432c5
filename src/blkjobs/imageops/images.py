"""Opening images and backing chains for the commands, with one-line errors.

Every command that reads an image goes through :func:`open_ro`: it checks the
path like :func:`.files.open_source` (missing file, directory, not a regular
file), probes the format unless given, and opens the whole backing chain
read-only through the graph layer.
"""
from __future__ import annotations

import os

from ..errors import UsageError
from ..formats import FORMATS, probe_format
from ..graph import Node, open_chain
from .files import open_source


def check_format(fmt: str | None, what: str = "image") -> None:
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unsupported {what} format '{fmt}' (supported: {', '.join(FORMATS)})")


def probe(path: str, fmt: str | None = None) -> str:
    """Validate ``path`` as a readable image file and return its format."""
    check_format(fmt, "source" if fmt else "image")
    os.close(open_source(path))        # one-line errors for missing/dir/special files
    return fmt or probe_format(path)


def open_ro(path: str, fmt: str | None = None, locking: bool = True) -> Node:
    """Open ``path`` (format given or probed) and its backing chain read-only;
    returns the top node. Close with ``node.close_chain()``."""
    fmt = probe(path, fmt)
    return open_chain(path, fmt, read_only=True, locking=locking)
