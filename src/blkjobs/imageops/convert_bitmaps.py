"""``convert --bitmaps [--skip-broken-bitmaps]``: copy the persistent dirty
bitmaps of the source image (its top layer) into the qcow2 target, as
``qemu-img convert --bitmaps`` does: name, granularity, enabled flag and
bits. :func:`source_bitmaps` runs before the copy (QEMU's refusals come
before any target is created); :func:`copy_bitmaps` after it.

An inconsistent (in-use) bitmap is refused (``Cannot copy inconsistent
bitmap``), or with ``--skip-broken-bitmaps`` skipped with a warning.
"""
from __future__ import annotations

import sys
from typing import Any

from ..errors import UsageError
from ..graph import Graph, Perm
from .images import open_one, probe


def _open(path: str, fmt: str | None, read_only: bool, force_share: bool = False) -> Any:
    fmt = probe(path, fmt)
    g = Graph()
    node = g.add(open_one(path, fmt, read_only=read_only), fmt=fmt)
    try:
        if read_only:
            shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
            if force_share:
                shared |= Perm.WRITE | Perm.RESIZE
            node.take("convert --bitmaps", Perm.CONSISTENT_READ, shared)
        else:
            node.take("convert --bitmaps", Perm.WRITE | Perm.CONSISTENT_READ,
                      Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    except BaseException:
        node.close()
        raise
    return node


def source_bitmaps(src: str, src_fmt: str | None, dst_fmt: str, skip_broken: bool,
                   force_share: bool = False, prog: str = "blkjobs") -> list[str]:
    """The names of the source's bitmaps to copy (QEMU's checks and texts,
    in its order); warnings for the skipped ones go to stderr (``prog``:
    the program's name in the texts)."""
    if dst_fmt != "qcow2":
        raise UsageError(f"Format driver '{dst_fmt}' does not support bitmaps")
    node = _open(src, src_fmt, True, force_share)
    try:
        pbm = node.driver.persistent_bitmaps
        if pbm is None:
            raise UsageError("Source lacks bitmap support")
        names = []
        # QEMU checks (and warns) from the last bitmap of the directory to
        # the first (its list of a node's bitmaps is built by prepending);
        # the copies keep the directory's order
        for b in reversed(list(pbm)):
            if b.in_use:
                if not skip_broken:
                    raise UsageError(f"Cannot copy inconsistent bitmap '{b.name}'\nTry "
                                     f"--skip-broken-bitmaps, or use '{prog} bitmap --remove' "
                                     "to delete it")
                print(f"{prog}: warning: Skipping inconsistent bitmap '{b.name}'",
                      file=sys.stderr, flush=True)
                continue
            names.append(b.name)
        return names[::-1]
    finally:
        node.close()


def copy_bitmaps(src: str, src_fmt: str | None, dst: str, names: list[str],
                 force_share: bool = False) -> None:
    """Add the bitmaps ``names`` of ``src`` to the qcow2 image ``dst``."""
    snode = _open(src, src_fmt, True, force_share)
    try:
        dnode = _open(dst, "qcow2", False)
        try:
            spbm = snode.driver.persistent_bitmaps
            dpbm = dnode.driver.persistent_bitmaps
            if dnode.driver.header.version < 3:
                raise UsageError("Format driver 'qcow2' does not support bitmaps")
            try:
                # added as QEMU walks the source's list (the directory's last
                # bitmap first); stored newest first: the directory's order
                for name in reversed(names):
                    sb = spbm.get(name)
                    try:
                        dpbm.add(name, sb.granularity, disabled=not sb.enabled,
                                 node_name=dnode.name)
                    except UsageError as e:
                        raise UsageError(f"Failed to create bitmap {name}: {e}") from None
                    dpbm.merge(name, name, spbm)
            finally:
                dpbm.store()        # what was added, as qemu-img leaves it
        finally:
            dnode.close()
    finally:
        snode.close()
