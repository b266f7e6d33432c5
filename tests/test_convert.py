"""convert of raw images: data equality (byte for byte and qemu-img compare),
sparseness by st_blocks, odd sizes, errors as one line."""
from __future__ import annotations

import os

import pytest

from conftest import blocks, make_sparse, qemu_compare, run_blkjobs

MiB = 1 << 20


def _same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            assert x == y
            if not x:
                return


@pytest.mark.parametrize("size", [0, 1, 511, 512, 4095, 4097, 2 * MiB + 1, 5 * MiB + 123])
def test_odd_sizes(tmp_path, size, qemu_img):
    src = tmp_path / "s.raw"
    src.write_bytes(os.urandom(size))
    dst = tmp_path / "d.raw"
    p = run_blkjobs("convert", "--request-size", "64k", src, dst)
    assert p.returncode == 0, p.stderr
    # as qemu-img's: the source in whole sectors, the rest of the last one zeroes
    whole = -(-size // 512) * 512
    assert os.path.getsize(dst) == whole
    assert dst.read_bytes() == src.read_bytes() + bytes(whole - size)
    assert qemu_compare(src, dst)[0] == 0


def test_sparse_stays_sparse(tmp_path, qemu_img):
    size = 64 * MiB
    src = make_sparse(tmp_path / "s.raw", size, [
        (0, MiB, "data"), (MiB, 2 * MiB, "zero"), (8 * MiB, 3 * MiB + 4096, "data"),
        (20 * MiB, 4096, "zero"), (40 * MiB + 512, 1000, 7)])
    dst = tmp_path / "d.raw"
    run_blkjobs("convert", src, dst, check=True)
    assert qemu_compare(src, dst)[0] == 0
    _same_bytes(src, dst)
    # Only the data blocks are allocated: 1 MiB + 3 MiB+4K + one 4K block for 1000 bytes
    # at a 512-offset crossing no 4K boundary -> at most 2 blocks.
    data = MiB + 3 * MiB + 4096
    assert data <= blocks(dst) <= data + 2 * 4096
    assert blocks(dst) < blocks(src)   # the zeroes written as data became holes


def test_huge_sparse_with_data_at_end(tmp_path, qemu_img):
    size = 1 << 40   # 1 TiB, nearly all hole
    src = make_sparse(tmp_path / "s.raw", size, [(size - 3 * 4096 - 17, 3 * 4096 + 17, "data")])
    dst = tmp_path / "d.raw"
    p = run_blkjobs("convert", src, dst)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(dst) == size
    assert blocks(dst) <= 5 * 4096
    with open(src, "rb") as a, open(dst, "rb") as b:
        a.seek(size - 20000)
        b.seek(size - 20000)
        assert a.read() == b.read()
    assert qemu_compare(src, dst)[0] == 0


def test_sparse_size_zero_allocates_everything(tmp_path, qemu_img):
    src = make_sparse(tmp_path / "s.raw", 4 * MiB, [(MiB, 4096, "data")])
    dst = tmp_path / "d.raw"
    run_blkjobs("convert", "-S", "0", src, dst, check=True)
    assert blocks(dst) >= 4 * MiB
    assert qemu_compare(src, dst)[0] == 0


def test_existing_target_n(tmp_path, qemu_img):
    src = make_sparse(tmp_path / "s.raw", 8 * MiB, [(0, MiB, "data"), (4 * MiB, MiB, "zero")])
    dst = tmp_path / "d.raw"
    dst.write_bytes(b"\xff" * (8 * MiB))     # garbage that must be overwritten by zeroes
    run_blkjobs("convert", "-n", src, dst, check=True)
    assert qemu_compare(src, dst)[0] == 0
    _same_bytes(src, dst)


def test_target_is_zero_skips_zero_writes(tmp_path):
    src = make_sparse(tmp_path / "s.raw", 8 * MiB, [(0, MiB, "data")])
    dst = tmp_path / "d.raw"
    dst.write_bytes(b"\xff" * (8 * MiB))
    # The user promises zeroes; we trust it, so the 0xff bytes past 1 MiB stay.
    run_blkjobs("convert", "-n", "--target-is-zero", src, dst, check=True)
    data = dst.read_bytes()
    assert data[:MiB] == src.read_bytes()[:MiB]
    assert data[MiB:] == b"\xff" * (7 * MiB)


def test_n_onto_smaller_target_refused(tmp_path):
    src = make_sparse(tmp_path / "s.raw", 8 * MiB, [(0, MiB, "data")])
    dst = tmp_path / "d.raw"
    dst.write_bytes(b"x" * MiB)
    p = run_blkjobs("convert", "-n", src, dst)
    assert p.returncode == 1
    assert p.stderr == (f"blkjobs: target '{dst}' is smaller than the source "
                        f"({MiB} < {8 * MiB} bytes)\n")
    assert dst.read_bytes() == b"x" * MiB


@pytest.mark.parametrize("args,message", [
    (["convert", "{missing}", "{dst}"], "blkjobs: Could not open '{missing}': Could not open '{missing}': No such file or directory\n"),
    (["convert", "{dir}", "{dst}"], "blkjobs: Could not open '{dir}': Is a directory\n"),
    (["convert", "{src}", "{src}"], "blkjobs: source and target are the same file: '{src}'\n"),
    (["convert", "-S", "100", "{src}", "{dst}"],
     "blkjobs: Invalid buffer size for sparse output specified. Valid sizes are multiples of "
     "512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).\n"),
    (["convert", "-r", "fast", "{src}", "{dst}"],
     "blkjobs: Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
     "blkjobs: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"),
    (["convert", "-m", "0", "{src}", "{dst}"],
     "blkjobs: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16\n"),
    (["convert", "-O", "vmdk", "{src}", "{dst}"], "blkjobs: unsupported target format 'vmdk' (supported: raw, qcow2, luks)\n"),
    (["convert", "--target-is-zero", "{src}", "{dst}"],
     "blkjobs: --target-is-zero requires use of -n flag\n"),
])
def test_bad_input_one_line(tmp_path, args, message):
    src = tmp_path / "s.raw"
    src.write_bytes(b"abc" * 1000)
    before = src.read_bytes()
    names = {"missing": tmp_path / "nope", "dir": tmp_path, "dst": tmp_path / "d.raw", "src": src}
    p = run_blkjobs(*[a.format(**names) for a in args])
    assert p.returncode == 1
    assert p.stderr == message.format(**names)
    assert src.read_bytes() == before


def test_source_given_as_target_through_symlink(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(b"precious" * 512)
    link = tmp_path / "link.raw"
    link.symlink_to(src)
    p = run_blkjobs("convert", src, link)
    assert p.returncode == 1
    assert "same file" in p.stderr
    assert src.read_bytes() == b"precious" * 512




def test_enospc_one_line_target_removed(tmp_path, small_tmpfs):
    src = make_sparse(tmp_path / "s.raw", 16 * MiB, [(0, 8 * MiB, "data")])
    before = src.read_bytes()
    dst = small_tmpfs / "d.raw"
    p = run_blkjobs("convert", src, dst)
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"blkjobs: error writing target '{dst}' at offset ")
    assert lines[0].endswith(": No space left on device (the incomplete target was removed)")
    assert not dst.exists()
    assert src.read_bytes() == before


def test_enospc_existing_target_said(tmp_path, small_tmpfs):
    src = make_sparse(tmp_path / "s.raw", 16 * MiB, [(0, 8 * MiB, "data")])
    dst = small_tmpfs / "d.raw"
    with open(dst, "wb") as f:
        f.truncate(16 * MiB)
    p = run_blkjobs("convert", "-n", src, dst)
    assert p.returncode == 1
    assert p.stderr.endswith(": No space left on device (the target was left partially written)\n")
    assert dst.exists()


def test_progress_json_counts_to_total(tmp_path):
    import json
    src = make_sparse(tmp_path / "s.raw", 32 * MiB, [(0, 4 * MiB, "data")])
    p = run_blkjobs("convert", "--progress-json", src, tmp_path / "d.raw", check=True)
    recs = [json.loads(line) for line in p.stderr.splitlines()]
    assert recs[-1]["final"] is True
    assert recs[-1]["done"] == recs[-1]["total"] == 32 * MiB
    dones = [r["done"] for r in recs]
    assert dones == sorted(dones)


def test_human_progress_line(tmp_path):
    src = make_sparse(tmp_path / "s.raw", 4 * MiB, [(0, MiB, "data")])
    p = run_blkjobs("convert", "-p", src, tmp_path / "d.raw", check=True)
    # on stdout as qemu-img's; plain lines when stdout is not a terminal
    final = p.stdout.splitlines()[-1]
    assert final.startswith("(100.00/100%) 4 MiB of 4 MiB, ")
    assert p.stdout.endswith("\n") and p.stderr == ""
