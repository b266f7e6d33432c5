"""Our NBD export against the protocol's real peers, with qemu-nbd serving
the same image as the reference: nbdinfo (export facts, ``--map``),
nbdcopy, qemu-img (map, compare, convert) and qemu-io (reads, writes,
zeroes, trims, over ``nbd+unix://``)."""
from __future__ import annotations

import shutil
import struct

from daemon_util import qemu_img, qemu_io
from nbd_peers import (blkjobs_export, go, handshake, nbd_map, option, qemu_io_nbd,
                       qemu_nbd, run, simple)

#: nbdinfo facts both servers must state alike (qemu-nbd -r for read-only)
FACTS = ("export-size", "is_read_only", "can_flush", "can_fua", "can_zero", "can_df",
         "can_cache", "can_fast_zero", "block_size_minimum", "block_size_preferred",
         "block_size_maximum", "is_rotational")


def facts(u: str) -> dict[str, str]:
    out = {}
    for line in run("nbdinfo", u).stdout.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in FACTS:
            out[key] = value.strip()
    return out


def chain(tmp_path) -> str:
    """A qcow2 over a qcow2 backing file: data in both layers, a zero
    cluster over backing data, unallocated clusters, a short tail."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    assert qemu_img("create", "-f", "qcow2", base, "16M").returncode == 0
    qemu_io(base, "write -P 0x11 0 2M")
    qemu_io(base, "write -P 0x22 6M 128k")
    assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top).returncode == 0
    qemu_io(top, "write -P 0x33 1M 64k")
    qemu_io(top, "write -z 1536k 512k")
    qemu_io(top, "write -z 6M 64k")
    qemu_io(top, "write -P 0x44 12M 64k")
    return top


def test_read_only_export_equals_qemu_nbd(tmp_path):
    top = chain(tmp_path)
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    with qemu_nbd(top, str(tmp_path / "qn.sock"), "disk", "qcow2", "-r") as ref, \
            blkjobs_export(ours_dir, top, "disk") as ours:
        assert facts(ours) == facts(ref)
        assert facts(ours)["is_read_only"] == "true"
        assert nbd_map(ours) == nbd_map(ref)
        assert nbd_map(ours).splitlines()[0].split() == ["0", "1572864", "0", "data"]
        for u, name in ((ref, "ref"), (ours, "ours")):
            run("nbdcopy", u, str(tmp_path / f"{name}.raw"))
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", u,
                str(tmp_path / f"{name}-conv.raw"))
        assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "ref.raw").read_bytes()
        assert (tmp_path / "ours-conv.raw").read_bytes() == (tmp_path / "ref.raw").read_bytes()
        assert run("qemu-img", "map", "--output=json", "-f", "raw", ours).stdout == \
            run("qemu-img", "map", "--output=json", "-f", "raw", ref).stdout
        p = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "-U", ours, top)
        assert p.stdout == "Images are identical.\n"
        out = qemu_io_nbd(ours, "read -P 0x33 1M 64k", "read -P 0x11 1088k 448k",
                          "read -P 0 1536k 512k", "read -P 0x22 6208k 64k", "read -P 0 6M 64k",
                          read_only=True)
        assert out.count("read ") == 5


def test_writes_zeroes_trims_equal_qemu_nbd(tmp_path):
    top = chain(tmp_path)
    ref_img, ours_img = str(tmp_path / "ref.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(top, ref_img)
    shutil.copy(top, ours_img)
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    cmds = ("write -P 0x55 100k 200k", "write -z 3M 1M", "write -z -u 4M 1M",
            "discard 0 128k", "write -f -P 0x66 12M 64k", "discard 6M 2M",
            "write -P 0x77 15M 1M", "write -z -u 15M 512k", "flush")
    with qemu_nbd(ref_img, str(tmp_path / "qn.sock"), "disk", "qcow2",
                  "--discard=unmap") as ref, \
            blkjobs_export(ours_dir, ours_img, "disk", writable=True, unmap=True) as ours:
        assert facts(ours) == facts(ref)
        assert facts(ours)["is_read_only"] == "false"
        qemu_io_nbd(ref, *cmds)
        qemu_io_nbd(ours, *cmds)
        assert nbd_map(ours) == nbd_map(ref)
        run("nbdcopy", ref, str(tmp_path / "ref.raw"))
        run("nbdcopy", ours, str(tmp_path / "ours.raw"))
        assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "ref.raw").read_bytes()
        # nbdcopy writes into an export too (it zeroes with WRITE_ZEROES)
        run("nbdcopy", str(tmp_path / "ref.raw"), ours)
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ref_img, ours_img)
    assert p.stdout == "Images are identical.\n", p
    assert qemu_img("check", ours_img).returncode == 0


def test_raw_image_holes_and_several_clients(tmp_path):
    img = str(tmp_path / "disk.raw")
    assert qemu_img("create", "-f", "raw", img, "8M").returncode == 0
    qemu_io(img, "write -P 0x5a 1M 1M", fmt="raw")
    qemu_io(img, "write -P 0xa5 5M 64k", fmt="raw")
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    with qemu_nbd(img, str(tmp_path / "qn.sock"), "d", "raw", "-r") as ref, \
            blkjobs_export(ours_dir, img, "d") as ours:
        assert nbd_map(ours) == nbd_map(ref)
        # nbdcopy with 4 connections (multi-conn) and many requests in flight
        run("nbdcopy", "-C", "4", "--requests=16", ours, str(tmp_path / "copy.raw"))
        assert (tmp_path / "copy.raw").read_bytes() == open(img, "rb").read()


def test_unknown_export_and_option_refused_like_qemu_nbd(tmp_path):
    img = str(tmp_path / "disk.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    with qemu_nbd(img, str(tmp_path / "qn.sock"), "d", "raw", "-r"), \
            blkjobs_export(ours_dir, img, "d"):
        got = {}
        for who, path in (("ref", str(tmp_path / "qn.sock")),
                          ("ours", str(ours_dir / "blkjobs-nbd.sock"))):
            s = handshake(path)
            name = b"nope"
            r_go, _ = option(s, 7, struct.pack(">I", len(name)) + name + b"\0\0")
            r_bad, _ = option(s, 200)
            r_abort, _ = option(s, 2)
            s.close()
            got[who] = (r_go, r_bad, r_abort)
        # NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_ACK
        assert got["ours"] == got["ref"] == ((1 << 31) | 6, (1 << 31) | 1, 1)


def test_request_errors_equal_qemu_nbd(tmp_path):
    img = str(tmp_path / "disk.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    with qemu_nbd(img, str(tmp_path / "qn.sock"), "d", "raw", "-r"), \
            blkjobs_export(ours_dir, img, "d"):
        got = {}
        for who, path in (("ref", str(tmp_path / "qn.sock")),
                          ("ours", str(ours_dir / "blkjobs-nbd.sock"))):
            s = handshake(path)
            size, _flags = go(s, b"d")
            got[who] = (size,
                        simple(s, 0, 0, 4096),                 # read: fine
                        simple(s, 1, 0, 4, b"abcd"),           # write: EINVAL
                        simple(s, 4, 0, 4096),                 # trim: EINVAL
                        simple(s, 6, 0, 4096),                 # write zeroes: EINVAL
                        simple(s, 0, size - 512, 1024),        # read past EOF: EINVAL
                        simple(s, 0, 0, (32 << 20) + 1),       # too large: EINVAL
                        simple(s, 3, 0, 0))                    # flush: fine
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))    # DISC
            s.close()
        # qemu-nbd answers EINVAL (not EPERM) to writes on a read-only export
        assert got["ours"] == got["ref"] == (1 << 20, 0, 22, 22, 22, 22, 22, 0)
