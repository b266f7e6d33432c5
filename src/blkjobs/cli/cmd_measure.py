"""blkjobs measure [--output human|json] [-O FMT] [-o OPTS] [--size N | [-f FMT] IMG]

The size a new image would take, as ``qemu-img measure`` prints it (numbers:
imageops.measure)."""
from __future__ import annotations

import json
import sys

from ..errors import UsageError
from ..units import parse_size
from .parity import open_chain_ro
from . import image_opts


def register(sub):
    p = sub.add_parser("measure", help="how large a new image of a size or of an image's data "
                       "would be")
    p.add_argument("--output", default="human", metavar="OFMT")
    p.add_argument("-O", dest="out_fmt", default="raw", metavar="FMT",
                   help="the new image's format (raw, default, or qcow2)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="its creation options (cluster_size, extended_l2, compat, "
                   "refcount_bits, preallocation, backing_file...)")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="format of IMG")
    p.add_argument("--size", metavar="N")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("images", nargs="*", metavar="IMG")
    image_opts.add(p, "images")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..imageops.measure import measure, parse_target_opts
    if args.output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    size = None
    if args.size is not None:
        size = parse_size(args.size, "image size")
    if len(args.images) > 1:
        raise UsageError("At most one filename argument is allowed.")
    if args.images and size is not None:
        raise UsageError("--size N cannot be used together with a filename.")
    if not args.images and size is None:
        raise UsageError("Either --size N or one filename must be specified.")
    if args.out_fmt not in ("raw", "qcow2"):
        raise UsageError(f"Unknown file format '{args.out_fmt}'")
    node = open_chain_ro(args.images[0], args.fmt, args.force_share) if args.images else None
    try:
        opts = parse_target_opts(args.options, args.out_fmt)
        info = measure(args.out_fmt, opts, size=size, node=node)
    finally:
        if node is not None:
            node.close_chain()
    if args.output == "json":
        order = ("bitmaps", "required", "fully-allocated")     # qemu-img 7.2's order
        sys.stdout.write(json.dumps({k: info[k] for k in order if k in info}, indent=4) + "\n")
    else:
        sys.stdout.write(f"required size: {info['required']}\n"
                         f"fully allocated size: {info['fully-allocated']}\n")
        if "bitmaps" in info:
            sys.stdout.write(f"bitmaps size: {info['bitmaps']}\n")
    return 0
