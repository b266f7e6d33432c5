"""Deterministic VM-shaped raw images for the demo, tests and benchmarks.

A real guest disk is not uniform: a boot area, file system metadata and
files (data runs of 64 KiB - 8 MiB), blocks the guest zeroed (zeroes written
as data, which a good copier turns into holes) and never-touched space
(holes). ``make_vm_image`` lays such runs out with a fixed seed, so every
run of a benchmark copies exactly the same bytes.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

MiB = 1 << 20


@dataclass
class Layout:
    data: int = 0     # bytes of data written
    zero: int = 0     # bytes of zeroes written as data
    hole: int = 0     # bytes never written


def make_vm_image(path: str, size: int, seed: int = 42, data: float = 0.35,
                  zero: float = 0.15) -> Layout:
    """Create ``path`` (raw, ``size`` bytes); about ``data`` of it random
    data, ``zero`` zeroes written as data and the rest holes."""
    if data < 0 or zero < 0 or data + zero > 1:
        raise ValueError("densities must be >= 0 and add up to at most 1")
    rnd = random.Random(seed)
    pool = rnd.randbytes(16 * MiB)
    zeroes = bytes(8 * MiB)
    lay = Layout()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        pos = 0

        def put(kind: str, n: int):
            nonlocal pos
            n = min(n, size - pos)
            if kind == "hole":
                lay.hole += n
            else:
                src = pool if kind == "data" else zeroes
                done = 0
                while done < n:
                    k = min(n - done, len(src))
                    start = rnd.randrange(0, len(src) - k + 1, 512) if kind == "data" else 0
                    os.pwrite(fd, memoryview(src)[start:start + k], pos + done)
                    done += k
                if kind == "data":
                    lay.data += n
                else:
                    lay.zero += n
            pos += n

        put("data", min(size, MiB))                  # boot area
        while pos < size:
            r = rnd.random()
            filled = (lay.data + lay.zero + lay.hole) or 1
            if r < data and lay.data / filled <= data + 0.02:
                put("data", rnd.randrange(16, 2048) * 4096)
            elif r < data + zero and lay.zero / filled <= zero + 0.02:
                put("zero", rnd.randrange(16, 1024) * 4096)
            else:
                put("hole", rnd.randrange(16, 2048) * 4096)
    finally:
        os.close(fd)
    return lay
