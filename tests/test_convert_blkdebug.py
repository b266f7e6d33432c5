"""``convert`` from a source under blkdebug (issue 16): the injected read and
block-status errors are met as qemu-img 7.2 meets them, blkjobs installed as
``qemu-img`` next to the real one (src/blkjobs/imageops/convert_faults.py).
Without ``--salvage``: the same exit status and error line, and the target
kept as qemu-img keeps it (test_convert_blkdebug_cb.left_on_disk); with it:
the same warnings, in the same order, and the same target (qemu-img compare)."""
from __future__ import annotations

import json

import pytest

from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import run, twins  # noqa: F401  (the fixture: twin dirs)


def left_on_disk(twins, name: str = "o.qcow2", args: list[str] | None = None) -> None:
    from test_convert_blkdebug_cb import left_on_disk as same_target
    same_target(twins, name, args)

MiB = 1 << 20


def conf(sector: int, event: str = "read_aio", iotype: str | None = None) -> str:
    text = f'[inject-error]\nevent = "{event}"\nerrno = "5"\nsector = "{sector}"\n'
    return text + (f'iotype = "{iotype}"\n' if iotype else "")


def names(fmt: str) -> dict[str, list[str]]:
    """The ways to put blkdebug (rules in bd.conf) over or under the source."""
    file = {"driver": "file", "filename": f"s.{fmt}"}
    over = {"driver": "blkdebug", "config": "bd.conf", "image": {"driver": fmt, "file": file}}
    under = {"driver": fmt, "file": {"driver": "blkdebug", "config": "bd.conf", "image": file}}
    return {"over-format": ["json:" + json.dumps(over)],
            "colon": ["-f", fmt, f"blkdebug:bd.conf:s.{fmt}"],
            "under-format": ["json:" + json.dumps(under)],
            "image-opts": ["--image-opts", f"driver={fmt},file.driver=blkdebug,"
                           "file.config=bd.conf,file.image.driver=file,"
                           f"file.image.filename=s.{fmt}"]}


def event(kind: str) -> str:
    """Above a format node only ``none`` fires (QEMU's formats raise their
    events on their own file); below one, the format's ``read_aio`` too."""
    return "none" if kind == "over-format" else "read_aio"


def source(twins, fmt: str, rules: str) -> None:
    for d in twins:
        qemu_img("create", "-f", fmt, d / f"s.{fmt}", "6M")
        qemu_img("convert", "-O", fmt, "-n", "-f", "raw", pattern(d), d / f"s.{fmt}")
        (d / "bd.conf").write_text(rules)


def pattern(d) -> str:
    """6 MiB: data, a hole at 4 MiB, data again (each MiB its own byte)."""
    p = d / "pattern.raw"
    with open(p, "wb") as f:
        for i in range(6):
            f.write(bytes([0x10 + i]) * MiB if i != 4 else bytes(MiB))
    return str(p)


# sectors in guest offsets: every layout over raw, blkdebug over a qcow2 node
CASES = [(fmt, kind) for fmt in ("raw", "qcow2") for kind in names(fmt)
         if fmt == "raw" or kind == "over-format"]


@pytest.mark.parametrize("fmt,kind", CASES)
@pytest.mark.parametrize("sector", [2048, 6000])
def test_read_error_fails_the_convert_as_qemu_img(twins, fmt, kind, sector):
    """The read of the request holding the sector fails: qemu-img's line,
    naming the request's first byte (0, or 2 MiB: its 2 MiB requests)."""
    source(twins, fmt, conf(sector, event(kind)))
    args = ["convert", *names(fmt)[kind], "-O", "qcow2", "o.qcow2"]
    ours, theirs = (run(d, *args) for d in twins)
    start = sector * 512 // (2 * MiB) * (2 * MiB)
    assert theirs == (1, "", f"qemu-img: error while reading at byte {start}: "
                              "Input/output error\n")
    assert ours == theirs
    left_on_disk(twins, args=args)


