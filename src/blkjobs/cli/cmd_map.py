"""blkjobs map [-f FMT] [--output human|json] [--start-offset N] [--max-length N] IMG

Walks the backing chain like ``qemu-img map``: ``depth`` is the layer that
provides each run. JSON lines are qemu-img 7.2's (no ``compressed`` key)."""
from __future__ import annotations

import sys

from ..errors import ImageError
from ..imageops.inspect import map_image
from ..units import parse_size

_KEYS = ("start", "length", "depth", "present", "zero", "data", "offset")


def register(sub):
    # argparse's options only: a plain command line (cli.quickparse) does not
    # import them (start-up)
    from . import image_opts
    p = sub.add_parser("map", help="show the layout of an image and its backing chain")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-s", "--start-offset", default="0", metavar="OFFSET")
    p.add_argument("-l", "--max-length", default=None, metavar="LENGTH")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="force share: read an image another process is writing")
    p.add_argument("image")
    image_opts.add(p, "image")
    p.set_defaults(func=run)


def run(args) -> int:
    # Everything is built first and written at once: on an error (a corrupt
    # entry half way, a backing file that cannot be opened) nothing reaches
    # stdout, only the one line on stderr.
    buf: list[str] = []
    out = buf.append
    start = parse_size(args.start_offset, "start offset")
    length = parse_size(args.max_length, "max length") if args.max_length else None
    entries = map_image(args.image, args.fmt, start, length, force_share=args.force_share)
    if args.output == "json":
        from .jsonout import dumps     # (not json: its decoder's re and enum, start-up)
        first = True
        out("[")
        for e in entries:
            out(("" if first else ",\n") + "{ " + ", ".join(
                f'"{k}": {dumps(e[k])}' for k in _KEYS if k in e) + "}")
            first = False
        out("]\n")
        sys.stdout.write("".join(buf))
        return 0
    out(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
    for e in entries:
        if not e["data"] or e["zero"]:      # qemu-img lists data that is not zero
            continue
        if "offset" not in e:
            raise ImageError("File contains external, encrypted or compressed clusters.")
        out("".join(f"{v:<#16x}" if v else f"{'0':<16}"
                    for v in (e["start"], e["length"], e["offset"])) + e["file"] + "\n")
    sys.stdout.write("".join(buf))
    return 0
