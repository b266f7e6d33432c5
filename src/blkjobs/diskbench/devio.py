"""What reached the device: psutil's disk counters (/proc/diskstats) of the
block device holding DIR, read before and after every run, for every
contender alike (blkjobs and the external tools).

The device is found from DIR's st_dev: /sys/dev/block/MAJOR:MINOR links to
the device as /proc/diskstats names it -- a partition (``vda1``, whose own
counters are used), a device-mapper volume (``dm-0``: LVM, LUKS), a whole
virtio or SCSI disk (``vda``, ``sda``). :func:`describe` says which, from
/sys. File systems whose st_dev is anonymous (major 0) are looked up in
/proc/self/mountinfo: btrfs names its device as the mount source, overlay
counts at its upper layer's device (where the benchmark's new files live;
reads of lower-layer files would not be counted). tmpfs, proc and network
file systems have no block device: no counters, and the report says so.
The counters are the whole device's: other work on it during a run is
counted too.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import psutil

SYS = "/sys"
MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class DevIO:
    """Device counters' change over one run."""
    read_bytes: int
    write_bytes: int
    busy_ms: int        # time the device had requests in flight
    read_ios: int = 0   # requests completed (after merging), as fio's disk_util counts
    write_ios: int = 0
    window_ms: float = 0.0  # time between the two readings (the run, setup included)

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def ios(self) -> int:
        return self.read_ios + self.write_ios

    @property
    def util(self) -> float:
        """Percent of the window the device was busy (fio's disk_util 'util')."""
        return min(100.0, 100.0 * self.busy_ms / self.window_ms) if self.window_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# -- which device --------------------------------------------------------------
def _sys_name(major: int, minor: int, sys_root: str) -> str | None:
    link = f"{sys_root}/dev/block/{major}:{minor}"
    if major == 0 or not os.path.exists(link):
        return None
    return os.path.basename(os.path.realpath(link))


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space)."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def mount_of(path: str, mountinfo: str = MOUNTINFO) -> tuple[str, str, str, str] | None:
    """(mount point, fstype, source, super options) of the mount holding
    path: the longest mount point that is a prefix of it, the last mounted
    when several are on the same point."""
    real = os.path.realpath(path)
    best = None
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mnt = _unescape(fields[4])
        if real == mnt or real.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) >= len(best[0]):
                best = (mnt, tail[0], _unescape(tail[1]), tail[2])
    return best


def device_of(path: str, sys_root: str = SYS, mountinfo: str = MOUNTINFO,
              _depth: int = 0) -> str | None:
    """The /proc/diskstats name of the block device holding path, or None."""
    st = os.stat(path)
    name = _sys_name(os.major(st.st_dev), os.minor(st.st_dev), sys_root)
    if name is not None or os.major(st.st_dev) != 0 or _depth > 4:
        return name
    m = mount_of(path, mountinfo)
    if m is None:
        return None
    _, fstype, source, opts = m
    if fstype == "overlay":
        upper = next((o[len("upperdir="):] for o in opts.split(",")
                      if o.startswith("upperdir=")), None)
        return device_of(upper, sys_root, mountinfo, _depth + 1) if upper else None
    if source.startswith("/dev/"):          # btrfs: an anonymous st_dev per subvolume
        try:
            rdev = os.stat(source).st_rdev
        except OSError:
            return None
        return _sys_name(os.major(rdev), os.minor(rdev), sys_root)
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _driver(block_dir: str) -> str | None:
    drv = os.path.join(block_dir, "device", "driver")
    if os.path.exists(drv):
        return os.path.basename(os.path.realpath(drv))
    uevent = _read(os.path.join(block_dir, "device", "uevent")) or ""
    return next((ln[7:] for ln in uevent.splitlines() if ln.startswith("DRIVER=")), None)


def describe(name: str, sys_root: str = SYS) -> str:
    """What the device is, from /sys: 'vda (virtio_blk disk)', 'vda1
    (partition 1 of vda, virtio_blk disk)', "dm-0 (device-mapper 'vg-root'
    on sda2)", 'loop0 (loop device on FILE)'."""
    d = f"{sys_root}/class/block/{name}"
    part = _read(f"{d}/partition")
    if part is not None:
        parent = os.path.basename(os.path.dirname(os.path.realpath(d)))
        return f"{name} (partition {part} of {describe(parent, sys_root)})"
    dm = _read(f"{d}/dm/name")
    if dm is not None:
        try:
            slaves = sorted(os.listdir(f"{d}/slaves"))
        except OSError:
            slaves = []
        on = f" on {', '.join(slaves)}" if slaves else ""
        return f"{name} (device-mapper '{dm}'{on})"
    backing = _read(f"{d}/loop/backing_file")
    if backing is not None:
        return f"{name} (loop device on {backing})"
    drv = _driver(d)
    return f"{name} ({drv} disk)" if drv else name


# -- its counters --------------------------------------------------------------
class DeviceCounters:
    """Snapshots of one device's counters; ``name`` None: not available,
    ``why`` says why."""

    def __init__(self, path: str, sys_root: str = SYS, mountinfo: str = MOUNTINFO):
        self.name = device_of(path, sys_root, mountinfo)
        self.why: str | None = None
        self.what = ""
        if self.name is None:
            m = mount_of(path, mountinfo)
            fs = f"{m[1]} file system" if m else "no block device"
            self.why = (f"no block device under '{path}' ({fs}; tmpfs, overlay without "
                        "an upper layer on a disk and network file systems have none): "
                        "device counters not available")
        elif self._read() is None:
            self.why = f"no disk counters for {self.name} in /proc/diskstats"
            self.name = None
        else:
            self.what = describe(self.name, sys_root)
            m = mount_of(path, mountinfo)
            if m and m[1] == "overlay":
                self.what += (" (the overlay's upper layer: what the benchmark writes; "
                              "reads of lower-layer files are not counted)")

    def _read(self):
        if self.name is None:
            return None
        return (psutil.disk_io_counters(perdisk=True) or {}).get(self.name)

    def snapshot(self):
        return self._read()

    @staticmethod
    def delta(before, after, window_s: float = 0.0) -> DevIO | None:
        """The change from ``before`` to ``after``, read ``window_s`` apart."""
        if before is None or after is None:
            return None

        def d(field: str) -> int:
            return max(0, getattr(after, field, 0) - getattr(before, field, 0))
        return DevIO(d("read_bytes"), d("write_bytes"), d("busy_time"),
                     d("read_count"), d("write_count"), round(window_s * 1000, 3))
