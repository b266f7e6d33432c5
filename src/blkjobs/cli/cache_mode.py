"""``-t CACHE`` / ``-T SRC_CACHE``: qemu-img's cache modes on the commands
where qemu-img 7.2 takes them (convert -t -T, commit -t, rebase -t -T,
compare -T, check -T, amend -t), as the open flags of the image files
(:mod:`blkjobs.formats.cache`: none = O_DIRECT, directsync = O_DIRECT and
O_DSYNC, writethrough = O_DSYNC; unsafe skips the final flush).

Which files a mode reaches: ``-t`` the files a command writes, ``-T`` the
files it only reads (convert, rebase); a command with one of them gives it
to every file it opens (commit, amend: ``-t``; compare, check: ``-T``)."""
from __future__ import annotations

from ..errors import UsageError
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


def apply(args) -> None:
    """Check the modes (qemu-img's texts) and set the open flags."""
    has_t, has_T = args._cache_sides
    dst = src = None
    if has_t:
        if args.cache not in cache.MODES:
            raise UsageError(f"Invalid cache option: {args.cache}")
        dst = args.cache
    if has_T:
        if args.src_cache not in cache.MODES:
            raise UsageError(f"Invalid source cache option: {args.src_cache}")
        src = args.src_cache
    cache.set_cli_modes(src=src or dst, dst=dst or src)
