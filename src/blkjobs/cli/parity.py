"""Helpers of the commands that mirror qemu-img's image subcommands
(measure, resize, snapshot, amend, dd): opening images with qemu-img's
error texts and its lock discipline (sizes: :mod:`blkjobs.units`)."""
from __future__ import annotations

import re

from ..errors import BlkjobsError, OSErrorWithContext, UsageError

RAW_PROBED = ("WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
              "         Automatically detecting the format is dangerous for raw images, "
              "write operations on block 0 will be restricted.\n"
              "         Specify the 'raw' format explicitly to remove the restrictions.\n")
_LOCK = re.compile(r'^Failed to get (shared )?"([a-z ]+)" lock on \'(.*)\': '
                   r'Is another process using the image\?$')


def could_not_open(path: str, e: BlkjobsError) -> UsageError:
    """qemu-img's ``Could not open 'PATH': REASON`` (the file layer's own
    "Could not open" text stays inside, as qemu-img prints it)."""
    from ..formats.base import FormatOpenError
    from ..formats.sniff import is_spec
    text = str(e)
    if isinstance(e, FormatOpenError):
        return UsageError(text)     # the format driver's refusal, worded as qemu-img's
    m = _LOCK.match(text)
    if m:       # QEMU's wording of a lock conflict
        return UsageError(f"Could not open '{path}': Failed to get {m.group(1) or ''}\"{m.group(2)}\" "
                          f"lock\nIs another process using the image [{m.group(3)}]?")
    if text.startswith((f"Could not open '{path}': Failed to get",
                        f"Could not open '{path}': Unsupported qcow2 feature(s): ",
                        f"Could not open '{path}': Image is too big",
                        f"Could not open '{path}': L1 table is too small",
                        f"Could not open '{path}': Snapshot table ",
                        f"Could not open '{path}': Too much extra metadata in snapshot",
                        f"Could not open '{path}': Could not open '{path}': ")) \
            or (text.startswith(f"Could not open '{path}': ") and is_spec(path)):
        return UsageError(text)      # already qemu-img's text (lock conflict, failed open)
    if isinstance(e, OSErrorWithContext) or text.startswith(f"Could not open '{path}'"):
        return UsageError(f"Could not open '{path}': {text}")
    if text.startswith(f"'{path}': "):
        text = text[len(path) + 4:]
    if text == "not a qcow2 image (bad magic)":
        text = "Image is not in qcow2 format"
    return UsageError(f"Could not open '{path}': {text}")


def check_fmt(fmt: str | None) -> None:
    from ..formats import FORMATS
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"Unknown file format '{fmt}'")


def open_rw(path: str, fmt: str | None, owner: str, resize: bool = False):
    """Open ``path`` (not its backing chain) read-write through the graph,
    holding what qemu-img holds: consistent read and write (and resize),
    sharing neither write nor resize with other processes. Returns the node
    (close with ``node.close()``)."""
    from ..formats import open_image, probe_format
    from ..graph import Graph
    from ..graph.perm import ALL, Perm
    from ..formats.sniff import is_spec
    from ..graph.blockspec import open_spec, parse
    from ..imageops.files import open_source
    import os
    check_fmt(fmt)
    try:
        if is_spec(path):       # json:, file:, --image-opts
            drv, fmt = open_spec(parse(path, fmt), read_only=False)
        else:
            os.close(open_source(path))
            fmt = fmt or probe_format(path)
            drv = open_image(path, fmt, read_only=False)
    except BlkjobsError as e:
        raise could_not_open(path, e) from None
    except OSError as e:
        raise UsageError(f"Could not open '{path}': Could not open '{path}': "
                         f"{e.strerror}") from None
    g = Graph(locking=True)
    node = g.add(drv, fmt=fmt)
    perm = Perm.CONSISTENT_READ | Perm.WRITE | (Perm.RESIZE if resize else 0)
    try:
        node.take(owner, perm, ALL & ~(Perm.WRITE | Perm.RESIZE))
    except BlkjobsError as e:
        node.close()
        raise could_not_open(path, e) from None
    return node


def open_chain_ro(path: str, fmt: str | None, force_share: bool = False):
    """Open ``path`` and its backing chain read-only with QEMU's read locks
    (sharing no write with other processes, unless ``force_share``, -U);
    qemu-img's ``Could not open`` texts."""
    from ..imageops.images import open_ro
    check_fmt(fmt)
    try:
        return open_ro(path, fmt, force_share=force_share)
    except BlkjobsError as e:
        raise could_not_open(path, e) from None
