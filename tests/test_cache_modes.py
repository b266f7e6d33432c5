"""Cache modes: ``-t CACHE`` / ``-T SRC_CACHE`` as qemu-img 7.2 takes them
(convert -t -T, commit -t, rebase -t -T, compare -T, check -T, amend -t).

The oracle is qemu-img itself: the open flags of a running convert's and
commit's files (``/proc/PID/fdinfo``, each process held at a known point:
its first progress line read under a rate limit) equal qemu-img's, and the
data a copy through O_DIRECT files writes is byte for byte what qemu-img
compares equal -- with image sizes that are no multiple of 512, so every
tail request is unaligned -- and images qemu-img check finds clean.
"""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from conftest import BLKJOBS, fd_flags, make_sparse, qemu_compare, run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io

MASK = os.O_ACCMODE | os.O_DIRECT | os.O_DSYNC
UNALIGNED = (1 << 20) + 512 + 1          # 1 MiB + 513: the tail block is partial
CHUNKS = [(0, 70000, "data"), (200 << 10, 4096, "zero"), (300 << 10, 5000, 0x5a),
          ((1 << 20) - 300, 813, "data")]


def direct_fds(pid: int, path: str) -> list[int]:
    """Access mode, O_DIRECT and O_DSYNC of the fds on ``path`` opened with
    O_DIRECT (blkjobs holds QEMU's lock bytes on an fd of its own besides)."""
    return sorted(f & MASK for f in fd_flags(pid, path) if f & os.O_DIRECT)


