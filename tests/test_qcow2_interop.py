"""qemu-img tools on images we make, and our API on the odd cases."""
from __future__ import annotations

import os
import random

import pytest

from blkjobs.errors import ImageError, UsageError
from blkjobs.formats import Kind, create_image, open_image
from blkjobs.graph import Perm, open_chain
from qemu_oracle import check_clean, qemu_img, qemu_info, qemu_io, to_raw

SIZE = 2 << 20


def _chain(tmp_path, base_fmt="qcow2"):
    base = tmp_path / f"base.{base_fmt}"
    create_image(str(base), base_fmt, SIZE)
    with open_image(str(base), base_fmt, read_only=False) as b:
        b.write(0, b"\x01" * SIZE)
    top = tmp_path / "top.qcow2"
    create_image(str(top), "qcow2", None, backing_file=base.name)   # format probed, size taken
    return base, top


def test_info_reads_our_backing(tmp_path):
    base, top = _chain(tmp_path, "raw")
    info = qemu_info(top)
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == SIZE
    with open_image(str(top)) as img:
        ours = img.info()
    assert ours == info["format-specific"]


def test_info_matches_qemu_v2_and_extl2(tmp_path):
    for opts in ({"compat": "0.10"}, {"extended_l2": True}):
        p = tmp_path / "i.qcow2"
        create_image(str(p), "qcow2", SIZE, **opts)
        with open_image(str(p)) as img:
            assert img.info() == qemu_info(p)["format-specific"]
        check_clean(p)


def test_create_layout_like_qemu(tmp_path):
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    create_image(str(ours), "qcow2", 64 << 20)
    qemu_img("create", "-f", "qcow2", theirs, 64 << 20)
    assert ours.read_bytes() == theirs.read_bytes()


def test_rebase_unsafe_and_commit(tmp_path):
    base, top = _chain(tmp_path)
    node = open_chain(str(top), read_only=False)
    with node.take("t", Perm.WRITE | Perm.CONSISTENT_READ):
        node.write(4096, b"\x02" * 10000)
    node.close_chain()
    expect = bytearray(b"\x01" * SIZE)
    expect[4096:14096] = b"\x02" * 10000
    # rebase -u onto a copy of the base
    os.rename(base, tmp_path / "base2.qcow2")
    qemu_img("rebase", "-u", "-b", "base2.qcow2", "-F", "qcow2", top)
    with open_image(str(top)) as img:
        assert (img.backing_filename, img.backing_format) == ("base2.qcow2", "qcow2")
    assert to_raw(top, tmp_path) == expect
    qemu_img("commit", top)
    check_clean(tmp_path / "base2.qcow2")
    assert to_raw(tmp_path / "base2.qcow2", tmp_path) == expect


def test_write_compressed_and_allocate(tmp_path):
    p = tmp_path / "c.qcow2"
    cs = 65536
    create_image(str(p), "qcow2", SIZE, cluster_size=cs)
    model = bytearray(SIZE)
    rnd = random.Random(5)
    with open_image(str(p), read_only=False) as img:
        for i in range(8):
            d = (bytes([i]) * 1000 + rnd.randbytes(100)) * 60
            d = d[:cs]
            img.write_compressed(i * cs, d)
            model[i * cs:(i + 1) * cs] = d
        img.write_compressed(9 * cs, rnd.randbytes(cs))   # incompressible: stored normally
        with open(p, "rb"):
            pass
        model[9 * cs:10 * cs] = img.read(9 * cs, cs)
        runs = img.allocate(16 * cs, 8 * cs)
        assert len(runs) == 1 and runs[0].length == 8 * cs and runs[0].kind == Kind.DATA
        d = rnd.randbytes(8 * cs)
        os.pwrite(img.fd, d, runs[0].host_offset)
        model[16 * cs:24 * cs] = d
        img.write(3 * cs + 5, b"\xff" * 7)      # overwrite inside a compressed cluster
        model[3 * cs + 5:3 * cs + 12] = b"\xff" * 7
        assert img.read(0, SIZE) == model
    res = check_clean(p)
    assert res.get("compressed-clusters") == 7
    assert to_raw(p, tmp_path) == model
    with open_image(str(p)) as img:
        assert img.check() == qemu_check_json(p)


def qemu_check_json(p):
    import json
    return json.loads(qemu_img("check", "--output", "json", p).stdout)


def test_check_matches_qemu_and_repairs_leaks(tmp_path):
    p = tmp_path / "l.qcow2"
    qemu_img("create", "-f", "qcow2", p, SIZE)
    qemu_io(p, "write -P 1 0 300k", "write -c -P 2 1M 64k")
    with open_image(str(p)) as img:
        assert img.check() == qemu_check_json(p)
    # leak: bump the header cluster's refcount (refcount block at 0x20000)
    with open(p, "r+b") as f:
        f.seek(0x20000)
        f.write((2).to_bytes(2, "big"))
    with open_image(str(p)) as img:
        ours = img.check()
    assert ours["leaks"] == 1 and ours == qemu_check_json_rc(p)
    with open_image(str(p), read_only=False) as img:
        fixed = img.check(repair="leaks")
    assert fixed.get("leaks-fixed") == 1 and "leaks" not in fixed
    check_clean(p)


