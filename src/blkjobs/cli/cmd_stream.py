"""blkjobs stream [-b BASE] [--backing-file NAME] [--on-error P] [--speed RATE]
[-p] [--events] IMAGE

What a safe ``qemu-img rebase -b BASE IMAGE`` does when BASE is in IMAGE's
backing chain: everything the images between IMAGE and BASE provide is
copied into IMAGE, which then backs directly onto BASE (header rewritten
with BASE as given, relative to IMAGE's directory, or ``--backing-file``).
Without ``-b`` the whole chain is pulled in and IMAGE ends without backing."""
from __future__ import annotations

from .cmd_backup import (POLICIES, add_common, cli_engine, copied, find_base, open_image_node,
                         run_job)
from ..units import parse_size


def register(sub):
    p = sub.add_parser("stream", help="pull the backing chain (down to a base) into an image")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-b", "--base", metavar="BASE", help="backing file to keep (in the chain)")
    p.add_argument("--backing-file", metavar="NAME",
                   help="backing file name to record (default: BASE as given)")
    p.add_argument("--on-error", default="report", choices=POLICIES)
    add_common(p)
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args) -> int:
    eng = cli_engine()
    try:
        top = open_image_node(eng, args.image, args.fmt, node_name="top")
        base_node = find_base(top, args.image, args.base).name if args.base else None
        speed = parse_size(args.speed, "speed")
        run_job(eng, lambda: eng.stream(top, base_node=base_node, job_id=args.job_id,
                                        speed=speed, on_error=args.on_error,
                                        backing_file=args.backing_file or args.base), args,
                aftermath=lambda job, synced: (
                    f"'{args.image}' still reads the same and keeps its backing file "
                    f"({copied(job, 'pulled into it')})"))
    finally:
        eng.close()
    return 0
