"""qemu-iotests 178 on qcow2: ``measure`` of a LUKS-encrypted qcow2 target
(``--object secret`` and ``-o encrypt.format=luks,...``) and ``convert -o
preallocation=...`` to qcow2, against qemu-img's own output and files."""
from __future__ import annotations

import filecmp

import pytest

from conftest import copy_sparse
from qemu_oracle import check_clean, qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)

SECRET = ["--object", "secret,id=sec0,data=base"]


@pytest.fixture(scope="module")
def _pristine_sources(tmp_path_factory):
    """The two source images, made once per module by qemu-img and qemu-io
    (set-up, not the step under test: some 200 processes when each test
    made its own); ``sources`` copies them, holes kept, into both twins."""
    d = tmp_path_factory.mktemp("measure_sources")
    qemu_img("create", "-f", "qcow2", d / "s.qcow2", "16M")
    # whole clusters: a partly written one leaves an unwritten extent,
    # which QEMU counts as data or not depending on the page cache
    qemu_io(d / "s.qcow2", "write -P 7 0 64k", "write -P 8 128k 64k", "write -P 9 10M 64k")
    qemu_img("snapshot", "-c", "snap1", d / "s.qcow2")
    qemu_img("create", "-f", "raw", d / "s.raw", "16M")
    qemu_io(d / "s.raw", "write -P 7 0 4k", "write -P 9 10M 64k", fmt="raw")
    return d


@pytest.fixture
def sources(twins, _pristine_sources):
    for d in twins:
        for name in ("s.qcow2", "s.raw"):
            copy_sparse(_pristine_sources / name, d / name)
    return twins


# (iter-time=10: QEMU derives throwaway keys for as long as it says, 2 s by default)
LUKS_OPTS = [
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,"
    "encrypt.iter-time=10",
    "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=512,encrypt.iter-time=10",
    "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=2M,preallocation=full,"
    "encrypt.iter-time=10",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=cbc,"
    "encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512,encrypt.iter-time=10",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=0x10",
]
NO_HEADER_OPTS = [
    "encrypt.format=aes,encrypt.key-secret=sec0",           # the legacy AES: no header
    "encryption=on,encrypt.key-secret=sec0",
]
SIZE, QCOW2_SRC, RAW_SRC = ["--size", "1G"], ["-f", "qcow2", "s.qcow2"], ["-f", "raw", "s.raw"]


# Each LUKS option set with --size, and with each source image the first
# one and a cluster size of its own: the LUKS area (imageops/measure.py:
# luks_area, from the options alone) is added to what the source needs, so
# the other 8 pairs met the same code (each qemu-img measure of a LUKS
# target costs it ~1 s of CPU timing PBKDF2).
@pytest.mark.parametrize("src,opts", [
    *((SIZE, o) for o in LUKS_OPTS),
    *((s, o) for s in (QCOW2_SRC, RAW_SRC) for o in (LUKS_OPTS[0], LUKS_OPTS[2])),
    *((s, o) for s in (SIZE, QCOW2_SRC, RAW_SRC) for o in NO_HEADER_OPTS),
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_measure_luks_target(sources, opts, src):
    for out in ("human", "json"):
        rc, stdout, _ = same(sources, "measure", "--output", out, *SECRET, "-o", opts,
                             "-O", "qcow2", *src)
        assert rc == 0 and stdout


@pytest.mark.parametrize("opts", [
    "encrypt.format=luks",                                   # no key-secret
    "encrypt.format=luks,encrypt.key-secret=nosuch",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=x",
])
def test_measure_luks_target_refusals(sources, opts):
    rc, out, err = same(sources, "measure", *SECRET, "-o", opts, "-O", "qcow2", "--size", "1M")
    assert (rc, out) == (1, "") and err


@pytest.mark.parametrize("mode", ["full", "falloc", "metadata"])
@pytest.mark.parametrize("src", [["-f", "qcow2", "s.qcow2"], ["-f", "raw", "s.raw"],
                                 ["-f", "qcow2", "-l", "snap1", "s.qcow2"]])
def test_convert_preallocated_qcow2_target(sources, mode, src):
    """The same file, byte for byte (qemu-img writes the data into the
    clusters its preallocation laid out)."""
    rc, out, err = same(sources, "convert", *src, "-O", "qcow2", "-o",
                        f"preallocation={mode}", "c.qcow2")
    assert (rc, out, err) == (0, "", "")
    ours, theirs = (d / "c.qcow2" for d in sources)
    assert filecmp.cmp(ours, theirs, shallow=False)
    check_clean(ours)
    if "-l" not in src:
        assert qemu_img("compare", "-f", src[1], "-F", "qcow2", sources[0] / src[-1],
                        ours).returncode == 0
