"""qcow2 images whose clusters qemu-img compressed with zstd read back
exactly like qemu-img's own raw conversion (the optional zstandard module,
installed by `make venv`, decodes them)."""
from __future__ import annotations

import os
import subprocess

from conftest import run_blkjobs


def test_zstd_compressed_image_reads_like_qemu(tmp_path, qemu_img):
    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(1 << 20) + b"abc" * 400000 + bytes(1 << 20))
    img = tmp_path / "z.qcow2"
    subprocess.run([qemu_img, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                    str(raw), str(img)], check=True)
    info = subprocess.run([qemu_img, "info", str(img)], capture_output=True, text=True).stdout
    assert "compression type: zstd" in info
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    run_blkjobs("convert", "-O", "raw", img, ours, check=True)
    subprocess.run([qemu_img, "convert", "-O", "raw", str(img), str(theirs)], check=True)
    assert ours.read_bytes() == theirs.read_bytes()
