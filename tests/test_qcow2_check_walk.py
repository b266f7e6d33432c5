"""``check`` counts references and words its errors as qemu-img 7.2 does
(qemu-iotests 271's unaligned L2 entries of extended-L2 images, 112's
refcount overflow): the same lines in the same order, the same exit status,
and the repaired images equal byte for byte to the ones qemu-img repaired."""
from __future__ import annotations

from pathlib import Path

from qemu_oracle import qemu_img, qemu_io
from test_check_repair import _poke
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


def _unaligned_l2_entry(d: Path, zero_it: bool) -> Path:
    """271's image: extended L2 over a raw backing file, 2k written at 4k
    (then zeroed: ``zero_it``), the L2 entry's offset made 0x50200."""
    base, img = d / "t.qcow2.base", d / "t.qcow2"
    qemu_img("create", "-f", "raw", base, "128k")
    qemu_io(base, "write -q -P 0xff 0 128k", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", base.name,
             img, "128k")
    qemu_io(img, "write -q -P 1 4k 2k")
    if zero_it:
        qemu_io(img, "write -q -z 4k 2k")
    with open(img, "r+b") as f:
        f.seek(0x40000 + 6)
        f.write(b"\x02")
    return img


def test_unaligned_data_cluster_is_counted_and_rebuilt(twins):
    """The unaligned data offset still references clusters 5 and 6 (so the
    refcount structure is rebuilt); the entry itself cannot be repaired."""
    imgs = [_unaligned_l2_entry(d, False) for d in twins]
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2
    assert err == ("ERROR offset=50200: Data cluster is not properly aligned; "
                   "L2 entry corrupted.\n"
                   "ERROR cluster 6 refcount=0 reference=1\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 2
    unaligned = "ERROR offset=50200: Data cluster is not properly aligned; L2 entry corrupted.\n"
    assert err == (unaligned + "ERROR cluster 6 refcount=0 reference=1\n"
                   "Rebuilding refcount structure\n" + unaligned +
                   "Repairing cluster 1 refcount=1 reference=0\n"
                   "Repairing cluster 2 refcount=1 reference=0\n" + unaligned)
    assert "    0 leaked clusters\n    1 corruptions\n" in out
    assert imgs[0].read_bytes() == imgs[1].read_bytes()


def test_unaligned_preallocated_cluster_is_zeroed(twins):
    """No subcluster allocated: -r all makes the entry a zero one and frees
    the cluster it pointed to."""
    imgs = [_unaligned_l2_entry(d, True) for d in twins]
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2
    assert err.startswith("ERROR offset=50200: Preallocated cluster is not properly aligned; "
                          "L2 entry corrupted.\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 0
    assert err == ("Repairing offset=50200: Preallocated cluster is not properly aligned; "
                   "L2 entry corrupted.\n"
                   "Leaked cluster 5 refcount=1 reference=0\n"
                   "Repairing cluster 5 refcount=1 reference=0\n")
    assert "    1 leaked clusters\n    1 corruptions\n" in out
    assert "Double checking the fixed image now...\nNo errors were found on the image.\n" in out
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    assert "read 2048/2048" in qemu_io(imgs[0], "read -P 0 4k 2k").stdout


def test_refcount_overflow_is_reported_once_the_count_is_full(twins):
    """112: refcount_bits=1, an internal snapshot that failed half-way
    leaves cluster 5 referenced twice: an overflow, not a mismatch."""
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", img, "64M")
        qemu_io(img, "write 0 512")
        # a second L2 entry naming data cluster 5: referenced twice
        _poke(img, 0x40008, 0x50000)
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2
    assert err.startswith("ERROR: overflow cluster offset=0x50000\n"
                          "Use qemu-img amend to increase the refcount entry width or "
                          "qemu-img convert to create a clean copy if the image cannot be "
                          "opened for writing\n")
    same(twins, "check", "--output", "json", "t.qcow2")


def test_l2_reserved_bits_in_qemu_words(twins):
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", img, "1M")
        qemu_io(img, "write 0 64k")
        _poke(img, 0x40000, 0x8000000000050100)     # L2 entry 0: reserved bit 8
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2
    assert err == "ERROR found l2 entry with reserved bits set: 8000000000050100\n"


def test_amend_of_a_dirty_image_prints_the_repair(twins):
    """061: opening a dirty image read/write repairs it first, and qemu-img
    prints that repair's lines; the amended images are equal."""
    import subprocess
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", img, "64M")
        p = subprocess.run(["qemu-io", "-c", "write -P 0x2a 0 128k", "-c", "flush",
                            "-c", "sigraise 9", str(img)], capture_output=True)
        assert p.returncode == -9
    imgs = [d / "t.qcow2" for d in twins]
    imgs[1].write_bytes(imgs[0].read_bytes())
    rc, out, err = same(twins, "amend", "-o", "compat=0.10", "t.qcow2")
    assert rc == 0
    assert err == ("ERROR cluster 5 refcount=0 reference=1\n"
                   "ERROR cluster 6 refcount=0 reference=1\n"
                   "Rebuilding refcount structure\n"
                   "Repairing cluster 1 refcount=1 reference=0\n"
                   "Repairing cluster 2 refcount=1 reference=0\n")
    assert imgs[0].read_bytes() == imgs[1].read_bytes()


def _bad_reftable(d: Path, entries: dict[int, int]) -> Path:
    """A 1 MiB qcow2 (refcount table at 0x10000, its one block at 0x20000)
    with the refcount table ``entries`` (index -> raw entry) poked in."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -q -P 1 0 64k")
    for i, e in entries.items():
        _poke(img, 0x10000 + 8 * i, e)
    return img


def test_refcount_table_entries_in_qemu_words(twins):
    """check_refblocks: reserved bits, an unaligned block, a block referenced
    twice, each reported as qemu-img does, in table order, wherever the
    entry is in the table (entries 300, 600 and 1000 are on the table's
    first, second and third 4 KiB page: the walk looks only at pages that
    hold something)."""
    for d in twins:
        _bad_reftable(d, {300: 0x20000 | 0x100, 600: 0x28000, 1000: 0x20000})
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2
    assert err == ("ERROR refcount table entry 300 has reserved bits set\n"
                   "ERROR refcount block 600 is not cluster aligned; refcount table entry "
                   "corrupted\n"
                   "ERROR refcount block 1000 refcount=2\n"
                   "ERROR cluster 2 refcount=1 reference=2\n")


def test_refcount_block_outside_image_is_reported_and_repaired(twins):
    """A refcount table entry far past the end of the file: ERROR, and
    ``-r all`` extends the file to hold the block, as qemu-img does (the
    repaired files equal byte for byte)."""
    imgs = [_bad_reftable(d, {700: 0x1000000}) for d in twins]
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2 and err.startswith("ERROR refcount block 700 is outside image\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert err.startswith("Repairing refcount block 700 is outside image\n")
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    assert same(twins, "check", "t.qcow2")[0] == 0