@pytest.mark.parametrize("fmt,kind", CASES)
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_salvage_warns_and_zeroes_as_qemu_img(twins, fmt, kind, out_fmt):
    ev = event(kind)
    source(twins, fmt, conf(6000, ev) + "\n" + conf(6001, ev) + "\n" + conf(10, ev))
    args = ["convert", "--salvage", *names(fmt)[kind], "-O", out_fmt, f"o.{out_fmt}"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs
    assert theirs[0] == 0 and theirs[2].count("warning: error while reading offset") == 3
    p = qemu_img("compare", "-f", out_fmt, "-F", out_fmt, twins[0] / f"o.{out_fmt}",
                 twins[1] / f"o.{out_fmt}")
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("salvage", [False, True])
def test_block_status_error_as_qemu_img(twins, fmt, salvage):
    """A block-status rule active from the open (event ``none``): without
    --salvage qemu-img fails at the first question (offset 0); with it, the
    sector is warned about in both walks and copied as data."""
    source(twins, fmt, conf(4100, "none", "block-status") + "\n" + conf(6200, "none", "read"))
    args = ["convert", *(["--salvage"] if salvage else []), *names(fmt)["over-format"],
            "-O", "raw", "o.raw"]
    ours, theirs = (run(d, *args) for d in twins)
    if not salvage:
        assert theirs == (1, "", "qemu-img: error while reading block status at offset 0: "
                                 "Input/output error\n")
        assert ours == theirs
        left_on_disk(twins, "o.raw", args)
        return
    assert ours == theirs
    assert theirs[2] == "".join(f"qemu-img: warning: error while reading {what}: "
                                "Input/output error\n" for what in (
                                    "block status at offset 2099200",
                                    "block status at offset 2099200", "offset 3174400"))
    assert (twins[0] / "o.raw").read_bytes() == (twins[1] / "o.raw").read_bytes()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_format_events_do_not_reach_a_blkdebug_node_above_the_format(twins, fmt):
    """``read_aio`` is raised by the format on its file: a rule on it in a
    blkdebug node over the format node never becomes active (qemu-img
    copies everything); nothing is warned about."""
    source(twins, fmt, conf(6000))
    args = ["convert", "--salvage", *names(fmt)["over-format"], "-O", "raw", "o.raw"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs == (0, "", "")
    assert (twins[0] / "o.raw").read_bytes() == (twins[1] / "o.raw").read_bytes()


@pytest.mark.parametrize("kind", ["colon", "under-format", "image-opts"])
@pytest.mark.parametrize("salvage", [False, True])
def test_under_a_qcow2_node_sectors_count_in_the_file(twins, kind, salvage):
    """Between a qcow2 node and its file, a rule's sector is a byte of the
    file: here 64 KiB into the host cluster run holding guest 3 MiB (the
    failing request: guest 2 MiB..4 MiB; the sector: guest 3 MiB + 64 KiB)."""
    source(twins, "qcow2", "")
    [host] = [r["offset"] + 3 * MiB - r["start"] for r in json.loads(qemu_img(
        "map", "--output", "json", twins[1] / "s.qcow2").stdout)
        if r["data"] and r["start"] <= 3 * MiB < r["start"] + r["length"]]
    assert host != 3 * MiB          # else the test could not tell file from guest
    for d in twins:
        (d / "bd.conf").write_text(conf((host + 65536) // 512))
    args = ["convert", *(["--salvage"] if salvage else []), *names("qcow2")[kind],
            "-O", "raw", "o.raw"]
    ours, theirs = (run(d, *args) for d in twins)
    if salvage:
        assert ours == theirs == (0, "", "qemu-img: warning: error while reading offset "
                                         f"{3 * MiB + 65536}: Input/output error\n")
        assert (twins[0] / "o.raw").read_bytes() == (twins[1] / "o.raw").read_bytes()
    else:
        assert theirs == (1, "", f"qemu-img: error while reading at byte {2 * MiB}: "
                                 "Input/output error\n")
        assert ours == theirs
        left_on_disk(twins, "o.raw", args)


# -- a qcow2 source with a backing file, blkdebug between it and its file ----

#: rules against the reads of the top's own data (read_aio), of what it
#: leaves to its backing file (read_backing_aio: raised on the layer, the
#: backing read itself does not pass it) and of its compressed cluster; its
#: zero cluster raises nothing
CHAIN_RULES = {
    "backing-then-data": '[set-state]\nevent = "read_backing_aio"\nstate = "1"\n'
                         'new_state = "2"\n[inject-error]\nevent = "read_aio"\nstate = "2"\n'
                         'errno = "5"\n',
    "third-backing-read": '[set-state]\nevent = "read_backing_aio"\nstate = "1"\n'
                          'new_state = "2"\n[set-state]\nevent = "read_backing_aio"\n'
                          'state = "2"\nnew_state = "3"\n[inject-error]\n'
                          'event = "read_backing_aio"\nstate = "3"\nerrno = "5"\n',
    "backing-enospc-once": '[inject-error]\nevent = "read_backing_aio"\nerrno = "28"\n'
                           'once = "on"\n',
    "third-data-read": '[set-state]\nevent = "read_aio"\nstate = "1"\nnew_state = "2"\n'
                       '[set-state]\nevent = "read_aio"\nstate = "2"\nnew_state = "3"\n'
                       '[inject-error]\nevent = "read_aio"\nstate = "3"\nerrno = "5"\n',
    "compressed": '[inject-error]\nevent = "read_compressed"\nerrno = "5"\n',
    "data-always": '[inject-error]\nevent = "read_aio"\nerrno = "5"\n',
}


@pytest.mark.parametrize("rules", sorted(CHAIN_RULES))
@pytest.mark.parametrize("m", ["1", "8"])
def test_blkdebug_under_a_top_with_a_backing_file(twins, rules, m):
    """Only the top's own file is under blkdebug: its data reads raise
    read_aio and are checked, a compressed cluster raises read_compressed,
    a zero cluster nothing, a range read from the backing file
    read_backing_aio (the read itself is not checked). qemu-img's error
    line and what it left in the target, as qemu-img 7.2."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "base.qcow2", "4M")
        qemu_io(d / "base.qcow2", "write -P 1 0 4M")
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
        qemu_io(d / "top.qcow2", "write -P 2 0 64k", "write -z 512k 64k", "write -P 3 1M 64k",
                "write -c -P 4 2M 64k", "write -P 5 3M 64k")
        (d / "bd.conf").write_text(CHAIN_RULES[rules])
    ours, theirs = (run(d, "convert", "-m", m, "-O", "raw", "blkdebug:bd.conf:top.qcow2",
                        "o.raw") for d in twins)
    assert ours == theirs
    assert theirs[0] == 1 and theirs[2].startswith("qemu-img: error while reading at byte ")
    if m == "1":        # with 8 coroutines what qemu-img wrote before the error varies
        assert (twins[0] / "o.raw").read_bytes() == (twins[1] / "o.raw").read_bytes()
