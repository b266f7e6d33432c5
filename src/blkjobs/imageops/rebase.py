"""``rebase``: change the backing file of a qcow2 image.

Safe mode (default): for every run that the overlay does not allocate itself
(it reads from the old backing chain), the old and the new backing contents
are compared — runs that read as zeroes on both sides by block status are not
read — and the overlay (sub)clusters that differ are written with the *old*
content (consecutive ones in one write), so the guest view does not change.
Past the old backing's end, or everywhere when there is none, the old content
is zeroes: there the differing (sub)clusters become zero clusters (a zero
write), as with qemu-img, not data.
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
from typing import Any
from collections.abc import Callable

from ..errors import BlkjobsError, UsageError
from ..formats import FORMATS
from ..formats.base import Kind
from ..graph import Perm, open_chain, resolve_backing
from ..graph.lock import ImageLock, LockConflict, opening
from ..graph.blockspec import file_name
from .images import check_format, cli_graph, open_one, open_ro, probe

WORK = 256 << 20
CHUNK = 4 << 20
#: the block drivers of Debian's qemu-img 7.2 (its --help): ``rebase -u -F``
#: records any of them as the backing format, as qemu-img does
QEMU_DRIVERS = frozenset(
    "blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read "
    "dmg file ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs "
    "null-aio null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication "
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat".split())
#: those of them that create no image (no creation options: ``create -f
#: FMT`` and ``convert -O FMT`` refuse them, "does not support image creation")
QEMU_NO_CREATE = frozenset(
    "blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read "
    "dmg ftp ftps http https null-aio null-co preallocate quorum replication "
    "snapshot-access throttle vvfat".split())


def rebase(path: str, backing: str | None, backing_fmt: str | None = None,
           fmt: str | None = None, unsafe: bool = False, force_share: bool = False,
           progress: Callable[[int, int], None] | None = None) -> None:
    """``progress(done, total)``: bytes of the image compared between the
    old and the new backing file so far (safe mode)."""
    fmt = probe(path, fmt)
    if fmt != "qcow2":
        raise UsageError(f"rebase: '{path}' is a {fmt} image; only qcow2 images have a "
                         "backing file")
    if not backing:
        backing, backing_fmt = None, None
    if backing is not None and backing_fmt is None and unsafe:
        raise _format_needed(backing)
    if unsafe and backing_fmt is not None and backing_fmt not in FORMATS:
        # only recorded, as qemu-img -u does for any driver it knows
        if backing_fmt not in QEMU_DRIVERS:
            raise UsageError(f"Invalid format name: '{backing_fmt}'")
    else:
        check_format(backing_fmt, "backing file")
    if unsafe:
        # the image alone, read-write (qemu-img opens no backing file here)
        with opening(path):
            lock = ImageLock(file_name(path), write=True)
        with lock:
            img = open_one(path, "qcow2", read_only=False)
            try:
                img.set_backing(backing, backing_fmt)
            finally:
                img.close()
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
            except BlkjobsError as e:     # qemu-img's: this line, then the file's
                text = str(e).removeprefix(f"Could not open '{new_path}': ")
                raise UsageError(f"{what} '{new_path}': {text}") from None
            if backing_fmt is None:     # said once the new backing file opened, as qemu-img
                raise _format_needed(backing)
            if any(os.path.samefile(n.filename, path) for n in new.chain()):
                raise UsageError(f"rebase: '{path}' would be its own backing file")
        top.take("rebase", Perm.WRITE | Perm.CONSISTENT_READ)
        if top.backing is not None or new is not None:
            _copy_differences(top, new, progress)
        top.flush()
        top.driver.set_backing(backing, backing_fmt)
    finally:
        top.close_chain()
        if new is not None:
            new.close_chain()


def _format_needed(backing: str) -> UsageError:
    return UsageError(f"Could not change the backing file to '{backing}': "
                      "backing format must be specified")


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


def _copy_differences(top, new, progress=None) -> None:
    """``top.backing`` (the old backing, possibly None: it then reads as
    zeroes, as it does past its end) against ``new`` (None: zeroes)."""
    old = top.backing
    old_end = old.size if old is not None else 0
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
                if old is None:
                    va[:k] = zero[:k]
                else:
                    old._read_below(off, va[:k])
                if new is None:
                    vb[:k] = zero[:k]
                else:
                    new._read_below(off, vb[:k])
                if va[:k] != vb[:k]:
                    _write_differing(top, off, va[:k], vb[:k], old_end, oz)
                off += k
                if progress:
                    progress(off, size)
        pos += n
        if progress:
            progress(pos, size)


def _write_differing(top, off, a, b, old_end, oz):
    """Write into ``top`` the (sub)clusters where ``a`` (the old backing's
    content at ``off``) differs from ``b`` (the new one's), consecutive ones
    of one kind in one request, as qemu-img does it: the old data where the
    old backing has data; past its end (``old_end``) zeroes, written as a
    zero request (zero clusters, not data). A (sub)cluster across old_end
    whose old part does not differ gets zeroes from old_end on, or as a whole
    when its old part is zero by block status (``oz``, as qemu's zero write
    checks)."""
    drv = top.driver
    g = drv.scs or drv.cluster_size     # allocation granule
    zero = bytes(g)
    reqs: list[list[Any]] = []                  # [kind, start, end] in image offsets
    i, n = 0, len(a)
    while i < n:
        j = min(n, (off + i) // g * g + g - off)
        gs, ge = off + i, off + j
        req = None
        if ge <= old_end:
            if a[i:j] != b[i:j]:
                req = ("data", gs, ge)
        elif gs >= old_end:
            if b[i:j] != zero[:j - i]:
                req = ("zero", gs, ge)
        else:                                   # across the old backing's end
            m = old_end - off
            if a[i:m] != b[i:m]:
                req = ("data", gs, ge)
            elif b[m:j] != zero[:j - m]:
                req = ("zero", gs if _covered(oz, gs, old_end) else old_end, ge)
        if req:
            if reqs and reqs[-1][0] == req[0] and reqs[-1][2] == req[1]:
                reqs[-1][2] = req[2]
            else:
                reqs.append(list(req))
        i = j
    for kind, s, e in reqs:
        if kind == "data":
            top.write(s, a[s - off:e - off])
        else:
            top.write_zeroes(s, e - s, may_unmap=False)
