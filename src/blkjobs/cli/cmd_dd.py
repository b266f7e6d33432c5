"""blkjobs dd [-f FMT] [-O FMT] [-U] if=INPUT of=OUTPUT [bs=N] [count=N] [skip=N]

As ``qemu-img dd``: OUTPUT is created (raw by default) and receives input
bytes from skip*bs on (see imageops.dd for qemu-img's count arithmetic)."""
from __future__ import annotations

import sys

from ..errors import UsageError
from ..units import parse_size, sector_size
from .parity import check_fmt, open_chain_ro, open_rw
from . import progname
from . import image_opts


def register(sub):
    p = sub.add_parser("dd", help="copy part of an image into a new image, dd style")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="input format")
    p.add_argument("-O", dest="out_fmt", default="raw", metavar="FMT",
                   help="output format (raw, default, or qcow2)")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("operands", nargs="*", metavar="if=|of=|bs=|count=|skip=")
    image_opts.add(p, "operands:if=")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats import create_image
    from ..imageops.dd import copy, length, plan
    ops: dict = {"bs": 512}
    for op in args.operands:
        key, eq, val = op.partition("=")
        if not eq or key not in ("if", "of", "bs", "count", "skip"):
            raise UsageError(f"unrecognized operand {key}")
        if key in ("if", "of"):
            ops[key] = val
            continue
        ops[key] = parse_size(val, key, 1, 2147483647) if key == "bs" else parse_size(val, key)
    if not ops.get("if") or not ops.get("of"):
        raise UsageError("Must specify both input and output files")
    if args.out_fmt not in ("raw", "qcow2"):
        raise UsageError("Unknown file format")
    check_fmt(args.fmt)
    src = open_chain_ro(ops["if"], args.fmt, args.force_share)
    try:
        bs = ops["bs"]
        start, end, past = plan(length(src), bs, ops.get("count"), ops.get("skip"))
        out_size = end - start
        if args.out_fmt == "qcow2":
            out_size = sector_size(out_size)
        try:
            create_image(ops["of"], args.out_fmt, out_size)
        except OSError as e:
            raise UsageError(f"{ops['of']}: error while creating output image: Could not "
                             f"create '{ops['of']}': {e.strerror}") from None
        dst = open_rw(ops["of"], args.out_fmt, "dd")
        try:
            if past:
                sys.stderr.write(f"{progname()}: {ops['if']}: cannot skip to specified offset\n")
            # no progress meter: a SIGUSR1 stays held and unanswered, as qemu-img dd's
            copy(src, dst, start, end, bs, lambda done, total: None)
        finally:
            dst.close()
    finally:
        src.close_chain()
    return 0
