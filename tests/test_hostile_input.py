"""Hostile images: every size read from disk is bounded before it is
allocated from (qemu-img's limits and texts), a data cluster past the end of
the file is a corruption for ``check``, backing files that are not regular
files or block devices are refused without hanging, ``map`` prints nothing
on an error -- and a short run of the qcow2 readers' fuzzer stays clean.

Every command runs as a real process under a 1 GiB address-space limit and a
timeout, as the long fuzz run does."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from conftest import BLKJOBS, run_blkjobs_in_process
from qemu_oracle import qemu_img, qemu_io

GiB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (GiB, GiB))


def blkjobs(*args, timeout=60):
    """The command line under RLIMIT_AS = 1 GiB; a hang fails the test."""
    p = subprocess.run(BLKJOBS + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=_limit)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return p


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang("blkjobs did not end within the time limit")


def blkjobs_in_process(capsys, *args, timeout=60):
    """``blkjobs``, through main() in this process (conftest.run_blkjobs_in_process),
    under the same bounds: 1 GiB more address space than the process holds
    now, and SIGALRM after ``timeout`` seconds (a hang fails the test);
    both put back after."""
    with open("/proc/self/status") as f:
        vm = int(re.search(r"^VmSize:\s*(\d+) kB", f.read(), re.M).group(1)) << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (vm + GiB, hard))
    signal.alarm(timeout)
    try:
        p = run_blkjobs_in_process(capsys, *args)
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old)
    assert "internal error" not in p.stderr, p.stderr
    return p


def _one_line(p) -> str:
    assert p.returncode != 0
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blkjobs: "), p.stderr
    return lines[0]


def qemu_open_error(path) -> str:
    """What qemu-img check says after "Could not open '<path>': "."""
    p = qemu_img("check", path, check=False)
    assert p.returncode == 1, p.stderr
    m = re.match(r"qemu-img: Could not open '[^']*': (.*)$", p.stderr.strip(), re.S)
    assert m, p.stderr
    return m.group(1)


# ---------------------------------------------------------------------------
# bitmaps: the extension, the directory and its entries
@pytest.fixture(scope="module")
def bitmap_image(tmp_path_factory):
    p = tmp_path_factory.mktemp("bm") / "b.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", p, "1M")
    qemu_img("bitmap", "--add", p, "bm0")
    qemu_io(p, "write -P 1 0 64k")
    return p


def _patch_bitmaps(src, dst, field, value):
    shutil.copyfile(src, dst)
    d = bytearray(dst.read_bytes())
    off = struct.unpack_from(">I", d, 100)[0]
    while True:
        t, n = struct.unpack_from(">II", d, off)
        if t == 0x23852875:
            break
        off += 8 + n + (-n % 8)
    e = off + 8
    doff = struct.unpack_from(">Q", d, e + 16)[0]
    fields = {"ext_len": (">I", off + 4), "reserved": (">I", e + 4), "nb": (">I", e),
              "dir_size": (">Q", e + 8), "dir_offset": (">Q", e + 16),
              "table_offset": (">Q", doff), "table_size": (">I", doff + 8),
              "flags": (">I", doff + 12), "type": (">B", doff + 16),
              "granularity": (">B", doff + 17), "name_size": (">H", doff + 18),
              "extra": (">I", doff + 20)}
    fmt, at = fields[field]
    struct.pack_into(fmt, d, at, value)
    dst.write_bytes(bytes(d))


BITMAP_CASES = [
    ("nb", 0x10000), ("nb", 0xFFFFFFFF), ("nb", 0), ("nb", 2),
    ("dir_size", 0x4000001), ("dir_size", 0x40000000), ("dir_size", 0xFFFFFFFF0),
    ("dir_size", 0), ("dir_size", 8), ("dir_size", 64), ("dir_offset", 0x123),
    ("ext_len", 16), ("reserved", 1),
    ("table_size", 0xFFFFFFFF), ("table_size", 0x8000001), ("table_size", 0x7FFFFFF),
    ("table_size", 0), ("table_offset", 0x123), ("table_offset", 0),
    ("granularity", 8), ("granularity", 32), ("name_size", 1024), ("name_size", 0),
    ("extra", 0x10000000), ("extra", 8), ("type", 2), ("flags", 0xF0),
]


@pytest.mark.parametrize("field,value", BITMAP_CASES, ids=[f"{f}={v:#x}" for f, v in BITMAP_CASES])
def test_bitmap_sizes_bounded_with_qemu_img_texts(bitmap_image, tmp_path, field, value, capsys):
    """The first case as real processes, the others in-process (same bounds)."""
    h = tmp_path / "h.qcow2"
    _patch_bitmaps(bitmap_image, h, field, value)
    want = qemu_open_error(h)
    for cmd in (["check"], ["info"], ["map", "--output", "json"]):
        if (field, value) == BITMAP_CASES[0]:
            p = blkjobs(*cmd, h)
        else:
            p = blkjobs_in_process(capsys, *cmd, h)
        assert p.returncode == 1, (cmd, p.stderr)
        assert _one_line(p) == f"blkjobs: '{h}': {want}"
        assert p.stdout == ""


@pytest.mark.parametrize("name,shown", [(b"b\x0c0", "b\\x0c0"), (b"b\x000", "b"),
                                        (b"b\n0", "b\\x0a0")])
def test_bitmap_name_in_error_stays_one_line(bitmap_image, tmp_path, name, shown):
    """The name is printed up to a NUL (qemu-img's "%.*s"), control
    characters escaped (found by the fuzzer: a form feed split the line)."""
    h = tmp_path / "h.qcow2"
    _patch_bitmaps(bitmap_image, h, "granularity", 8)
    d = bytearray(h.read_bytes())
    ext = d.index(struct.pack(">I", 0x23852875), 104)
    i = struct.unpack_from(">Q", d, ext + 8 + 16)[0] + 24       # the first entry's name
    assert d[i:i + 3] == b"bm0"
    d[i:i + 3] = name
    h.write_bytes(bytes(d))
    assert qemu_open_error(h).startswith(f"Bitmap '{name.split(bytes(1))[0][:1].decode()}")
    p = blkjobs("check", h)
    assert _one_line(p) == f"blkjobs: '{h}': Bitmap '{shown}' doesn't satisfy the constraints"


def test_bitmap_table_past_eof_is_a_corruption(bitmap_image, tmp_path):
    """Offsets are not sizes: a table past the end is counted as qemu-img
    counts it (a corruption, its clusters not counted)."""
    h = tmp_path / "h.qcow2"
    _patch_bitmaps(bitmap_image, h, "table_offset", 0x40000000000)
    q = qemu_img("check", "--output", "json", h, check=False)
    p = blkjobs("check", "--output", "json", h)
    assert (p.returncode, json.loads(p.stdout)) == (q.returncode, json.loads(q.stdout))
    assert p.stderr == q.stderr


def test_pristine_bitmap_image_checks_clean(bitmap_image):
    p = blkjobs("check", bitmap_image)
    assert p.returncode == 0 and p.stdout.startswith("No errors were found"), p.stderr


# ---------------------------------------------------------------------------
# a data cluster past the end of the file
def _truncated_last_cluster(tmp_path):
    p = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 1M 128k")
    os.truncate(p, os.path.getsize(p) - 65536)      # the last data cluster is gone
    return p


@pytest.mark.parametrize("output", ["human", "json"])
def test_check_reports_data_cluster_past_eof(tmp_path, output):
    p = _truncated_last_cluster(tmp_path)
    q = qemu_img("check", "--output", output, p, check=False)
    r = blkjobs("check", "--output", output, p)
    assert q.returncode == 2
    assert r.returncode == 2
    assert r.stderr == q.stderr            # "ERROR: counting reference for region ..."
    if output == "json":
        assert json.loads(r.stdout) == json.loads(q.stdout)
    else:
        assert r.stdout == q.stdout


def test_check_entry_past_eof_with_copied_flag(tmp_path):
    p = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io(p, "write -P 1 0 64k")
    d = bytearray(p.read_bytes())
    l1 = struct.unpack_from(">Q", d, 40)[0]
    l2 = struct.unpack_from(">Q", d, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", d, l2, 1 << 63 | (len(d) + 0x100000))
    p.write_bytes(bytes(d))
    q = qemu_img("check", "--output", "json", p, check=False)
    r = blkjobs("check", "--output", "json", p)
    assert (r.returncode, json.loads(r.stdout)) == (q.returncode, json.loads(q.stdout))
    assert r.stderr == q.stderr


def test_map_prints_nothing_on_error(tmp_path):
    """map fails on the entry past the end: nothing on stdout (not "["),
    one line on stderr; the same for the human output."""
    p = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io(p, "write -P 1 0 64k")
    d = bytearray(p.read_bytes())
    l1 = struct.unpack_from(">Q", d, 40)[0]
    l2 = struct.unpack_from(">Q", d, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", d, l2, 1 << 63 | (len(d) + 0x100000))
    p.write_bytes(bytes(d))
    h = blkjobs("map", p)
    assert h.returncode == 1 and h.stdout == ""
    m = blkjobs("map", "--output", "json", p)
    assert m.returncode == 1 and m.stdout == ""
    assert _one_line(m) == (f"blkjobs: '{p}': L2 entry for guest offset 0x0 is corrupt "
                            f"(0x{1 << 63 | (len(d) + 0x100000):016x}): data cluster beyond "
                            "the end of the file")


# ---------------------------------------------------------------------------
# backing files (and images) that are FIFOs, devices, directories
def _with_backing(tmp_path, name, fmt):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", name, "-F", fmt or "raw", top, "1M")
    if fmt is None:      # drop the backing format: the name is probed
        from blkjobs.formats import open_image
        with open_image(str(top), "qcow2", read_only=False) as img:
            img.set_backing(name, None)
    return top


@pytest.mark.parametrize("fmt", ["raw", "qcow2", None])
@pytest.mark.parametrize("kind", ["fifo", "chardev", "dir"])
def test_backing_file_not_a_file(tmp_path, kind, fmt, capsys):
    """A FIFO as real processes (opening one may block: a hang must stay
    another process's), the others in-process."""
    if kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
        name, why = "fifo", "not a regular file or block device"
    elif kind == "chardev":
        name, why = "/dev/zero", "not a regular file or block device"
    else:
        (tmp_path / "adir").mkdir()
        name, why = "adir", "Is a directory"
    top = _with_backing(tmp_path, name, fmt)
    full = name if name.startswith("/") else str(tmp_path / name)
    want = f"blkjobs: Could not open backing file '{full}' of '{top}': {why}"
    for cmd in (["info", "--backing-chain"], ["map"], ["map", "--output", "json"],
                ["convert", "-O", "raw"], ["compare", top]):
        args = cmd + [top] + ([tmp_path / "out.raw"] if cmd[0] == "convert" else [])
        if kind == "fifo":
            p = blkjobs(*args, timeout=30)
        else:
            p = blkjobs_in_process(capsys, *args, timeout=30)
        assert p.returncode in (1, 2) and p.stdout == "", (cmd, p.stdout)
        assert _one_line(p) == want, cmd
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("cmd", [["info"], ["info", "--backing-chain"], ["check"], ["map"],
                                 ["map", "--output", "json"], ["convert", "-O", "raw"],
                                 ["info", "-f", "qcow2"], ["map", "-f", "raw"]])
def test_top_image_is_a_fifo(tmp_path, cmd):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = cmd + [fifo] + ([tmp_path / "out.raw"] if cmd[0] == "convert" else [])
    p = blkjobs(*args, timeout=30)
    assert p.returncode == 1 and p.stdout == ""
    assert _one_line(p) == f"blkjobs: Could not open '{fifo}': not a regular file or block device"


def test_drivers_refuse_a_fifo_by_fd(tmp_path):
    """The library path (no CLI pre-checks): open_image and probe_format."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    want = f"Could not open '{fifo}': not a regular file or block device"

    def hung(signum, frame):
        raise TimeoutError("opening a FIFO blocked")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        _drivers_refuse(fifo, want)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _drivers_refuse(fifo, want):
    from blkjobs.errors import ImageError
    from blkjobs.formats import open_image, probe_format
    for call in (lambda: probe_format(str(fifo)), lambda: open_image(str(fifo), "qcow2"),
                 lambda: open_image(str(fifo), "raw"), lambda: open_image(str(fifo))):
        with pytest.raises(ImageError) as ei:
            call()
        assert str(ei.value) == want


def test_backing_name_with_nul_and_control_characters(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x07" * (1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "base.rawXX", "-F", "raw", top, "1M")
    d = bytearray(top.read_bytes())
    bf_off, bf_len = struct.unpack_from(">QI", d, 8)
    # "base.raw\0X": a C string ends at the NUL (qemu-img reads base.raw too)
    d[bf_off + 8:bf_off + 10] = b"\0X"
    top.write_bytes(bytes(d))
    assert qemu_img("compare", top, base).returncode == 0
    assert blkjobs("compare", top, base).returncode == 0
    assert json.loads(blkjobs("info", "--output", "json", top).stdout)[
        "backing-filename"] == "base.raw"
    d[bf_off + 8:bf_off + 10] = b"\r\n"
    top.write_bytes(bytes(d))
    p = blkjobs("map", top)
    assert _one_line(p) == (f"blkjobs: Could not open backing file '{tmp_path}/base.raw\\x0d"
                            f"\\x0a' of '{top}': No such file or directory")


# ---------------------------------------------------------------------------
# the fuzzer itself, briefly: zero findings on a few hundred images
def test_fuzz_qcow2_readers_short_run():
    script = os.path.join(HERE, "fuzz", "fuzz_qcow2_readers.py")
    p = subprocess.run([sys.executable, script, "--count", "300", "--seed", "11",
                        "--jobs", "2", "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)
    assert s["images"] == 300 and s["operations"] == 1200 and s["findings"] == 0
    assert sum(s["outcomes"].values()) == 1200
    # the mutations reach past the open: many operations succeed, many fail cleanly
    assert s["outcomes"]["ok"] > 200 and s["outcomes"]["error"] > 200, s
