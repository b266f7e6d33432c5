"""Images whose size is not a whole number of 512-byte sectors, through every
qemu-img command, side by side with the real qemu-img (``twins`` of
test_parity_invocation): QEMU's block layer works in sectors, so

* a qcow2 image whose header says 1600 bytes is 1536 bytes long (qcow2's
  open takes ``size / 512`` sectors): info, map, convert, compare,
  measure, dd, resize, check, rebase and commit all see 1536;
* a raw file of 1000 bytes is 1024 bytes long (a file's length is rounded
  up; the tail reads as zeroes): convert writes 1024 bytes;
* ``create 1600`` writes a header of 2048 (qcow2's create rounds up) and a
  raw file of 2048 bytes, and ``resize`` to 1700 is refused.

Every command runs on identical inputs (made by the real qemu-img and
qemu-io) in both directories; exit code, stdout and stderr must be the
same, and so must every file the command leaves (raw files byte for byte;
qcow2 files: the header's size, the guest bytes, ``qemu-img check``)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from daemon_util import brief, qcow2_node, run_daemon, start_blkjobs, start_qsd
from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


def _odd_qcow2(path: Path, size: int, pattern: int, backing: str | None = None) -> None:
    """A qcow2 image of 64 KiB with data in its first 4 KiB, its header's
    size then set to ``size`` (what another tool may write)."""
    args = ["create", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, path, "64k")
    qemu_io(path, f"write -P {pattern} 0 4k" if not backing else f"write -P {pattern} 512 512")
    with open(path, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", size))


def _inputs(d: Path) -> None:
    _odd_qcow2(d / "odd.qcow2", 1600, 0xAA)
    _odd_qcow2(d / "base.qcow2", 1600, 0x11)
    _odd_qcow2(d / "top.qcow2", 1600, 0x22, backing="base.qcow2")
    for name, size, fill in (("r1000.raw", 1000, b"\x55"), ("r1536.raw", 1536, b"\xaa"),
                             ("r1600.raw", 1600, b"\xaa")):
        (d / name).write_bytes(fill * size)


CASES = [
    ("info", "odd.qcow2"),
    ("info", "--output=json", "odd.qcow2"),
    ("info", "--backing-chain", "top.qcow2"),
    ("map", "--output=json", "odd.qcow2"),
    ("map", "odd.qcow2"),
    ("map", "--output=json", "top.qcow2"),
    ("check", "odd.qcow2"),
    ("check", "--output=json", "odd.qcow2"),
    ("measure", "-O", "qcow2", "odd.qcow2"),
    ("measure", "-O", "raw", "odd.qcow2"),
    ("convert", "-O", "raw", "odd.qcow2", "out.raw"),
    ("convert", "-O", "qcow2", "odd.qcow2", "out.qcow2"),
    ("convert", "-O", "raw", "top.qcow2", "out.raw"),
    ("compare", "odd.qcow2", "r1536.raw"),
    ("compare", "-s", "odd.qcow2", "r1536.raw"),
    ("compare", "-s", "odd.qcow2", "r1600.raw"),
    ("dd", "-O", "raw", "if=odd.qcow2", "of=out.raw", "bs=512"),
    ("resize", "odd.qcow2", "+512"),
    ("resize", "odd.qcow2", "2048"),
    ("resize", "odd.qcow2", "1700"),
    ("resize", "--shrink", "odd.qcow2", "1024"),
    ("rebase", "-u", "-b", "odd.qcow2", "-F", "qcow2", "top.qcow2"),
    ("rebase", "-b", "", "top.qcow2"),
    ("commit", "top.qcow2"),
    ("info", "-f", "raw", "r1000.raw"),
    ("map", "-f", "raw", "--output=json", "r1000.raw"),
    ("convert", "-f", "raw", "-O", "raw", "r1000.raw", "out.raw"),
    ("convert", "-f", "raw", "-O", "qcow2", "r1000.raw", "out.qcow2"),
    ("compare", "-f", "raw", "-F", "raw", "r1000.raw", "r1536.raw"),
    ("measure", "-O", "qcow2", "-f", "raw", "r1000.raw"),
    ("dd", "-f", "raw", "-O", "raw", "if=r1000.raw", "of=out.raw", "bs=512"),
    ("resize", "-f", "raw", "r1000.raw", "2048"),
    ("resize", "-f", "raw", "r1000.raw", "+512"),
    ("resize", "-f", "raw", "r1000.raw", "1024"),
    ("resize", "-f", "raw", "--shrink", "r1000.raw", "512"),
    ("info", "-f", "raw", "--output=json", "r1000.raw"),
    ("compare", "-s", "-f", "raw", "-F", "raw", "r1000.raw", "r1536.raw"),
    ("dd", "-f", "raw", "-O", "raw", "if=r1000.raw", "of=out.raw", "bs=512", "skip=1"),
    ("create", "-f", "qcow2", "-b", "r1000.raw", "-F", "raw", "over.qcow2"),
    ("convert", "-O", "qcow2", "-B", "r1000.raw", "-F", "raw", "r1536.raw", "out.qcow2"),
    ("amend", "-o", "size=2048", "odd.qcow2"),
    ("snapshot", "-c", "s1", "odd.qcow2"),
    ("bitmap", "--add", "odd.qcow2", "b0"),
    ("create", "-f", "qcow2", "new.qcow2", "1600"),
    ("create", "-f", "raw", "new.raw", "1600"),
    ("measure", "-O", "qcow2", "--size", "1600"),
]


def _files(d: Path) -> dict[str, Path]:
    return {p.name: p for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_unaligned_size_as_qemu_img(twins, args):
    for d in twins:
        _inputs(d)
    same(twins, *args)
    ours, theirs = (_files(d) for d in twins)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        o = ours[name]
        if name.endswith(".raw"):
            assert o.read_bytes() == t.read_bytes(), name
            continue
        assert o.read_bytes()[24:32] == t.read_bytes()[24:32], name     # the header's size
        qemu_img("check", o)
        if name == "odd.qcow2" and args[-2:] in (("odd.qcow2", "+512"), ("odd.qcow2", "2048"),
                                                  ("size=2048", "odd.qcow2")):
            # grown: QEMU shows again what its host cluster holds past 1536
            # (here 0xaa); blkjobs reads zeroes past the old end, as
            # test_resize_qcow2_grow_reads_zeroes_past_the_old_end wants
            a, b = (_guest(p, d / "g.raw") for p, d in ((o, o.parent), (t, t.parent)))
            assert a[:1536] == b[:1536] and a[1536:] == bytes(512) and len(a) == len(b)
            continue
        assert qemu_img("compare", "-s", o, t, check=False).returncode == 0, name


def _guest(img: Path, raw: Path) -> bytes:
    qemu_img("convert", "-O", "raw", img, raw)
    data = raw.read_bytes()
    raw.unlink()
    return data


async def _daemon_view(s, d: Path) -> dict:
    """Nodes of the 1600-byte qcow2 and the 1000-byte raw file as the
    daemon sees them, and a full backup of the qcow2 (its completion event)."""
    await s.x("blockdev-add", **qcow2_node("odd", str(d / "odd.qcow2")))
    await s.x("blockdev-add", driver="raw", **{"node-name": "r1000"},
              file={"driver": "file", "filename": str(d / "r1000.raw")})
    await s.x("blockdev-add", **qcow2_node("tgt", str(d / "tgt.qcow2")))
    sizes = {n["node-name"]: n["image"]["virtual-size"]
             for n in await s.x("query-named-block-nodes") if not n["node-name"].startswith("#")}
    await s.x("blockdev-backup", **{"job-id": "b0"}, device="odd", target="tgt", sync="full")
    done = [e for e in brief(await s.until("JOB_STATUS_CHANGE", id="b0", status="null"))
            if e[0] == "BLOCK_JOB_COMPLETED"]
    for _, data in done:
        # QEMU counts a backup's progress in whole clusters of its copy
        # bitmap (65536 for any image under 64 KiB), blkjobs in bytes of the
        # image: a difference of every image not a whole number of clusters
        data.pop("len"), data.pop("offset")
    return {"sizes": sizes, "done": done}


def test_daemon_sees_whole_sectors_as_qemu_storage_daemon(tmp_path):
    """query-named-block-nodes' virtual sizes and a backup job's length of
    the same images, against qemu-storage-daemon."""
    out = {}
    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        _inputs(d)
        qemu_img("create", "-f", "qcow2", d / "tgt.qcow2", "1536")
        out[name] = run_daemon(start, d, _daemon_view)
        assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", d / "odd.qcow2",
                        d / "tgt.qcow2").returncode == 0
    assert out["blkjobs"] == out["qsd"]
    assert out["qsd"]["sizes"] == {"odd": 1536, "r1000": 1024, "tgt": 1536}
