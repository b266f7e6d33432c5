"""``create`` and ``convert`` refusals in qemu-img's words, byte for byte,
through a ``qemu-img`` symlink (qemu-iotests 049, 054, 111, 114)."""
from __future__ import annotations

from qemu_oracle import qemu_img
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


def _both(twins, *files):
    for d in twins:
        for name, size in files:
            qemu_img("create", "-q", "-f", "qcow2" if name.endswith("qcow2") else "raw",
                     d / name, size)


def test_create_option_errors_name_the_image(twins):
    for args in (["-o", "size=-1024", "t.qcow2"], ["-o", "size=foobar", "t.qcow2"],
                 ["-o", "cluster_size=foo", "t.qcow2", "1M"],
                 ["-o", "lazy_refcounts=maybe", "t.qcow2", "1M"],
                 ["-o", "refcount_bits=x", "t.qcow2", "1M"], ["-o", "foo=bar", "t.qcow2", "1M"],
                 ["-o", "size=1k", "t.qcow2", "1M"], ["-o", "preallocation=1234", "t.qcow2", "64M"],
                 ["-b", "", "t.qcow2", "1M"], ["-b", "t.qcow2", "-F", "qcow2", "t.qcow2", "1M"]):
        rc, _, err = same(twins, "create", "-f", "qcow2", *args)
        assert rc == 1 and err.startswith("qemu-img: t.qcow2: "), err
    rc, _, err = same(twins, "create", "-f", "raw", "-o", "foo=bar", "t.raw", "1M")
    assert (rc, err) == (1, "qemu-img: t.raw: Invalid parameter 'foo'\n")


def test_create_too_large_for_the_l1_table(twins):
    for args in (["t.qcow2", str(1 << 60)], ["-o", "cluster_size=512", "t.qcow2", "2T"],
                 ["-o", "extended_l2=on", "t.qcow2", str((1 << 50) + 512)]):
        rc, out, err = same(twins, "create", "-f", "qcow2", *args)
        assert rc == 1 and out.startswith("Formatting 't.qcow2', fmt=qcow2 ")
        assert err == ("qemu-img: t.qcow2: The image size is too large for file format "
                       "'qcow2' (try using a larger cluster size)\n")
    for args in (["t.qcow2", "2P"], ["-o", "extended_l2=on", "t.qcow2", "1P"]):
        assert same(twins, "create", "-f", "qcow2", *args)[0] == 0


def test_an_image_too_big_to_open(twins):
    for d in twins:
        qemu_img("create", "-q", "-f", "qcow2", d / "t.qcow2", "4G")
        with open(d / "t.qcow2", "r+b") as f:
            f.seek(24)
            f.write((1 << 60).to_bytes(8, "big"))
    for cmd in ("check", "info", "map"):
        assert same(twins, cmd, "t.qcow2")[::2] == (
            1, "qemu-img: Could not open 't.qcow2': Image is too big\n")
    for d in twins:
        with open(d / "t.qcow2", "r+b") as f:
            f.seek(24)
            f.write((8 << 30).to_bytes(8, "big"))
    assert same(twins, "info", "t.qcow2")[::2] == (
        1, "qemu-img: Could not open 't.qcow2': L1 table is too small\n")


def test_create_backing_file_errors(twins):
    _both(twins, ("base.qcow2", "1M"), ("r.raw", "1000"))
    for d in twins:
        (d / "sub").mkdir()
    cases = [(["-b", "t.qcow2.inexistent"],
              "qemu-img: t.qcow2: Could not open 't.qcow2.inexistent': No such file or "
              "directory\nCould not open backing image.\n"),
             (["-b", "nope", "-F", "qcow2", "sub/t.qcow2"],
              "qemu-img: sub/t.qcow2: Could not open 'sub/nope': No such file or directory\n"
              "Could not open backing image.\n"),
             (["-b", "base.qcow2"], "qemu-img: t.qcow2: Backing file specified without backing "
              "format\nDetected format of qcow2."),
             (["-u", "-b", "base.qcow2", "t.qcow2", "1M"],
              "qemu-img: t.qcow2: Backing file specified without backing format\n"),
             (["-u", "-b", "base.qcow2", "-F", "qcow2"],
              "qemu-img: t.qcow2: Image creation needs a size parameter\n"),
             (["-b", "base.qcow2", "-F", "foo"],
              "qemu-img: t.qcow2: Unknown driver 'foo'\nCould not open backing image.\n"),
             (["-b", "r.raw", "-F", "qcow2"],
              "qemu-img: t.qcow2: Image is not in qcow2 format\nCould not open backing image.\n")]
    for args, err in cases:
        if not any(a.endswith("t.qcow2") for a in args):
            args = [*args, "t.qcow2"]
        assert same(twins, "create", "-f", "qcow2", *args) == (1, "", err)
    # a raw backing file's size in whole sectors
    rc, out, _ = same(twins, "create", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "t.qcow2")
    assert rc == 0 and " size=1024 backing_file=r.raw backing_fmt=raw " in out


def test_convert_backing_file_needs_its_format(twins):
    _both(twins, ("base.qcow2", "1M"), ("s.raw", "1M"))
    for args in (["-O", "qcow2", "-B", "base.qcow2"], ["-O", "qcow2", "-B", "nope.qcow2"],
                 ["-O", "qcow2", "-o", "backing_file=base.qcow2"]):
        assert same(twins, "convert", *args, "s.raw", "x.qcow2") == (
            1, "", "qemu-img: Use of backing file requires explicit backing format\n")
    assert same(twins, "convert", "-O", "raw", "-B", "base.qcow2", "s.raw", "x.raw") == (
        1, "", "qemu-img: Backing file not supported for file format 'raw'\n")
    assert not any((d / n).exists() for d in twins for n in ("x.qcow2", "x.raw"))


def test_a_repeated_backing_format_extension_the_last_counts(twins):
    for d in twins:
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2",
                 d / "t.qcow2", "64M")
        _add_extension(d / "t.qcow2", 0xE2792ACA, b"foo")
    rc, out, err = same(twins, "info", "t.qcow2")
    assert rc == 0 and "backing file format: foo\n" in out, err


def _add_extension(img, magic: int, data: bytes) -> None:
    """Append a header extension (the backing file name moves after them)."""
    with open(img, "r+b") as f:
        head = bytearray(f.read(4096))
        hlen = int.from_bytes(head[100:104], "big")
        name_off, name_len = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
        name = bytes(head[name_off:name_off + name_len])
        exts, off = [], hlen
        while (kind := int.from_bytes(head[off:off + 4], "big")) != 0:
            n = int.from_bytes(head[off + 4:off + 8], "big")
            exts.append((kind, bytes(head[off + 8:off + 8 + n])))
            off += 8 + n + (-n % 8)
        out = bytearray()
        for kind, d in exts + [(magic, data)]:
            out += kind.to_bytes(4, "big") + len(d).to_bytes(4, "big") + d + bytes(-len(d) % 8)
        out += bytes(8)
        head[hlen:] = bytes(4096 - hlen)
        head[hlen:hlen + len(out)] = out
        head[hlen + len(out):hlen + len(out) + len(name)] = name
        head[8:16] = (hlen + len(out)).to_bytes(8, "big")
        f.seek(0)
        f.write(head)
