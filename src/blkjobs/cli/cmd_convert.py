"""blkjobs convert [-f FMT] [-O raw|qcow2] [-c] [-B BACKING [-F FMT]] [-o OPTS]
[-p] [-S SIZE] [-n] [--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] [-r RATE]
[-m THREADS] [-t CACHE] SRC [SRC...] DST"""
from __future__ import annotations

import os

from ..errors import OSErrorWithContext, UsageError
from ..imageops.convert_base import ConvertOptions
from ..imageops.convert_entry import convert    # files, and NBD URIs (imports what it needs)
from ..units import parse_size
from ..formats import cache

from . import progress_reporter


def register(sub):
    # argparse's options only: a plain command line (cli.quickparse) does not
    # import them (start-up)
    from . import cache_mode, image_opts
    p = sub.add_parser("convert", help="copy an image into another image",
                       description="Convert (copy) SRC into DST (several SRC: one after the "
                       "other, as qemu-img concatenates them). Holes stay holes and "
                       "zero blocks become holes.")
    p.add_argument("-f", dest="src_fmt", metavar="FMT", help="source format (raw, qcow2; "
                   "probed by default)")
    p.add_argument("--object", dest="objects", action="append", metavar="OBJECT",
                   help="secret,id=ID,data=TEXT|file=PATH: the password of an encrypted "
                   "target (-O luks -o key-secret=ID; -O qcow2 -o encrypt.key-secret=ID)")
    p.add_argument("-O", dest="dst_fmt", metavar="FMT", default="raw",
                   help="target format (raw, qcow2; default raw)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the target's clusters (qcow2, zlib)")
    p.add_argument("-B", dest="backing", metavar="BACKING",
                   help="the target gets this backing file; only data differing from it "
                   "is copied")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of -B (probed)")
    from .opts_action import OptsAction     # argparse: only with the parser
    p.add_argument("-o", dest="options", action=OptsAction, metavar="OPTS",
                   help="target creation options, as for create; -o help lists them")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="accepted for qemu-img compatibility (writes are always parallel)")
    p.add_argument("-q", dest="quiet", action="store_true", help="no progress output")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT_PARAM",
                   help="convert an internal snapshot of a qcow2 source: its ID or "
                   "name, or snapshot.id=ID[,snapshot.name=NAME]")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: read a source another process is writing (the "
                   "target is always locked for writing)")
    from .copy_progress import add_progress_options
    add_progress_options(p)
    p.add_argument("-S", dest="sparse", default=None, metavar="SIZE",
                   help="consecutive zero bytes that become a hole (default 4k; 0: fully "
                   "allocate the target)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="do not create the target: write into an existing one")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the target already reads as zeroes, skip writing zeroes")
    p.add_argument("-r", dest="rate", default="0", metavar="RATE",
                   help="rate limit in bytes per second (e.g. 100M)")
    p.add_argument("-m", dest="threads", default=None, metavar="N",
                   help="parallel requests (worker threads, 1..16; default 4, or 8 with "
                   "-t other than unsafe, where workers also wait for the disk)")
    cache_mode.add(p, t="unsafe", T="writeback")
    p.add_argument("--request-size", default=None, metavar="SIZE",
                   help="bytes per request (default 2M for raw -> raw, else 512k)")
    p.add_argument("--salvage", action="store_true",
                   help="go on past read errors: a sector that cannot be read is written "
                   "as zeroes, with a warning (as qemu-img --salvage)")
    p.add_argument("-C", dest="copy_range", action="store_true",
                   help="copy offloading, as qemu-img -C: accepted (blkjobs' engine already "
                   "copies without a detour), refused with -c, -S and --salvage as qemu-img does")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the source's persistent dirty bitmaps (qcow2 target)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent (in-use) bitmaps, with a warning")
    p.add_argument("srcs", nargs="+", metavar="src",
                   help="the source image; several: concatenated into DST")
    p.add_argument("dst")
    image_opts.add(p, "srcs", fmt=("src_fmt",))
    p.set_defaults(func=run)


