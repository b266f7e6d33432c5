"""Exports of images whose size is no whole number of 512-byte sectors,
against qemu-nbd (and qemu-storage-daemon's export, which answers the
same): QEMU's block layer gives a node's length in sectors, so qemu-nbd
exports a raw file of 1000 bytes as 1024 -- the last 24 bytes read as
zeroes, their block status ``hole,zero`` -- and a qcow2 image whose header
says 1600 bytes as 1536 (the qcow2 driver keeps the whole sectors).
Both data paths: the C one and ``BLKJOBS_NBD_C=0``."""
from __future__ import annotations

import json
import struct

import pytest

from daemon_util import qemu_img, qemu_io
from nbd_peers import blkjobs_export, qemu_io_nbd, qemu_nbd, run

KiB, MiB = 1 << 10, 1 << 20


def _raw(tmp_path, size: int) -> str:
    img = str(tmp_path / f"r{size}.raw")
    with open(img, "wb") as f:
        f.truncate(size)
    qemu_io(img, f"write -P 0x5a 0 {min(size, 64 * KiB)}", fmt="raw")
    if size > 64 * KiB:
        qemu_io(img, f"write -P 0x6b {size - 700} 700", fmt="raw")
    return img


def _qcow2_1600(tmp_path) -> str:
    """A qcow2 image of 2 KiB of data whose header says 1600 bytes (no tool
    of QEMU's makes one: qemu-img create rounds up to a sector)."""
    img = str(tmp_path / "q1600.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "2K").returncode == 0
    qemu_io(img, "write -P 0x77 0 2K")
    with open(img, "r+b") as f:
        f.seek(24)              # the header's size field
        f.write(struct.pack(">Q", 1600))
    return img


def _seen(u: str, tmp_path, name: str) -> dict[str, object]:
    """What the clients see of an export: nbdinfo's size and map, the bytes
    nbdcopy copies."""
    info = json.loads(run("nbdinfo", "--json", u).stdout)["exports"][0]
    out = tmp_path / f"{name}.copy"
    run("nbdcopy", u, str(out))
    return {"size": info["export-size"], "map": run("nbdinfo", "--map", u).stdout,
            "bytes": out.read_bytes()}


@pytest.mark.parametrize("c_path", ["1", "0"])
@pytest.mark.parametrize("kind,fmt,size", [("raw 1000", "raw", 1024),
                                           ("raw 1M+1000", "raw", MiB + 1024),
                                           ("qcow2 1600", "qcow2", 1536)])
def test_unaligned_export_seen_as_qemu_nbd(tmp_path, monkeypatch, kind, fmt, size, c_path):
    monkeypatch.setenv("BLKJOBS_NBD_C", c_path)
    if kind == "qcow2 1600":
        img = _qcow2_1600(tmp_path)
    else:
        img = _raw(tmp_path, 1000 if kind == "raw 1000" else MiB + 1000)
    with qemu_nbd(img, str(tmp_path / "qn.sock"), "d", fmt, "-r") as ref:
        theirs = _seen(ref, tmp_path, "theirs")
    with blkjobs_export(tmp_path, img, "d") as u:
        ours = _seen(u, tmp_path, "ours")
        # reads over the end of the file and wholly past it: zeroes
        end = 1000 if kind == "raw 1000" else MiB + 1000 if fmt == "raw" else 1536
        pad = size - end
        last = "read -P 0x77 1512 24" if fmt == "qcow2" else f"read -P 0 {size - 24} 24"
        cmds = [last, f"read -P 0 {end} {pad}" if pad else "read -P 0x77 1024 512",
                f"read -v {size - 512} 512"]
        outs = qemu_io_nbd(u, *cmds, read_only=True)
    assert ours["size"] == theirs["size"] == size
    assert ours == theirs
    assert "fail" not in outs.lower() and outs.count("read ") == 3, outs
    if pad:
        assert f"{pad}/{pad} bytes" in outs


def _after(u: str, img: str, fmt: str, cmds: tuple[str, ...]) -> dict[str, object]:
    """What ``cmds`` (qemu-io, over NBD) answer, and what the export and
    the image look like after them: the export's map, the file's length
    and (raw) bytes; (qcow2) the header's size, qemu-img check and map."""
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    out = run(*argv, u, check=False)
    said = [ln for ln in out.stdout.splitlines() if " ops; " not in ln]
    seen: dict[str, object] = {"said": said, "rc": out.returncode,
                               "map": run("nbdinfo", "--map", u).stdout}
    with open(img, "rb") as f:
        data = f.read()
    if fmt == "raw":
        seen["bytes"] = data
    else:
        seen["header size"] = struct.unpack(">Q", data[24:32])[0]
        seen["check"] = qemu_img("check", img).stdout
        seen["image map"] = qemu_img("map", "--output=json", img).stdout
    seen["length"] = len(data) if fmt == "raw" else None
    return seen


_PADDING_CASES = [
    # raw, 1000 bytes (exported as 1024): data grows the file to the
    # write's end, so do zeroes that may not be unmapped; a punched hole
    # or a trim leaves it as it is
    ("raw", ("write -P 0x11 1000 24",)),
    ("raw", ("write -P 0x11 1010 4", "read -P 0 1000 10", "read -P 0 1014 10")),
    ("raw", ("write -P 0x11 990 20",)),
    ("raw", ("write -P 0 1000 24",)),
    ("raw", ("write -z 1010 4",)),
    ("raw", ("write -z 990 34",)),
    ("raw", ("write -z -u 990 34",)),
    ("raw", ("write -z -u 0 1024",)),
    ("raw", ("discard 990 34", "write -P 0x22 1020 4", "discard 1000 24")),
    # qcow2 whose header says 1600 (exported as 1536): no padding; writes
    # at its end land in the cluster, the header keeps 1600; past it EIO
    ("qcow2", ("write -P 0x11 1512 24", "read -P 0x11 1512 24")),
    ("qcow2", ("write -P 0x11 1536 64",)),
    ("qcow2", ("write -z 1512 24", "discard 0 1536", "read -P 0 1512 24")),
]


@pytest.mark.parametrize("c_path", ["1", "0"])
@pytest.mark.parametrize("fmt,cmds", _PADDING_CASES, ids=[" ; ".join(c) for _, c in
                                                          _PADDING_CASES])
def test_writes_into_the_padding_as_qemu_nbd(tmp_path, monkeypatch, fmt, cmds, c_path):
    """A writable export of an image whose size is no whole number of
    sectors: the replies, the export's map after, the file (its length and
    bytes; a qcow2 image's header, check and map) as qemu-nbd 7.2 leaves
    them. Before: data written into a raw file's padding was refused with
    ENOSPC and zeroes there did not grow the file."""
    monkeypatch.setenv("BLKJOBS_NBD_C", c_path)
    seen = []
    for who in ("qemu-nbd", "blkjobs"):
        d = tmp_path / who
        d.mkdir()
        img = _raw(d, 1000) if fmt == "raw" else _qcow2_1600(d)
        if who == "qemu-nbd":
            server = qemu_nbd(img, str(d / "qn.sock"), "d", fmt)
        else:
            server = blkjobs_export(d, img, "d", writable=True)
        with server as u:
            seen.append(_after(u, img, fmt, cmds))
    theirs, ours = seen
    assert ours == theirs