def held(argv: list[str], progress_fd: bool, paths: list[str]) -> dict[str, list[int]]:
    """Run ``argv`` (rate-limited), wait for its first progress line (on a
    pipe: FD in argv for blkjobs' --progress-fd, stdout for qemu-img's -p), then
    read the flags of its fds on ``paths`` and stop it."""
    r, w = os.pipe()
    if progress_fd:
        argv = [str(w) if a == "FD" else a for a in argv]
        p = subprocess.Popen(argv, pass_fds=(w,), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    else:
        p = subprocess.Popen(argv, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    try:
        with os.fdopen(r, "rb", buffering=0) as f:
            # qemu-img prints (0.00/100%) before it opens the images: wait
            # for the next line; blkjobs's first line comes once they are open
            ends, seen = (b"\n", 1) if progress_fd else (b"\r", 2)
            while seen:
                c = f.read(1)
                assert c, p.communicate()[1]
                seen -= c == ends
            return {a: direct_fds(p.pid, a) for a in paths}
    finally:
        p.terminate()
        p.communicate()


RO, RW, D, S = os.O_RDONLY, os.O_RDWR, os.O_DIRECT, os.O_DSYNC


@pytest.mark.parametrize("sfmt,dfmt,t,T", [
    ("raw", "raw", "none", "none"), ("raw", "qcow2", "none", "writeback"),
    ("qcow2", "raw", "writeback", "none"), ("qcow2", "qcow2", "directsync", "unsafe"),
    ("raw", "raw", "writethrough", "writeback")])
def test_convert_opens_the_files_as_qemu_img_does(tmp_path, sfmt, dfmt, t, T):
    src = str(tmp_path / f"src.{sfmt}")
    assert subprocess.run(["qemu-img", "create", "-q", "-f", sfmt, src, "8M"]).returncode == 0
    qemu_io(src, "write -P 7 0 8M", fmt=sfmt)
    got = {}
    for tool in ("qemu-img", "blkjobs"):
        dst = str(tmp_path / f"{tool}.{dfmt}")
        opts = ["convert", "-t", t, "-T", T, "-f", sfmt, "-O", dfmt, "-r", "1M", src, dst]
        argv = (["qemu-img"] + opts[:1] + ["-p"] + opts[1:] if tool == "qemu-img"
                else BLKJOBS + opts[:1] + ["--progress-fd", "FD"] + opts[1:])
        fl = held(argv, tool == "blkjobs", [src, dst])
        got[tool] = (fl[src], fl[dst])
    want_src = [RO | D] if T in ("none", "directsync") else []
    want_dst = [RW | D] if t in ("none", "directsync") else []
    # QEMU writes through (directsync, writethrough) by flushing after each
    # write; blkjobs opens the target O_DSYNC instead (formats/cache.py)
    assert got["qemu-img"] == (want_src, want_dst)
    ours_dst = [RW | D | S] if t == "directsync" else want_dst
    assert got["blkjobs"] == (want_src, ours_dst)


def test_writethrough_target_is_o_dsync(tmp_path):
    src = tmp_path / "s.raw"
    make_sparse(src, 8 << 20, [(0, 8 << 20, "data")])
    dst = str(tmp_path / "d.raw")
    argv = BLKJOBS + ["convert", "--progress-fd", "FD", "-t", "writethrough", "-r", "1M",
                      str(src), dst]
    r, w = os.pipe()
    argv = [str(w) if a == "FD" else a for a in argv]
    p = subprocess.Popen(argv, pass_fds=(w,), stderr=subprocess.PIPE)
    os.close(w)
    try:
        with os.fdopen(r, "rb", buffering=0) as f:
            assert f.read(1)
            flags = fd_flags(p.pid, dst)
    finally:
        p.terminate()
        p.communicate()
    assert [f & MASK for f in flags if f & os.O_ACCMODE] == [os.O_WRONLY | S]


@pytest.mark.parametrize("args", [
    ["-O", "raw"], ["-O", "qcow2"], ["-O", "raw", "-S", "0"], ["-O", "qcow2", "-c"],
    ["-O", "raw", "-m", "1"]])
def test_unaligned_image_through_o_direct(tmp_path, args):
    """1 MiB + 513 bytes, raw -> X -> raw, every file O_DIRECT: the data is
    the source's byte for byte, a qcow2 target is clean, and the sizes are
    qemu-img's."""
    src = tmp_path / "src.raw"
    make_sparse(src, UNALIGNED, CHUNKS)
    fmt = args[1]
    mid, back = tmp_path / f"mid.{fmt}", tmp_path / "back.raw"
    run_blkjobs("convert", "-t", "none", "-T", "none", "-f", "raw", *args, src, mid, check=True)
    run_blkjobs("convert", "-t", "none", "-T", "none", "-f", fmt, "-O", "raw", mid, back,
                check=True)
    assert qemu_compare(src, mid, "raw", fmt)[0] == 0
    assert qemu_compare(src, back)[0] == 0
    if fmt == "qcow2":
        check_clean(str(mid))
        ref = tmp_path / "ref.qcow2"
        qemu_img("convert", "-t", "none", "-T", "none", "-f", "raw", *args, str(src), str(ref))
        for img in (mid, ref):      # the size rounded up to 512, as qemu-img's
            assert '"virtual-size": 1049600' in qemu_img("info", "--output=json", str(img)).stdout
    with open(src, "rb") as a, open(back, "rb") as b:
        data, copy = a.read(), b.read()
    assert copy[:len(data)] == data and not copy[len(data):].strip(b"\0")


def test_unaligned_write_into_existing_target(tmp_path):
    """-n into an existing raw target of an unaligned size: the tail block
    is read, patched and written whole, and the file keeps its size."""
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    make_sparse(src, UNALIGNED, CHUNKS, seed=3)
    make_sparse(dst, UNALIGNED + 7, [(0, UNALIGNED + 7, 0xee)])
    run_blkjobs("convert", "-n", "-t", "none", "-T", "none", "-O", "raw", src, dst, check=True)
    assert os.path.getsize(dst) == UNALIGNED + 7
    with open(src, "rb") as a, open(dst, "rb") as b:
        got = b.read()
        assert got[:UNALIGNED] == a.read() and got[UNALIGNED:] == b"\xee" * 7


def test_bad_cache_modes_say_what_qemu_img_says(tmp_path):
    src = tmp_path / "s.raw"
    make_sparse(src, 1 << 20, [])
    for cmd, opt, text in [("convert", "-t", "Invalid cache option: foo"),
                           ("convert", "-T", "Invalid source cache option: foo"),
                           ("rebase", "-T", "Invalid source cache option: foo"),
                           ("commit", "-t", "Invalid cache option: foo"),
                           ("check", "-T", "Invalid source cache option: foo")]:
        tail = [str(src), str(tmp_path / "d.raw")] if cmd == "convert" else \
            (["-u", "-b", "", str(src)] if cmd == "rebase" else [str(src)])
        ref = subprocess.run(["qemu-img", cmd, opt, "foo", *tail], capture_output=True,
                             text=True)
        ours = run_blkjobs(cmd, opt, "foo", *tail)
        assert ref.stderr == f"qemu-img: {text}\n", ref.stderr
        assert (ours.returncode, ours.stderr) == (ref.returncode, f"blkjobs: {text}\n")


def test_commit_t_none_opens_o_direct_and_commits(tmp_path):
    """commit -t none: top and base O_DIRECT (as qemu-img's), the result
    equal to qemu-img commit's on a twin chain."""
    got = {}
    for tool in ("qemu-img", "blkjobs"):
        d = tmp_path / tool
        d.mkdir()
        base, top = str(d / "base.qcow2"), str(d / "top.qcow2")
        qemu_img("create", "-f", "qcow2", base, str(UNALIGNED))
        qemu_io(base, f"write -P 1 0 {UNALIGNED}")
        qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, str(UNALIGNED))
        qemu_io(top, "write -P 2 512 700k")
        opts = ["commit", "-t", "none", "-r", "64k"]
        argv = (["qemu-img"] + opts + ["-p", top] if tool == "qemu-img"
                else BLKJOBS + opts + ["--progress-fd", "FD", top])
        fl = held(argv, tool == "blkjobs", [base, top])
        got[tool] = (base, fl[base], fl[top])
        # then the whole commit (the first one was stopped part-way)
        run = subprocess.run(([*BLKJOBS] if tool == "blkjobs" else ["qemu-img"])
                             + ["commit", "-t", "none", top], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        check_clean(base)
    assert got["qemu-img"][1:] == got["blkjobs"][1:] == ([RW | D], [RW | D])
    assert qemu_compare(got["qemu-img"][0], got["blkjobs"][0], "qcow2", "qcow2")[0] == 0


def test_other_commands_with_o_direct_match_qemu_img(tmp_path):
    """rebase -t none -T none, compare -T none, check -T none, amend -t none
    give qemu-img's results and output on twin images."""
    out = {}
    for tool in ("qemu-img", "blkjobs"):
        d = tmp_path / tool
        d.mkdir()
        base, new, top = (str(d / n) for n in ("base.qcow2", "new.qcow2", "top.qcow2"))
        for b, pat in ((base, 1), (new, 3)):
            qemu_img("create", "-f", "qcow2", b, str(UNALIGNED))
            qemu_io(b, f"write -P {pat} 0 {UNALIGNED - 1000}")
        qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, str(UNALIGNED))
        qemu_io(top, "write -P 2 65536 1000")
        exe = [*BLKJOBS] if tool == "blkjobs" else ["qemu-img"]

        def run(*a: str, exe: list[str] = exe) -> tuple[int, str]:
            p = subprocess.run(exe + list(a), capture_output=True, text=True)
            assert "Traceback" not in p.stderr
            return p.returncode, p.stdout
        out[tool] = [
            run("compare", "-T", "none", top, base),
            run("rebase", "-t", "none", "-T", "none", "-F", "qcow2", "-b", new, top),
            run("compare", "-T", "none", top, base),
            run("check", "-T", "none", top),
            run("amend", "-t", "none", "-o", "lazy_refcounts=on", top),
            run("check", "-T", "directsync", top)]
        out[tool].append(qemu_img("info", top).stdout.replace(str(d), "D"))
        check_clean(top)
    assert out["blkjobs"] == out["qemu-img"]
    assert qemu_compare(tmp_path / "qemu-img" / "top.qcow2", tmp_path / "blkjobs" / "top.qcow2",
                        "qcow2", "qcow2")[0] == 0


def test_file_system_refusing_o_direct_gets_qemus_text(tmp_path, monkeypatch):
    """A file system that answers O_DIRECT with EINVAL (tmpfs before Linux
    6.6, some FUSE file systems): QEMU's qemu_open text. No such file
    system here, so os.open refuses O_DIRECT in the test."""
    from blkjobs.errors import ImageError
    from blkjobs.formats import cache
    from blkjobs.formats.base import open_file
    real = os.open

    def refuse(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(path, flags, *a)
    p = tmp_path / "img"
    p.write_bytes(bytes(4096))
    monkeypatch.setattr(os, "open", refuse)
    with cache.opening(os.O_DIRECT), pytest.raises(ImageError) as e:
        open_file(str(p))
    assert str(e.value) == f"Could not open '{p}': filesystem does not support O_DIRECT"
    with cache.opening(0):
        os.close(open_file(str(p)))


def test_dio_reads_and_writes_of_any_shape(tmp_path):
    """native.dio on an O_DIRECT fd: reads and writes at odd offsets and
    lengths (a qcow2 header field, an L2 entry, a raw tail) land as on a
    buffered fd; a write of the partial last block keeps the file's size;
    a read across the end stops there."""
    import random

    from blkjobs.native import dio
    rnd = random.Random(5)
    p = tmp_path / "f"
    ref = bytearray(rnd.randbytes(UNALIGNED))
    p.write_bytes(ref)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        assert dio.is_direct(fd) and dio.alignment(fd) in (512, 4096)
        for off, n in [(0, 1), (72, 8), (4095, 2), (UNALIGNED - 5, 5), (UNALIGNED - 600, 600),
                       (1000, 3 << 20 >> 1), (8192, 4096)]:
            data = rnd.randbytes(n)
            assert dio.pwrite(fd, data, off) == n
            ref[off:off + n] = data
            assert os.fstat(fd).st_size == len(ref)
            start = max(off - 1, 0)
            assert dio.pread(fd, n + 7, start) == bytes(ref[start:start + n + 7])
        assert dio.pread(fd, 4096, len(ref) - 10) == bytes(ref[-10:])
        dio.set_direct(fd, False)
        assert not dio.is_direct(fd) and dio.alignment(fd) == 1
    finally:
        os.close(fd)
    assert p.read_bytes() == ref
