"""blkjobs bitmap (--merge SOURCE | --add | --remove | --clear | --enable |
--disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT]
FILENAME BITMAP

``qemu-img bitmap``: the operations are applied in the order given, on the
persistent bitmaps of FILENAME (opened read-write with the write lock, its
backing chain not opened). The first one that fails ends the command with
qemu-img's text ("Operation OP on bitmap NAME failed: ...") and exit 1; the
ones before it stay done, as with qemu-img. ``--merge`` takes the source
bitmap from FILENAME, or from SOURCE_FILE (opened read-only) with ``-b``.
Raw images cannot hold bitmaps: adding one is refused, the others find none.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import BlkjobsError
from . import progname
from . import image_opts



class _Op(argparse.Action):
    def __init__(self, option_strings, dest, verb=None, **kw):
        self.verb = verb
        super().__init__(option_strings, "ops", **kw)

    def __call__(self, parser, ns, values, option_string=None):
        ops = getattr(ns, "ops", None) or []
        ops.append((self.verb, values))
        ns.ops = ops


def register(sub):
    p = sub.add_parser("bitmap", help="change the persistent dirty bitmaps of a qcow2 image",
                       description="Operations are applied in the order given. Exit status: "
                       "0 done, 1 an operation failed (the ones before it stay done).")
    for verb in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{verb}", action=_Op, verb=verb, nargs=0,
                       help=f"{verb} the bitmap")
    p.add_argument("--merge", action=_Op, verb="merge", metavar="SOURCE",
                   help="merge bitmap SOURCE into the bitmap")
    p.add_argument("-g", "--granularity", dest="granularity", metavar="GRANULARITY",
                   help="granularity of a bitmap made by --add")
    p.add_argument("-b", "--source-file", dest="source_file", metavar="SOURCE_FILE")
    p.add_argument("-F", "--source-format", dest="source_fmt", metavar="SOURCE_FMT")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("args", nargs="*", metavar="FILENAME BITMAP")
    image_opts.add(p, "args[0]")
    p.set_defaults(func=run, ops=[])


def _fail(msg: str) -> int:
    sys.stderr.write(f"{progname()}: {msg}\n")
    return 1


def _granularity(text: str) -> int | None:
    """qemu-img's cvtnum: a size with a k/M/G/T/P/E suffix; None if invalid."""
    from ..units import parse_size
    try:
        return parse_size(text, "granularity")
    except BlkjobsError:
        return None


def run(args) -> int:
    ops = args.ops
    if not ops:
        return _fail("Need at least one of --add, --remove, --clear, --enable, --disable, "
                     "or --merge")
    gran = None
    if args.granularity is not None:
        gran = _granularity(args.granularity)
        if gran is None:
            return _fail("Invalid granularity specified. You may use k, M, G, T, P or E "
                         f"suffixes for\n{progname()}: kilobytes, megabytes, gigabytes, terabytes, "
                         "petabytes and exabytes.")
    verbs = {v for v, _ in ops}
    if gran and "add" not in verbs:
        return _fail("granularity only supported with --add")
    if args.source_fmt and not args.source_file:
        return _fail("-F only supported with -b")
    if args.source_file and "merge" not in verbs:
        return _fail("Merge bitmap source file only supported with --merge")
    if len(args.args) != 2:
        return _fail("Expecting filename and bitmap name")
    filename, name = args.args
    disabled = "disable" in verbs

    from ..graph import Graph, Perm
    from ..imageops.images import open_one, probe
    fmt = probe(filename, args.fmt)
    g = Graph()
    node = g.add(open_one(filename, fmt, read_only=False), fmt=fmt)
    src_graph = None
    try:
        node.take("bitmap", Perm.WRITE | Perm.CONSISTENT_READ,
                  Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        src = None
        if args.source_file:
            sfmt = probe(args.source_file, args.source_fmt)
            src_graph = Graph()
            snode = src_graph.add(open_one(args.source_file, sfmt), fmt=sfmt)
            snode.take("bitmap", Perm.CONSISTENT_READ,
                       Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
            src = snode.driver.persistent_bitmaps
        pbm = node.driver.persistent_bitmaps
        try:
            for verb, value in ops:
                try:
                    _apply(pbm, verb, value, name, gran, disabled, src, node.name,
                           bool(args.source_file))
                except BlkjobsError as e:
                    return _fail(f"Operation {verb} on bitmap {name} failed: {e}")
            return 0
        finally:
            # the operations done so far, while the lock is still held
            if pbm is not None:
                pbm.store()
    finally:
        try:
            node.close()
        finally:
            if src_graph is not None:
                src_graph.close()


def _apply(pbm, verb, value, name, gran, disabled, src, node_name, other_source):
    from ..formats.qcow2.bitmaps import BitmapError
    if pbm is None:                    # raw: no bitmaps can live in the image
        if verb == "add":
            if gran is not None and gran and (gran < 512 or gran & (gran - 1)
                                              or gran >= 1 << 32):
                raise BitmapError("Granularity must be power of 2 and at least 512")
            raise BitmapError(f"Can't store persistent bitmaps to {node_name}: "
                              "Operation not supported")
        raise BitmapError(f"Dirty bitmap '{name}' not found")
    if verb == "add":
        pbm.add(name, gran, disabled, node_name)
    elif verb == "remove":
        pbm.remove(name)
    elif verb == "clear":
        pbm.clear(name)
    elif verb == "enable":
        pbm.enable(name)
    elif verb == "disable":
        pbm.disable(name)
    else:
        if other_source and src is None:
            pbm.get(name)
            raise BitmapError(f"Dirty bitmap '{value}' not found")
        pbm.merge(name, value, src if other_source else None)
