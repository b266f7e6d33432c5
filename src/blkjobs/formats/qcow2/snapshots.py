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

import os
import struct
from dataclasses import dataclass

from ...errors import ImageError

_ENTRY = struct.Struct(">QIHHIIQII")       # 40 bytes


@dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int          # -1: not recorded
    extra_unknown: bytes = b""   # extra data past the 24 bytes QEMU knows

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


def read_snapshots(drv) -> list[Snapshot]:
    """The snapshot table of an open qcow2 driver, in table order."""
    return read_table(drv)[0]


def read_table(drv) -> tuple[list[Snapshot], int]:
    """The snapshot table and its size in bytes (to the end of the last
    entry's name)."""
    h = drv.header
    if not h.nb_snapshots:
        return [], 0
    end = 0
    out = []
    pos = h.snapshots_offset
    for i in range(h.nb_snapshots):
        raw = os.pread(drv.fd, _ENTRY.size, pos)
        if len(raw) != _ENTRY.size:
            raise ImageError(f"'{drv.filename}': snapshot table truncated (entry {i})")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
         extra_len) = _ENTRY.unpack(raw)
        if extra_len > 1024 or id_len > 1024 or name_len > 1024:
            raise ImageError(f"'{drv.filename}': snapshot table entry {i} is corrupt")
        pos += _ENTRY.size
        extra = os.pread(drv.fd, extra_len, pos) if extra_len else b""
        pos += extra_len
        strs = os.pread(drv.fd, id_len + name_len, pos)
        if len(strs) != id_len + name_len or len(extra) != extra_len:
            raise ImageError(f"'{drv.filename}': snapshot table truncated (entry {i})")
        pos += id_len + name_len
        end = pos - h.snapshots_offset
        pos += -(pos - h.snapshots_offset) % 8
        if len(extra) >= 8:
            vmsize = struct.unpack_from(">Q", extra, 0)[0]
        disk = struct.unpack_from(">Q", extra, 8)[0] if len(extra) >= 16 else h.size
        icount = struct.unpack_from(">q", extra, 16)[0] if len(extra) >= 24 else -1
        out.append(Snapshot(strs[:id_len].decode("utf-8", "replace"),
                            strs[id_len:].decode("utf-8", "replace"), l1_off, l1_size,
                            dsec, dnsec, clock, vmsize, disk, icount, extra[24:]))
    return out, end


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
