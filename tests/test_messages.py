"""Messages say what happened (issue 10 §6): what became of a convert's
target, the bytes a failed job really wrote, a job paused on ENOSPC."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import subprocess

import pytest
from conftest import BLKJOBS, make_sparse, run_blkjobs

MiB = 1 << 20


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of ``size`` at ``path``, unmounted after. Needs root (CI runs
    as root): fails, not skips."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {r.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@pytest.fixture
def ro_tmpfs(tmp_path):
    """A small tmpfs holding a 16 MiB raw and a 16 MiB qcow2 image, then
    remounted read-only."""
    with tmpfs(tmp_path / "ro", "4m") as mnt:
        with open(mnt / "t.raw", "wb") as f:
            f.truncate(16 * MiB)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(mnt / "t.qcow2"), "16M"],
                       check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt


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


# --------------------------------------------------------------------------
# A failed job says how much it really wrote


def test_failed_backup_reports_bytes_really_written(tmp_path):
    """ENOSPC after 8 MiB of a 32 MiB raw backup (one 64 MiB batch, so no
    batch landed): the line counts the bytes in the target, not 0 B."""
    src = make_sparse(tmp_path / "s.raw", 32 * MiB, [(0, 32 * MiB, "data")])
    with tmpfs(tmp_path / "full", "8m") as mnt:
        dst = mnt / "bk.raw"
        p = run_blkjobs("backup", "-O", "raw", src, dst)
        in_target = dst.stat().st_blocks * 512
        assert p.returncode == 1
        m = re.fullmatch(r"blkjobs: backup job failed: No space left on device; the target "
                         f"'{re.escape(str(dst))}' is incomplete \\((\\d+) MiB of 32 MiB "
                         r"copied\); the source is unchanged\n", p.stderr)
        assert m, p.stderr
        data, runs = dst.read_bytes(), _data_runs(dst)
    # the engine counts whole requests (2 MiB; 4 workers): the ones that
    # failed part-way wrote a little more than is said
    said = int(m.group(1)) * MiB
    assert 0 < said <= in_target == 8 * MiB < said + 4 * 2 * MiB
    assert sum(n for _, n in runs) == in_target
    want = src.read_bytes()
    assert all(data[o:o + n] == want[o:o + n] for o, n in runs)


def _data_runs(path) -> list[tuple[int, int]]:
    """(offset, length) of the file's data (SEEK_DATA/SEEK_HOLE)."""
    out, pos = [], 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                d = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(f.fileno(), d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
    return out


def test_failed_backup_into_qcow2_counts_what_was_put_back(tmp_path):
    """A qcow2 target's clusters of a batch that failed are put back
    (unallocated): nothing of it is in the target, and the line says 0 B."""
    src = make_sparse(tmp_path / "s.raw", 32 * MiB, [(0, 32 * MiB, "data")])
    with tmpfs(tmp_path / "full", "8m") as mnt:
        dst = mnt / "bk.qcow2"
        p = run_blkjobs("backup", "-O", "qcow2", src, dst)
        assert p.returncode == 1
        assert p.stderr == (
            "blkjobs: backup job failed: No space left on device; the target "
            f"'{dst}' is incomplete (0 B of 32 MiB copied); the source is unchanged\n")
        m = subprocess.run(["qemu-img", "map", "--output", "json", str(dst)],
                           capture_output=True, text=True, check=True).stdout
    assert '"data": true' not in m


# --------------------------------------------------------------------------
# A job paused by --on-target-error enospc says so, once, and how to go on


def test_backup_paused_on_enospc_says_so_once_and_resumes_on_sigcont(tmp_path):
    src = make_sparse(tmp_path / "s.raw", 24 * MiB, [(0, 24 * MiB, "data")])
    with tmpfs(tmp_path / "full", "32m") as mnt:
        filler = mnt / "filler"
        filler.write_bytes(bytes(16 * MiB))
        dst = mnt / "bk.raw"
        proc = subprocess.Popen(BLKJOBS + ["backup", "-O", "raw", "--on-target-error", "enospc",
                                           str(src), str(dst)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # (a wait with a deadline: a CLI that pauses silently never writes)
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            assert ready, "no line in 60 s while the job is paused"
            first = proc.stderr.readline()
            assert first == (
                f"blkjobs: backup job paused: No space left on device writing '{dst}'; "
                f"free space, then 'kill -CONT {proc.pid}' retries (Ctrl-C or "
                f"'kill {proc.pid}' cancels the job)\n")
            assert proc.poll() is None
            filler.unlink()
            proc.send_signal(signal.SIGCONT)
            rest = proc.stderr.read()
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        assert (rc, rest) == (0, "")
        assert dst.read_bytes() == src.read_bytes()


def test_an_oserror_without_errno_reads_as_an_io_error():
    """OSError("text") has errno None; the error that reports it still
    has an errno and a one-line message (os.strerror(None) would raise)."""
    from blkjobs.errors import OSErrorWithContext
    e = OSErrorWithContext(OSError("no errno").errno, "Could not open", path="/x")
    assert e.errno == errno.EIO
    assert str(e) == "Could not open '/x': Input/output error"
