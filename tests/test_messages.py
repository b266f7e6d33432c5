"""Messages say what happened (issue 10 §6): what became of a convert's
target, the bytes a failed job really wrote, a job paused on ENOSPC."""
from __future__ import annotations

import subprocess

import pytest
from conftest import make_sparse, run_blkjobs

MiB = 1 << 20


@pytest.fixture
def ro_tmpfs(tmp_path):
    """A small tmpfs holding a 16 MiB raw and a 16 MiB qcow2 image, then
    remounted read-only. Needs root (CI runs as root): fails, not skips."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {r.stderr}")
    try:
        with open(mnt / "t.raw", "wb") as f:
            f.truncate(16 * MiB)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(mnt / "t.qcow2"), "16M"],
                       check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
def test_convert_n_onto_read_only_fs_says_it_never_opened(tmp_path, ro_tmpfs, fmt, src_fmt):
    src = make_sparse(tmp_path / "s.raw", 16 * MiB, [(0, MiB, "data")])
    if src_fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(tmp_path / "s.q")],
                       check=True)
        src = tmp_path / "s.q"
    dst = ro_tmpfs / f"t.{fmt}"
    before = dst.read_bytes()
    p = run_blkjobs("convert", "-n", "-O", fmt, src, dst)
    assert p.returncode == 1
    assert p.stderr == f"blkjobs: Could not open target '{dst}': Read-only file system\n"
    assert dst.read_bytes() == before


def test_convert_compressed_onto_full_disk_says_target_removed(tmp_path, small_tmpfs):
    src = make_sparse(tmp_path / "s.raw", 16 * MiB, [(0, 16 * MiB, "data")])
    dst = small_tmpfs / "d.qcow2"
    p = run_blkjobs("convert", "-c", "-O", "qcow2", src, dst)
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"blkjobs: error writing target '{dst}' at offset ")
    assert lines[0].endswith(": No space left on device (the incomplete target was removed)")
    assert not dst.exists()
