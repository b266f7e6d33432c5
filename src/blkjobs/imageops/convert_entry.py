"""``convert``'s entry point (the command line's): it decides which converter
copies, and imports only that one (start-up time is part of every copy).

* local files (raw, qcow2, a backing chain): :func:`.convert.convert`, the C
  engine over host files;
* an NBD URI on either side, ``--salvage``, an encrypted source or target,
  or a source under fault injection: the buffer path of :mod:`.convert_nbd`
  (:mod:`.convert_faults` for the fault-injected source).

The tests that pick a path are cheap (:func:`.convert_base.injects_faults`,
:func:`.convert_base.encrypted`): a name's prefix, a spec's parse (only for
``json:``/``blkdebug:`` names), a header's encryption field.
"""
from __future__ import annotations

from ..formats import is_nbd_uri
from .convert_base import ConvertOptions, ConvertResult, check_options, encrypted, injects_faults

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["convert"]


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
    from .convert_nbd import convert_nbd     # here: a file convert does not need it
    from .images import check_format
    check_format(o.dst_fmt, "target")
    check_format(o.src_fmt, "source")
    check_options(o)
    return convert_nbd(src, dst, o, progress, check)
