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
from blkjobs.diskbench.devio import DeviceCounters, DevIO, device_of


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
    assert dev.why == "no block device under '/proc' (tmpfs, overlay or a network file " \
                      "system): device counters not available"
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
    assert f"device counters: {name} (the whole device's, other work on it during a run " \
           "included)" in doc["notes"]
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
    d = DevIO(3, 4, 5)
    assert d.bytes == 7 and d.as_dict() == {"read_bytes": 3, "write_bytes": 4, "busy_ms": 5}
