"""qcow2 external data files (``data_file``, ``data_file_raw``): the same
command lines run as blkjobs and as the real qemu-img (twin directories,
tests/test_parity_invocation.py) give the same output and byte-identical
images; images either tool makes are read and written by the other
(qemu-io, qemu-img compare, qemu-img check)."""
from __future__ import annotations

import os
from contextlib import chdir
from pathlib import Path

import pytest

from conftest import data_bytes, run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)

MiB = 1 << 20


def io_in(d: Path, img: str, *cmds: str) -> None:
    """qemu-io on ``img`` from directory ``d``: QEMU opens a relative data
    file name from the working directory."""
    with chdir(d):
        qemu_io(img, *cmds)


def files_same(twins, *names):
    """Each named file byte for byte the same in both directories."""
    ours, theirs = twins
    for n in names:
        assert (ours / n).read_bytes() == (theirs / n).read_bytes(), n


def test_create_info_check_map_parity(twins):
    """create (plain, data_file_raw, preallocation), info (human, JSON),
    check and map of an image written by qemu-io."""
    same(twins, "create", "-f", "qcow2", "-o", "data_file=a.data", "a.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-o", "data_file=b.data,data_file_raw=on", "b.qcow2",
         "1M")
    same(twins, "create", "-f", "qcow2", "-o", "data_file=c.data,preallocation=metadata",
         "c.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-o", "data_file=e.data,preallocation=full",
         "e.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
         "-o", "data_file=f.data", "f.qcow2")
    files_same(twins, "a.qcow2", "a.data", "b.qcow2", "b.data", "c.qcow2", "c.data",
               "e.qcow2", "e.data", "f.qcow2", "f.data")
    for d in twins:
        io_in(d, "a.qcow2", "write -P 0xaa 0 64k", "write -P 0xbb 192k 4k")
    files_same(twins, "a.qcow2", "a.data")
    out = same(twins, "info", "a.qcow2")[1]
    assert "    data file: a.data\n    data file raw: false\n" in out
    info = same(twins, "info", "--output=json", "b.qcow2")[1]
    assert '"data-file": "b.data",\n            "data-file-raw": true,' in info
    for img in ("a.qcow2", "b.qcow2", "c.qcow2", "f.qcow2"):
        same(twins, "check", img)
        same(twins, "map", img)
        same(twins, "map", "--output=json", img)
    for d in twins:
        assert data_bytes(d / "e.data") == MiB       # full: the data file written


