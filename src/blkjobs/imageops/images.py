"""Opening images and backing chains for the commands, with one-line errors.

Every command that reads an image goes through :func:`open_ro`: it checks the
path like :func:`.files.open_source` (missing file, directory, not a regular
file), probes the format unless given, and opens the whole backing chain
read-only through the graph layer.
"""
from __future__ import annotations

import errno
import os

from ..errors import ImageError, OSErrorWithContext, UsageError
from ..formats import FORMATS, is_nbd_uri, is_spec, open_image, probe_format
from ..graph.lock import opening
from .files import open_source

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..formats.base import Driver
    from ..graph import Graph, Node


def check_format(fmt: str | None, what: str = "image") -> None:
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unsupported {what} format '{fmt}' (supported: {', '.join(FORMATS)})")


def probe(path: str, fmt: str | None = None, header_only: bool = False) -> str:
    """Validate ``path`` as a readable image file and return its format
    (``header_only``: an encrypted image's key is not tried, as by info)."""
    if is_spec(path):      # fmt: given, or what this found before
        return probe_spec(path, fmt if fmt in FORMATS else None, header_only)
    check_format(fmt, "source" if fmt else "image")
    if is_nbd_uri(path):
        if fmt not in (None, "raw", "qcow2"):
            raise UsageError(f"'{path}': only the raw and qcow2 formats are supported over NBD")
        return fmt or "raw"
    try:
        os.close(open_source(path))    # one-line errors for missing/dir/special files
    except OSErrorWithContext as e:
        if e.errno == errno.EISDIR:
            raise
        # qemu-img names the image, then the file layer's own open
        raise OSErrorWithContext(e.errno, f"Could not open '{path}': Could not open",
                                 path=path) from None
    return fmt or probe_format(path)


def probe_spec(name: str, fmt: str | None = None, header_only: bool = False) -> str:
    """The format of the image ``name`` in one of qemu-img's other name
    syntaxes (:mod:`blkjobs.graph.blockspec`), opened once to find it;
    qemu-img's ``Could not open 'NAME': WHY`` when it does not open."""
    from ..graph.blockspec import open_spec, parse
    from ..graph.blockspec_net import keep_probed
    try:
        spec = parse(name, fmt)
        drv, found = open_spec(spec, header_only=header_only)
    except ImageError as e:
        raise ImageError(f"Could not open '{name}': {e}") from None
    if not keep_probed(spec, drv):      # an NBD connection: kept for the open that follows
        drv.close()
    return found


def open_one(path: str, fmt: str | None, read_only: bool = True,
             header_only: bool = False) -> Driver:
    """The image ``path`` alone (no backing chain), any name syntax
    (``header_only``: an encrypted image without unlocking it)."""
    if is_spec(path):
        from ..graph.blockspec import open_spec, parse
        try:
            return open_spec(parse(path, fmt), read_only, with_backing=False,
                             header_only=header_only)[0]
        except ImageError as e:
            raise ImageError(f"Could not open '{path}': {e}") from None
    return open_image(path, fmt, read_only, header_only=header_only)


def cli_graph(force_share: bool = False, stable: bool = False) -> Graph:
    from ..graph import Graph       # here: a raw -> raw convert needs no graph
    """A graph for a qemu-img style command, holding QEMU's lock bytes.
    ``stable``: every image refuses other writers (qemu-img convert's source,
    rebase's backing files, the job commands); otherwise a qcow2 image (and
    a backing file) refuses them and a raw one shares writing, as qemu-img's
    info, map and compare do. ``force_share`` (-U): share everything."""
    return Graph(locking=True, share_writes=not stable, force_share=force_share,
                 format_locks=True)


def open_ro(path: str, fmt: str | None = None, force_share: bool = False,
            stable: bool = False, what: str = "Could not open",
            key_secret: str | None = None, header_only: bool = False) -> Node:
    """Open ``path`` (format given or probed) and its backing chain read-only,
    holding what qemu-img's readers hold (see :func:`cli_graph`). A conflict
    raises qemu-img's error (``Could not open 'PATH': Failed to get shared
    "write" lock``). Returns the top node; close with ``node.close_chain()``.
    ``key_secret``: the secret of an encrypted top image (formats.secrets)."""
    from ..formats.base import CryptoOpenError
    from ..graph import open_chain
    fmt = probe(path, fmt)
    try:
        with opening(path, what):
            return open_chain(path, fmt, read_only=True, graph=cli_graph(force_share, stable),
                              key_secret=key_secret, header_only=header_only)
    except CryptoOpenError as e:        # qemu-img's prefix
        raise CryptoOpenError(f"{what} '{path}': {e}") from None
    except ImageError as e:     # json:, file:...: qemu-img names the image first
        if not is_spec(path) or str(e).startswith(f"{what} '{path}'"):
            raise
        raise ImageError(f"{what} '{path}': {e}") from None