def _plan(args, opts: ConvertOptions) -> list[int] | None:
    """qemu-img's progress chunks of this convert (``-p`` as qemu-img), from
    the sources' allocation; None when a source cannot be read here (the
    convert then says why)."""
    from ..errors import BlkjobsError
    from ..imageops.images import open_ro
    from .copy_progress import qemu_convert_plan
    runs: list = []
    try:
        for src in args.srcs:
            top = open_ro(src, opts.src_fmt, force_share=True)
            try:
                runs += top.block_status()
            finally:
                top.close_chain()
    except (BlkjobsError, OSError):
        return None
    return qemu_convert_plan(runs, opts.sparse_size == 0)


def _concat(args, opts: ConvertOptions) -> int:
    """Several sources, one after the other (:mod:`..imageops.convert_concat`)."""
    from ..imageops.convert_concat import convert_concat
    if args.bitmaps:
        raise UsageError("Cannot copy bitmaps when concatenating multiple input images")
    prog = _reporter(args, opts)
    try:
        convert_concat(args.srcs, args.dst, opts, progress=prog.update)
        prog.finish()
    finally:
        prog.close()
    return 0


def run(args) -> int:
    if getattr(args, "_invalid_opts", None) is not None:       # (set by -o's parsing)
        from .opts_help import check_lists
        check_lists(args)       # qemu-img refuses it while it reads its options
    # workers that wait for the disk (a durable copy, O_DIRECT): 8
    threads = _coroutines(args.threads) if args.threads is not None else (
        8 if args.cache != "unsafe" else 4)
    sparse = parse_size(args.sparse or "4k", "buffer size for sparse output")
    if sparse % 512 or sparse > 16 << 20:
        raise UsageError("Invalid buffer size for sparse output specified. Valid sizes are "
                         "multiples of 512 up to 16777216. Select 0 to disable sparse "
                         "detection (fully allocates output).")
    for obj in args.objects or []:
        from ..formats.secrets import add_secret_object     # start-up: only when used
        add_secret_object(obj)
    _unknown_formats(args)
    if args.target_is_zero and not args.no_create:
        raise UsageError("--target-is-zero requires use of -n flag")
    if args.no_create and args.options:
        raise UsageError("-o has no effect when skipping image creation")
    if args.options:
        from .opts_help import print_help, wants_help
        if wants_help(args.options):    # the target named: with its protocol's options
            return print_help(args.dst_fmt, args.dst if args.srcs else None)
    _no_create(args)
    if args.options:
        from .cmd_create import parse_opts      # -o only: not at start-up
    create_opts = parse_opts(args.options, args.dst_fmt if args.dst_fmt in ("raw", "qcow2", "luks")
                             else "raw") if args.options else {}
    # -o backing_file=,backing_fmt= is -B/-F (qemu-img: the -o value wins): only
    # what differs from the backing file is copied
    backing = create_opts.pop("backing_file", None) or args.backing
    backing_fmt = create_opts.pop("backing_format", None) or args.backing_fmt
    args.src = args.srcs[0]
    if backing and len(args.srcs) > 1:
        from ..imageops.convert_concat import check_concat
        check_concat(ConvertOptions(backing=backing))
    if backing and not backing_fmt and not args.no_create and args.dst_fmt != "raw":
        # qemu-img refuses to probe it (the library probes: ConvertOptions)
        raise UsageError("Use of backing file requires explicit backing format")
    opts = ConvertOptions(
        sparse_size=sparse,
        no_create=args.no_create, target_is_zero=args.target_is_zero,
        rate=parse_size(args.rate, "rate limit"), threads=threads,
        request_size=parse_size(args.request_size, "request size", 512, 1 << 30)
        if args.request_size else None,
        flush=cache.flushes(args.cache), src_fmt=args.src_fmt, dst_fmt=args.dst_fmt,
        compress=args.compress, backing=backing, backing_fmt=backing_fmt,
        force_share=args.force_share, create_opts=create_opts,
        snapshot=_snapshot_param(args.snapshot), salvage=args.salvage,
        on_salvage=None if args.quiet else _salvage_warning,
        on_status_salvage=None if args.quiet else _status_warning,
        coroutines=_coroutines(args.threads) if args.threads is not None else 8,
        keep_failed_target=_as_qemu_img())
    names = None
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.copy_range:
        _check_copy_range(args)
    if len(args.srcs) > 1:
        return _concat(args, opts)
    if args.bitmaps:
        from ..imageops.convert_bitmaps import source_bitmaps
        from . import progname
        names = source_bitmaps(args.src, args.src_fmt, args.dst_fmt, args.skip_broken_bitmaps,
                               args.force_share, prog=progname())
    prog = _reporter(args, opts)
    try:
        convert(args.src, args.dst, opts, progress=prog.update)
        prog.finish()
    finally:
        prog.close()
    if names is not None:
        from ..imageops.convert_bitmaps import copy_bitmaps
        copy_bitmaps(args.src, args.src_fmt, args.dst, names, args.force_share)
    return 0


