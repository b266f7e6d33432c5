"""One size grammar everywhere, qemu-img's: each spelling is given to
``qemu-img create`` and to blkjobs.units.parse_size, and both must take it
with the same value or refuse it with the same text."""
from __future__ import annotations

import re
import subprocess

import pytest
from conftest import run_blkjobs

from blkjobs.errors import UsageError
from blkjobs.units import parse_opt_size, parse_size, strtosz

SPELLINGS = [
    # taken
    "0", "10", "010", "10b", "10B", "10k", "10K", "10M", "10m", "10G", "10g", "10T", "10P",
    "1.5G", "1.5t", "1.5P", "0.5k", "1.3k", "1.k", "1.", "1.0", "1.0b", "1.0005k",
    "1.00048828125k", "0.0001k", "0.00000000000000000001E", "0.9E", "7E", "7.9E", "1E", "1e",
    "1.5e", " 10G", "\t5", "+5", " +5", "0x10", "0X1F", " 0x10", "+0x10",
    "9223372036854775807", "0b", "0k", "1.99999999999999999999", "0.99999999999999999999k",
    # refused: not a size
    "", " ", "abc", "10GB", "10KB", "10KiB", "10Kb", "1.5", "1.1", "1.5b", "1.5B", "0.5b",
    "1e3", "1.5e3", "1.5e-3k", ".5k", "1..5k", "1.k5", "1.-5k", "1. 5k", "1.inf", "inf", "nan",
    "10 G", "10G ", "1 ", "-0", "-1", "+ 5", "1_000", "1,5k", "5kk", "10X", "0x", "0xg",
    "0x1.5", "0x+5", "00x10", "0b101", "99999999999999999999k", "16Ex",
    "0xFFFFFFFFFFFFFFFFFk",
    # refused: out of range
    "9223372036854775808", "18446744073709551615", "18446744073709551616", "8E", "10E", "16E",
    "15.99999E", "99999999999999999999", "0xFFFFFFFFFFFFFFFFF",
]


def _qemu_img_create(tmp_path, text: str) -> tuple[int | None, str]:
    """(the size qemu-img create took, or None; its error text as ours)."""
    p = subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "x.raw"), "--", text],
                       capture_output=True, text=True)
    m = re.match(r"Formatting '.*', fmt=raw size=(-?\d+)", p.stdout)
    if m:
        return int(m.group(1)), ""
    return None, p.stderr.replace("qemu-img: ", "blkjobs: ")


@pytest.mark.parametrize("text", SPELLINGS)
def test_sizes_as_qemu_img_create(tmp_path, text):
    size, err = _qemu_img_create(tmp_path, text)
    if size is not None:
        assert parse_size(text, "image size") == size
    else:
        with pytest.raises(UsageError) as e:
            parse_size(text, "image size")
        assert f"blkjobs: {e.value}\n" == err


def test_the_grammar_alone():
    assert strtosz("15E") == 15 << 60                  # up to 2**64 - 1 before a caller's limit
    assert strtosz("18446744073709551615") == (1 << 64) - 1
    with pytest.raises(OverflowError):
        strtosz("16E")
    with pytest.raises(ValueError):
        strtosz("99999999999999999999k")   # strtoull's overflow with something after it


def test_hex_with_a_suffix_is_taken_with_qemu_img_warning(tmp_path):
    p = subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "x.raw"), "0x1k"],
                       capture_output=True, text=True)
    assert p.stderr == "qemu-img: warning: Using a multiplier suffix on hex numbers is " \
                       "deprecated: 0x1k\n" and "size=1024" in p.stdout
    r = run_blkjobs("create", "-f", "raw", tmp_path / "y.raw", "0x1k")
    assert (r.returncode, r.stderr) == (0, "Using a multiplier suffix on hex numbers is "
                                            "deprecated: 0x1k\n")
    assert (tmp_path / "y.raw").stat().st_size == 1024


def test_limits_and_names_in_the_refusal():
    with pytest.raises(UsageError) as e:
        parse_size("0", "bs", 1, 2147483647)
    assert str(e.value) == "Invalid bs specified. Must be between 1 and 2147483647."
    with pytest.raises(UsageError) as e:
        parse_size("fast", "rate limit")
    assert str(e.value) == ("Invalid rate limit specified. You may use k, M, G, T, P or E "
                            "suffixes for\nblkjobs: kilobytes, megabytes, gigabytes, "
                            "terabytes, petabytes and exabytes.")


def test_option_values_as_qemu_option_parser():
    assert parse_opt_size("64k", "cluster_size") == 65536
    with pytest.raises(UsageError) as e:
        parse_opt_size("16E", "size")
    assert str(e.value) == "Value '16E' is out of range for parameter 'size'"
    with pytest.raises(UsageError) as e:
        parse_opt_size("64KiB", "cluster_size")
    assert str(e.value) == ("Parameter 'cluster_size' expects a non-negative number below "
                            "2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, "
                            "giga-, tera-, peta-\nand exabytes, respectively.")


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "{d}/a.raw", "10GB"], ["create", "-f", "raw", "{d}/a.raw", "10E"],
    ["create", "-f", "raw", "{d}/a.raw", "1.5"], ["convert", "-r", "fast", "{d}/s", "{d}/t"],
    ["convert", "-S", "3x", "{d}/s", "{d}/t"], ["map", "--start-offset=3x", "{d}/s"],
    ["map", "--max-length=1.5", "{d}/s"], ["measure", "-O", "raw", "--size", "1MB"],
    ["bitmap", "--add", "-g", "3x", "{d}/s", "b0"]])
def test_commands_refuse_as_qemu_img(tmp_path, args):
    (tmp_path / "s").write_bytes(bytes(65536))
    argv = [a.format(d=tmp_path) for a in args]
    q = subprocess.run(["qemu-img", *argv], capture_output=True, text=True)
    p = run_blkjobs(*argv)
    assert q.returncode == 1 and q.stderr.startswith("qemu-img: Invalid ")
    assert (p.returncode, p.stdout, p.stderr) == \
        (1, "", q.stderr.replace("qemu-img: ", "blkjobs: "))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize("args,what", [
    (["bench", "{d}", "--size", "1MB"], "--size"), (["bench", "{d}", "-b", "4KiB"], "request size"),
    (["backup", "--speed", "1.5", "{d}/s", "{d}/t"], "speed"),
    (["demo", "{d}/demo", "--size", "10GB"], "size")])
def test_blkjobs_own_options_use_the_same_grammar(tmp_path, args, what):
    (tmp_path / "s").write_bytes(bytes(65536))
    p = run_blkjobs(*[a.format(d=tmp_path) for a in args])
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == (f"blkjobs: Invalid {what} specified. You may use k, M, G, T, P or E "
                        "suffixes for\nblkjobs: kilobytes, megabytes, gigabytes, terabytes, "
                        "petabytes and exabytes.\n")


def test_sector_size_is_the_length_qemu_img_gives_a_raw_file(tmp_path):
    """units.sector_size (the one rounding to whole sectors: raw driver,
    convert, dd, the daemon) gives what ``qemu-img info -f raw`` says of a
    file of that many bytes."""
    import json

    from qemu_oracle import qemu_img

    from blkjobs.units import sector_size
    for n in (0, 1, 511, 512, 513, 1000, 65537):
        f = tmp_path / f"{n}.raw"
        f.write_bytes(b"\1" * n)
        info = json.loads(qemu_img("info", "--output", "json", "-f", "raw", f).stdout)
        assert (n, sector_size(n)) == (n, info["virtual-size"])
