"""blkjobs compare [-f FMT] [-F FMT] [-s] A B (raw, qcow2, backing chains):
exit 0 identical, 1 different, 2 error."""
from __future__ import annotations

import sys

from ..errors import BlkjobsError
from ..imageops.compare import ReadFailed, compare_images
from . import progname, progress_reporter


def register(sub):
    # argparse's options only: a plain command line (cli.quickparse) does not
    # import them (start-up)
    from . import cache_mode, image_opts
    from .copy_progress import add_progress_options
    p = sub.add_parser("compare", help="compare the contents of two images",
                       description="Exit status: 0 identical, 1 different, 2 error.")
    p.add_argument("-f", dest="fmt_a", metavar="FMT")
    p.add_argument("-F", dest="fmt_b", metavar="FMT")
    cache_mode.add(p, T="writeback")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: compare images another process is writing")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: print nothing; the exit status tells")
    add_progress_options(p, "the comparison")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: images of different sizes differ")
    p.add_argument("a")
    p.add_argument("b")
    image_opts.add(p, "a", "b", fmt=("fmt_a", "fmt_b"))
    p.set_defaults(func=run)


def run(args) -> int:
    prog = progress_reporter(args, lambda: _reporter(args))
    try:
        r = compare_images(args.a, args.b, args.fmt_a, args.fmt_b, strict=args.strict,
                           force_share=args.force_share, progress=prog.update)
        prog.finish()
    except ReadFailed as e:
        sys.stderr.write(f"{progname()}: {e}\n")
        if e.size_mismatch:
            print("Warning: Image size mismatch!")
        return e.exit_code
    except BlkjobsError as e:
        sys.stderr.write(f"{progname()}: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"{progname()}: {e}\n")
        return 2
    finally:
        prog.close()
    rc, msg = _verdict(r, args.strict)
    if not args.quiet:
        print(msg)
    return rc


def _reporter(args):
    from .copy_progress import Reporter
    return Reporter(args, quiet=args.quiet)


def _verdict(r, strict: bool) -> tuple[int, str]:
    """(exit status, qemu-img's line)."""
    warn = ""
    if r.size_mismatch:
        if strict:
            return 1, "Strict mode: Image size mismatch!"
        warn = "Warning: Image size mismatch!\n"
    if r.status_mismatch:
        return 1, f"{warn}Strict mode: Offset {r.offset} block status mismatch!"
    if r.identical:
        return 0, f"{warn}Images are identical."
    assert r.offset is not None         # images that differ differ somewhere
    # qemu-img compares in 512-byte sectors and names the first differing sector
    return 1, f"{warn}Content mismatch at offset {r.offset // 512 * 512}!"
