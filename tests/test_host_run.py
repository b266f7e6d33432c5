"""Driver.host_run, the jobs' fast path for small ranges: a file offset only
for plain data in one piece (for writing: overwritable in place), None for
everything the general path must classify. Images made by qemu-img/qemu-io;
host offsets checked against ``qemu-img map``."""
from __future__ import annotations

import json

from blkjobs.formats import open_image
from test_jobs_helpers import MiB, mkimg, qimg

C = 64 << 10


def host_of(path, off):
    for r in json.loads(qimg("map", "--output", "json", path)):
        if r["start"] <= off < r["start"] + r["length"] and r["data"] and "offset" in r:
            return r["offset"] + off - r["start"]
    return None


def test_qcow2(tmp_path):
    p = mkimg(tmp_path / "a.qcow2", writes=[("0x11", 0, 2 * C), (None, 4 * C, C)])
    from test_jobs_helpers import qio
    qio(p, "qcow2", f"write -c -P 0x22 {6 * C} {C}")          # compressed cluster
    with open_image(p, "qcow2", read_only=False) as img:
        img.write(8 * C, b"\x01")                             # prepares writes; allocates
        want = host_of(p, 4096)
        assert want is not None
        assert img.host_run(4096, 4096) == want
        assert img.host_run(4096, 4096, for_write=True) == want
        assert img.host_run(C + 100, C - 100) == host_of(p, C + 100)   # ends at the boundary
        assert img.host_run(C - 512, 1024) is None            # spans two clusters
        assert img.host_run(4 * C, 4096) is None              # zero cluster
        assert img.host_run(6 * C, 4096) is None              # compressed
        assert img.host_run(10 * C, 4096) is None             # unallocated
        assert img.host_run(img.size - 512, 1024) is None     # past the end
        assert img.host_run(0, 0) is None
    with open_image(p, "qcow2") as ro:
        assert ro.host_run(4096, 4096) is not None
        assert ro.host_run(4096, 4096, for_write=True) is None   # read-only


def test_qcow2_extended_l2_uses_the_general_path(tmp_path):
    p = str(tmp_path / "x.qcow2")
    qimg("create", "-f", "qcow2", "-o", "extended_l2=on", p, MiB)
    from test_jobs_helpers import qio
    qio(p, "qcow2", "write -P 0x33 0 65536")
    with open_image(p, "qcow2") as img:
        assert img.host_run(0, 4096) is None


def test_raw(tmp_path):
    p = mkimg(tmp_path / "r.raw", "raw", writes=[("0x44", 0, C)])
    with open_image(p, "raw", read_only=False) as img:
        assert img.host_run(4096, 8192) == 4096
        assert img.host_run(4096, 8192, for_write=True) == 4096
        assert img.host_run(img.size - 512, 1024) is None
    with open_image(p, "raw") as ro:
        assert ro.host_run(4096, 8192, for_write=True) is None
