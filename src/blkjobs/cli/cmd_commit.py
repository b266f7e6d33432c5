"""blkjobs commit [-b BASE] [-d] [--speed RATE] [-p] [--events] IMAGE

What ``qemu-img commit`` does to the files: the data of IMAGE (and of every
image down to BASE, default IMAGE's backing file) is written into BASE by a
commit job; without ``-b`` IMAGE is then emptied (unless ``-d``). The backing
links of the files do not change."""
from __future__ import annotations

import os

from ..errors import UsageError
from ..formats import create_image, open_image
from .cmd_backup import (POLICIES, add_common, cli_engine, copied, find_base, JobFailed,
                         open_image_node,
                         run_job)
from ..units import parse_size
from . import image_opts, progname
from . import cache_mode


def make_empty(path: str, fmt: str, debug=None, name: str | None = None) -> None:
    """Empty a qcow2 overlay (qemu-img's make_empty): every cluster
    unallocated again, so it reads through to its backing file. In place
    (formats.qcow2.empty: same file, header and backing link; crash-safe
    order); an image whose tables are not where a fresh one has them is
    re-created with the same size, cluster size, extended L2, version and
    backing link instead. ``debug``: the image's blkdebug hook; an error it
    injects fails as qemu-img's does (``Failed to empty NAME: ...``)."""
    if fmt != "qcow2":
        return
    # Hold QEMU's lock bytes meanwhile, as qemu-img does (write, sharing only
    # consistent read): a VM that opened the image since fails cleanly.
    from ..graph.lock import FileLock
    from ..graph.perm import ALL, Perm
    fd = os.open(path, os.O_RDONLY)
    lock = FileLock(fd, path)
    try:
        lock.apply(Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, ALL & ~Perm.CONSISTENT_READ)
        _empty(path, fmt, debug)
    except OSError as e:
        raise UsageError(f"Failed to empty {name or path}: {e.strerror}") from None
    finally:
        lock.release()
        os.close(fd)


def _empty(path: str, fmt: str, debug=None) -> None:
    from ..formats.qcow2.driver import Qcow2
    from ..formats.qcow2.empty import make_empty as empty_in_place
    if empty_in_place(path, debug):
        return
    drv = open_image(path, fmt, read_only=True)
    try:
        assert isinstance(drv, Qcow2)   # make_empty() returns early for other formats
        size, cs = drv.size, drv.cluster_size
        ext = drv.extended
        compat = "1.1" if drv.header.version >= 3 else "0.10"
        bf, bfmt = drv.backing_filename, drv.backing_format
    finally:
        drv.close()
    create_image(path, "qcow2", size, cluster_size=cs, extended_l2=ext, compat=compat,
                 backing_file=bf, backing_format=bfmt)


def register(sub):
    p = sub.add_parser("commit", help="commit an image's data into its backing file")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-b", dest="base", metavar="BASE", help="commit down into this backing file")
    p.add_argument("-d", dest="keep", action="store_true", help="do not empty IMAGE afterwards")
    p.add_argument("--on-error", default="report", choices=POLICIES,
                   help="what an I/O error does to the job (default report: it fails)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: no progress and no 'Image committed.'")
    cache_mode.add(p, t="writeback")
    p.add_argument("-r", dest="rate", metavar="RATE",
                   help="rate limit in bytes per second (qemu-img's name for --speed)")
    add_common(p)
    p.add_argument("image")
    image_opts.add(p, "image")
    p.set_defaults(func=run)


def run(args) -> int:
    eng = cli_engine()
    try:
        top = open_image_node(eng, args.image, args.fmt, node_name="top")
        if top.backing is None:
            raise UsageError("Image does not have a backing file")   # qemu-img's text
        base = top.backing
        if args.base:
            try:
                base = find_base(top, args.image, args.base)
            except UsageError:      # qemu-img commit's words
                raise UsageError(f"Did not find '{args.base}' in the backing chain of "
                                 f"'{args.image}'") from None
        speed = parse_size(args.rate, "rate limit") if args.rate is not None else \
            parse_size(args.speed, "speed")
        path, fmt = top.filename, top.format
        from ..graph.blockspec import file_name
        fpath = file_name(args.image)
        debug = top.driver.blkdebug     # blkdebug under a qcow2 image
        base_path = args.base or top.driver.backing_filename   # as the user knows it

        def aftermath(job, synced: bool) -> str:
            # Only data that top's chain covers was written: top reads the same.
            left = ("holds all of the data" if synced
                    else f"has been partly written ({copied(job, 'committed')})")
            return f"'{base_path}' {left}; '{args.image}' still reads the same and was not emptied"

        jobs: list = []

        def start():
            jobs.append(eng.commit(top, base_node=base.name, job_id=args.job_id,
                                   speed=speed, on_error=args.on_error))
            return jobs[0]
        try:
            run_job(eng, start, args, ready_action=lambda job: eng.jobs.complete_job(job),
                    aftermath=aftermath)
        except JobFailed as e:
            if progname() == "qemu-img" and e.exit_code == 1 and jobs:   # qemu-img's words
                raise JobFailed(f"Block job failed: {jobs[0].error}") from None
            raise
    finally:
        eng.close()
    if not args.keep and not args.base:
        make_empty(fpath, fmt, debug, path)
    if not args.quiet:
        print("Image committed.")
    return 0
