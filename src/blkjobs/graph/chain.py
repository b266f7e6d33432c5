"""Opening an image with its whole backing chain into a :class:`~.node.Graph`,
and where a relative backing name points."""
from __future__ import annotations

import os

from ..errors import ImageError
from ..formats import is_nbd_uri, is_spec, open_image, probe_format
from .node import Graph, Node
from .perm import ALL, Perm


def resolve_backing(overlay_path: str, backing: str) -> str:
    """A relative backing name is relative to the overlay's directory."""
    if os.path.isabs(backing) or is_spec(backing):
        return backing
    return os.path.join(os.path.dirname(overlay_path), backing)


def _check_backing_file(path: str, of: str) -> None:
    """A backing file must exist and be a regular file or a block device
    (a FIFO named by a hostile image would block the open forever). Checked
    on an fd opened non-blocking; the drivers check their own fd again."""
    from ..errors import NotAnImageFile
    from ..formats.cache import open_file
    try:
        os.close(open_file(path, devices=False))
    except OSError as e:
        why = e.strerror
    except NotAnImageFile as e:
        why = str(e).rsplit(": ", 1)[-1]
    else:
        return
    # the name comes from the image: control characters must not break the line
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in path)
    raise ImageError(f"Could not open backing file '{shown}' of '{of}': {why}")


def open_chain(path: str, fmt: str | None = None, read_only: bool = True,
               graph: Graph | None = None, name: str | None = None,
               locking: bool = True, key_secret: str | None = None,
               header_only: bool = False, data_file: str | None = None) -> Node:
    """Open ``path`` and its whole backing chain; return the top node.

    The top node is opened as asked; backing nodes always read-only. A
    backing file whose format is not recorded is probed (so it opens as
    qcow2 or as *read-only* raw, never as a writable raw guess). Loops
    (a file appearing twice in its own chain) raise ImageError. The top node
    is held by the owner ``'open'`` with consistent read, sharing all.
    ``key_secret``: the secret unlocking the top image when it is encrypted
    (``formats.open_image``); ``header_only``: encrypted images without a
    key open for their headers only (``info --backing-chain``);
    ``data_file``: the top qcow2 image's external data file (its
    ``data-file`` option).
    """
    if graph is None:
        graph = Graph(locking=locking)
    opened: list[Node] = []
    seen: dict[str, str] = {}
    try:
        cur_path, cur_fmt, ro = path, fmt, read_only
        prev: Node | None = None
        while True:
            real = cur_path if is_nbd_uri(cur_path) or is_spec(cur_path) \
                else os.path.realpath(cur_path)
            if real in seen:
                # qemu-img's words (info --backing-chain)
                raise ImageError(f"Backing file '{cur_path}' creates an infinite loop.")
            seen[real] = cur_path
            if is_spec(cur_path):      # json:{...}, file:NAME, blkdebug:...
                from .blockspec import open_spec, parse     # (only then: start-up)
                drv, cur_fmt = open_spec(parse(cur_path, cur_fmt), read_only=ro)
            else:
                if cur_fmt is None:
                    cur_fmt = probe_format(cur_path)
                drv = open_image(cur_path, cur_fmt, read_only=ro,
                                 key_secret=key_secret if prev is None else None,
                                 header_only=header_only,
                                 data_file=data_file if prev is None else None)
            node = graph.add(drv, name if prev is None else None, cur_fmt)
            opened.append(node)
            if prev is None:
                node.take("open", Perm.CONSISTENT_READ, ALL)
            else:
                prev.attach_backing(node)
            ref = drv.backing_ref      # a json: name's "backing"
            if ref is not None:
                raise ImageError(f"Could not open backing file: Cannot find device='{ref}' "
                                 f"nor node-name='{ref}'")
            bspec: str = drv.backing_spec
            bf = None if drv.no_backing else drv.backing_filename
            if not bf and not bspec:
                break
            if len(opened) > 256:
                raise ImageError(f"backing chain of '{path}' is too long")
            cur_fmt, ro, prev = None if bspec else drv.backing_format, True, node
            if bspec or not bf:
                cur_path = bspec
                continue
            if drv.no_dirname and not os.path.isabs(bf) and not is_spec(bf):
                raise ImageError("Cannot generate a base directory for quorum nodes")
            # relative to the overlay's file (under a json: name too)
            cur_path = resolve_backing(drv.map_filename if drv.map_filename is not None
                                       else drv.filename, bf)
            if not is_spec(cur_path):
                _check_backing_file(cur_path, drv.filename)
        return opened[0]
    except BaseException:
        for n in reversed(opened):
            n.close()
        raise
