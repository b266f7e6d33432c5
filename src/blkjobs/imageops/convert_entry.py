"""``convert``'s entry point (the command line's): it decides which converter
copies, and imports only that one (start-up time is part of every copy).

* local files (raw, qcow2, a backing chain): :func:`.convert.convert`, the C
  engine over host files;
* an NBD URI on either side, ``--salvage``, an encrypted source or target,
  or a source under fault injection: the buffer path of :mod:`.convert_nbd`
  (:mod:`.convert_faults` for the fault-injected source).

The tests that pick a path are cheap: a name's prefix, a spec's parse (only
for ``json:``/``blkdebug:`` names), a header's encryption field.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import BlkjobsError
from ..formats.sniff import is_nbd_uri
from .convert_base import ConvertOptions, ConvertResult

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["convert", "encrypted", "injects_faults"]


def convert(src: str, dst: str, opts: ConvertOptions | None = None,
            progress: Callable[[int, int], None] | None = None,
            check: Callable[[], None] | None = None) -> ConvertResult:
    """:func:`blkjobs.imageops.convert.convert`, and NBD URIs on either side,
    ``--salvage``, encrypted images, fault injection (:mod:`.convert_nbd`)."""
    o = opts or ConvertOptions()
    # -B, -c: qemu-img's order on the buffer path too (not into an export)
    faults = injects_faults(src) and not ((o.backing or o.compress) and is_nbd_uri(dst))
    if not (is_nbd_uri(src) or is_nbd_uri(dst) or o.salvage or faults or encrypted(src, dst, o)):
        # imported here: an NBD copy does not load the local converter
        from .convert import convert as convert_files
        return convert_files(src, dst, o, progress, check)
    from .convert_base import check_options
    from .convert_nbd import convert_nbd     # here: a file convert does not need it
    from .images import check_format
    check_format(o.dst_fmt, "target")
    check_format(o.src_fmt, "source")
    check_options(o)
    return convert_nbd(src, dst, o, progress, check)


def encrypted(src: str, dst: str, o: ConvertOptions) -> bool:
    """An encrypted source or target: its bytes move through the drivers'
    ciphers, on the buffer path of :mod:`.convert_nbd` (the C engine copies
    host bytes)."""
    from ..formats import is_encrypted
    try:
        if is_encrypted(src, o.src_fmt):
            return True
        if o.no_create:
            return is_encrypted(dst, o.dst_fmt)
    except OSError:
        return False            # the converter says what is wrong with the file
    return o.dst_fmt == "luks" or any(k.startswith("encrypt") for k in o.create_opts)


def injects_faults(name: str) -> bool:
    """``name`` is an image name with a ``blkdebug`` layer in it."""
    from ..formats.sniff import is_spec
    if not is_spec(name):
        return False
    from ..graph.blockspec import FILTER_DRIVERS, parse     # (a spec only: start-up)
    try:
        layer: Any = parse(name).top
    except BlkjobsError:        # a bad name: opening it says what is wrong
        return False
    while layer is not None:
        if layer.driver in FILTER_DRIVERS:
            return True
        layer = layer.child
    return False
