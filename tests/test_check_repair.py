"""``check -r`` repairs as qemu-img does (qemu-iotests 039, 138, 214): the
same lines in the same order, the same counts and exit status, and the
repaired images equal byte for byte to the ones qemu-img repaired."""
from __future__ import annotations

import subprocess
from pathlib import Path

from qemu_oracle import check_clean, qemu_img, qemu_io
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)


def _be(path: Path, off: int, n: int = 8) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return int.from_bytes(f.read(n), "big")


def _poke(path: Path, off: int, value: int, n: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(value.to_bytes(n, "big"))


def _dirty_lazy_image(d: Path) -> Path:
    """039's dirty image: lazy refcounts, a write, then qemu-io killed before
    it wrote the refcount of the new data cluster."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", img, "128M")
    p = subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", str(img)],
                       capture_output=True)
    assert p.returncode == -9
    assert _be(img, 72) & 1        # incompatible_features: dirty
    return img


def test_check_r_all_rebuilds_the_refcount_structure_of_a_dirty_image(twins):
    imgs = [_dirty_lazy_image(d) for d in twins]
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 0
    assert err == ("ERROR cluster 5 refcount=0 reference=1\n"
                   "Rebuilding refcount structure\n"
                   "Repairing cluster 1 refcount=1 reference=0\n"
                   "Repairing cluster 2 refcount=1 reference=0\n")
    assert out.startswith("The following inconsistencies were found and repaired:\n\n"
                          "    0 leaked clusters\n    1 corruptions\n")
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    assert _be(imgs[0], 72) == 0   # no longer dirty
    check_clean(imgs[0])
    assert "read 512/512" in qemu_io(imgs[0], "read -P 0x5a 0 512").stdout


def test_check_r_leaks_cannot_rebuild(twins):
    """The same failure; the image is left as it was. (qemu-img clears the
    dirty bit when it closes the image, which leaves wrong refcounts in a
    clean-looking image; blkjobs keeps it dirty so that the next writer
    rebuilds them: the one deliberate difference, docs/qcow2.md.)"""
    imgs = [_dirty_lazy_image(d) for d in twins]
    before = imgs[0].read_bytes()
    rc, out, err = same(twins, "check", "-r", "leaks", "t.qcow2")
    assert (rc, out) == (1, "")
    assert err == ("ERROR cluster 5 refcount=0 reference=1\n"
                   "ERROR need to rebuild refcount structures\n"
                   "qemu-img: Check failed: Input/output error\n")
    assert imgs[0].read_bytes() == before
    theirs = bytearray(imgs[1].read_bytes())
    assert theirs[79] == 0
    theirs[79] = 1
    assert bytes(theirs) == before


def _image_138(d: Path) -> tuple[Path, int]:
    """138: the header cluster's refcount 2 and the L1 entry's COPIED flag
    cleared."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64k")
    qemu_io(img, "write 0 64k")
    refblock = _be(img, _be(img, 48))
    _poke(img, refblock, 2, 2)
    l1 = _be(img, 40)
    entry = _be(img, l1) & ~(1 << 63)
    _poke(img, l1, entry)
    return img, entry


def test_check_r_all_repairs_leaks_and_the_l2_copied_flag(twins):
    made = [_image_138(d) for d in twins]
    imgs, entry = [m[0] for m in made], made[0][1]
    rc, out, err = same(twins, "check", "-r", "all", "--output=json", "t.qcow2")
    assert rc == 0
    assert err == ("Leaked cluster 0 refcount=2 reference=1\n"
                   "Repairing cluster 0 refcount=2 reference=1\n"
                   f"Repairing OFLAG_COPIED L2 cluster: l1_index=0 l1_entry={entry:x} "
                   "refcount=1\n")
    assert '"corruptions-fixed": 1,' in out and '"leaks-fixed": 1,' in out
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    check_clean(imgs[0])


