"""blkjobs amend [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS IMG

As ``qemu-img amend``: changes the options of an existing qcow2 image
(compat, lazy_refcounts, size; backing_file/backing_fmt only to their
current values), with qemu-img's texts and progress lines
(:mod:`blkjobs.imageops.amend`). ``-o help`` lists the options."""
from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..units import valid_option_list
from . import image_opts, progname
from .copy_progress import signal_line, take_sigusr1
from .parity import RAW_PROBED, check_fmt, open_rw
from . import cache_mode


def register(sub):
    p = sub.add_parser("amend", help="change the options of an existing qcow2 image")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    cache_mode.add(p, t="writeback")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--image-opts", action="store_true",
                   help="IMG is driver=FMT,file.filename=PATH[,...] (other keys ignored)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="IMG")
    image_opts.add(p)         # --object (this parser has its own --image-opts)
    p.set_defaults(func=run)


class _Progress:
    """qemu-img's progress lines: ``    (N.NN/100%)`` and a carriage return,
    printed at 0, 100 and each step of at least 1%; a newline at the end.
    Without them, a SIGUSR1 prints one line on stderr at the next such
    point (qemu-img's progress meter without -p)."""

    def __init__(self, on: bool) -> None:
        self.on, self.last = on, 0.0

    def __call__(self, frac: float) -> None:
        cur = min(100.0, frac * 100)
        if abs(cur - self.last) > 1.0 or cur in (0.0, 100.0):
            self.last = cur
            if self.on:
                sys.stdout.write(f"    ({cur:3.2f}/100%)\r")
                sys.stdout.flush()
            elif take_sigusr1():
                signal_line(cur)

    def end(self) -> None:
        if self.on:
            sys.stdout.write("\n")


_FLAGS = {"-p": "progress", "-q": "quiet", "--force": "force", "--image-opts": "image_opts"}


def run(args) -> int:
    from ..imageops import amend as am
    rest = []
    items = iter(args.args)
    for a in items:               # options after IMG (getopt permutes them)
        if a in _FLAGS:
            setattr(args, _FLAGS[a], True)
        elif a == "-o":
            args.options = (args.options or []) + [next(items, "")]
        elif a.startswith("-o") and len(a) > 2:
            args.options = (args.options or []) + [a[2:]]
        else:
            rest.append(a)
    for text in args.options or []:     # qemu-img stops at the first invalid one
        if not valid_option_list(text):
            raise UsageError(f"Invalid option list: {text}")
    if not args.options:
        raise UsageError(f"Must specify options (-o)\nTry '{progname()} --help' for more "
                         "information")
    options = ",".join(args.options)
    prog = _Progress(args.progress and not args.quiet)
    try:
        if args.fmt and am.wants_help(options):
            from ..imageops.rebase import QEMU_DRIVERS
            if args.fmt not in QEMU_DRIVERS:
                check_fmt(args.fmt)
            return _help(args.fmt)      # only qcow2 and luks have amend options
        if len(rest) != 1:
            raise UsageError("Expecting one image file name")
        path = rest[0]
        if args.image_opts:         # opened as the options say (their key-secret too)
            if args.fmt:
                raise UsageError("--image-opts and --format are mutually exclusive")
            from ..formats.sniff import mark_image_opts
            mark_image_opts(path)
        node = open_rw(path, args.fmt, "amend", resize=True)
        try:
            if args.fmt is None and node.format == "raw" and not args.image_opts:
                sys.stderr.write(RAW_PROBED.format(path))
            if am.wants_help(options):
                return _help(node.format)
            if node.format == "luks":
                return _luks(node, options, args.force)
            if node.format != "qcow2":
                raise UsageError(f"Format driver '{node.format}' does not support option "
                                 "amendment")
            opts = am.parse(options)
            prog(0.0)
            try:
                am.amend(node, opts, prog, force=args.force)
            finally:
                prog(1.0)
        finally:
            node.close()
    finally:
        prog.end()
    return 0


def _luks(node, options: str, force: bool) -> int:
    from ..imageops.amend import amend_luks
    amend_luks(node, options, force)
    return 0


def _help(fmt: str) -> int:
    from ..imageops.amend import AMEND_HELP, LUKS_AMEND_HELP
    if fmt == "luks":
        sys.stdout.write(LUKS_AMEND_HELP)
        return 0
    if fmt != "qcow2":
        raise UsageError(f"Format driver '{fmt}' does not support option amendment")
    sys.stdout.write(AMEND_HELP)
    return 0
