"""``-t CACHE`` / ``-T SRC_CACHE``: qemu-img's cache modes on the commands
where qemu-img 7.2 takes them (convert -t -T, commit -t, rebase -t -T,
compare -T, check -T, amend -t), as the open flags of the image files
(:mod:`blkjobs.formats.cache`: none = O_DIRECT, directsync = O_DIRECT and
O_DSYNC, writethrough = O_DSYNC; unsafe skips the final flush).

Which files a mode reaches: ``-t`` the files a command writes, ``-T`` the
files it only reads (convert, rebase); a command with one of them gives it
to every file it opens (commit, amend: ``-t``; compare, check: ``-T``).

``main`` applies them before the command (``cli.main._apply_cache_modes``:
checked with qemu-img's texts, then the open flags set), without importing
this module, which only adds the options to a parser."""
from __future__ import annotations

from ..formats import cache

MODES = ", ".join(cache.CHOICES)


def add(p, t: str | None = None, T: str | None = None) -> None:
    """Add ``-t`` (default ``t``) and/or ``-T`` (default ``T``) to parser ``p``."""
    if t is not None:
        p.add_argument("-t", dest="cache", metavar="CACHE", default=t,
                       help=f"cache mode of the {'target' if T is not None else 'image'} "
                       f"({MODES}; default {t})")
    if T is not None:
        p.add_argument("-T", dest="src_cache", metavar="SRC_CACHE", default=T,
                       help=f"cache mode of the {'source' if t is not None else 'image'} "
                       f"files ({MODES}; default {T})")
    p.set_defaults(_cache_sides=(t is not None, T is not None))

