"""blkjobs compare [-s] A B: exit 0 identical, 1 different, 2 error."""
from __future__ import annotations

import sys

from ..errors import BlkjobsError
from ..imageops.compare import compare_raw


def register(sub):
    p = sub.add_parser("compare", help="compare the contents of two images",
                       description="Exit status: 0 identical, 1 different, 2 error.")
    p.add_argument("-f", dest="fmt_a", metavar="FMT")
    p.add_argument("-F", dest="fmt_b", metavar="FMT")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: images of different sizes differ")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        r = compare_raw(args.a, args.b, strict=args.strict)
    except BlkjobsError as e:
        sys.stderr.write(f"blkjobs: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"blkjobs: {e}\n")
        return 2
    if r.size_mismatch:
        print("Warning: Image size mismatch!" if not args.strict else
              "Strict mode: Image size mismatch!")
    if r.identical:
        print("Images are identical.")
        return 0
    print(f"Content mismatch at offset {r.offset}!")
    return 1
