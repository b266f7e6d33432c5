"""qcow2 internal snapshots: reading the snapshot table (docs/qcow2.md).

Each entry: L1 table offset and size, the ID and name strings, the date
(seconds and nanoseconds), the VM clock (nanoseconds), the VM state size
(32 bits, or 64 in the extra data), and in the extra data the disk size at
the snapshot and the instruction count (absent: -1). Entries are 8-byte
aligned. Extra data past the 24 bytes QEMU knows is kept as it is when the
table is rewritten. Creating, applying and deleting snapshots (which share
clusters between L1 tables through refcounts): :mod:`.snapshot_ops`.
"""
from __future__ import annotations

import struct

from ...errors import ImageError
from ...native import dio
from ...native.record import Record

_ENTRY = struct.Struct(">QIHHIIQII")       # 40 bytes


class Snapshot(Record):
    """One table entry. A plain class, not a dataclass (``dataclasses``
    imports ``inspect``: start-up); unhashable as the dataclass it was."""
    __slots__ = ("id", "name", "l1_table_offset", "l1_size", "date_sec", "date_nsec",
                 "vm_clock_nsec", "vm_state_size", "disk_size", "icount", "extra_unknown",
                 "extra_size")
    __hash__ = None     # type: ignore[assignment]  # mutable

    def __init__(self, id: str, name: str, l1_table_offset: int, l1_size: int,
                 date_sec: int, date_nsec: int, vm_clock_nsec: int, vm_state_size: int,
                 disk_size: int | None, icount: int, extra_unknown: bytes = b"",
                 extra_size: int = 24) -> None:
        self.id = id
        self.name = name
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size
        self.icount = icount                  # -1: not recorded
        self.extra_unknown = extra_unknown    # extra data past the 24 bytes QEMU knows
        self.extra_size = extra_size          # the entry's extra data size as read

    def pack(self) -> bytes:
        """The table entry as QEMU writes it (qcow2_write_snapshots): at
        least 24 bytes of extra data; no padding after the name."""
        ident, name = self.id.encode(), self.name.encode()
        extra = struct.pack(">QQq", self.vm_state_size, self.disk_size or 0,
                            self.icount) + self.extra_unknown
        vm32 = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        return _ENTRY.pack(self.l1_table_offset, self.l1_size, len(ident), len(name),
                           self.date_sec, self.date_nsec, self.vm_clock_nsec, vm32,
                           len(extra)) + extra + ident + name

    def qapi(self) -> dict:
        """SnapshotInfo as qemu-img 7.2 prints it in JSON (its key order)."""
        d: dict = {}
        if self.icount != -1:
            d["icount"] = self.icount
        d.update({"vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000, "name": self.name,
                  "date-sec": self.date_sec, "date-nsec": self.date_nsec,
                  "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000, "id": self.id,
                  "vm-state-size": self.vm_state_size})
        return d


def pack_table(snaps: list[Snapshot]) -> bytes:
    """The snapshot table: the entries, each 8-byte aligned."""
    out = bytearray()
    for s in snaps:
        out += bytes(-len(out) % 8)
        out += s.pack()
    return bytes(out)


MAX_EXTRA = 1024                # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 1024 * 65536  # QCOW_MAX_SNAPSHOTS_SIZE


class SnapshotTableError(ImageError):
    """The table cannot be read (qcow2_do_read_snapshots' refusal: EFBIG);
    ``hint``: the line qemu-img prints after the error."""

    def __init__(self, path: str, text: str, hint: str) -> None:
        super().__init__(f"Could not open '{path}': {text}\n{hint}" if path
                         else f"{text}\n{hint}")
        self.text, self.hint = text, hint


class TableRead(Record):
    """What :func:`load_table` read (and, repairing, dropped). A plain class
    (see Snapshot)."""
    __slots__ = ("snaps", "size", "reduced", "dropped")
    __hash__ = None     # type: ignore[assignment]  # mutable

    def __init__(self, snaps: list[Snapshot], size: int, reduced: int = 0,
                 dropped: int = 0) -> None:
        self.snaps = snaps
        self.size = size            # bytes, to the end of the last entry's name
        self.reduced = reduced      # overhanging snapshots discarded
        self.dropped = dropped      # entries whose too large extra data was cut


def read_snapshots(drv) -> list[Snapshot]:
    """The snapshot table of an open qcow2 driver, in table order."""
    return read_table(drv)[0]


def read_table(drv) -> tuple[list[Snapshot], int]:
    """The snapshot table and its size in bytes (to the end of the last
    entry's name)."""
    t = load_table(drv.fd, drv.header, drv.filename)
    return t.snaps, t.size


