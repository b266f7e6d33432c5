"""The command line over qcow2 and backing chains, with qemu-img as the
oracle: every qcow2 we write is ``qemu-img check`` clean and ``qemu-img
compare`` equal to its source; info/map/check JSON equal qemu-img's on the
same image; exit codes and error lines are qemu-img's."""
from __future__ import annotations

import json
import os
import struct

import pytest

from conftest import make_sparse, run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_info, qemu_io, qemu_map

MiB = 1 << 20
SIZE = 24 * MiB
LAYOUT = [(0, MiB, "data"), (MiB, 2 * MiB, "zero"), (5 * MiB + 512, 70000, "data"),
          (9 * MiB, 3 * MiB, "data"), (16 * MiB - 4096, 8192, 0x5a), (SIZE - 4096, 4096, "data")]


def same(a, b, fa=None, fb=None):
    args = ["compare"] + (["-f", fa] if fa else []) + (["-F", fb] if fb else []) + [a, b]
    p = qemu_img(*args, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def src_raw(tmp_path):
    return make_sparse(tmp_path / "src.raw", SIZE, LAYOUT)


@pytest.fixture
def chain3(tmp_path):
    """base (raw-ish data) <- mid <- top, written by qemu-io; plus its flat copy."""
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, SIZE)
    qemu_io(base, "write -P 1 0 4M", "write -P 7 10M 2M", "write -z 20M 1M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io(mid, "write -P 2 1M 2M", "write -z 10M 64k", "write -c 16M 64k")
    qemu_img("create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 3 3M 1536k", "write -P 9 22M 4k")
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", top, flat)
    return top, flat


# -- convert -------------------------------------------------------------------
@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=64k", "cluster_size=2M",
                                  "cluster_size=64k,extended_l2=on", "compat=0.10"])