def test_create_refusals_parity(twins):
    """qemu-img's errors (after its Formatting line) for data file options."""
    same(twins, "create", "-f", "qcow2", "-o", "data_file=d,compat=0.10", "x.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-o", "data_file_raw=on", "x.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-o", "data_file=x.raw", "base.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         "-o", "data_file=d,data_file_raw=on", "x.qcow2", "1M")
    rc, _, err = same(twins, "create", "-f", "qcow2", "-o", "data_file=/nonexistent/d",
                      "x.qcow2", "1M")
    assert rc == 1 and err == "qemu-img: x.qcow2: Could not create '/nonexistent/d': " \
        "No such file or directory\n"


def test_create_truncates_an_existing_data_file(twins):
    for d in twins:
        (d / "d.raw").write_bytes(b"old content" * 1000)
    same(twins, "create", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "64k")
    files_same(twins, "d.raw", "a.qcow2")
    assert (twins[0] / "d.raw").read_bytes() == bytes(65536)


def test_open_errors_parity(twins):
    """A missing data file (info still works), the data-file option in
    json: and --image-opts, on images with and without a data file."""
    for d in twins:
        with chdir(d):
            qemu_img("create", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on",
                     "a.qcow2", "1M")
        qemu_img("create", "-f", "qcow2", d / "p.qcow2", "1M")
        io_in(d, "a.qcow2", "write -P 0x5a 64k 64k")
        os.rename(d / "d.raw", d / "moved.raw")
    rc, _, err = same(twins, "check", "a.qcow2")
    assert rc == 1 and err == ("qemu-img: Could not open 'a.qcow2': Could not open 'd.raw': "
                               "No such file or directory\n")
    same(twins, "info", "a.qcow2")
    spec = ('json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},'
            '"data-file":{"driver":"file","filename":"moved.raw"}}')
    same(twins, "check", spec)
    same(twins, "info", spec)
    same(twins, "map", spec)
    same(twins, "compare", spec, "moved.raw")
    same(twins, "check", "--image-opts",
         "driver=qcow2,file.filename=a.qcow2,data-file.filename=moved.raw")
    rc, _, err = same(twins, "check", "--image-opts",
                      "driver=qcow2,file.filename=p.qcow2,data-file.filename=moved.raw")
    assert err.endswith("': 'data-file' can only be set for images with an external "
                        "data file\n")
    same(twins, "check", 'json:{"driver":"qcow2","file":{"driver":"file",'
         '"filename":"a.qcow2"},"data-file":{"driver":"file","filename":"nonex"}}')


def test_amend_parity(twins):
    for d in twins:
        with chdir(d):
            qemu_img("create", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on",
                     "a.qcow2", "1M")
        qemu_img("create", "-f", "qcow2", d / "p.qcow2", "1M")
        (d / "e.raw").write_bytes((d / "d.raw").read_bytes())
    same(twins, "amend", "-o", "data_file=e.raw", "a.qcow2")
    same(twins, "amend", "-o", "data_file_raw=off", "a.qcow2")
    rc, _, err = same(twins, "amend", "-o", "data_file_raw=on", "a.qcow2")
    assert (rc, err) == (1, "qemu-img: data-file-raw cannot be set on existing images\n")
    same(twins, "amend", "-o", "data_file=x.raw", "p.qcow2")
    same(twins, "amend", "-o", "compat=0.10", "a.qcow2")
    files_same(twins, "a.qcow2", "p.qcow2")
    same(twins, "amend", "-o", "data_file=", "a.qcow2")
    files_same(twins, "a.qcow2")
    same(twins, "info", "a.qcow2")
    os.remove(twins[0] / "e.raw")
    os.remove(twins[1] / "e.raw")
    rc, _, err = same(twins, "snapshot", "-l", "a.qcow2")
    assert (rc, err) == (1, "qemu-img: Could not open 'a.qcow2': 'data-file' is required "
                         "for this image\n")


def test_convert_parity(twins, tmp_path):
    """convert into a data file image (and with data_file_raw), and from one
    to raw: the same images and data files as qemu-img's."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "4M")
    qemu_io(src, "write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -z 2M 64k",
            "write -P 0x33 4032k 64k")
    same(twins, "convert", "-O", "qcow2", "-o", "data_file=t.raw", src, "t.qcow2")
    same(twins, "convert", "-O", "qcow2", "-o", "data_file=r.raw,data_file_raw=on", src,
         "r.qcow2")
    same(twins, "convert", "-O", "raw", "t.qcow2", "back.raw")
    files_same(twins, "t.qcow2", "t.raw", "r.qcow2", "back.raw")
    ours = twins[0]
    with chdir(ours):       # QEMU opens a relative data file name from the working directory
        for img in ("t.qcow2", "r.qcow2", "back.raw"):
            assert qemu_img("compare", src, img, check=False).returncode == 0
        check_clean("t.qcow2")
        # data_file_raw: the data file itself is the disk
        assert qemu_img("compare", "-f", "raw", "r.raw", src).returncode == 0


def test_written_by_blkjobs_read_by_qemu(tmp_path):
    """Writes through blkjobs' driver (partial clusters, cluster 0 at host
    offset 0, zeroes) land in the data file at the guest offset; qemu-io
    reads them back, qemu-img check finds nothing."""
    from blkjobs.formats import open_image
    img, data = tmp_path / "a.qcow2", tmp_path / "a.data"
    run_blkjobs("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", img, "1M", check=True)
    with open_image(str(img), read_only=False) as d:
        d.write(512, b"\x11" * 1000)             # inside guest cluster 0: host offset 0
        d.write(3 * 65536 - 100, b"\x22" * 200)  # across two clusters
        d.write(8 * 65536, b"\x33" * 65536)      # one whole cluster
        d.write_zeroes(8 * 65536 + 4096, 4096)
    raw = data.read_bytes()
    assert raw[512:1512] == b"\x11" * 1000 and raw[:512] == bytes(512)
    assert raw[3 * 65536 - 100:3 * 65536 + 100] == b"\x22" * 200
    assert raw[8 * 65536:8 * 65536 + 4096] == b"\x33" * 4096
    assert os.path.getsize(img) == 5 * 65536      # no data cluster in the qcow2 file
    check_clean(img)
    qemu_io(img, "read -P 0x11 512 1000", "read -P 0 0 512", "read -P 0x22 196508 200",
            "read -P 0x33 524288 4096", "read -P 0 528384 4096", "read -P 0x33 532480 57344")
    m = qemu_map(img)
    assert m[0] == {"start": 0, "length": 65536, "depth": 0, "present": True, "zero": False,
                    "data": True, "offset": 0}


def test_data_file_raw_stays_raw(tmp_path):
    """With data_file_raw, guest writes and zeroes go to the same offsets of
    the data file, which stays a valid raw image of the disk."""
    from blkjobs.formats import open_image
    img, data = tmp_path / "r.qcow2", tmp_path / "r.data"
    run_blkjobs("create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on",
                img, "2M", check=True)
    qemu_io(img, "write -P 0x44 0 1M")
    with open_image(str(img), read_only=False) as d:
        d.write_zeroes(65536, 2 * 65536)
        d.write(300000, b"\x55" * 5000)
    check_clean(img)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", data, img).returncode == 0


def test_commit_and_rebase_over_data_files(twins):
    """commit into, and rebase onto, images with external data files."""
    for d in twins:
        with chdir(d):
            qemu_img("create", "-f", "qcow2", "-o", "data_file=bd.raw", "base.qcow2", "4M")
            qemu_io("base.qcow2", "write -P 0x11 0 1M", "write -P 0x12 2M 64k")
            qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     "-o", "data_file=od.raw", "top.qcow2")
            qemu_io("top.qcow2", "write -P 0x21 512k 1M", "write -P 0x22 3M 4k")
            qemu_img("convert", "-O", "raw", "top.qcow2", "before.raw")
            qemu_img("create", "-f", "qcow2", "-o", "data_file=nd.raw", "new.qcow2", "4M")
    same(twins, "rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2")
    same(twins, "commit", "top.qcow2")
    files_same(twins, "top.qcow2", "od.raw", "new.qcow2", "nd.raw")
    same(twins, "compare", "before.raw", "new.qcow2")
    same(twins, "check", "new.qcow2")


@pytest.mark.parametrize("args", [["--size", "1G", "-O", "qcow2", "-o", "data_file=x.raw"],
                                  ["-O", "qcow2", "-o", "data_file=x.raw,data_file_raw=on",
                                   "src.qcow2"],
                                  ["-O", "qcow2", "src.qcow2"]])
def test_measure_parity(twins, args):
    for d in twins:
        with chdir(d):
            qemu_img("create", "-f", "qcow2", "-o", "data_file=s.raw", "src.qcow2", "4M")
            qemu_io("src.qcow2", "write -P 1 0 1M")
    same(twins, "measure", *args)
    assert not Path(twins[0] / "x.raw").exists()


def test_header_rewrite_leaves_no_old_bytes(twins):
    """A header rewrite writes the whole first cluster: rebase -u to a
    shorter backing name leaves nothing of the old one (as qemu-img)."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", "-b", "a-long-backing-name.qcow2", "-F", "qcow2",
                 "-u", d / "top.qcow2", "1M")
    same(twins, "rebase", "-u", "-b", "short.qcow2", "-F", "qcow2", "top.qcow2")
    files_same(twins, "top.qcow2")


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=2M",
                                  "data_file=d.raw,preallocation=metadata"])
