"""blkjobs snapshot [-l] [-U] [-q] IMG

Lists the internal snapshots of a qcow2 image as ``qemu-img snapshot -l``
prints them. Creating, applying and deleting them (-c, -a, -d) is refused:
blkjobs does not write images with internal snapshots."""
from __future__ import annotations

import sys

from ..errors import UsageError
from .parity import RAW_PROBED, open_chain_ro


def register(sub):
    p = sub.add_parser("snapshot", help="list the internal snapshots of a qcow2 image")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    p.add_argument("-c", dest="create", metavar="NAME", help="not supported")
    p.add_argument("-a", dest="apply", metavar="NAME", help="not supported")
    p.add_argument("-d", dest="delete", metavar="NAME", help="not supported")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("images", nargs="*", metavar="IMG")
    p.set_defaults(func=run)


def run(args) -> int:
    actions = [a for a in ("list", "create", "apply", "delete") if getattr(args, a)]
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'\n"
                         "Try 'blkjobs --help' for more information")
    if len(args.images) != 1:
        raise UsageError("Expecting one image file name\n"
                         "Try 'blkjobs --help' for more information")
    path = args.images[0]
    if actions and actions[0] != "list":
        flag = {"create": "-c", "apply": "-a", "delete": "-d"}[actions[0]]
        raise UsageError(f"snapshot {flag}: creating, applying and deleting internal "
                         "snapshots is not supported (use qemu-img snapshot)")
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
