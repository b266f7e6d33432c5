"""blkjobs compare [-f FMT] [-F FMT] [-s] A B (raw, qcow2, backing chains):
exit 0 identical, 1 different, 2 error."""
from __future__ import annotations

import sys

from ..errors import BlkjobsError
from ..imageops.compare import compare_images
from . import progname


def register(sub):
    p = sub.add_parser("compare", help="compare the contents of two images",
                       description="Exit status: 0 identical, 1 different, 2 error.")
    p.add_argument("-f", dest="fmt_a", metavar="FMT")
    p.add_argument("-F", dest="fmt_b", metavar="FMT")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: compare images another process is writing")
    p.add_argument("-q", dest="quiet", action="store_true", help="accepted; output is short")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: images of different sizes differ")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        r = compare_images(args.a, args.b, args.fmt_a, args.fmt_b, strict=args.strict,
                           force_share=args.force_share)
    except BlkjobsError as e:
        sys.stderr.write(f"{progname()}: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"{progname()}: {e}\n")
        return 2
    if r.size_mismatch:
        if args.strict:
            print("Strict mode: Image size mismatch!")
            return 1
        print("Warning: Image size mismatch!")
    if r.status_mismatch:
        print(f"Strict mode: Offset {r.offset} block status mismatch!")
        return 1
    if r.identical:
        print("Images are identical.")
        return 0
    # qemu-img compares in 512-byte sectors and names the first differing sector
    assert r.offset is not None         # images that differ differ somewhere
    print(f"Content mismatch at offset {r.offset // 512 * 512}!")
    return 1