def test_convert_raw_qcow2_raw(tmp_path, src_raw, opts):
    q = tmp_path / "t.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-o", opts, src_raw, q, check=True)
    check_clean(q)
    same(src_raw, q)
    # qcow2 -> qcow2 with other clusters, and back to raw
    q2 = tmp_path / "t2.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-o", "cluster_size=16k", q, q2, check=True)
    check_clean(q2)
    same(src_raw, q2)
    r = tmp_path / "back.raw"
    run_blkjobs("convert", "-O", "raw", q2, r, check=True)
    assert r.read_bytes() == src_raw.read_bytes()
    info = qemu_info(q)
    assert info["virtual-size"] == SIZE
    # holes of the source stay unallocated in the target: less than half of
    # it allocated, or with big clusters no more than qemu-img's convert
    # (which writes its metadata clusters whole: 6 MiB of 2 MiB clusters)
    qemu_img("convert", "-O", "qcow2", "-o", opts, src_raw, tmp_path / "q.qcow2")
    assert info["actual-size"] <= max(SIZE // 2, qemu_info(tmp_path / "q.qcow2")["actual-size"])


def test_convert_allocation_like_qemu_img(tmp_path, src_raw):
    """Holes and zeroes written as data end up unallocated, as with qemu-img
    convert: the maps agree except for host offsets."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run_blkjobs("convert", "-O", "qcow2", src_raw, ours, check=True)
    qemu_img("convert", "-O", "qcow2", src_raw, theirs)
    strip = lambda m: [{k: v for k, v in e.items() if k != "offset"} for e in m]  # noqa: E731
    assert strip(qemu_map(ours)) == strip(qemu_map(theirs))
    a = json.loads(qemu_img("check", "--output", "json", ours).stdout)
    b = json.loads(qemu_img("check", "--output", "json", theirs).stdout)
    assert a["allocated-clusters"] == b["allocated-clusters"]


def test_convert_odd_size_to_qcow2(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(os.urandom(MiB + 1234))
    q = tmp_path / "t.qcow2"
    run_blkjobs("convert", "-O", "qcow2", src, q, check=True)
    check_clean(q)
    assert qemu_info(q)["virtual-size"] == MiB + 1536     # rounded up to 512 like qemu-img
    back = tmp_path / "b.raw"
    qemu_img("convert", "-O", "raw", q, back)
    assert back.read_bytes()[:MiB + 1234] == src.read_bytes()


def test_convert_chain_flattened(tmp_path, chain3):
    top, flat = chain3
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        run_blkjobs("convert", "-O", fmt, top, out, check=True)
        if fmt == "qcow2":
            check_clean(out)
            assert "backing-filename" not in qemu_info(out)
        same(flat, out, "raw", fmt)


def test_convert_compressed(tmp_path, chain3):
    top, flat = chain3
    out = tmp_path / "c.qcow2"
    run_blkjobs("convert", "-c", "-O", "qcow2", top, out, check=True)
    check_clean(out)
    same(flat, out, "raw", "qcow2")
    res = json.loads(qemu_img("check", "--output", "json", out).stdout)
    assert res["compressed-clusters"] > 0     # the -P patterns compress well


def test_convert_B_same_backing_copies_top_only(tmp_path, chain3):
    top, flat = chain3
    out = tmp_path / "o.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", top, out, check=True)
    check_clean(out)
    info = qemu_info(out)
    assert info["backing-filename"] == "mid.qcow2"
    same(flat, out, "raw", "qcow2")
    depth0 = sum(e["length"] for e in qemu_map(out) if e["depth"] == 0 and e["data"])
    assert depth0 == 1536 * 1024 + 64 * 1024     # top's own writes (4k rounded to a cluster)


def test_convert_B_other_image_copies_differences(tmp_path, chain3):
    top, flat = chain3
    base = tmp_path / "base.qcow2"
    out = tmp_path / "o.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-B", base.name, "-F", "qcow2", top, out, check=True)
    check_clean(out)
    same(flat, out, "raw", "qcow2")
    m = qemu_map(out)
    # 0..1M is base's data unchanged: not copied
    assert m[0]["depth"] == 1 and m[0]["length"] >= MiB


def test_convert_n_into_existing_qcow2(tmp_path, src_raw):
    q = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", q, SIZE)
    qemu_io(q, "write -P 0xff 0 24M")
    run_blkjobs("convert", "-n", "-O", "qcow2", src_raw, q, check=True)
    check_clean(q)
    same(src_raw, q, "raw", "qcow2")


def test_convert_qcow2_errors(tmp_path, src_raw):
    q = tmp_path / "t.qcow2"
    p = run_blkjobs("convert", "-O", "qcow2", "-o", "cluster_size=3000", src_raw, q)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert "cluster size must be a power of two" in p.stderr
    p = run_blkjobs("convert", "-O", "qcow2", "-o", "bogus=1", src_raw, q)
    assert p.stderr == "blkjobs: Invalid parameter 'bogus'\n"
    p = run_blkjobs("convert", "-c", src_raw, tmp_path / "x.raw")
    assert p.returncode == 1 and "Compression not supported" in p.stderr
    p = run_blkjobs("convert", "-O", "qcow2", "-B", "nope.qcow2", src_raw, q)
    assert (p.returncode, p.stderr) == (
        1, "blkjobs: Use of backing file requires explicit backing format\n")
    p = run_blkjobs("convert", "-O", "qcow2", "-B", "nope.qcow2", "-F", "qcow2", src_raw, q)
    assert (p.returncode, p.stderr) == (      # qemu-img's text (iotests 082)
        1, f"blkjobs: Could not open '{q}': Could not open backing file: "
        f"Could not open '{tmp_path}/nope.qcow2': No such file or directory\n")
    assert not q.exists()
    # a broken qcow2 source: one line, target removed, source untouched
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", bad, SIZE)
    qemu_io(bad, "write -P 1 0 64k")
    raw = bytearray(bad.read_bytes())
    struct.pack_into(">Q", raw, 0x40000, 0x8000000000000000 | (1 << 40))  # L2 entry past EOF
    bad.write_bytes(raw)
    before = bad.read_bytes()
    p = run_blkjobs("convert", "-O", "qcow2", bad, q)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    assert not q.exists()
    assert bad.read_bytes() == before


# -- info / map / check --------------------------------------------------------
def _ours(*args):
    p = run_blkjobs(*args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_info_map_json_equal_qemu(tmp_path, chain3, src_raw):
    top, _ = chain3
    ours_q = tmp_path / "ours.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-o", "cluster_size=64k,extended_l2=on", top, ours_q,
                check=True)
    for img in (top, tmp_path / "mid.qcow2", ours_q, src_raw):
        assert _ours("info", "--output", "json", img) == qemu_info(img)
        assert _ours("map", "--output", "json", img) == qemu_map(img)
        # human output byte for byte
        for cmd in (["info"], ["map"]):
            a = run_blkjobs(*cmd, img)
            b = qemu_img(*cmd, img, check=False)
            if b.returncode == 0:
                assert a.stdout == b.stdout
    chain = json.loads(qemu_img("info", "--backing-chain", "--output", "json", top).stdout)
    assert _ours("info", "--backing-chain", "--output", "json", top) == chain
    assert run_blkjobs("info", "--backing-chain", top).stdout == \
        qemu_img("info", "--backing-chain", top).stdout


def _set_refcount(path, cluster, value):
    """16-bit refcounts, first refcount block at 0x20000 (qemu-img create layout)."""
    with open(path, "r+b") as f:
        f.seek(0x20000 + 2 * cluster)
        f.write(struct.pack(">H", value))


def _check_both(img, *extra):
    a = run_blkjobs("check", *extra, "--output", "json", img)
    b = qemu_img("check", *extra, "--output", "json", img, check=False)
    return a, b


def test_check_exit_codes_and_json(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    qemu_io(img, "write -P 1 0 128k", "write -c 1M 64k")
    a, b = _check_both(img)
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert run_blkjobs("check", img).stdout == qemu_img("check", img).stdout

    leak = tmp_path / "leak.qcow2"
    leak.write_bytes(img.read_bytes())
    _set_refcount(leak, 0, 2)
    a, b = _check_both(leak)
    assert a.returncode == b.returncode == 3
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert "Leaked cluster 0 refcount=2 reference=1" in a.stderr
    h = run_blkjobs("check", leak)
    assert h.stdout == qemu_img("check", leak, check=False).stdout

    corrupt = tmp_path / "bad.qcow2"
    corrupt.write_bytes(img.read_bytes())
    data_cluster = qemu_map(img)[0]["offset"] // 65536
    _set_refcount(corrupt, data_cluster, 0)
    a, b = _check_both(corrupt)
    assert a.returncode == b.returncode == 2
    assert json.loads(a.stdout) == json.loads(b.stdout)

    # -r leaks repairs, like qemu-img (exit status of the re-check)
    fixed = tmp_path / "fixed.qcow2"
    fixed.write_bytes(leak.read_bytes())
    a = run_blkjobs("check", "-r", "leaks", "--output", "json", fixed)
    assert a.returncode == 0 and json.loads(a.stdout)["leaks-fixed"] == 1
    check_clean(fixed)

    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    p = run_blkjobs("check", raw)
    assert p.returncode == 63 == qemu_img("check", raw, check=False).returncode
    assert p.stderr == "blkjobs: This image format does not support checks\n"


# -- compare -------------------------------------------------------------------
def test_compare_across_formats(tmp_path, chain3):
    top, flat = chain3
    q = tmp_path / "flat.qcow2"
    qemu_img("convert", "-O", "qcow2", flat, q)
    assert run_blkjobs("compare", top, flat).returncode == 0
    assert run_blkjobs("compare", q, top).returncode == 0
    other = tmp_path / "other.raw"
    other.write_bytes(flat.read_bytes())
    with open(other, "r+b") as f:
        f.seek(22 * MiB + 100)
        f.write(b"X")
    p = run_blkjobs("compare", top, other)
    assert p.returncode == 1
    assert p.stdout == qemu_img("compare", top, other, check=False).stdout
    assert p.stdout == f"Content mismatch at offset {22 * MiB}!\n"
    p = run_blkjobs("compare", top, tmp_path / "missing")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1
    p = run_blkjobs("compare", "-s", q, flat)
    assert p.returncode == qemu_img("compare", "-s", q, flat, check=False).returncode


# -- create / rebase -------------------------------------------------------------
def test_create_matches_qemu(tmp_path):
    ours, theirs = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    p = run_blkjobs("create", "-f", "qcow2", "-o", "cluster_size=128k", ours, "64M")
    q = qemu_img("create", "-f", "qcow2", "-o", "cluster_size=128k", theirs, "64M")
    assert p.stdout.replace("a.qcow2", "b.qcow2") == q.stdout
    check_clean(ours)
    i1, i2 = qemu_info(ours), qemu_info(theirs)
    for k in ("filename", "actual-size"):    # qemu-img writes its metadata differently
        i1.pop(k), i2.pop(k)
    assert i1 == i2
    ov = tmp_path / "ov.qcow2"
    p = run_blkjobs("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", ov)
    assert p.returncode == 0, p.stderr
    assert qemu_info(ov)["virtual-size"] == 64 * MiB
    p = run_blkjobs("create", "-f", "qcow2", "-b", "a.qcow2", tmp_path / "x.qcow2")
    assert p.returncode == 1 and "without backing format" in p.stderr
    p = run_blkjobs("create", "-f", "raw", tmp_path / "r.raw", "1M")
    assert p.stdout == f"Formatting '{tmp_path / 'r.raw'}', fmt=raw size=1048576\n"


def test_rebase_safe_and_unsafe(tmp_path, chain3):
    top, flat = chain3
    base = tmp_path / "base.qcow2"
    safe = tmp_path / "top.qcow2"
    p = run_blkjobs("rebase", "-b", base.name, "-F", "qcow2", safe)
    assert p.returncode == 0, p.stderr
    check_clean(safe)
    same(flat, safe, "raw", "qcow2")            # guest view unchanged
    assert qemu_info(safe)["backing-filename"] == "base.qcow2"
    # standalone
    run_blkjobs("rebase", "-b", "", safe, check=True)
    check_clean(safe)
    same(flat, safe, "raw", "qcow2")
    assert "backing-filename" not in qemu_info(safe)
    # -u: header only, the guest view changes (mid's data is gone)
    top2 = tmp_path / "top2.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top2)
    run_blkjobs("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top2, check=True)
    check_clean(top2)
    assert qemu_info(top2)["backing-filename"] == "base.qcow2"
    assert qemu_img("compare", base, top2, check=False).returncode == 0
    p = run_blkjobs("rebase", "-b", "missing.qcow2", "-F", "qcow2", top2)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    p = run_blkjobs("rebase", "-b", "base.qcow2", flat)
    assert p.returncode == 1 and "only qcow2" in p.stderr


def test_convert_B_and_c_with_other_cluster_layouts(tmp_path, chain3):
    top, flat = chain3
    for opts in ("cluster_size=2M", "cluster_size=32k,extended_l2=on", "cluster_size=512"):
        out = tmp_path / "o.qcow2"
        run_blkjobs("convert", "-O", "qcow2", "-o", opts, "-B", "mid.qcow2", "-F", "qcow2",
                    top, out, check=True)
        check_clean(out)
        same(flat, out, "raw", "qcow2")
        out.unlink()
        run_blkjobs("convert", "-c", "-O", "qcow2", "-o", opts, top, out, check=True)
        check_clean(out)
        same(flat, out, "raw", "qcow2")
        out.unlink()




def test_convert_qcow2_enospc_one_line_target_removed(tmp_path, chain3, small_tmpfs):
    top, _ = chain3
    before = top.read_bytes()
    dst = small_tmpfs / "d.qcow2"
    p = run_blkjobs("convert", "-O", "qcow2", top, dst)
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"blkjobs: error writing target '{dst}' at offset ")
    assert lines[0].endswith(": No space left on device (the incomplete target was removed)")
    assert not dst.exists()
    assert top.read_bytes() == before


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_compare_small_and_large_images_as_qemu_img(tmp_path, fmt):
    """compare's read buffers are as large as the larger image when that is
    under 4 MiB: differences, and data past the shorter image's end, are
    still found at qemu-img's offsets, for images smaller and larger than
    the buffers and of sizes that are no multiple of anything."""
    cases = [(3 << 20, 3 << 20, [("a", "write -P 1 0 64k"), ("b", "write -P 1 0 64k"),
                                 ("b", "write -P 2 3000k 1k")]),
             (5 << 20, 5 << 20, [("a", "write -P 3 4092k 8k"), ("b", "write -P 3 4092k 8k"),
                                 ("b", "write -P 4 5119k 1k")]),
             (1 << 20, 2 << 20, [("a", "write -P 5 0 4k"), ("b", "write -P 5 0 4k"),
                                 ("b", "write -P 6 1536k 4k")]),
             (8192, 12288, [("b", "write -P 7 8192 512")]),
             (0, 4096, [])]
    for i, (sa, sb, writes) in enumerate(cases):
        a, b = tmp_path / f"a{i}.{fmt}", tmp_path / f"b{i}.{fmt}"
        qemu_img("create", "-f", fmt, a, str(sa))
        qemu_img("create", "-f", fmt, b, str(sb))
        for side, cmd in writes:
            qemu_io(a if side == "a" else b, cmd, fmt=fmt)
        for args in ([a, b], [b, a]):
            want = qemu_img("compare", *args, check=False)
            got = run_blkjobs("compare", *args)
            assert (got.returncode, got.stdout) == (want.returncode, want.stdout), (i, args)