def test_create_allocates_as_qemu_img(twins, opts):
    """The metadata clusters are written whole, as qemu-img writes them: the
    same blocks allocated (qemu-img guesses metadata preallocation, and so
    answers map, from the file's allocation)."""
    same(twins, "create", "-f", "qcow2", "-o", opts, "a.qcow2", "64M")
    files_same(twins, "a.qcow2")
    assert data_bytes(twins[0] / "a.qcow2") == data_bytes(twins[1] / "a.qcow2")


def test_daemon_blockdev_add_data_file(tmp_path):
    """blockdev-add of a qcow2 node with a ``data-file`` (inline or a file
    node): the same answers as qemu-storage-daemon, and a full backup of it
    holds the guest data (byte for byte: qemu-img compare)."""
    from daemon_util import brief, drop_transient_pauses, qcow2_node, side_by_side

    def setup(d: Path) -> None:
        with chdir(d):
            qemu_img("create", "-f", "qcow2", "-o", "data_file=d.raw", "src.qcow2", "4M")
            qemu_io("src.qcow2", "write -P 0xaa 0 1M", "write -P 0x55 2M 64k")
            qemu_img("convert", "-O", "raw", "src.qcow2", "want.raw")
            qemu_img("create", "-f", "qcow2", "tgt.qcow2", "4M")
            os.rename("d.raw", "moved.raw")     # the header's name no longer opens
            (d / "src2.qcow2").write_bytes((d / "src.qcow2").read_bytes())
            (d / "moved2.raw").write_bytes((d / "moved.raw").read_bytes())
            qemu_img("create", "-f", "qcow2", "tgt2.qcow2", "4M")

    async def scenario(s, d):
        setup(d)
        src, moved = str(d / "src.qcow2"), str(d / "moved.raw")
        out = {"missing": await s.err("blockdev-add", **qcow2_node("src", src))}
        await s.x("blockdev-add", driver="file", filename=moved, **{"node-name": "df"})
        await s.x("blockdev-add", **qcow2_node("src", src, **{"data-file": "df"}))
        await s.x("blockdev-add", **qcow2_node(
            "src2", str(d / "src2.qcow2"),
            **{"data-file": {"driver": "file", "filename": str(d / "moved2.raw")}}))
        await s.x("blockdev-add", **qcow2_node("tgt", str(d / "tgt.qcow2")))
        await s.x("blockdev-add", **qcow2_node("tgt2", str(d / "tgt2.qcow2")))
        await s.x("blockdev-backup", **{"job-id": "b0"}, device="src", target="tgt",
                  sync="full")
        out["events"] = drop_transient_pauses(
            brief(await s.until("JOB_STATUS_CHANGE", id="b0", status="null")))
        await s.x("blockdev-backup", **{"job-id": "b1"}, device="src2", target="tgt2",
                  sync="full")
        out["events2"] = drop_transient_pauses(
            brief(await s.until("JOB_STATUS_CHANGE", id="b1", status="null")))
        return out

    ref, ours = side_by_side(tmp_path, scenario)
    assert ours["missing"] == ref["missing"]
    assert ours["events"] == ref["events"] and ours["events2"] == ref["events2"]
    assert ref["missing"][1].endswith("Could not open 'd.raw': No such file or directory")
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        for tgt in ("tgt.qcow2", "tgt2.qcow2"):
            assert qemu_img("compare", "-f", "raw", d / "want.raw", d / tgt,
                            check=False).returncode == 0, (name, tgt)


