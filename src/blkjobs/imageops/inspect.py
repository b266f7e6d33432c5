"""``info`` and ``map`` for raw images, with qemu-img's JSON field names."""
from __future__ import annotations

import os

from ..native.extents import extents
from .files import fd_size, open_source


def info_raw(path: str) -> dict:
    fd = open_source(path)
    try:
        st = os.fstat(fd)
        return {"virtual-size": fd_size(fd), "filename": path, "format": "raw",
                "actual-size": st.st_blocks * 512, "dirty-flag": False}
    finally:
        os.close(fd)


def map_raw(path: str, work: int = 1 << 30):
    """Yield qemu-img map entries; asked of the file system per work range."""
    fd = open_source(path)
    try:
        size = fd_size(fd)
        pos = 0
        last = None
        while pos < size:
            n = min(work, size - pos)
            for e in extents(fd, pos, n):
                ent = {"start": e.offset, "length": e.length, "depth": 0, "present": True,
                       "zero": not e.data, "data": e.data, "offset": e.offset}
                if last and last["data"] == ent["data"] and last["start"] + last["length"] == e.offset:
                    last["length"] += e.length
                    continue
                if last:
                    yield last
                last = ent
            pos += n
        if last:
            yield last
    finally:
        os.close(fd)
