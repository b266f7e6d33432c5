"""blkjobs snapshot [-l | -a NAME | -c NAME | -d NAME] [-U] [-q] IMG

As ``qemu-img snapshot``: lists (-l, the default), creates (-c), applies
(-a, by ID or name) and deletes (-d, by name) the internal snapshots of a
qcow2 image, with qemu-img's texts and exit codes
(:mod:`blkjobs.imageops.snapshot`)."""
from __future__ import annotations

import sys

from ..errors import UsageError
from . import image_opts, progname
from .parity import RAW_PROBED, open_chain_ro, open_rw


def register(sub):
    p = sub.add_parser("snapshot", help="list, create, apply or delete the internal "
                       "snapshots of a qcow2 image")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    p.add_argument("-c", dest="create", metavar="NAME", help="create snapshot NAME")
    p.add_argument("-a", dest="apply", metavar="NAME",
                   help="revert the image to snapshot NAME (an ID or a name)")
    p.add_argument("-d", dest="delete", metavar="NAME", help="delete snapshot NAME")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("images", nargs="*", metavar="IMG")
    image_opts.add(p, "images")
    p.set_defaults(func=run)


def run(args) -> int:
    actions = [a for a in ("list", "create", "apply", "delete")
               if getattr(args, a) not in (None, False)]
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'\n"
                         f"Try '{progname()} --help' for more information")
    if len(args.images) != 1:
        raise UsageError("Expecting one image file name\n"
                         f"Try '{progname()} --help' for more information")
    path = args.images[0]
    if actions and actions[0] != "list":
        return _modify(args, actions[0], path)
    node = open_chain_ro(path, args.fmt, args.force_share)
    try:
        if not actions:      # qemu-img opens the image for writing then: it warns
            if args.fmt is None and node.format == "raw":
                sys.stderr.write(RAW_PROBED.format(path))
            return 0
        if node.format != "qcow2":
            return 0
        from ..formats.qcow2.snapshots import dump_table, read_snapshots
        snaps = read_snapshots(node.driver)
    finally:
        node.close_chain()
    if snaps:
        sys.stdout.write(dump_table(snaps))
    return 0


def _modify(args, action: str, path: str) -> int:
    from ..imageops import snapshot
    if args.force_share:
        raise UsageError(f"Could not open '{path}': force-share=on can only be used "
                         "with read-only images")
    node = open_rw(path, args.fmt, "snapshot")
    try:
        if args.fmt is None and node.format == "raw":
            sys.stderr.write(RAW_PROBED.format(path))
            if action == "apply":    # qemu-img reopens the file to try it: probes again
                sys.stderr.write(RAW_PROBED.format(path))
        getattr(snapshot, action)(node, getattr(args, action))
    finally:
        node.close()
    return 0
