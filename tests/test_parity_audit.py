"""Issue 16's audit (docs/qemu-img-parity.md): what the audit found still
different from qemu-img 7.2, each checked with both tools side by side
(blkjobs installed as ``qemu-img``: the same exit status, stdout and
stderr byte for byte, the same files)."""
from __future__ import annotations

import pytest

from conftest import run_blkjobs
from qemu_oracle import qemu_img
from test_parity_invocation import same, twins  # noqa: F401  (the fixture: twin dirs)


@pytest.mark.parametrize("args", [
    "create -f qcow2 -o help", "create -f qcow2 -o ? x.qcow2", "create -f raw -o help",
    "create -o help x.raw", "create -f luks -o help", "create -f luks -o help x.luks",
    "create -f qcow2 -o cluster_size=4k -o help x.qcow2 1M", "create -f qcow2 -ohelp nbd:h:1",
    "create -f raw -o help,foo=bar blkdebug:x:y", "create -f raw -o help foo:x",
    "create -f foo -o help", "convert -O qcow2 -o help", "convert -o help",
    "convert -O qcow2 -o help x.qcow2", "convert -O qcow2 -o help a.raw x.qcow2",
    "convert -O luks -o help a.raw b.raw x.luks", "convert -O foo -o help",
    "convert -n -o help a.raw x.raw"])
def test_o_help_lists_the_options(twins, args):
    """``-o help`` (or ``?``) lists the format's creation options, with the
    protocol's when a target is named; no operands needed, nothing made."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "a.raw", "1M")
    same(twins, *args.split())
    for d in twins:
        assert sorted(p.name for p in d.iterdir()) == ["a.raw", "bin"]


@pytest.mark.parametrize("args", ["-b nonexist", "-b nonexist -F qcow2", "-b nonexist -F raw",
                                  "-b base.qcow2", "-u -b nonexist"])
def test_rebase_new_backing_file_errors(twins, args):
    """In safe mode the new backing file is opened (probed) before its
    format is asked for; its open error is said once, not twice."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "base.qcow2", "1M")
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    rc, _out, err = same(twins, "rebase", *args.split(), "top.qcow2")
    assert rc == 1 and err.count("\n") == 1
    assert (twins[0] / "top.qcow2").read_bytes() == (twins[1] / "top.qcow2").read_bytes()


BLKDEBUG_EIO = """[inject-error]
event = "read_aio"
sector = "8"
errno = "5"
once = "off"
"""


@pytest.mark.parametrize("args", ["--salvage -O raw", "--salvage -q -O raw",
                                  "--salvage -O qcow2", "-C -O raw", "-C -O qcow2"])
def test_convert_salvage_and_copy_offloading(twins, args):
    """--salvage: a sector that fails to read becomes zeroes, with qemu-img's
    warning (-q: none); -C is taken. The same target, byte for byte."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "s.raw", "1M")
        (d / "s.raw").write_bytes(b"\x09" * (1 << 20))
        (d / "bd.conf").write_text(BLKDEBUG_EIO)
    src = "blkdebug:bd.conf:s.raw" if "--salvage" in args else "s.raw"
    rc, _out, err = same(twins, "convert", *args.split(), src, "o")
    assert rc == 0 and err.count("warning: error while reading offset 4096") == (
        1 if args.startswith("--salvage -O") else 0)
    assert (twins[0] / "o").read_bytes() == (twins[1] / "o").read_bytes()
    qemu_img("compare", twins[0] / "o", twins[1] / "o")


@pytest.mark.parametrize("args", ["-C -c -O qcow2", "-C -S 4k", "-C --salvage", "-C -S 0 -c"])
def test_convert_copy_offloading_refusals(twins, args):
    for d in twins:
        qemu_img("create", "-f", "raw", d / "s.raw", "1M")
    rc, _out, _err = same(twins, "convert", *args.split(), "s.raw", "o")
    assert rc == 1 and not (twins[0] / "o").exists()


@pytest.mark.parametrize("args", [
    "convert -m 0", "convert -m 17", "convert -m x", "convert -m 0x10", "convert -S 513",
    "convert -S 32M", "convert -S 16M", "convert --target-is-zero", "convert -O foo",
    "convert -f foo", "convert -O foo -f foo"])
def test_convert_option_errors(twins, args):
    """Refusals of convert's option values in qemu-img's words (and what
    they accept, accepted)."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "s.raw", "1M")
    same(twins, *args.split(), "s.raw", "o")


@pytest.mark.parametrize("rate", ["10MB", "-5", "1x"])
def test_commit_r_error_says_rate_limit(twins, rate):
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "b.qcow2", "1M")
        qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d / "t.qcow2")
    assert same(twins, "commit", "-r", rate, "t.qcow2")[0] == 1


def _stale_bitmaps(d, name: str, version: int) -> None:
    """An image whose bitmaps a program without bitmap support may have
    changed: v2 (qemu-img amend compat=0.10 keeps the extension), or v3
    with the autoclear bit cleared."""
    img = d / name
    qemu_img("create", "-f", "qcow2", img, "16M")
    qemu_img("bitmap", "--add", img, "b0")
    if version == 2:
        qemu_img("amend", "-o", "compat=0.10", img)
    else:
        with open(img, "r+b") as f:
            f.seek(88)
            autoclear = int.from_bytes(f.read(8), "big")
            f.seek(88)
            f.write((autoclear & ~1).to_bytes(8, "big"))


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("args", ["info", "check", "map", "measure -O qcow2", "snapshot -l",
                                  "convert -p -O raw s.qcow2 o.raw", "convert -O raw s.qcow2 o.raw",
                                  "resize s.qcow2 +1M", "check -r leaks"])
def test_stale_bitmaps_warning_and_drop(twins, version, args):
    """Every open warns as QEMU does (its two lines; the second, as QEMU's,
    without a newline); the first change drops the extension (the same file)."""
    _stale_bitmaps(twins[0].parent, "made.qcow2", version)
    for d in twins:     # both written alike (info's disk size)
        (d / "s.qcow2").write_bytes((twins[0].parent / "made.qcow2").read_bytes())
    img = twins[0] / "s.qcow2"
    words = args.split()
    rc, _out, err = same(twins, *(words if "s.qcow2" in words else [*words, "s.qcow2"]))
    assert "inconsistent\nSome clusters may be leaked" in err
    assert img.read_bytes() == (twins[1] / "s.qcow2").read_bytes()


@pytest.mark.parametrize("size", ["10MB", "1.5Q", "1e6", "4KiB"])
def test_bench_takes_qemu_img_sizes(tmp_path, size):
    """bench's sizes are qemu-img's (no MB = 10^6): what qemu-img refuses as
    an image size, bench refuses in the same words, naming its option."""
    theirs = qemu_img("create", "-f", "raw", tmp_path / "x.raw", size, check=False)
    ours = run_blkjobs("bench", "--size", size, "-q", tmp_path)
    assert theirs.returncode == ours.returncode == 1
    assert ours.stderr == theirs.stderr.replace("qemu-img: ", "blkjobs: ").replace(
        "image size", "--size")
