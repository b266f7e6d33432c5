"""qemu-iotests 125: a qcow2 image created with ``preallocation=falloc``
(then grown with ``resize --preallocation``) keeps its allocation when the
guest writes the preallocated area: the file's st_blocks do not grow. With
ext4 they did grow by one extent-tree block when blkjobs created the file
with another order of writes, syncs and descriptors than QEMU's (the file
system placed the data before the metadata, leaving the file in more
extents once written). The same scenario run with qemu-img and blkjobs,
several rounds (the file system's placement varies with its free space)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_oracle import qemu_img, qemu_io

SIZE = 2 * 1024 * 1024 - 48 * 1024         # 125's: 48 KiB below 2 MiB


def _blkjobs(*args):
    exe = Path(sys.executable).parent / "blkjobs"
    subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("growth_mode,growth", [("metadata", 16), ("full", 16), ("full", 80)])
def test_falloc_image_does_not_grow_when_written(tmp_path, growth_mode, growth):
    grew = {}
    for rnd in range(6):
        for name, tool in (("qemu-img", qemu_img), ("blkjobs", _blkjobs)):
            img = tmp_path / f"{name}-{rnd}.qcow2"
            tool("create", "-q", "-f", "qcow2", "-o", "preallocation=falloc,cluster_size=64k",
                 img, SIZE)
            tool("resize", "-q", "-f", "qcow2", f"--preallocation={growth_mode}", img,
                 f"+{growth}K")
            before = os.stat(img).st_blocks
            qemu_io(img, f"write 0 {SIZE}")
            after = os.stat(img).st_blocks
            if after != before:
                grew.setdefault(name, []).append((rnd, before, after))
            assert qemu_img("check", img, check=False).returncode == 0
            img.unlink()
    assert grew == {}
