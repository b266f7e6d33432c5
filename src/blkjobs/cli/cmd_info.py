"""blkjobs info [-f FMT] [--backing-chain] [--output human|json] IMG

Human and JSON output as ``qemu-img info`` 7.2 prints them (JSON keys in
qemu-img's order; see imageops.inspect for what is not reported)."""
from __future__ import annotations

import sys

from ..imageops.inspect import info
from ..units import human


def register(sub):
    # argparse's options only: a plain command line (cli.quickparse) does not
    # import them (start-up)
    from . import image_opts
    p = sub.add_parser("info", help="show information about an image")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--backing-chain", action="store_true",
                   help="also show every image of the backing chain")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: read an image another process is writing (no lock "
                   "conflict; what is read may be inconsistent)")
    p.add_argument("image")
    image_opts.add(p, "image")
    p.set_defaults(func=run)


def _human(d: dict) -> str:
    lines = [f"image: {d['filename']}", f"file format: {d['format']}",
             f"virtual size: {human(d['virtual-size'])} ({d['virtual-size']} bytes)",
             f"disk size: {human(d['actual-size']) if 'actual-size' in d else 'unavailable'}"]
    if d.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if "backing-filename" in d:
        b, full = d["backing-filename"], d.get("full-backing-filename")
        lines.append(f"backing file: {b}" + (" (cannot determine actual path)" if full is None
                                              else "" if b == full
                                              else f" (actual path: {full})"))
        if "backing-filename-format" in d:
            lines.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        from ..formats.qcow2.snapshots import table_from_qapi
        lines.append(table_from_qapi(d["snapshots"]).rstrip("\n"))
    fs = d.get("format-specific")
    if fs and fs.get("data"):
        lines.append("Format specific information:")
        for k, v in fs["data"].items():
            _dump(lines, 4, k.replace('-', ' '), v)
    return "\n".join(lines) + "\n"


def _dump(lines: list, indent: int, key: str, v) -> None:
    """One format-specific field as qemu-img prints it: lists as
    ``[i]:`` items, dicts as nested fields, four more spaces per level."""
    pad = " " * indent
    if isinstance(v, list):
        lines.append(f"{pad}{key}:")
        for i, item in enumerate(v):
            _dump(lines, indent + 4, f"[{i}]", item)
    elif isinstance(v, dict):
        lines.append(f"{pad}{key}:")
        for k, x in v.items():
            _dump(lines, indent + 4, k.replace('-', ' '), x)
    else:
        if isinstance(v, bool):
            v = "true" if v else "false"
        lines.append(f"{pad}{key}: {v}")


def run(args) -> int:
    infos = info(args.image, args.fmt, backing_chain=args.backing_chain,
                 force_share=args.force_share)
    if args.output == "json":
        out = infos if args.backing_chain else infos[0]
        from .jsonout import dumps     # (not json: its decoder's re and enum, start-up)
        sys.stdout.write(dumps(out, indent=4) + "\n")
        return 0
    sys.stdout.write("\n".join(_human(d) for d in infos))
    return 0
