"""blkjobs resize [-f FMT] [--preallocation=MODE] [-q] [--shrink] IMG [+|-]SIZE

As ``qemu-img resize``: shrinking needs --shrink; prints ``Image resized.``."""
from __future__ import annotations

import os
import sys

import argparse

from ..errors import UsageError
from ..units import parse_opt_size
from .parity import RAW_PROBED, open_rw
from . import image_opts

def register(sub):
    p = sub.add_parser("resize", help="grow or shrink an image",
                       description="SIZE may be +N or -N (relative; put -- before a "
                       "negative one).")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--preallocation", default=None, metavar="MODE",
                   help="off, falloc, full (raw), metadata")
    p.add_argument("--shrink", action="store_true", help="allow shrinking (data past the "
                   "new end is lost)")
    p.add_argument("-q", dest="quiet", action="store_true")
    # options may follow IMG (getopt permutes them for qemu-img): taken from here too
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="IMG SIZE")
    image_opts.add(p, "args[0]")
    p.set_defaults(func=run)


def _attach_backing(node, path: str) -> None:
    """qemu-img resize opens the backing chain too: growing over a longer
    backing file zeroes the new area (see imageops.resize)."""
    from ..errors import BlkjobsError
    from ..graph.chain import open_chain, resolve_backing
    from .parity import could_not_open
    bf = node.driver.backing_filename
    if node.format != "qcow2" or not bf:
        return
    bpath = resolve_backing(node.driver.filename, bf)
    try:
        os.close(os.open(bpath, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        raise UsageError(f"Could not open '{path}': Could not open backing file: "
                         f"Could not open '{bpath}': {e.strerror}") from None
    try:
        below = open_chain(bpath, node.driver.backing_format, graph=node.graph)
    except BlkjobsError as e:
        raise could_not_open(path, e) from None
    node.attach_backing(below)


def run(args) -> int:
    from ..imageops.resize import PREALLOC, resize_node
    rest, opts_done = [], False
    # qemu-img takes the last argument as the size before getopt sees it:
    # a negative size needs no ``--``
    size_arg = args.args[-1:] if len(args.args) >= 2 else []
    for a in args.args[:len(args.args) - len(size_arg)]:
        if opts_done or not a.startswith("-") or a == "-":
            rest.append(a)
        elif a == "--":
            opts_done = True
        elif a == "--shrink":
            args.shrink = True
        elif a == "-q":
            args.quiet = True
        elif a.startswith("--preallocation="):
            args.preallocation = a.split("=", 1)[1]
        else:
            raise UsageError(f"unrecognized option '{a}'\n"
                             "Try 'blkjobs --help' for more information")
    args.args = rest + size_arg
    if len(args.args) < 2:
        raise UsageError("Not enough arguments\nTry 'blkjobs --help' for more information")
    if len(args.args) > 2:
        raise UsageError("Expecting image file name and size\n"
                         "Try 'blkjobs --help' for more information")
    path, text = args.args
    prealloc = args.preallocation or "off"
    if prealloc not in PREALLOC:
        raise UsageError(f"Invalid preallocation mode '{prealloc}'")
    sign = text[0] if text[:1] in ("+", "-") else ""
    n = parse_opt_size(text[len(sign):], "size")
    node = open_rw(path, args.fmt, "resize", resize=True)
    try:
        _attach_backing(node, path)
        if args.fmt is None and node.format == "raw":
            sys.stderr.write(RAW_PROBED.format(path))
        cur = node.size
        total = cur + n if sign == "+" else cur - n if sign == "-" else n
        if total <= 0 or total >= 1 << 63:
            raise UsageError("New image size must be positive")
        if total < cur and prealloc != "off":
            raise UsageError("Preallocation can only be used for growing images")
        if total < cur and not args.shrink:
            raise UsageError("Use the --shrink option to perform a shrink operation.\n"
                             "blkjobs: warning: Shrinking an image will delete all data beyond "
                             "the shrunken image's end. Before performing such an operation, "
                             "make sure there is no important data there.")
        resize_node(node, total, prealloc)
    finally:
        node.graph.close()
    if not args.quiet:
        print("Image resized.")
    return 0
