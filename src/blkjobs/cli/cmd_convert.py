"""blkjobs convert [-f FMT] [-O FMT] [-p] [-S SIZE] [-n] [--target-is-zero]
[-r RATE] [-m THREADS] SRC DST"""
from __future__ import annotations

import sys

from ..errors import UsageError
from ..imageops.convert import ConvertOptions, convert_raw
from .progress import Progress
from .sizes import parse_size


def register(sub):
    p = sub.add_parser("convert", help="copy an image into another image",
                       description="Convert (copy) SRC into DST. Holes stay holes and "
                       "zero blocks become holes.")
    p.add_argument("-f", dest="src_fmt", metavar="FMT", help="source format (raw)")
    p.add_argument("-O", dest="dst_fmt", metavar="FMT", default="raw", help="target format (raw)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("--progress-json", action="store_true",
                   help="progress as JSON lines on stderr (for programs)")
    p.add_argument("-S", dest="sparse", default="4k", metavar="SIZE",
                   help="consecutive zero bytes that become a hole (default 4k; 0: fully "
                   "allocate the target)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="do not create the target: write into an existing one")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the target already reads as zeroes, skip writing zeroes")
    p.add_argument("-r", dest="rate", default="0", metavar="RATE",
                   help="rate limit in bytes per second (e.g. 100M)")
    p.add_argument("-m", dest="threads", default="4", metavar="N",
                   help="parallel requests (worker threads, 1..16, default 4)")
    p.add_argument("-t", dest="cache", default="writeback", choices=["writeback", "unsafe"],
                   help="target cache mode: writeback flushes at the end, unsafe does not")
    p.add_argument("--request-size", default="2M", metavar="SIZE",
                   help="bytes per request (default 2M)")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=run)


def run(args) -> int:
    for which, fmt in (("source", args.src_fmt), ("target", args.dst_fmt)):
        if fmt not in (None, "raw"):
            raise UsageError(f"unsupported {which} format '{fmt}' (supported: raw)")
    try:
        threads = int(args.threads)
    except ValueError:
        raise UsageError(f"invalid number of threads '{args.threads}'") from None
    opts = ConvertOptions(
        sparse_size=parse_size(args.sparse, "sparse size"),
        no_create=args.no_create, target_is_zero=args.target_is_zero,
        rate=parse_size(args.rate, "rate limit"), threads=threads,
        request_size=parse_size(args.request_size, "request size", 512, 1 << 30),
        flush=args.cache != "unsafe")
    prog = None
    if args.progress or args.progress_json:
        prog = Progress(json_lines=args.progress_json)
    convert_raw(args.src, args.dst, opts, progress=prog.update if prog else None)
    if prog:
        prog.finish()
    return 0
