"""What reached the device: psutil's disk counters (/proc/diskstats) of the
block device holding DIR, read before and after every run.

The device is found from DIR's st_dev: /sys/dev/block/MAJOR:MINOR links to
the device (a partition's name, e.g. ``sda2``, as /proc/diskstats lists
it). tmpfs, overlay and other file systems without a block device (major 0)
have no counters; the report says so. The counters are the whole device's:
other work on it during a run is counted too.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import psutil


@dataclass(frozen=True)
class DevIO:
    """Device counters' change over one run."""
    read_bytes: int
    write_bytes: int
    busy_ms: int        # time the device had requests in flight

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def device_of(path: str) -> str | None:
    """The /proc/diskstats name of the block device holding path, or None."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        return None
    link = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(link):
        return None
    return os.path.basename(os.path.realpath(link))


class DeviceCounters:
    """Snapshots of one device's counters; ``name`` None: not available,
    ``why`` says why."""

    def __init__(self, path: str):
        self.name = device_of(path)
        self.why: str | None = None
        if self.name is None:
            self.why = (f"no block device under '{path}' (tmpfs, overlay or a network "
                        "file system): device counters not available")
        elif self._read() is None:
            self.why = f"no disk counters for {self.name} in /proc/diskstats"
            self.name = None

    def _read(self):
        if self.name is None:
            return None
        return (psutil.disk_io_counters(perdisk=True) or {}).get(self.name)

    def snapshot(self):
        return self._read()

    @staticmethod
    def delta(before, after) -> DevIO | None:
        if before is None or after is None:
            return None
        return DevIO(max(0, after.read_bytes - before.read_bytes),
                     max(0, after.write_bytes - before.write_bytes),
                     max(0, getattr(after, "busy_time", 0) - getattr(before, "busy_time", 0)))
