"""``dd``: copy a range of an image into a new image (``qemu-img dd``).

The arithmetic is qemu-img 7.2's, including its quirk: ``count`` limits the
input to its first ``count * bs`` bytes *before* ``skip`` is applied, so the
output holds input bytes [skip*bs, min(size, count*bs)). The output image is
created (truncated when it exists) with that size (qcow2 rounds it up to 512
bytes, as qemu-img does), then every byte is written, zeroes too (qemu-img
writes them: a raw output is fully allocated, a qcow2 one allocates every
cluster). Reads and writes go in chunks of whole blocks of ``bs``.
"""
from __future__ import annotations

from ..units import sector_size

CHUNK = 4 << 20
INT64_MAX = (1 << 63) - 1


def plan(size: int, bs: int, count: int | None, skip: int | None) -> tuple[int, int, bool]:
    """(input start, input end, skipped_past_end) for an input of ``size``."""
    if count is not None and count <= INT64_MAX // bs and count * bs < size:
        size = count * bs
    if skip is not None and (skip > INT64_MAX // bs or size < skip * bs):
        return size, size, True
    return (skip or 0) * bs, size, False


def length(node) -> int:
    """The input's length as QEMU sees it: whole 512-byte sectors (a raw
    file's last partial sector reads as zeroes past its end)."""
    return sector_size(node.size)


def copy(src, dst, start: int, end: int, bs: int, progress=None) -> None:
    """Copy src[start:end] to dst[0:end-start] (graph nodes); zeroes past
    the end of ``src``. ``progress(done, total)``: bytes written so far."""
    real = src.size
    step = max(bs, CHUNK // bs * bs)
    buf = bytearray(min(step, max(0, end - start)))
    pos, out = start, 0
    while pos < end:
        n = min(step, end - pos)
        mv = memoryview(buf)[:n]
        inside = max(0, min(n, real - pos))
        if inside:
            src.readinto(pos, mv[:inside])
        mv[inside:] = bytes(n - inside)
        dst.write(out, mv)
        pos += n
        out += n
        if progress:
            progress(out, end - start)
    dst.flush()
