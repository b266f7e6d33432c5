"""blkjobs mirror [-f FMT] [-O FMT] [--sync MODE] [--granularity N] [--buf-size N]
[--copy-mode MODE] [--speed RATE] [-p] [--events] SRC TARGET

Runs a mirror job from SRC into TARGET (created when missing, like backup)
until it is ready, then completes it (the target now holds SRC's content),
or soft-cancels it with ``--cancel-when-ready`` (same data, no pivot)."""
from __future__ import annotations


from .cmd_backup import (POLICIES, add_common, cli_engine, copy_aftermath, open_image_node,
                         open_target, refuse_same_file, run_job, target_exists)
from ..units import parse_size


def register(sub):
    p = sub.add_parser("mirror", help="mirror an image into another one until in sync")
    p.add_argument("-f", dest="src_fmt", metavar="FMT")
    p.add_argument("-O", dest="dst_fmt", metavar="FMT")
    p.add_argument("--sync", default="full", choices=["full", "top", "none"])
    p.add_argument("--granularity", metavar="SIZE")
    p.add_argument("--buf-size", metavar="SIZE")
    p.add_argument("--copy-mode", default="background", choices=["background", "write-blocking"])
    p.add_argument("-t", dest="cache", default="writeback", choices=["writeback", "unsafe"],
                   help="target cache mode: writeback flushes at the end, unsafe does not "
                   "(qemu-img convert's default)")
    p.add_argument("--on-source-error", default="report", choices=POLICIES)
    p.add_argument("--on-target-error", default="report", choices=POLICIES)
    p.add_argument("--cancel-when-ready", action="store_true",
                   help="end with a soft cancel instead of complete")
    add_common(p)
    p.add_argument("src")
    p.add_argument("target")
    p.set_defaults(func=run)


def run(args) -> int:
    refuse_same_file(args.src, args.target)
    eng = cli_engine()
    try:
        src = open_image_node(eng, args.src, args.src_fmt, node_name="source")
        created = not target_exists(args.target)
        tgt = open_target(eng, src, args.target, args.dst_fmt,
                          src.backing if args.sync == "top" else None, args.cache)
        gran = parse_size(args.granularity, "granularity") if args.granularity else None
        buf = parse_size(args.buf_size, "buf-size") if args.buf_size else None
        speed = parse_size(args.speed, "speed")

        def at_ready(job):
            if args.cancel_when_ready:
                eng.jobs.cancel_job(job, False)
            else:
                eng.jobs.complete_job(job)

        run_job(eng, lambda: eng.mirror(src, tgt, args.sync, job_id=args.job_id, speed=speed,
                                        granularity=gran, buf_size=buf,
                                        copy_mode=args.copy_mode,
                                        on_source_error=args.on_source_error,
                                        on_target_error=args.on_target_error),
                args, ready_action=at_ready, aftermath=copy_aftermath(args.target, created))
    finally:
        eng.close()
    return 0