def qemu_check_json_rc(p):
    import json
    return json.loads(qemu_img("check", "--output", "json", p, check=False).stdout)


def test_snapshots_shared_clusters(tmp_path):
    """An image with a snapshot reads as qemu-img reads it, checks as it
    does, and a write through our driver leaves the snapshot's data alone
    (tests/test_snapshot.py has the rest)."""
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", p, SIZE)
    qemu_io(p, "write -P 1 0 128k")
    qemu_img("snapshot", "-c", "snap1", p)
    qemu_io(p, "write -P 2 64k 128k")
    with open_image(str(p)) as img:
        assert img.read(0, SIZE) == to_raw(p, tmp_path)
        assert img.check() == qemu_check_json(p)
    with open_image(str(p), read_only=False) as img:
        img.write(4096, b"\x03" * 4096)
    check_clean(p)
    qemu_img("convert", "-l", "snap1", "-O", "raw", p, tmp_path / "snap.raw")
    assert (tmp_path / "snap.raw").read_bytes()[:128 << 10] == b"\x01" * (128 << 10)


def test_preallocation_metadata(tmp_path):
    p = tmp_path / "m.qcow2"
    create_image(str(p), "qcow2", SIZE, cluster_size=4096, preallocation="metadata")
    check_clean(p)
    with open_image(str(p)) as img:
        maps = img.map_host(0, SIZE)
        assert len(maps) == 1 and maps[0].kind == Kind.DATA
        assert img.read(0, SIZE) == bytes(SIZE)


def test_dirty_bit_rebuilds_refcounts(tmp_path):
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", p, SIZE)
    qemu_io(p, "write -P 3 0 64k")
    with open(p, "r+b") as f:   # set the dirty bit and make a refcount too low
        f.seek(72)
        inc = int.from_bytes(f.read(8), "big") | 1
        f.seek(72)
        f.write(inc.to_bytes(8, "big"))
    with open_image(str(p), read_only=False) as img:
        assert img.header.incompatible & 1      # opening writes nothing
        img.write(65536, b"x" * 100)
        assert not img.header.incompatible & 1
    check_clean(p)


def test_corrupt_bit_refuses_write(tmp_path):
    p = tmp_path / "c.qcow2"
    create_image(str(p), "qcow2", SIZE)
    with open(p, "r+b") as f:
        f.seek(79)
        f.write(b"\x02")
    with pytest.raises(ImageError, match="corrupt"):
        open_image(str(p), read_only=False)
    open_image(str(p)).close()


@pytest.mark.parametrize("feature,msg", [(1 << 2, "'data-file' is required for this image"),
                                           (1 << 9, "incompatible")])
def test_unsupported_features(tmp_path, feature, msg):
    p = tmp_path / "f.qcow2"
    create_image(str(p), "qcow2", SIZE)
    with open(p, "r+b") as f:
        f.seek(72)
        f.write(feature.to_bytes(8, "big"))
    with pytest.raises(ImageError, match=msg):
        open_image(str(p))


def test_zstd(tmp_path):
    p = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", p, SIZE)
    qemu_io(p, "write -c -P 4 0 64k", "write -P 5 64k 64k")
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with open_image(str(p)) as img:
            assert img.read(65536, 65536) == b"\x05" * 65536
            with pytest.raises(ImageError, match="zstandard"):
                img.read(0, 4096)
    else:  # pragma: no cover - depends on the environment
        with open_image(str(p)) as img:
            assert img.read(0, SIZE) == to_raw(p, tmp_path)


def test_bad_args(tmp_path):
    with pytest.raises(UsageError):
        create_image(str(tmp_path / "x"), "qcow2", SIZE, cluster_size=1000)
    with pytest.raises(UsageError):
        create_image(str(tmp_path / "x"), "qcow2", SIZE, extended_l2=True, cluster_size=4096)
    with pytest.raises(UsageError):
        create_image(str(tmp_path / "x"), "vmdk", SIZE)


def test_repair_all_fixes_too_low_refcount(tmp_path):
    p = tmp_path / "r.qcow2"
    create_image(str(p), "qcow2", SIZE)
    with open_image(str(p), read_only=False) as img:
        img.write(0, b"\x09" * 65536)
        host = img.map_host(0, 1)[0].host_offset
    with open(p, "r+b") as f:      # refcount of the data cluster 1 -> 0
        f.seek(0x20000 + (host >> 16) * 2)
        f.write(bytes(2))
    theirs = qemu_check_json_rc(p)
    with open_image(str(p)) as img:
        ours = img.check()
    assert ours["corruptions"] == theirs["corruptions"] == 2
    with open_image(str(p), read_only=False) as img:
        res = img.check(repair="all")
        assert res["corruptions-fixed"] == 1 and "corruptions" not in res   # as qemu-img -r all
    check_clean(p)
    assert to_raw(p, tmp_path)[:65536] == b"\x09" * 65536
