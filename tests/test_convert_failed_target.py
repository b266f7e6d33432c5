"""What a failed convert leaves behind, blkjobs installed as ``qemu-img``
next to the real qemu-img 7.2 (issue 16): qemu-img keeps the target,
whether it created it or it existed (-n), raw or qcow2, after a read error,
a write error or a signal, and says nothing of it; so does blkjobs invoked
as qemu-img (invoked as blkjobs it removes a target it created and says
so: test_convert.py). Compared: exit status, stderr, the kept file
(``qemu-img compare``/``map`` where the run is deterministic, ``qemu-img
check`` clean)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_sparse
from qemu_oracle import qemu_img, qemu_io
from test_convert_blkdebug import pattern
from test_convert_blkdebug_cb import left_on_disk, rule, source
from test_parity_invocation import run, twins  # noqa: F401  (the fixture: twin dirs)

MiB = 1 << 20


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("opts", ["", "-m 1", "-c"])
def test_read_error_into_an_existing_target(twins, fmt, opts):
    """-n: the existing target keeps what it held where nothing was written;
    no 'partially written' note."""
    if opts == "-c" and fmt == "raw":
        opts = "-m 3"           # (no compression into raw)
    src = source(twins, "raw", rule(6000))
    for d in twins:
        qemu_img("create", "-f", fmt, d / f"o.{fmt}", "6M")
        qemu_img("convert", "-n", "-f", "raw", "-O", fmt, pattern(d), d / f"o.{fmt}")
        qemu_img("create", "-f", "raw", d / "ff.raw", "6M")
        qemu_img("convert", "-n", "-O", fmt, "-f", "raw", d / "ff.raw", d / f"o.{fmt}")
    args = ["convert", "-n", *opts.split(), src, "-O", fmt, f"o.{fmt}"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs
    assert theirs[0] == 1
    if opts == "-c":        # QEMU's compressed write never overwrites a cluster: EIO
        assert theirs[2] == "qemu-img: error while writing at byte 0: Input/output error\n"
    else:
        assert theirs[2].startswith("qemu-img: error while reading at byte ")
    left_on_disk(twins, f"o.{fmt}")


def _enospc(d, mnt, fmt: str, no_create: bool, src: str = "s.raw"):
    """qemu-img (``d``'s) converts 8 MiB of data into a 2 MiB tmpfs, one
    request at a time (-m 1: which of several parallel writes fails first
    varies from run to run); the target is then moved into ``d``. Returns
    (exit, stdout, stderr)."""
    dst = mnt / f"d.{fmt}"
    if no_create:
        qemu_img("create", "-f", fmt, dst, "16M")
    res = run(d, "convert", "-m", "1", *(["-n"] if no_create else []), "-O", fmt, src, dst)
    if dst.exists():
        shutil.move(dst, d / f"d.{fmt}")
    return res


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("no_create", [False, True])
@pytest.mark.parametrize("start", [0, 1088 << 10])
@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
def test_write_error_keeps_the_target(twins, small_tmpfs, fmt, no_create, start, src_fmt):
    """ENOSPC: qemu-img's one line names the guest byte where its request
    began (the start of the source's data run, then 2 MiB steps), for a
    qcow2 target too (where ours once named the host offset in the file)."""
    for d in twins:
        make_sparse(d / "s.raw", 16 * MiB, [(start, 8 * MiB, "data")])
        if src_fmt == "qcow2":
            qemu_img("convert", "-O", "qcow2", d / "s.raw", d / "s.qcow2")
    ours, theirs = (_enospc(d, small_tmpfs, fmt, no_create, f"s.{src_fmt}") for d in twins)
    assert theirs[0] == ours[0] == 1
    assert all((d / f"d.{fmt}").exists() for d in twins)
    assert ours == theirs
    if (fmt, start) == ("raw", 0):
        assert theirs == (1, "", "qemu-img: error while writing at byte 2097152: "
                                 "No space left on device\n")
    if fmt == "qcow2":          # its 2 MiB request past the metadata fails: the first
        assert theirs == (1, "", f"qemu-img: error while writing at byte {start}: "
                                 "No space left on device\n")
        for d in twins:
            p = qemu_img("check", d / "d.qcow2")
            assert p.returncode == 0, p.stdout


def test_write_error_names_the_guest_byte(tmp_path, small_tmpfs):
    """Invoked as blkjobs, a qcow2 target's failed write is said at its
    guest offset (inside the source's data), not at its offset in the file."""
    make_sparse(tmp_path / "s.raw", 16 * MiB, [(1088 << 10, 8 * MiB, "data")])
    p = subprocess.run([sys.executable, "-m", "blkjobs", "convert", "-m", "1", "-O", "qcow2",
                        tmp_path / "s.raw", small_tmpfs / "d.qcow2"], capture_output=True,
                       text=True, timeout=300)
    m = re.fullmatch(r"blkjobs: error writing target '.*' at offset (\d+): No space left on "
                     r"device \(the incomplete target was removed\)\n", p.stderr)
    assert p.returncode == 1 and m, p.stderr
    # the 2 MiB tmpfs holds the metadata and less than 2 MiB of data clusters
    assert (1088 << 10) + MiB <= int(m[1]) < (1088 << 10) + 2 * MiB


def _interrupted(d, fmt: str, no_create: bool, sig: int):
    """Convert 8 MiB at 1 MiB/s with -p; the signal once the target holds
    at least 1 MiB more than before (so it is being written, and the rate
    limit keeps the copy from ending for seconds). Returns (exit, stderr).
    (Waiting for the first progress line past 0 instead was flaky: under
    load ours printed it only as the copy ended, and the signal came after
    the exit.)"""
    if no_create:
        qemu_img("create", "-f", fmt, d / f"d.{fmt}", "16M")
    target = d / f"d.{fmt}"

    def held() -> int:
        try:
            return os.stat(target).st_blocks * 512
        except FileNotFoundError:
            return 0
    before = held()
    p = subprocess.Popen([str(d / "bin" / "qemu-img"), "convert", "-p", "-r", "1M",
                          *(["-n"] if no_create else []), "-O", fmt, "-f", "raw", "s.raw",
                          f"d.{fmt}"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.read(1), "the convert ended before the signal"   # it has begun
    while held() < before + MiB:    # an event (the target grew), not a time
        assert p.poll() is None, "the convert ended before the signal"
        time.sleep(0.01)
    p.send_signal(sig)
    _out, err = p.communicate(timeout=120)
    return p.returncode, err.decode()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("no_create", [False, True])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_the_target(twins, fmt, no_create, sig):
    """qemu-img dies of the signal, silently, and the target stays (a qcow2
    one a valid image)."""
    for d in twins:
        make_sparse(d / "s.raw", 16 * MiB, [(0, 8 * MiB, "data")])
    ours, theirs = (_interrupted(d, fmt, no_create, sig) for d in twins)
    assert ours == theirs == (-sig, "")
    for d in twins:
        assert os.path.exists(d / f"d.{fmt}")
        if fmt == "qcow2":
            p = qemu_img("check", d / "d.qcow2")
            assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("pre", ["write -P 9 0 64k", "write -P 9 1M 64k", "write -z 0 64k",
                                 "discard 0 64k"])
def test_compressed_never_overwrites_a_cluster(twins, pre):
    """convert -n -c into an image whose cluster holds data: QEMU's compressed
    write refuses it (EIO, the cluster's offset said); a zero cluster
    without host space is written over."""
    for d in twins:
        pattern(d)
        qemu_img("create", "-f", "qcow2", d / "o.qcow2", "6M")
        qemu_io(d / "o.qcow2", pre)
    args = ["convert", "-n", "-c", "-f", "raw", "pattern.raw", "-O", "qcow2", "o.qcow2"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs
    if pre.startswith("write -P"):
        at = 0 if " 0 " in pre else MiB
        assert theirs == (1, "", f"qemu-img: error while writing at byte {at}: "
                                 "Input/output error\n")
        for d in twins:
            p = qemu_img("check", d / "o.qcow2")
            assert p.returncode == 0, p.stdout
    else:
        assert theirs == (0, "", "")
        left_on_disk(twins)
