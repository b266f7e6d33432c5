"""The snapshot table's part of ``check``, as qemu-img 7.2 does it
(qcow2_check_read_snapshot_table before the refcounts are checked,
qcow2_check_fix_snapshot_table after).

Before: the table pointer is validated and the table read; ``-r all`` cuts
what cannot be read (more than 65536 snapshots, a table over 64 MiB: the
overhanging entries; extra data over 1024 bytes: the excess) and writes the
shortened count to the header at once (its clusters are then leaks the
refcount check frees). A v3 entry with less than 16 bytes of extra data is
incomplete. After: if corruptions of the table remain and ``-r all`` was
asked, the table is written anew (complete entries, the cut extra data).
"""
from __future__ import annotations

import errno
import os
import struct

from ...errors import ImageError
from .snapshots import Snapshot, SnapshotTableError, load_table
from .tables import L2Tables
from ...native import dio

MAX_SNAPSHOTS = 65536
#: a message starting with this is an error qemu-img reports with its name
#: in front (``qemu-img: ...``); the command puts the name in its place
PROG = "\x01"


class SnapshotCheck:
    """One snapshot-table check of ``img``: ``snaps`` / ``size`` are what
    the refcount check walks; ``failed`` is set (the errno's text) when the
    table could not be read and the check stops."""

    def __init__(self, img: L2Tables, repair: str | None) -> None:
        self.img, self.repair = img, repair
        self.msgs: list[str] = []
        self.corrupt = self.fixed = self.check_errors = 0
        self.failed: str | None = None
        self.snaps: list[Snapshot] = []
        self.size = 0
        self.old_size = 0           # the table's size before a repair cut it
        self._read()

    @classmethod
    def of(cls, other: SnapshotCheck) -> SnapshotCheck:
        """The table ``other`` read, for another pass (no messages, no
        counts: qemu keeps the table it read in memory)."""
        sc = cls.__new__(cls)
        sc.img, sc.repair = other.img, None
        sc.msgs = []
        sc.corrupt = sc.fixed = sc.check_errors = 0
        sc.failed = None
        sc.snaps, sc.size, sc.old_size = other.snaps, other.size, other.old_size
        return sc

    def _fail(self, err: int, *lines: str) -> None:
        self.check_errors += 1
        self.msgs += lines
        self.failed = os.strerror(err)

    def _read(self) -> None:
        img, h, fix = self.img, self.img.header, self.repair == "all"
        reduced = 0
        nb = h.nb_snapshots
        if nb > MAX_SNAPSHOTS and fix:
            self.msgs.append(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb - MAX_SNAPSHOTS
            nb = h.nb_snapshots = MAX_SNAPSHOTS
        if nb > MAX_SNAPSHOTS:
            self._fail(errno.EFBIG, f"{PROG}ERROR snapshot table too large",
                       f"You can force-remove all {nb - MAX_SNAPSHOTS} overhanging snapshots "
                       "with qemu-img check -r all")
            return
        if (1 << 63) - 1 - nb * 40 < h.snapshots_offset or h.snapshots_offset % img.cluster_size:
            self._fail(errno.EINVAL, f"{PROG}ERROR snapshot table offset invalid")
            return
        try:
            t = load_table(img.fd, h, img.filename, fix, self.msgs)
        except SnapshotTableError as e:
            self._fail(errno.EFBIG, f"{PROG}ERROR failed to read the snapshot table: {e.text}",
                       e.hint)
            return
        self.snaps, self.size, self.old_size = t.snaps, t.size, t.size
        reduced += t.reduced
        self.corrupt += reduced + t.dropped
        if reduced:
            h.nb_snapshots = len(t.snaps)
            dio.pwrite(img.fd, struct.pack(">I", h.nb_snapshots), 60)
            os.fsync(img.fd)
            self.fixed += reduced
            self.corrupt -= reduced
        if h.version >= 3:
            for i, s in enumerate(self.snaps):
                if s.extra_size < 16:
                    self.corrupt += 1
                    self.msgs.append(f"{'Repairing' if fix else 'ERROR'} snapshot table "
                                     f"entry {i} is incomplete")

    def fix_table(self) -> None:
        """qcow2_check_fix_snapshot_table: with ``-r all``, a table with
        corruptions left is written anew."""
        if not (self.corrupt and self.repair == "all"):
            return
        from .snapshot_ops import write_table
        try:
            write_table(self.img, self.snaps, self.old_size)
        except ImageError as e:
            self.check_errors += 1
            self.msgs.append(f"ERROR failed to update snapshot table: {e}")
            return
        self.fixed += self.corrupt
        self.corrupt = 0
