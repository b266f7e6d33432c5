"""``convert -c`` and ``convert -B`` from a source under blkdebug, and what a
failed convert leaves behind (issue 16), blkjobs installed as ``qemu-img``
next to the real qemu-img 7.2: the same error lines (``error while reading
at byte N``: the cluster being compressed, the 2 MiB buffer of -B), the same
exit status, and the same target left on disk (qemu-img keeps it: the same
``qemu-img map``, ``qemu-img compare`` equal, ``qemu-img check`` clean).
The window of qemu-img's ``-m`` coroutines decides what was written before
the error (src/blkjobs/imageops/convert_faults.py)."""
from __future__ import annotations

import json

import pytest

from qemu_oracle import qemu_img
from test_convert_blkdebug import pattern
from test_parity_invocation import run, twins  # noqa: F401  (the fixture: twin dirs)


def rule(sector: int, once: bool = False) -> str:
    return (f'[inject-error]\nevent = "none"\nerrno = "5"\nsector = "{sector}"\n'
            + ('once = "on"\n' if once else ""))


def source(twins, fmt: str, rules: str) -> str:
    """s.FMT (6 MiB: data, a zero MiB at 4 MiB, data) under blkdebug rules."""
    for d in twins:
        pat = pattern(d)
        if fmt == "raw":
            (d / "s.raw").write_bytes((d / "pattern.raw").read_bytes())
        else:
            qemu_img("create", "-f", fmt, d / f"s.{fmt}", "6M")
            qemu_img("convert", "-O", fmt, "-n", "-f", "raw", pat, d / f"s.{fmt}")
        (d / "bd.conf").write_text(rules)
    return "json:" + json.dumps({"driver": "blkdebug", "config": "bd.conf", "image": {
        "driver": fmt, "file": {"driver": "file", "filename": f"s.{fmt}"}}})


def left_on_disk(twins, name: str = "o.qcow2", args: list[str] | None = None) -> None:
    """Both kept the target, and it is the same image.

    With ``-m`` 2 or more, what qemu-img leaves written before a read error
    is a race among its own coroutines (seen: 4 of 20 identical runs wrote
    2 MiB, the others 4 MiB). ``args``: the convert that made the targets;
    while the maps differ, qemu-img's is made again (up to 9 more times)
    and ours must equal one of the images qemu-img itself leaves."""
    fmt = name.rsplit(".", 1)[1]

    def image_map(d):
        if fmt == "qcow2":
            p = qemu_img("check", d / name)
            assert p.returncode == 0, p.stdout + p.stderr
        return qemu_img("map", "-f", fmt, "--output", "json", d / name).stdout

    for d in twins:
        assert (d / name).exists(), d
    ours = image_map(twins[0])
    theirs = [image_map(twins[1])]
    while args is not None and ours not in theirs and len(theirs) < 10:
        run(twins[1], *args)
        theirs.append(image_map(twins[1]))
    assert ours == theirs[-1], theirs
    p = qemu_img("compare", "-f", fmt, "-F", fmt, twins[0] / name, twins[1] / name)
    assert p.returncode == 0, p.stdout + p.stderr


OPTS = {"-c": ["-c"], "-c -m 3": ["-c", "-m", "3"], "-c -m 1": ["-c", "-m", "1"],
        "-B": ["-B", "pattern.raw", "-F", "raw"],
        "-B -m 1": ["-B", "pattern.raw", "-F", "raw", "-m", "1"],
        "-m 1": ["-m", "1"], "-m 2": ["-m", "2"]}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("opts", list(OPTS))
@pytest.mark.parametrize("sector", [10, 6000, 9000])
def test_read_error_as_qemu_img(twins, fmt, opts, sector):
    """Sector 10: the first request; 6000: in the second 2 MiB buffer (the
    47th cluster); 9000: in the zero MiB (a qcow2 source does not hold it:
    nothing reads it, the convert succeeds)."""
    src = source(twins, fmt, rule(sector))
    args = ["convert", *OPTS[opts], src, "-O", "qcow2", "o.qcow2"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs
    c = 64 << 10 if "-c" in opts else 2 << 20
    if fmt == "qcow2" and sector == 9000:
        assert theirs == (0, "", "")
    else:
        assert theirs == (1, "", f"qemu-img: error while reading at byte {sector * 512 // c * c}"
                                 ": Input/output error\n")
    left_on_disk(twins, args=args)


@pytest.mark.parametrize("opts", ["", "-m 2", "-c", "-c -m 2"])
def test_errors_in_the_first_requests_each_said(twins, opts):
    """All of qemu-img's first ``-m`` requests are read before one is
    written: each that fails is said, nothing is written."""
    src = source(twins, "raw", rule(10) + rule(6000))
    args = ["convert", *opts.split(), src, "-O", "qcow2", "o.qcow2"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs
    assert theirs[2].count("error while reading at byte") == (1 if "-c" in opts else 2)
    left_on_disk(twins, args=args)


@pytest.mark.parametrize("opts", ["", "-c"])
def test_an_error_injected_once(twins, opts):
    src = source(twins, "qcow2", rule(6000, once=True))
    args = ["convert", *opts.split(), src, "-O", "qcow2", "o.qcow2"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs and theirs[0] == 1
    left_on_disk(twins, args=args)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("opts", ["-W", "-c -W", "-B pattern.raw -F raw -W"])
def test_out_of_order_writes_the_same_error(twins, fmt, opts):
    """-W: qemu-img's writes come in no fixed order (what it left written
    varies from run to run); the error line and the exit are the same, and
    both targets are kept as valid images."""
    src = source(twins, fmt, rule(6000))
    args = ["convert", *opts.split(), src, "-O", "qcow2", "o.qcow2"]
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs
    at = 3014656 if "-c" in opts else 2 << 20
    assert theirs == (1, "", f"qemu-img: error while reading at byte {at}: Input/output error\n")
    for d in twins:
        p = qemu_img("check", d / "o.qcow2")
        assert p.returncode == 0, p.stdout
