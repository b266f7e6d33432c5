"""blkjobs info [--output human|json] IMG"""
from __future__ import annotations

import json
import sys

from ..imageops.inspect import info_raw
from .sizes import human


def register(sub):
    p = sub.add_parser("info", help="show information about an image")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args) -> int:
    info = info_raw(args.image)
    if args.output == "json":
        sys.stdout.write(json.dumps(info, indent=4) + "\n")
        return 0
    print(f"image: {info['filename']}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {human(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"disk size: {human(info['actual-size'])}")
    return 0
