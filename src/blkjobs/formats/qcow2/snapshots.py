"""qcow2 internal snapshots: reading the snapshot table (docs/qcow2.md).

Each entry: L1 table offset and size, the ID and name strings, the date
(seconds and nanoseconds), the VM clock (nanoseconds), the VM state size
(32 bits, or 64 in the extra data), and in the extra data the disk size at
the snapshot and the instruction count (absent: -1). Entries are 8-byte
aligned. Only reading is implemented: creating, deleting and applying
snapshots (which share clusters between L1 tables through refcounts) is not.
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


def read_snapshots(drv) -> list[Snapshot]:
    """The snapshot table of an open qcow2 driver, in table order."""
    h = drv.header
    if not h.nb_snapshots:
        return []
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
        pos += -(pos - h.snapshots_offset) % 8
        if len(extra) >= 8:
            vmsize = struct.unpack_from(">Q", extra, 0)[0]
        disk = struct.unpack_from(">Q", extra, 8)[0] if len(extra) >= 16 else None
        icount = struct.unpack_from(">q", extra, 16)[0] if len(extra) >= 24 else -1
        out.append(Snapshot(strs[:id_len].decode("utf-8", "replace"),
                            strs[id_len:].decode("utf-8", "replace"), l1_off, l1_size,
                            dsec, dnsec, clock, vmsize, disk, icount))
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