def _shared_data_cluster(d: Path) -> None:
    """A data cluster referenced twice (two L2 entries with COPIED) whose
    refcount says 1: 214's corruption, on plain clusters."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0x11 0 64k")
    l2 = _be(img, _be(img, 40)) & 0x00FFFFFFFFFFFE00
    e0 = _be(img, l2)
    _poke(img, l2 + 8, e0)


def test_check_repairs_the_copied_flag_of_a_shared_data_cluster(twins):
    for d in twins:
        _shared_data_cluster(d)
    assert same(twins, "check", "t.qcow2")[::2] == (2, "ERROR cluster 5 refcount=1 reference=2\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 0
    assert err == ("ERROR cluster 5 refcount=1 reference=2\n"
                   "Repairing cluster 5 refcount=1 reference=2\n"
                   "Repairing OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2\n"
                   "Repairing OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2\n")
    assert "    0 leaked clusters\n    3 corruptions\n" in out
    assert (twins[0] / "t.qcow2").read_bytes() == (twins[1] / "t.qcow2").read_bytes()
    check_clean(twins[0] / "t.qcow2")


def test_check_r_leaks_repairs_copied_flags_when_nothing_else_is_wrong(twins):
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", img, "1M")
        qemu_io(img, "write -P 0x11 0 64k")
        l2 = _be(img, _be(img, 40)) & 0x00FFFFFFFFFFFE00
        _poke(img, l2, _be(img, l2) & ~(1 << 63))
    rc, _, err = same(twins, "check", "-r", "leaks", "t.qcow2")
    assert rc == 0 and err.startswith("Repairing OFLAG_COPIED data cluster: l2_entry=")
    assert (twins[0] / "t.qcow2").read_bytes() == (twins[1] / "t.qcow2").read_bytes()
    assert run(twins[0], "check", "t.qcow2")[0] == 0


# -- unknown incompatible features (iotests 036) --------------------------------
def _with_features(img: Path, bits: list[int], entries: list[tuple[int, int, bytes]]) -> None:
    """Set incompatible feature ``bits`` and overwrite the feature name
    table's first entries with ``entries`` (type, bit, name)."""
    _poke(img, 72, _be(img, 72) | sum(1 << b for b in bits))
    head = img.read_bytes()[:4096]
    at = head.index(bytes.fromhex("6803f857")) + 8
    with open(img, "r+b") as f:
        for i, (kind, bit, name) in enumerate(entries):
            f.seek(at + 48 * i)
            f.write(bytes([kind, bit]) + name.ljust(46, b"\0"))


def test_unsupported_incompatible_features_in_qemu_img_words(twins):
    cases = [([63], []),                                    # no name: a hex mask
             ([61, 62, 63], [(0, 63, b"Test feature")]),    # names first, table order
             ([61, 62, 63], [(0, 62, b"test2\0ignored"), (0, 61, b"test1")]),
             ([61, 63], [(1, 61, b"compatible"), (0, 63, b"x" * 46)]),
             ([62], [(0, 5, b""), (0, 62, b"after the end")])]   # an empty name ends it
    for bits, entries in cases:
        for d in twins:
            img = d / "t.qcow2"
            qemu_img("create", "-f", "qcow2", img, "64M")
            _with_features(img, bits, entries)
        for cmd in (("info", "t.qcow2"), ("check", "t.qcow2"), ("map", "t.qcow2"),
                    ("convert", "-O", "raw", "t.qcow2", "t.raw"), ("resize", "t.qcow2", "1G")):
            rc, out, err = same(twins, *cmd)
            assert rc == 1 and out == "" and err.startswith(
                "qemu-img: Could not open 't.qcow2': Unsupported qcow2 feature(s): "), err
    assert err.endswith("feature(s): Unknown incompatible feature: 4000000000000000\n")


def test_check_r_all_clears_unknown_autoclear_bits(twins):
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", img, "64M")
        _poke(img, 88, 1 << 63)         # autoclear_features
    assert same(twins, "check", "-r", "all", "t.qcow2") == (
        0, "No errors were found on the image.\nImage end offset: 262144\n", "")
    assert _be(twins[0] / "t.qcow2", 88) == 0
    assert (twins[0] / "t.qcow2").read_bytes() == (twins[1] / "t.qcow2").read_bytes()
