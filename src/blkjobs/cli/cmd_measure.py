"""blkjobs measure [--output human|json] [-O FMT] [-o OPTS] [--size N | [-f FMT] IMG]

The size a new image would take, as ``qemu-img measure`` prints it (numbers:
imageops.measure)."""
from __future__ import annotations

import sys

from ..errors import UsageError
from ..units import parse_size, valid_option_list
from .jsonout import dumps
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
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT_PARAM",
                   help="measure an internal snapshot of a qcow2 image: its ID or name, "
                   "or snapshot.id=ID[,snapshot.name=NAME]")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("images", nargs="*", metavar="IMG")
    image_opts.add(p, "images")
    p.set_defaults(func=run)


def _check_options(args) -> None:
    """What qemu-img checks while it reads its options, before the operands."""
    for text in args.options or []:
        if not valid_option_list(text):
            raise UsageError(f"Invalid option list: {text}")
    if args.snapshot is not None:
        from .cmd_convert import _snapshot_param
        _snapshot_param(args.snapshot)
    if args.output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")


def run(args) -> int:
    from ..imageops.measure import measure, parse_target_opts
    _check_options(args)
    size = None
    if args.size is not None:
        size = parse_size(args.size, "image size")
    if len(args.images) > 1:
        raise UsageError("At most one filename argument is allowed.")
    if not args.images and (args.image_opts or args.fmt or args.snapshot is not None):
        raise UsageError("--image-opts, -f, and -l require a filename argument.")
    if args.images and size is not None:
        raise UsageError("--size N cannot be used together with a filename.")
    if not args.images and size is None:
        raise UsageError("Either --size N or one filename must be specified.")
    node = open_chain_ro(args.images[0], args.fmt, args.force_share) if args.images else None
    if node is not None and args.snapshot is not None:
        from ..imageops.snapshot import load_tmp
        from .cmd_convert import _snapshot_param
        snap = _snapshot_param(args.snapshot)
        assert snap is not None
        load_tmp(node, snap)        # closes the node when it fails
    try:
        if args.out_fmt not in ("raw", "qcow2"):
            raise UsageError(f"Unknown file format '{args.out_fmt}'")
        opts = parse_target_opts(args.options, args.out_fmt)
        info = measure(args.out_fmt, opts, size=size, node=node)
    finally:
        if node is not None:
            node.close_chain()
    if args.output == "json":
        order = ("bitmaps", "required", "fully-allocated")     # qemu-img 7.2's order
        sys.stdout.write(dumps({k: info[k] for k in order if k in info}, indent=4) + "\n")
    else:
        sys.stdout.write(f"required size: {info['required']}\n"
                         f"fully allocated size: {info['fully-allocated']}\n")
        if "bitmaps" in info:
            sys.stdout.write(f"bitmaps size: {info['bitmaps']}\n")
    return 0
