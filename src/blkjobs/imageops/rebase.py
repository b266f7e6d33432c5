"""``rebase``: change the backing file of a qcow2 image.

Safe mode (default): for every run that the overlay does not allocate itself
(it reads from the old backing chain), the old and the new backing contents
are compared — runs that read as zeroes on both sides by block status are not
read — and the overlay clusters that differ are written with the *old*
content (consecutive ones in one write), so the guest view does not change.
Then the header is rewritten (name and format). ``unsafe`` (-u) only rewrites
the header. ``backing=None`` (``-b ""``) makes the image standalone: every
non-zero byte of the old chain is copied into it.

Locks as qemu-img rebase: the image is opened read-write (it takes write and
lets nobody else write); safe mode also reads its old backing chain and the
new backing file, which nobody may write meanwhile (``force_share``, -U,
lifts that for the new backing file only, as in qemu-img); ``-u`` opens no
backing file. A new backing file needs its format (``-F``): qemu-img 7.2
refuses to record a probed one.
"""
from __future__ import annotations

import os

from ..errors import BlkjobsError, UsageError
from ..formats.base import Kind
from ..graph import Perm, open_chain, resolve_backing
from ..graph.lock import ImageLock, LockConflict, opening
from .images import check_format, cli_graph, open_ro, probe

WORK = 256 << 20
CHUNK = 4 << 20


def rebase(path: str, backing: str | None, backing_fmt: str | None = None,
           fmt: str | None = None, unsafe: bool = False, force_share: bool = False) -> None:
    fmt = probe(path, fmt)
    if fmt != "qcow2":
        raise UsageError(f"rebase: '{path}' is a {fmt} image; only qcow2 images have a "
                         "backing file")
    if not backing:
        backing, backing_fmt = None, None
    if backing is not None and backing_fmt is None:
        raise UsageError(f"Could not change the backing file to '{backing}': "
                         "backing format must be specified")
    check_format(backing_fmt, "backing file")
    if unsafe:
        # the image alone, read-write (qemu-img opens no backing file here)
        from ..formats import open_image
        with opening(path):
            lock = ImageLock(path, write=True)
        with lock, open_image(path, "qcow2", read_only=False) as img:
            img.set_backing(backing, backing_fmt)
        return
    with opening(path):
        top = open_chain(path, fmt, read_only=False, graph=cli_graph(stable=True))
    new = None
    try:
        if backing is not None:
            new_path = resolve_backing(path, backing)
            what = "Could not open new backing file"
            try:
                new = open_ro(new_path, backing_fmt, force_share=force_share, stable=True,
                              what=what)
            except LockConflict as e:
                if os.path.realpath(e.path) == os.path.realpath(path):
                    raise UsageError(f"rebase: '{path}' would be its own backing file") \
                        from None
                raise
            except BlkjobsError as e:
                raise UsageError(f"{what} '{new_path}': {e}") from None
            if any(os.path.samefile(n.filename, path) for n in new.chain()):
                raise UsageError(f"rebase: '{path}' would be its own backing file")
        top.take("rebase", Perm.WRITE | Perm.CONSISTENT_READ)
        if top.backing is not None:
            _copy_differences(top, new)
        top.flush()
        top.driver.set_backing(backing, backing_fmt)
    finally:
        top.close_chain()
        if new is not None:
            new.close_chain()


def _zero_runs(node, pos, n):
    if node is None or pos >= node.size:
        return [(pos, pos + n)]
    out = [(r["start"], r["start"] + r["length"])
           for r in node.block_status(pos, min(n, node.size - pos)) if r["zero"]]
    if pos + n > node.size:
        out.append((node.size, pos + n))
    return out


def _covered(runs, a, b):
    return any(s <= a and e >= b for s, e in runs)


def _copy_differences(top, new) -> None:
    old = top.backing
    size = top.size
    cs = top.driver.cluster_size
    va, vb = memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK))
    zero = bytes(CHUNK)
    pos = 0
    while pos < size:
        n = min(WORK, size - pos)
        oz, nz = _zero_runs(old, pos, n), _zero_runs(new, pos, n)
        for m in top.driver.map_host(pos, n):
            if m.kind != Kind.UNALLOCATED:
                continue
            off, end = m.start, m.start + m.length
            while off < end:
                k = min(CHUNK - off % cs, end - off)     # chunks keep cluster alignment
                if _covered(oz, off, off + k) and _covered(nz, off, off + k):
                    off += k
                    continue
                old._read_below(off, va[:k])
                if new is None:
                    vb[:k] = zero[:k]
                else:
                    new._read_below(off, vb[:k])
                if va[:k] != vb[:k]:
                    _write_differing(top, off, va[:k], vb[:k], cs)
                off += k
        pos += n


def _write_differing(top, off, a, b, cs):
    """Write the clusters of ``a`` that differ from ``b`` into ``top``,
    consecutive differing clusters in one write."""
    i, n = 0, len(a)
    run = None
    while i < n:
        j = min(n, (off + i) // cs * cs + cs - off)
        if a[i:j] != b[i:j]:
            run = (run[0], j) if run else (i, j)
        elif run:
            top.write(off + run[0], a[run[0]:run[1]])
            run = None
        i = j
    if run:
        top.write(off + run[0], a[run[0]:run[1]])
