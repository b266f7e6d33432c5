"""blkjobs map [--output human|json] IMG"""
from __future__ import annotations

import json
import sys

from ..imageops.inspect import map_raw


def register(sub):
    p = sub.add_parser("map", help="show the layout of an image")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args) -> int:
    out = sys.stdout
    if args.output == "json":
        first = True
        out.write("[")
        for e in map_raw(args.image):
            out.write(("" if first else ",\n") + "{ " + ", ".join(
                f'"{k}": {json.dumps(v)}' for k, v in e.items()) + "}")
            first = False
        out.write("]\n")
    else:
        out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        for e in map_raw(args.image):
            if e["data"]:
                out.write(f"{e['start']:<#16x}{e['length']:<#16x}{e['offset']:<#16x}{args.image}\n"
                          .replace("0x0 ", "0   "))
    return 0
