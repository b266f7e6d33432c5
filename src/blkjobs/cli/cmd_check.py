"""blkjobs check [-f FMT] [-r leaks|all] [--output human|json] IMG

Exit status like qemu-img: 0 clean, 1 the check could not complete, 2
corruptions, 3 leaks only, 63 format without checks (raw)."""
from __future__ import annotations

import sys

from ..errors import BlkjobsError
from ..imageops.inspect import check_exit_code, check_image
from . import progname


# qemu-img 7.2 prints ImageCheck keys in the order of its QDict's hash buckets
# (tdb_hash(key) % 512: image-end-offset 30, compressed-clusters 67, ...)
_ORDER = ("image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
          "corruptions-fixed", "check-errors", "leaks", "leaks-fixed", "allocated-clusters",
          "filename", "format", "fragmented-clusters")


def register(sub):
    # argparse's options only: a plain command line (cli.quickparse) does not
    # import them (start-up)
    from . import cache_mode, image_opts
    p = sub.add_parser("check", help="check a qcow2 image for consistency",
                       description="Exit status: 0 clean, 1 check failed, 2 corruptions, "
                       "3 leaked clusters only, 63 format without checks.")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-r", dest="repair", choices=["leaks", "all"],
                   help="repair leaks, or leaks and corruptions")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-q", dest="quiet", action="store_true")
    cache_mode.add(p, T="writeback")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: check an image another process is writing "
                   "(not with -r)")
    p.add_argument("image")
    image_opts.add(p, "image")
    p.set_defaults(func=run)


def _human(res: dict) -> str:
    out = []
    if res.get("corruptions-fixed") or res.get("leaks-fixed"):
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {res.get('leaks-fixed', 0)} leaked clusters\n"
                   f"    {res.get('corruptions-fixed', 0)} corruptions\n\n"
                   "Double checking the fixed image now...\n")
    c, lk, ce = res.get("corruptions", 0), res.get("leaks", 0), res.get("check-errors", 0)
    if not (c or lk or ce):
        out.append("No errors were found on the image.\n")
    else:
        if c:
            out.append(f"\n{c} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if lk:
            out.append(f"\n{lk} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if ce:
            out.append(f"\n{ce} internal errors have occurred during the check.\n")
    total, alloc = res.get("total-clusters", 0), res.get("allocated-clusters", 0)
    if total and alloc:
        out.append(f"{alloc}/{total} = {alloc * 100.0 / total:0.2f}% allocated, "
                   f"{res.get('fragmented-clusters', 0) * 100.0 / alloc:0.2f}% fragmented, "
                   f"{res.get('compressed-clusters', 0) * 100.0 / alloc:0.2f}% compressed "
                   "clusters\n")
    if res.get("image-end-offset"):
        out.append(f"Image end offset: {res['image-end-offset']}\n")
    return "".join(out)


def run(args) -> int:
    try:
        res = check_image(args.image, args.fmt, args.repair, force_share=args.force_share)
    except BlkjobsError as e:
        from .error_json import print_if_json
        if not print_if_json(args, e, e.exit_code):
            sys.stderr.write(f"{progname()}: {e}\n")
        return e.exit_code
    for m in getattr(res, "messages", []):
        if m.startswith("\x01"):        # check_snapshots.PROG: an error qemu-img names itself in
            m = f"{progname()}: {m[1:]}"
        sys.stderr.write(m + "\n")
    failed = getattr(res, "failed", None)
    if failed:         # the check could not complete: qemu-img prints no result
        sys.stderr.write(f"{progname()}: Check failed: {failed}\n")
        return 1
    if args.output == "json":
        from .jsonout import dumps     # (not json: its decoder's re and enum, start-up)
        order = [k for k in _ORDER if k in res] + [k for k in res if k not in _ORDER]
        d = {k: res[k] for k in order}
        sys.stdout.write(dumps(d, indent=4) + "\n")
    elif not args.quiet:
        sys.stdout.write(_human(res))
    return check_exit_code(res)