def _reporter(args, opts: ConvertOptions):
    """The convert's progress outputs (:func:`.progress_reporter`)."""
    def make():
        from .copy_progress import Reporter
        return Reporter(args, quiet=args.quiet, plan=lambda: _plan(args, opts))
    return progress_reporter(args, make)


def _unknown_formats(args) -> None:
    """A format no qemu-img knows, refused in qemu-img's words (one it knows
    but blkjobs does not write: the library says so)."""
    from ..formats import FORMATS
    if (args.src_fmt is None or args.src_fmt in FORMATS) and args.dst_fmt in FORMATS:
        return          # (the usual case: no need to import rebase for its list)
    from ..imageops.rebase import QEMU_DRIVERS
    if args.src_fmt is not None and args.src_fmt not in FORMATS \
            and args.src_fmt not in QEMU_DRIVERS and args.srcs:
        raise UsageError(f"Could not open '{args.srcs[0]}': Unknown driver '{args.src_fmt}'")
    if args.dst_fmt not in FORMATS and args.dst_fmt not in QEMU_DRIVERS:
        raise UsageError(f"Unknown file format '{args.dst_fmt}'")


def _no_create(args) -> None:
    """A target format qemu-img knows but cannot create (bochs, cloop...):
    refused in its words once the sources are found (it opens them first)."""
    from ..formats import FORMATS
    if args.dst_fmt in FORMATS or args.no_create:
        return          # the usual case: nothing more imported (start-up time)
    from ..imageops.rebase import QEMU_NO_CREATE
    if args.dst_fmt not in QEMU_NO_CREATE:
        return
    from ..formats import is_nbd_uri, is_spec
    from ..imageops.files import open_source
    for src in args.srcs:
        if not is_spec(src) and not is_nbd_uri(src):
            try:
                os.close(open_source(src))
            except OSErrorWithContext as e:
                raise UsageError(f"Could not open '{src}': Could not open '{src}': "
                                 f"{os.strerror(e.errno)}") from None
    raise UsageError(f"Format driver '{args.dst_fmt}' does not support image creation")


def _as_qemu_img() -> bool:
    """Invoked as ``qemu-img``: a failed convert keeps its target, as qemu-img's."""
    from . import progname
    return progname() == "qemu-img"


def _coroutines(text: str) -> int:
    """-m N, read as qemu-img reads it (C's strtol, base 0), refused in its words."""
    try:
        n = int(text, 8) if text[:1] == "0" and text[1:2].isdigit() else int(text, 0)
    except ValueError:
        n = 0
    if not 1 <= n <= 16:
        raise UsageError("Invalid number of coroutines. Allowed number of coroutines is "
                         "between 1 and 16")
    return n


def _check_copy_range(args) -> None:
    """-C: what qemu-img refuses with it."""
    if args.compress:
        raise UsageError("Cannot enable copy offloading when -c is used")
    if args.sparse is not None:
        raise UsageError("Cannot enable copy offloading when -S is used")
    if args.salvage:
        raise UsageError("Cannot use copy offloading in salvaging mode")


def _salvage_warning(offset: int, err: int) -> None:
    from . import progname
    os.write(2, f"{progname()}: warning: error while reading offset {offset}: "
             f"{os.strerror(err)}\n".encode())


def _status_warning(offset: int, err: int) -> None:
    import os
    from . import progname
    os.write(2, f"{progname()}: warning: error while reading block status at offset {offset}: "
             f"{os.strerror(err)}\n".encode())


def _snapshot_param(text: str | None) -> tuple[str | None, str | None] | str | None:
    """-l: an ID or name, or ``snapshot.id=ID,snapshot.name=NAME`` (either)."""
    if text is None or not text.startswith("snapshot."):
        return text
    got: dict[str, str] = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            raise UsageError(f"Invalid parameter '{key}'\nblkjobs: Failed in parsing "
                             f"snapshot param '{text}'")
        got[key] = val
    return got.get("snapshot.id"), got.get("snapshot.name")
