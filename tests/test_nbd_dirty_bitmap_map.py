"""QEMU's x-dirty-bitmap hack (iotests nbd-qemu-allocation,
qemu-img-bitmaps): an NBD node opened with
``x-dirty-bitmap=qemu:allocation-depth`` or ``qemu:dirty-bitmap:NAME``
reports that meta context's bits as if they were base:allocation's, so
``map`` shows them. qemu-nbd serves, and the real qemu-img's map of the same
options is the expected output, byte for byte."""
from __future__ import annotations

from conftest import run_blkjobs
from nbd_peers import qemu_nbd
from qemu_oracle import qemu_img, qemu_io


def _maps(spec: str, *extra: str) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    ours = run_blkjobs("map", *extra, "--image-opts", spec)
    theirs = qemu_img("map", *extra, "--image-opts", spec, check=False)
    return ((ours.returncode, ours.stdout, ours.stderr),
            (theirs.returncode, theirs.stdout, theirs.stderr.replace("qemu-img:", "blkjobs:")))


def test_allocation_depth_and_dirty_bitmap_as_qemu_img(tmp_path):
    """A base with data at [0, 2M), an overlay writing [1M, 3M) with a
    dirty bitmap recording it: depth 2 (backing) reads as data and zero,
    depth 1 (the overlay) as not present, depth 0 (nowhere) as data; the
    bitmap's dirty range as not present, the rest as data."""
    base, top = tmp_path / "t.qcow2.base", tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write 0 2M")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M")
    qemu_img("bitmap", "--add", top, "b0")
    qemu_io(top, "write 1M 2M")
    sock = str(tmp_path / "nbd.sock")
    with qemu_nbd(str(top), sock, "e", "qcow2", "-r", "-A", "-B", "b0"):
        img = f"driver=nbd,server.type=unix,server.path={sock},export=e"
        plain = _maps(img, "--output=json")
        assert plain[0] == plain[1]
        depth = _maps(f"{img},x-dirty-bitmap=qemu:allocation-depth", "--output=json")
        assert depth[0] == depth[1]
        assert depth[0][1] == (
            '[{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": true, '
            '"data": true, "offset": 0},\n'
            '{ "start": 1048576, "length": 2097152, "depth": 0, "present": false, '
            '"zero": false, "data": false},\n'
            '{ "start": 3145728, "length": 1048576, "depth": 0, "present": true, '
            '"zero": false, "data": true, "offset": 3145728}]\n')
        dirty = _maps(f"{img},x-dirty-bitmap=qemu:dirty-bitmap:b0", "--output=json")
        assert dirty[0] == dirty[1]
        assert '"start": 1048576, "length": 2097152, "depth": 0, "present": false' \
            in dirty[0][1]
        # a context the server does not offer: QEMU's (generic) text
        missing = _maps(f"{img},x-dirty-bitmap=qemu:dirty-bitmap:nope", "--output=json")
        assert missing[0] == missing[1]
        assert missing[0][0] == 1 and missing[0][2].endswith(
            ": Could not open image: Invalid argument\n")


def test_data_reads_are_the_exports(tmp_path):
    """The hack changes block status only: reads return the export's bytes."""
    from blkjobs.formats.sniff import mark_image_opts
    from blkjobs.graph.blockspec import open_spec, parse
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0x33 0 64k")
    sock = str(tmp_path / "nbd.sock")
    with qemu_nbd(str(img), sock, "e", "qcow2", "-r", "-A"):
        spec = (f"driver=nbd,server.type=unix,server.path={sock},export=e,"
                "x-dirty-bitmap=qemu:allocation-depth")
        mark_image_opts(spec)
        drv, _ = open_spec(parse(spec))
        try:
            assert drv.read(0, 128 << 10) == b"\x33" * (64 << 10) + bytes(64 << 10)
        finally:
            drv.close()
