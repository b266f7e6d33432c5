"""blkjobs rebase [-f FMT] -b BACKING [-F FMT] [-u] IMG

Safe mode copies into IMG the data that differs between the old and the new
backing file before relinking, so the guest view does not change; -u only
rewrites the header. -b "" makes IMG standalone."""
from __future__ import annotations

from ..imageops.rebase import rebase
from . import image_opts
from .copy_progress import Reporter, add_progress_options
from . import cache_mode


def register(sub):
    p = sub.add_parser("rebase", help="change the backing file of an image")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-b", dest="backing", required=True, metavar="BACKING",
                   help='new backing file ("" = none)')
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the new backing file")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only rewrite the backing file name in the header")
    add_progress_options(p, "the comparison of the backing files (safe mode)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: no progress")
    cache_mode.add(p, t="writeback", T="writeback")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: read a new backing file another process is writing")
    p.add_argument("image")
    image_opts.add(p, "image")
    p.set_defaults(func=run)


def run(args) -> int:
    prog = Reporter(args, quiet=args.quiet)
    try:
        rebase(args.image, args.backing, args.backing_fmt, args.fmt, args.unsafe,
               force_share=args.force_share, progress=prog.update)
        if not prog.total:      # -u, or nothing to compare: done all the same
            prog.update(1, 1)
        prog.finish()
    finally:
        prog.close()
    return 0