class _Window:
    """The table's bytes through one buffer: large reads, not four preads
    per entry (a damaged count must not make thousands of system calls);
    zeroes past the file's end, as qemu reads it."""

    CHUNK = 1 << 20

    def __init__(self, fd: int):
        self.fd, self.base, self.buf, self.at_eof = fd, 0, b"", False

    def read(self, n: int, off: int) -> bytes:
        if not n:
            return b""
        end = self.base + len(self.buf)
        if not (self.base <= off and (off + n <= end or self.at_eof)):
            want = max(n, self.CHUNK)
            self.base, self.buf = off, dio.pread(self.fd, want, off)
            self.at_eof = len(self.buf) < want
        d = self.buf[off - self.base:off - self.base + n]
        return d + bytes(n - len(d))


# long because: one pass in qcow2_do_read_snapshots' order, messages included
def load_table(fd: int, h, path: str, repair: bool = False,
               msgs: list[str] | None = None) -> TableRead:
    """qcow2_do_read_snapshots: the table at ``h.snapshots_offset``. Too much
    extra data in an entry or a table over 64 MiB is refused
    (:class:`SnapshotTableError`) or, ``repair``ing, cut (the extra data to
    1024 bytes; the overhanging entries off the end), with qemu-img's lines
    appended to ``msgs``."""
    out = TableRead([], 0)
    if not h.nb_snapshots:
        return out
    pos = start = h.snapshots_offset
    w = _Window(fd)
    length = 0
    for i in range(h.nb_snapshots):
        pre = pos
        length += -length % 8
        pos += -pos % 8
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
         eds) = _ENTRY.unpack(w.read(_ENTRY.size, pos))
        pos += _ENTRY.size
        cut = False
        if eds > MAX_EXTRA:
            if not repair:
                raise SnapshotTableError(
                    path, f"Too much extra metadata in snapshot table entry {i}",
                    "You can force-remove this extra metadata with qemu-img check -r all")
            if msgs is not None:
                msgs.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                            f"({eds} > {MAX_EXTRA})")
            out.dropped += 1
            cut = True
        extra = w.read(min(24, eds), pos)
        pos += len(extra)
        if eds >= 8:
            vmsize = struct.unpack_from(">Q", extra, 0)[0]
        disk = struct.unpack_from(">Q", extra, 8)[0] if eds >= 16 else h.size
        icount = struct.unpack_from(">q", extra, 16)[0] if eds >= 24 else -1
        unknown = b""
        if eds > 24:
            end = pos + eds - 24
            if cut:
                eds = MAX_EXTRA
            unknown = w.read(eds - 24, pos)
            pos = end
        strs = w.read(id_len + name_len, pos)
        pos += id_len + name_len
        length += _ENTRY.size + eds + id_len + name_len
        if length > MAX_TABLE_BYTES or pos - start > 0x7FFFFFFF:
            over = h.nb_snapshots - i
            if not repair:
                raise SnapshotTableError(
                    path, "Snapshot table is too big",
                    f"You can force-remove all {over} overhanging snapshots with "
                    "qemu-img check -r all")
            if msgs is not None:
                msgs.append(f"Discarding {over} overhanging snapshots (snapshot table is "
                            "too big)")
            out.reduced += over
            pos = pre
            break
        # C strings, as qemu keeps them: each ends at its first NUL
        sid, name = (b.split(b"\0", 1)[0].decode("utf-8", "replace")
                     for b in (strs[:id_len], strs[id_len:]))
        out.snaps.append(Snapshot(sid, name, l1_off, l1_size,
                                  dsec, dnsec, clock, vmsize, disk, icount, unknown, eds))
    out.size = pos - start
    return out


def dump_table(snaps: list[Snapshot]) -> str:
    """``Snapshot list:`` and the table as qemu-img 7.2 prints it
    (bdrv_snapshot_dump's widths; dates in local time)."""
    import time
    from ...units import human
    lines = ["Snapshot list:",
             f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs = s.vm_clock_nsec // 1_000_000_000
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s.vm_clock_nsec // 1_000_000 % 1000:03d}")
        icount = str(s.icount) if s.icount != -1 else ""
        lines.append(f"{s.id:<9} {s.name:<16} {human(s.vm_state_size):>8}{date:>20}"
                     f"{clock:>13}{icount:>11}")
    return "\n".join(lines) + "\n"


def table_from_qapi(infos: list[dict]) -> str:
    """:func:`dump_table` of SnapshotInfo dicts (``info``'s JSON form)."""
    return dump_table([Snapshot(i["id"], i["name"], 0, 0, i["date-sec"], i["date-nsec"],
                                i["vm-clock-sec"] * 1_000_000_000 + i["vm-clock-nsec"],
                                i["vm-state-size"], None, i.get("icount", -1)) for i in infos])
