"""qcow2 over NBD: a qcow2 image whose file is an NBD export (a qcow2 file
served raw, ``qemu-nbd -f raw img.qcow2``), opened as ``-f qcow2 URI`` the
way QEMU stacks its qcow2 driver on an ``nbd`` protocol node. Read-only.

The qcow2 driver reads its metadata with ``pread`` on a file descriptor, so
the metadata is brought to a local sparse mirror first: an anonymous memory
file (``memfd``) the size of the export, holding the export's allocated
bytes (its block status) except the guest data clusters the active L1/L2
tables point to. Those are read from the export when the guest reads them
(:meth:`NbdQcow2._pread_into`). What the mirror holds is small: the header,
L1/L2 and refcount tables, snapshot tables, bitmaps, compressed clusters,
and the data clusters only snapshots use (QEMU reads those on demand; here
they are fetched at open). Zero stretches are not stored (the mirror stays
sparse).

A corrupt image whose active L2 table points a data cluster at metadata
would show that metadata as holes here (``check`` then differs from
qemu-img's); a sound image is read as qemu-img reads it.
"""
from __future__ import annotations

import os
import struct

from ..errors import ImageError
from .base import Kind
from .nbd import Nbd
from .qcow2 import Qcow2
from .qcow2.header import parse_header
from .qcow2.tables import COMPRESSED, L1_OFFSET_MASK

#: bytes fetched per request while filling the mirror
_PIECE = 4 << 20
#: the bytes of cluster 0 parsed first (the qcow2 driver's own read size)
_HEAD = 2 << 20
_ZEROES = memoryview(bytes(_PIECE + (2 << 20)))     # a piece and a largest cluster


def _data_clusters(nbd: Nbd, head: bytes, name: str) -> set[int]:
    """Host offsets of the guest data clusters of the active L1/L2 tables
    (not compressed ones: those are read with the metadata)."""
    h = parse_header(head, nbd.size, name)
    if h.crypt_method:
        raise ImageError(f"'{name}': encrypted qcow2 images are not supported over NBD")
    if h.has_data_file:
        raise ImageError(f"'{name}': qcow2 images with an external data file are not "
                         "supported over NBD")
    cs = h.cluster_size
    esz = 16 if h.extended_l2 else 8
    raw = nbd.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
    out: set[int] = set()
    for e in struct.unpack(f">{h.l1_size}Q", raw):
        l2 = e & L1_OFFSET_MASK
        if not l2 or l2 + cs > nbd.size:
            continue            # the qcow2 driver reports a bad entry at open
        tab = nbd.read(l2, cs)
        for t in struct.iter_unpack(">Q" if esz == 8 else ">QQ", tab):
            if t[0] & COMPRESSED:
                continue
            off = t[0] & L1_OFFSET_MASK
            if off:
                out.add(off)
    return out


def _fill(nbd: Nbd, fd: int, skip: set[int], cs: int) -> None:
    """Copy the export's allocated bytes, but the clusters ``skip`` and
    zero stretches, to ``fd`` at the same offsets."""
    buf = bytearray(_PIECE + cs)
    for m in nbd.map_host(0, nbd.size):
        if m.kind != Kind.DATA:
            continue
        pos, end = m.start, m.start + m.length
        while pos < end:
            c = pos - pos % cs
            if c in skip:
                pos = min(end, c + cs)
                continue
            n = min(end, c + cs)
            while n < end and n - pos < _PIECE and n not in skip:
                n = min(end, n + cs)
            mv = memoryview(buf)[:n - pos]
            nbd.readinto(pos, mv)
            if mv != _ZEROES[:len(mv)]:
                os.pwrite(fd, mv, pos)
            pos = n


class NbdQcow2(Qcow2):
    """A read-only qcow2 image over an NBD export (see the module
    docstring). ``nbd``: the export, closed with this driver when
    ``owns_nbd``."""

    host_file = False
    parallel_reads = False
    #: qemu-img info: "disk size: unavailable"
    disk_size_unknown = True
    protocol = "nbd"

    def __init__(self, nbd: Nbd, owns_nbd: bool = True, header_only: bool = False):
        self._nbd, self._owns_nbd = nbd, owns_nbd
        name = nbd.filename
        mfd = os.memfd_create("blkjobs-qcow2-over-nbd", os.MFD_CLOEXEC)
        try:
            os.ftruncate(mfd, nbd.size)
            head = nbd.read(0, min(_HEAD, nbd.size))
            if head[:4] != b"QFI\xfb":
                raise ImageError(f"Could not open '{nbd.uri}': Image is not in qcow2 format")
            cs = 1 << int.from_bytes(head[20:24], "big")
            _fill(nbd, mfd, _data_clusters(nbd, head, name), cs)
            super().__init__(f"/proc/self/fd/{mfd}", read_only=True, header_only=header_only)
        finally:
            os.close(mfd)           # the driver holds its own descriptor
        self.filename = name

    def _pread_into(self, mv: memoryview, host: int) -> None:
        """Guest data: from the export (zeroes past its end, as past a
        file's end)."""
        n = max(0, min(len(mv), self._nbd.size - host))
        if n:
            self._nbd.readinto(host, mv[:n])
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owns_nbd:
                self._nbd.close()


def open_qcow2(uri: str, read_only: bool = True, header_only: bool = False) -> NbdQcow2:
    """``-f qcow2`` on an NBD URI (read-only)."""
    if not read_only:
        raise ImageError(f"Could not open '{uri}': qcow2 over NBD is read-only in blkjobs")
    nbd = Nbd(uri, read_only=True)
    try:
        return NbdQcow2(nbd, header_only=header_only)
    except BaseException:
        nbd.close()
        raise
