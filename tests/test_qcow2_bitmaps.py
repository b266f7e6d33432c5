"""qcow2 persistent dirty bitmaps against qemu-img, qemu-io and
qemu-storage-daemon: read bit for bit what QEMU wrote, write what QEMU reads,
and ``blkjobs bitmap`` with qemu-img bitmap's semantics and texts."""
from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess

import pytest

from blkjobs.cli.main import main as cli_main
from blkjobs.formats.qcow2 import Qcow2
from conftest import BLKJOBS, run_blkjobs, run_blkjobs_in_process
from daemon_util import connect, start_qsd
from qemu_oracle import check_clean, qemu_img, qemu_info, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (the fixture)

GRANULARITIES = [1 << b for b in range(9, 32)]          # 512 B .. 2 GiB: the spec's range
SIZE = 64 * 1024 * 1024 + 3 * 4096 + 512               # a partial last granule for most


def new_image(path, size=SIZE, cluster_size="64k"):
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    return path


def expected_bits(size, gran, writes) -> bytes:
    """Serialized bitmap (qcow2 order: byte k, bit j LSB first = granule
    8k+j) with every granule a write touches set."""
    n = -(-size // gran)
    out = bytearray(-(-n // 8))
    for off, ln in writes:
        for g in range(off // gran, (off + ln - 1) // gran + 1):
            out[g // 8] |= 1 << (g % 8)
    return bytes(out)


def read_bitmaps(path) -> dict:
    """name -> (granularity, flags, serialized bits or None if in use)."""
    d = Qcow2(str(path))
    try:
        pbm = d.persistent_bitmaps
        return {b.name: (b.granularity, b.flags(),
                         None if b.in_use else bytes(pbm.load(b).to_bytes())) for b in pbm}
    finally:
        d.close()


def info_bitmaps(path):
    return qemu_info(path)["format-specific"]["data"].get("bitmaps", [])


def random_writes(seed, size, n=12):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        ln = rnd.choice([1, 512, 4096, 65536, 300000])
        off = rnd.randrange(0, size - ln)
        out.append((off, ln))
    out.append((size - 1, 1))              # the last byte: the partial last granule
    return out


# ---------------------------------------------------------------------------
# reading what QEMU wrote

@pytest.mark.parametrize("gran", GRANULARITIES)
def test_qemu_io_dirtied_bitmap_reads_bit_for_bit(tmp_path, gran):
    img = new_image(tmp_path / "a.qcow2")
    qemu_img("bitmap", "--add", "-g", gran, img, "b")
    qemu_img("bitmap", "--add", "-g", gran, "--disable", img, "off")
    writes = random_writes(gran, SIZE)
    qemu_io(img, *[f"write -P 0x5a {o} {n}" for o, n in writes])
    got = read_bitmaps(img)
    assert got["b"] == (gran, ["auto"], expected_bits(SIZE, gran, writes))
    assert got["off"] == (gran, [], expected_bits(SIZE, gran, []))


def test_bit_order_is_lsb_first(tmp_path):
    img = new_image(tmp_path / "a.qcow2", 8 << 20)
    qemu_img("bitmap", "--add", "-g", "64k", img, "b")
    qemu_io(img, "write 0 1k", "write 1M 64k", "write 3M 1")
    bits = read_bitmaps(img)["b"][2]
    # granule 0 -> byte 0 bit 0, granule 16 -> byte 2 bit 0, granule 48 -> byte 6 bit 0
    assert bits == bytes([1, 0, 1, 0, 0, 0, 1]) + bytes(len(bits) - 7)


# ---------------------------------------------------------------------------
# writing what QEMU reads

def _dirty_with_blkjobs(img, writes):
    d = Qcow2(str(img), read_only=False)
    try:
        for off, ln in writes:
            d.write(off, b"\xa5" * ln)
    finally:
        d.close()


@pytest.mark.parametrize("gran", GRANULARITIES)
def test_blkjobs_bitmap_read_by_qemu(tmp_path, gran):
    """Added and dirtied by blkjobs: qemu-img lists it, check is clean,
    qemu-img merges its bits into its own bitmap and convert --bitmaps
    copies them; both read back equal to what blkjobs meant."""
    img = new_image(tmp_path / "a.qcow2")
    assert run_blkjobs("bitmap", "--add", "-g", gran, img, "b").returncode == 0
    writes = random_writes(gran + 1, SIZE)
    _dirty_with_blkjobs(img, writes)
    want = expected_bits(SIZE, gran, writes)
    assert read_bitmaps(img)["b"] == (gran, ["auto"], want)
    check_clean(img)
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": gran}]
    # qemu-img reads our bits: merged into a bitmap of its own...
    qemu_img("bitmap", "--add", "-g", gran, "--disable", img, "q")
    qemu_img("bitmap", "--merge", "b", img, "q")
    assert read_bitmaps(img)["q"] == (gran, [], want)
    check_clean(img)
    # ... and copied by convert --bitmaps
    out = tmp_path / "out.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", img, out)
    got = read_bitmaps(out)
    assert got["b"][2] == want and got["b"][0] == gran
    check_clean(out)


def test_every_granularity_in_one_image(tmp_path):
    img = new_image(tmp_path / "a.qcow2")
    for g in GRANULARITIES:
        assert run_blkjobs("bitmap", "--add", "-g", g, img, f"g{g}").returncode == 0
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": f"g{g}", "granularity": g}
                                 for g in GRANULARITIES]
    check_clean(img)
    qemu_io(img, "write 100k 1")
    for name, (g, _flags, bits) in read_bitmaps(img).items():
        assert bits == expected_bits(SIZE, g, [(100 * 1024, 1)]), name


@pytest.mark.slow
def test_names_at_the_length_limit_and_many_bitmaps(tmp_path, capsys):
    """84 bitmap commands on one image: the first add and the last remove
    as real processes, the others through the command line's main() in this
    process (what is checked is the image each leaves, not the process: 84
    interpreter start-ups were most of this test's CPU)."""
    img = new_image(tmp_path / "a.qcow2", 4 << 20)
    long = "n" * 1023
    names = [long, "é" * 300] + [f"bm{i}" for i in range(40)]   # 'é' is 2 bytes: 600

    def bitmap(*args) -> None:
        assert cli_main(["bitmap", *map(str, args)]) == 0
        assert capsys.readouterr() == ("", "")

    assert run_blkjobs("bitmap", "--add", img, names[0]).returncode == 0
    for n in names[1:]:
        bitmap("--add", img, n)
    assert [b["name"] for b in info_bitmaps(img)] == names
    check_clean(img)
    assert list(read_bitmaps(img)) == names
    # removing some keeps the others, check stays clean (no leaks of tables)
    for n in names[2::3]:
        bitmap("--remove", img, n)
    left = [n for n in names if n not in names[2::3]]
    assert [b["name"] for b in info_bitmaps(img)] == left
    check_clean(img)
    for n in left[:-1]:
        bitmap("--remove", img, n)
    assert run_blkjobs("bitmap", "--remove", img, left[-1]).returncode == 0
    assert "bitmaps" not in qemu_info(img)["format-specific"]["data"]
    check_clean(img)


# ---------------------------------------------------------------------------
# the same operations through qemu-img and blkjobs

SEQUENCES = [
    [["--add"], "b0"],
    [["--add", "-g", "4k", "--disable"], "b1"],
    [["--merge", "b0"], "b1"],
    [["--clear"], "b0"],
    [["--disable"], "b0"],
    [["--enable"], "b1"],
    [["--add", "-g", "512", "--merge", "b1", "--disable"], "b2"],
    [["--remove"], "b1"],
    [["--add", "--merge", "nope"], "m1"],          # fails after the add: the add stays
    [["--add", "--remove", "--add", "-g", "1M"], "m2"],
    [["--clear", "--enable", "--disable", "--enable"], "b0"],
]


def test_operations_match_qemu_img(tmp_path):
    """SEQUENCES' steps one after another on an image of each; after every
    step (and the write that follows it) the same results so far, the same
    bitmaps and ours clean. (One case per step replayed the steps before
    it: 66 steps' processes for the 11 states checked here.)"""
    imgs = {}
    for who in ("qemu", "ours"):
        img = new_image(tmp_path / f"{who}.qcow2")
        qemu_io(img, "write 0 1")        # no bitmaps yet: nothing recorded
        imgs[who] = img
    results = {"qemu": [], "ours": []}
    for i, (opts, name) in enumerate(SEQUENCES):
        for who, img in imgs.items():
            if who == "qemu":
                p = qemu_img("bitmap", *opts, img, name, check=False)
                err = p.stderr
            else:
                p = run_blkjobs("bitmap", *opts, img, name)
                err = p.stderr.replace("blkjobs: ", "qemu-img: ")
            results[who].append((p.returncode, err))
            qemu_io(img, f"write {i * 3}M 70k")      # dirties the enabled bitmaps
        assert results["ours"] == results["qemu"], i
        assert info_bitmaps(imgs["ours"]) == info_bitmaps(imgs["qemu"]), i
        assert read_bitmaps(imgs["ours"]) == read_bitmaps(imgs["qemu"]), i
        check_clean(imgs["ours"])


def test_merge_from_another_file_and_size_mismatch(tmp_path):
    texts = {}
    for who in ("qemu", "ours"):
        d = tmp_path / who
        d.mkdir()
        img, src, big = new_image(d / "a.qcow2"), new_image(d / "s.qcow2"), new_image(d / "big.qcow2", SIZE * 2)
        for p in (src, big):
            qemu_img("bitmap", "--add", "-g", "8k", p, "s")
            qemu_io(p, "write 5M 100k")
        args = [["--add", "--merge", "s", "-b", src, "-F", "qcow2"],
                ["--merge", "s", "-b", big], ["--merge", "nope", "-b", src]]
        out = []
        for a in args:
            if who == "qemu":
                p = qemu_img("bitmap", *a, img, "t", check=False)
                out.append((p.returncode, p.stderr))
            else:
                p = run_blkjobs("bitmap", *a, img, "t")
                out.append((p.returncode, p.stderr.replace("blkjobs: ", "qemu-img: ")))
        texts[who] = (out, read_bitmaps(img))
        check_clean(img)
    assert texts["ours"] == texts["qemu"]
    assert texts["ours"][1]["t"][2] == expected_bits(SIZE, 65536, [(5 << 20, 100 * 1024)])


# ---------------------------------------------------------------------------
# error texts and exit codes

ERROR_CASES = [
    ["a.qcow2", "b0"],
    ["--add", "a.qcow2"],
    ["--add", "a.qcow2", "b0", "extra"],
    ["--add", "a.qcow2", "b0"],                 # exists
    ["--remove", "a.qcow2", "nope"],
    ["--clear", "a.qcow2", "nope"],
    ["--enable", "a.qcow2", "nope"],
    ["--disable", "a.qcow2", "nope"],
    ["--merge", "nope", "a.qcow2", "b0"],
    ["--merge", "b0", "a.qcow2", "nope"],
    ["--add", "-g", "256", "a.qcow2", "x"],
    ["--add", "-g", "3000", "a.qcow2", "x"],
    ["--add", "-g", "4G", "a.qcow2", "x"],
    ["--add", "-g", "abc", "a.qcow2", "x"],
    ["--remove", "-g", "512", "a.qcow2", "b0"],
    ["-b", "a.qcow2", "--add", "a.qcow2", "z"],
    ["-F", "qcow2", "--add", "a.qcow2", "z"],
    ["--add", "a.qcow2", ""],
    ["--add", "a.qcow2", "n" * 1024],
    ["--add", "r.raw", "b0"],
    ["-f", "raw", "--add", "r.raw", "b0"],
    ["-f", "raw", "--remove", "r.raw", "b0"],
    ["-f", "raw", "--merge", "x", "r.raw", "b0"],
    ["--add", "-g", "2G", "--add", "a.qcow2", "ok"],
]


def _norm(text: str) -> str:
    text = re.sub(r"#block\d+", "#blockN", text)
    # qemu-img's warning about probing raw: a qemu-img-only extra
    return re.sub(r"WARNING: Image format was not specified.*?restrictions\.\n", "", text,
                  flags=re.S)


@pytest.mark.parametrize("argv", ERROR_CASES, ids=[" ".join(a)[:40] for a in ERROR_CASES])
def test_error_texts_and_exit_codes_match_qemu_img(tmp_path, argv, capsys):
    """Ours: the first case as a real process, the others in-process."""
    res = {}
    for who in ("qemu", "ours"):
        d = tmp_path / who
        d.mkdir()
        new_image(d / "a.qcow2", 10 << 20)
        qemu_img("bitmap", "--add", d / "a.qcow2", "b0")
        qemu_img("create", "-q", "-f", "raw", d / "r.raw", "1M")
        if who == "qemu":
            p = subprocess.run([shutil.which("qemu-img"), "bitmap", *argv], cwd=d,
                               capture_output=True, text=True)
            err = p.stderr
        elif argv == ERROR_CASES[0]:
            p = subprocess.run([*BLKJOBS, "bitmap", *argv], cwd=d,
                               capture_output=True, text=True)
            assert "Traceback" not in p.stderr
            err = p.stderr.replace("blkjobs: ", "qemu-img: ")
        else:
            p = run_blkjobs_in_process(capsys, "bitmap", *argv, cwd=d)
            err = p.stderr.replace("blkjobs: ", "qemu-img: ")
        res[who] = (p.returncode, _norm(err), info_bitmaps(d / "a.qcow2"))
    assert res["ours"] == res["qemu"]


# ---------------------------------------------------------------------------
# a bitmap left in use by a crash

def _crash_with_bitmap_in_use(img):
    """qemu-io opens the image (marking the enabled bitmaps in use), writes,
    and is killed by SIGKILL before it can store them."""
    p = subprocess.run([shutil.which("qemu-io"), "-f", "qcow2", "-c", "write 64k 4k",
                        "-c", "sigraise 9", str(img)], capture_output=True, text=True)
    assert p.returncode == -9, p


def test_in_use_bitmap_is_inconsistent_never_used(tmp_path):
    res = {}
    for who in ("qemu", "ours"):
        img = new_image(tmp_path / f"{who}.qcow2", 10 << 20)
        qemu_img("bitmap", "--add", img, "live")
        qemu_img("bitmap", "--add", "--disable", img, "off")
        _crash_with_bitmap_in_use(img)
        tool = ["qemu-img"] if who == "qemu" else BLKJOBS
        out = []
        info = subprocess.run([*tool, "info", "--output", "json", img], capture_output=True,
                              text=True)
        out.append(json.loads(info.stdout)["format-specific"]["data"]["bitmaps"])
        human = subprocess.run([*tool, "info", img], capture_output=True, text=True).stdout
        out.append(human[human.index("Format specific"):])
        chk = subprocess.run([*tool, "check", img], capture_output=True, text=True)
        out.append((chk.returncode, chk.stdout))
        for op in (["--clear"], ["--enable"], ["--disable"], ["--merge", "off"], ["--add"]):
            p = subprocess.run([*tool, "bitmap", *op, img, "live"], capture_output=True,
                               text=True)
            out.append((p.returncode, p.stderr.replace("blkjobs: ", "qemu-img: ")))
        p = subprocess.run([*tool, "bitmap", "--merge", "live", img, "off"],
                           capture_output=True, text=True)
        out.append((p.returncode, p.stderr.replace("blkjobs: ", "qemu-img: ")))
        assert read_bitmaps(img)["live"][2] is None          # never read
        p = subprocess.run([*tool, "bitmap", "--remove", img, "live"], capture_output=True,
                           text=True)
        out.append((p.returncode, p.stderr))
        out.append(info_bitmaps(img))
        check_clean(img)
        res[who] = out
    assert res["ours"] == res["qemu"]
    assert res["ours"][0][0] == {"flags": ["in-use", "auto"], "name": "live",
                                 "granularity": 65536}


def test_writes_mark_bitmaps_in_use_until_close(tmp_path):
    """Every consistent bitmap is flagged in use while the image is written,
    a disabled one too (QEMU flags all it loads when it opens read-write)."""
    img = new_image(tmp_path / "a.qcow2", 10 << 20)
    qemu_img("bitmap", "--add", img, "live")
    qemu_img("bitmap", "--add", "--disable", img, "off")
    d = Qcow2(str(img), read_only=False)
    try:
        d.write(1 << 20, b"x" * 10)
        # on disk meanwhile: what a crash would leave
        seen = json.loads(qemu_img("info", "-U", "--output", "json", img).stdout)
        assert seen["format-specific"]["data"]["bitmaps"] == [
            {"flags": ["in-use", "auto"], "name": "live", "granularity": 65536},
            {"flags": ["in-use"], "name": "off", "granularity": 65536}]
    finally:
        d.close()
    assert info_bitmaps(img)[0]["flags"] == ["auto"]
    assert read_bitmaps(img)["live"][2] == expected_bits(10 << 20, 65536, [(1 << 20, 10)])
    assert read_bitmaps(img)["off"][2] == expected_bits(10 << 20, 65536, [])
    check_clean(img)


# ---------------------------------------------------------------------------
# qemu-storage-daemon loads ours, and we load its

def _qsd_node(path):
    return {"node-name": "disk", "driver": "qcow2",
            "file": {"driver": "file", "filename": str(path)}}


async def _qsd_scenario(sock, img):
    s = await connect(sock)
    try:
        await s.x("blockdev-add", **_qsd_node(img))
        nodes = await s.x("query-named-block-nodes", flat=True)
        seen = [n for n in nodes if n["node-name"] == "disk"][0]["dirty-bitmaps"]
        await s.x("block-dirty-bitmap-add", node="disk", name="qsd", granularity=16384,
                  persistent=True)
        await s.x("block-dirty-bitmap-merge", node="disk", target="qsd", bitmaps=["ours"])
        await s.x("block-dirty-bitmap-disable", node="disk", name="ours")
        await s.x("blockdev-del", **{"node-name": "disk"})
        return sorted((b["name"], b["granularity"], b["count"], b["recording"])
                      for b in seen)
    finally:
        await s.close()


def test_qemu_storage_daemon_loads_ours_and_we_load_its(tmp_path):
    img = new_image(tmp_path / "a.qcow2", 10 << 20)
    assert run_blkjobs("bitmap", "--add", "-g", "4k", img, "ours").returncode == 0
    writes = [(0, 1), (5000, 10000), (9 << 20, 65536)]
    _dirty_with_blkjobs(img, writes)
    daemon = start_qsd(tmp_path)
    try:
        seen = asyncio.run(_qsd_scenario(daemon.sock, img))
    finally:
        assert daemon.stop() == 0, daemon.stderr
    # count: dirty bytes (granules x granularity)
    ours_bits = expected_bits(10 << 20, 4096, writes)
    count = sum(bin(b).count("1") for b in ours_bits) * 4096
    assert seen == [("ours", 4096, count, True)]
    got = read_bitmaps(img)
    assert got["ours"] == (4096, [], ours_bits)
    assert got["qsd"] == (16384, ["auto"], expected_bits(10 << 20, 16384, writes))
    check_clean(img)
    assert run_blkjobs("check", img).returncode == 0


# ---------------------------------------------------------------------------
# Every write path of the jobs dirties the target's persistent bitmaps

def test_mirror_writes_in_place_dirty_the_targets_bitmap(tmp_path):
    """A mirror copies a granule the guest wrote into a target cluster that
    is already allocated in place (the fast path: no allocation): the
    target's persistent bitmap must still get those bits, or a later
    incremental backup of the target misses the data."""
    from blkjobs import Engine
    size = 8 << 20
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    new_image(src, size)
    new_image(dst, size)
    qemu_io(dst, "write -P 0x99 0 8M")              # every cluster allocated (COPIED)
    qemu_img("bitmap", "--add", dst, "live")
    eng = Engine()
    try:
        s = eng.open(str(src), "qcow2", node_name="src")
        eng.open(str(dst), "qcow2", node_name="dst")
        vm = eng.attach(s)
        ev = eng.listen()
        job = eng.mirror("src", "dst", sync="none", job_id="m0")
        ev.wait_for("BLOCK_JOB_READY", timeout=30)
        vm.write(3 << 20, b"\x66" * 4096)      # the first prepares the target for writes
        vm.flush()
        vm.write(5 << 20, b"\x67" * 4096)      # in place
        eng.job_complete("m0")
        assert eng.wait_job(job, 30).value == "completed"
    finally:
        eng.close()
    writes = [(3 << 20, 4096), (5 << 20, 4096)]
    assert read_bitmaps(dst)["live"][2] == expected_bits(size, 65536, writes)
    check_clean(dst)


# ---------------------------------------------------------------------------
# where the bitmaps lie: qemu-img's file, byte for byte

def test_bitmap_sessions_lay_the_file_out_as_qemu_img(twins):
    """iotest 190's steps at a smaller size (2 MiB clusters): each
    `bitmap --add` stores every bitmap anew (the ones on disk were flagged in
    use at open), first-fit, the tables and the directory written as long as
    they are, so the file ends inside its last cluster and `measure` of it
    as raw says what qemu-img's says; then a --remove (at once: a new
    directory, the old one and the bitmap's clusters freed) with a --clear
    and bits set by a write. The files are equal after every step."""
    steps = [("create", "-f", "qcow2", "-o", "cluster_size=2M", "t.qcow2", "32G"),
             ("bitmap", "--add", "--granularity", "512", "-f", "qcow2", "t.qcow2", "b1"),
             ("bitmap", "--add", "-g", "2M", "-f", "qcow2", "t.qcow2", "b2"),
             ("bitmap", "--add", "t.qcow2", "b3")]
    for args in steps:
        same(twins, *args)
        assert [(d / "t.qcow2").read_bytes() for d in twins].count(
            (twins[1] / "t.qcow2").read_bytes()) == 2, args
    for d in twins:
        qemu_io(d / "t.qcow2", "write -P 1 1G 64k", "write -P 2 20G 3M")
    for args in (("bitmap", "--remove", "t.qcow2", "b2"),
                 ("bitmap", "--clear", "t.qcow2", "b3"),
                 ("bitmap", "--add", "-g", "64k", "t.qcow2", "b4")):
        same(twins, *args)
        assert (twins[0] / "t.qcow2").read_bytes() == (twins[1] / "t.qcow2").read_bytes(), args
    same(twins, "measure", "-O", "qcow2", "-f", "raw", "t.qcow2")
    # the directory (3 entries of 32 bytes) ends the file
    assert (twins[0] / "t.qcow2").stat().st_size % (2 << 20) == 96
    for d in twins:
        check_clean(d / "t.qcow2")