def test_snapshot_and_resize_parity(twins):
    """No internal snapshots with a data file; resize takes the data file
    along (grown, cut, preallocated; kept 1:1 with data_file_raw)."""
    for d in twins:
        with chdir(d):
            qemu_img("create", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M")
            qemu_io("a.qcow2", "write -P 1 0 64k")
            qemu_img("create", "-f", "qcow2", "-o", "data_file=r.raw,data_file_raw=on",
                     "r.qcow2", "1M")
    rc, _, err = same(twins, "snapshot", "-c", "s1", "a.qcow2")
    assert (rc, err) == (1, "qemu-img: Could not create snapshot 's1': -95 (Operation not "
                         "supported)\n")
    same(twins, "resize", "a.qcow2", "2M")
    files_same(twins, "a.qcow2", "d.raw")
    same(twins, "resize", "--shrink", "a.qcow2", "512k")
    files_same(twins, "a.qcow2", "d.raw")
    same(twins, "resize", "--preallocation=full", "a.qcow2", "1M")
    same(twins, "resize", "--preallocation=metadata", "a.qcow2", "3M")
    same(twins, "resize", "r.qcow2", "2M")
    files_same(twins, "a.qcow2", "d.raw", "r.qcow2", "r.raw")
    assert data_bytes(twins[0] / "d.raw") == data_bytes(twins[1] / "d.raw")
    for img in ("a.qcow2", "r.qcow2"):
        same(twins, "check", img)
        same(twins, "map", "--output=json", img)
