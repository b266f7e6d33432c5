"""Device counters beside the application figures: the block device under
DIR (found from st_dev), and what reached it during each run."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import psutil
import pytest

from blkjobs.cli.main import main
from blkjobs.diskbench.devio import DeviceCounters, DevIO, describe, device_of


@pytest.fixture
def disk_dir():
    """A directory on a real disk (not tmpfs): /var/tmp."""
    d = tempfile.mkdtemp(prefix="test-bench-dev.", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_device_of_follows_st_dev(disk_dir):
    st = os.stat(disk_dir)
    name = device_of(disk_dir)
    assert name is not None and os.major(st.st_dev) != 0
    with open(f"/sys/class/block/{name}/dev") as f:
        assert f.read().strip() == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert name in psutil.disk_io_counters(perdisk=True)
    assert device_of("/proc") is None            # no block device


def test_no_block_device_says_so():
    dev = DeviceCounters("/proc")
    assert dev.name is None and dev.snapshot() is None
    assert dev.why == "no block device under '/proc' (proc file system; tmpfs, overlay " \
                      "without an upper layer on a disk and network file systems have " \
                      "none): device counters not available"
    assert DeviceCounters.delta(None, None) is None


def test_direct_runs_reach_the_device(capsys, disk_dir):
    # O_DIRECT writes (and the final fsync) and reads must all reach the
    # device: its counters show at least the workload's bytes (other work on
    # the shared disk only adds).
    rc = main(["bench", disk_dir, "-q", "-w", "seqwrite,seqread", "-b", "1M", "--size", "8M",
               "--repeat", "2", "--warmup", "0", "--direct", "--output", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    name = device_of(disk_dir)
    assert f"device counters: {describe(name)}, for every row (the whole device's: other " \
           "work on it during a run is counted too)" in doc["notes"]
    for r in doc["results"]:
        for run in r["runs"]:
            d = run["device"]
            moved = d["write_bytes"] if r["case"]["workload"] == "seqwrite" else d["read_bytes"]
            assert moved >= run["bytes"] == 8 << 20, r
        s = r["summary"]
        assert s["median_device_bps"] >= s["median_bps"] * 0.999
        assert s["median_cpu_s_per_gb"] >= 0
    assert os.listdir(disk_dir) == []


def test_devio_bytes():
    d = DevIO(3, 4, 5, 6, 7, 10.0)
    assert d.bytes == 7 and d.ios == 13 and d.util == 50.0
    assert d.as_dict() == {"read_bytes": 3, "write_bytes": 4, "busy_ms": 5, "read_ios": 6,
                           "write_ios": 7, "window_ms": 10.0}
    assert DevIO(0, 0, 12, window_ms=10.0).util == 100.0     # busy_time's ms granularity
    assert DevIO(0, 0, 0).util == 0.0


# -- which device: a made-up /sys and mountinfo ---------------------------------
def _fake_sys(root, real_dir):
    """/sys as Linux lays it out for a virtio disk vda with a partition
    vda1, a device-mapper volume dm-0 on vda1 and a loop device; the
    MAJOR:MINOR of real_dir's st_dev links to dm-0."""
    dev = root / "devices"
    vda = dev / "pci0000:00/0000:00:02.0/virtio1/block/vda"
    (vda / "vda1").mkdir(parents=True)
    (vda / "vda1" / "partition").write_text("1\n")
    drivers = root / "bus/virtio/drivers/virtio_blk"
    drivers.mkdir(parents=True)
    (vda.parent.parent / "driver").symlink_to(drivers)
    (vda / "device").symlink_to(vda.parent.parent)
    dm = dev / "virtual/block/dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dm" / "name").write_text("vg-root\n")
    (dm / "slaves").mkdir()
    (dm / "slaves" / "vda1").symlink_to(vda / "vda1")
    loop = dev / "virtual/block/loop0"
    (loop / "loop").mkdir(parents=True)
    (loop / "loop" / "backing_file").write_text("/var/lib/disk.img\n")
    cls = root / "class/block"
    cls.mkdir(parents=True)
    for name, path in (("vda", vda), ("vda1", vda / "vda1"), ("dm-0", dm), ("loop0", loop)):
        (cls / name).symlink_to(path)
    (root / "dev/block").mkdir(parents=True)
    st = os.stat(real_dir)
    (root / f"dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").symlink_to(dm)
    return root


def test_describe_partition_dm_virtio_loop(tmp_path, disk_dir):
    sysr = str(_fake_sys(tmp_path / "sys", disk_dir))
    assert describe("vda", sysr) == "vda (virtio_blk disk)"
    assert describe("vda1", sysr) == "vda1 (partition 1 of vda (virtio_blk disk))"
    assert describe("dm-0", sysr) == "dm-0 (device-mapper 'vg-root' on vda1)"
    assert describe("loop0", sysr) == "loop0 (loop device on /var/lib/disk.img)"
    assert device_of(disk_dir, sysr) == "dm-0"


def test_describe_this_machine(disk_dir):
    # the real /sys: a whole disk names its driver, or is a partition/dm
    name = device_of(disk_dir)
    text = describe(name)
    assert text.startswith(f"{name} (") and text.endswith(")")


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
25 24 0:23 / {shm} rw,relatime - tmpfs tmpfs rw,size=24684096k
40 27 0:41 / {over} rw,relatime - {fstype} {source} rw,{opts}
"""


@pytest.mark.parametrize("fstype,source,opts,expect", [
    # overlay: the device of its upper layer, where new files go
    ("overlay", "overlay", "lowerdir=/l,upperdir={disk},workdir=/w", "DISK"),
    # btrfs: st_dev is an anonymous device; the mount source is the disk
    ("btrfs", "/dev/{name}", "space_cache=v2,subvolid=5", "DISK"),
    ("nfs4", "server:/export", "vers=4.2", None),
])
def test_anonymous_st_dev_found_through_mountinfo(tmp_path, disk_dir, fstype, source, opts,
                                                  expect):
    # /dev/shm stands for the mount: its st_dev has major 0, as overlay's
    # and btrfs's have
    shm = tempfile.mkdtemp(dir="/dev/shm")
    try:
        mi = tmp_path / "mountinfo"
        mi.write_text(MOUNTINFO.format(shm="/nowhere", over=shm, fstype=fstype,
                                       source=source.format(name=device_of(disk_dir)),
                                       opts=opts.format(disk=disk_dir)))
        want = device_of(disk_dir) if expect == "DISK" else expect
        assert device_of(shm, mountinfo=str(mi)) == want
        if expect is None:
            assert DeviceCounters(shm, mountinfo=str(mi)).why.startswith(
                f"no block device under '{shm}' (nfs4 file system; ")
        if fstype == "overlay":
            assert DeviceCounters(shm, mountinfo=str(mi)).what.endswith(
                "(the overlay's upper layer: what the benchmark writes; reads of lower-layer "
                "files are not counted)")
    finally:
        os.rmdir(shm)


def test_tmpfs_has_no_counters():
    dev = DeviceCounters("/dev/shm")
    assert dev.name is None
    assert dev.why == "no block device under '/dev/shm' (tmpfs file system; tmpfs, overlay " \
                      "without an upper layer on a disk and network file systems have " \
                      "none): device counters not available"
