"""``convert -c``: clusters compressed on ``-m`` threads (zlib in the C core,
zstd on a thread pool) and stored in order. The target is what the source
reads (``qemu-img compare``), clean (``qemu-img check``), with compressed
clusters for compressible data, plain ones for incompressible data, none
for zeroes, and the same image whatever the number of threads."""
from __future__ import annotations

import json
import random
import zlib

import pytest

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_map

CS = 65536


def mixed_raw(path, clusters: int, tail: int = 5000, seed: int = 9) -> bytes:
    """Text-like, random and zero clusters, then a short tail (a virtual
    size that is no multiple of the cluster size)."""
    rnd = random.Random(seed)
    words = b"mirror backup stream commit cluster "
    out = bytearray()
    for i in range(clusters):
        k = i % 4
        if k in (0, 1):
            out += (words * (CS // len(words) + 1))[i % 7:i % 7 + CS]
        elif k == 2:
            out += rnd.randbytes(CS)
        else:
            out += bytes(CS)
    out += (words * 200)[:tail]
    path.write_bytes(bytes(out))
    return bytes(out)


def compressed_clusters(path) -> int:
    return json.loads(qemu_img("check", "--output", "json", path).stdout)["compressed-clusters"]


@pytest.mark.parametrize("threads", ["1", "4"])
def test_convert_c_parallel(tmp_path, threads):
    src = tmp_path / "src.raw"
    mixed_raw(src, 150)          # more than one 4 MiB chunk
    out = tmp_path / "o.qcow2"
    run_blkjobs("convert", "-c", "-m", threads, "-O", "qcow2", src, out, check=True)
    check_clean(out)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)
    # 76 text clusters and the tail compress; 37 random ones do not
    assert compressed_clusters(out) == 77
    data = sum(r["length"] for r in qemu_map(out) if r["data"])
    assert data == (76 + 37) * CS + 5120      # the tail: the virtual size is in sectors
    # zero clusters are not allocated
    zero = [r for r in qemu_map(out) if not r["data"]]
    assert sum(r["length"] for r in zero) == 37 * CS


def test_convert_c_same_image_for_any_thread_count(tmp_path):
    src = tmp_path / "src.raw"
    mixed_raw(src, 70, tail=0)
    outs = []
    for m in ("1", "3", "16"):
        out = tmp_path / f"o{m}.qcow2"
        run_blkjobs("convert", "-c", "-m", m, "-O", "qcow2", src, out, check=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_convert_c_zstd(tmp_path):
    src = tmp_path / "src.raw"
    mixed_raw(src, 40, tail=0)
    out = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", out, 40 * CS)
    run_blkjobs("convert", "-n", "-c", "-O", "qcow2", src, out, check=True)
    check_clean(out)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)
    assert compressed_clusters(out) == 20


def test_compressed_backup(tmp_path):
    """A compressed full backup: the same clusters compressed, plain and
    left out as convert -c, the data equal to the source's."""
    from blkjobs.engine import Engine
    raw = tmp_path / "src.raw"
    mixed_raw(raw, 150, tail=0)
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src)
    bk = tmp_path / "bk.qcow2"
    eng = Engine()
    try:
        s = eng.open(str(src), node_name="src")
        eng.create(str(bk), "qcow2", s.size, node_name="bk")
        job = eng.backup("src", "bk", sync="full", compress=True, job_id="b0")
        assert eng.wait_job(job, 60).value == "completed"
    finally:
        eng.close()
    check_clean(bk)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, bk)
    assert compressed_clusters(bk) == 76
    assert sum(r["length"] for r in qemu_map(bk) if r["data"]) == (76 + 37) * CS


# -- issue 15: igzip (ISA-L) and zlib, cluster sizes, QEMU's 4 KiB window ----

KINDS = ("text", "text", "random", "zero")


def kinds_raw(path, cs: int, clusters: int, tail: int = 0, seed: int = 4) -> list[str]:
    """``clusters`` clusters of ``cs`` bytes by KINDS in turn (text-like,
    random, written zeroes), then a text tail of ``tail`` bytes; the kinds."""
    rnd = random.Random(seed)
    words = b"qcow2 cluster deflate window backup "
    kinds, out = [], bytearray()
    for i in range(clusters):
        k = KINDS[i % len(KINDS)]
        kinds.append(k)
        if k == "text":
            out += (words * (cs // len(words) + 2))[i % 11:i % 11 + cs]
        elif k == "random":
            out += rnd.randbytes(cs)
        else:
            out += bytes(cs)
    out += (words * (tail // len(words) + 1))[:tail]
    path.write_bytes(bytes(out))
    return kinds


def strict_inflate(z: bytes, cs: int) -> bytes:
    """Inflate a raw deflate stream with a 4 KiB window, 256 bytes of output
    per call: a match reaching further back than 4 KiB fails (zlib.error)."""
    d = zlib.decompressobj(-12)
    out, buf = bytearray(), z
    while len(out) < cs:
        piece = d.decompress(buf, 256)
        buf = d.unconsumed_tail
        if not piece:
            break
        out += piece
    return bytes(out)


def compressed_streams(path) -> dict[int, bytes]:
    """The stored stream of each compressed cluster, by guest offset."""
    from blkjobs.formats.qcow2.driver import Qcow2
    from blkjobs.formats.qcow2.tables import COMPRESSED
    out = {}
    with Qcow2(str(path)) as img, open(path, "rb") as f:
        for gc in range(-(-img.size // img.cluster_size)):
            e = img._entry(gc)[2]
            if e & COMPRESSED:
                off, n = img._compressed_span(gc, e)
                f.seek(off)
                out[gc * img.cluster_size] = f.read(n)
    return out


def check_compressed_image(src, out, kinds: list[str], cs: int, tail: int,
                           deflate: bool = True) -> None:
    """qemu-img compare and check; text clusters (and the tail) compressed,
    random ones stored plain, zero ones not allocated; each deflate stream
    within QEMU's 4 KiB window."""
    check_clean(out)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)
    streams = compressed_streams(out)
    text = [i * cs for i, k in enumerate(kinds) if k == "text"]
    assert sorted(streams) == text + ([len(kinds) * cs] if tail else [])
    raw = src.read_bytes()
    if deflate:
        for off, z in streams.items():
            want = raw[off:off + cs].ljust(cs, b"\0")
            assert strict_inflate(z, cs) == want, off
    m = qemu_map(out)
    for i, k in enumerate(kinds):
        r = next(r for r in m if r["start"] <= i * cs < r["start"] + r["length"])
        assert r["data"] == (k != "zero"), (i, k, r)
        if k == "random":
            assert "offset" in r        # a plain cluster: its host offset is shown


CODECS = ["isal", "zlib"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("cs", [4096, 65536, 2 << 20])
def test_convert_c_codecs_cluster_sizes(tmp_path, monkeypatch, codec, cs):
    """igzip (the default where built in) and zlib (BLKJOBS_DEFLATE=zlib):
    4 KiB, 64 KiB and 2 MiB clusters, readable by qemu-img."""
    from blkjobs.native.compress import CODECS as BUILT, ISAL
    assert ISAL in BUILT            # libisal-dev is in the Makefile's DEB_TOOLS
    monkeypatch.setenv("BLKJOBS_DEFLATE", codec)
    n = {4096: 64, 65536: 24, 2 << 20: 6}[cs]
    src = tmp_path / "src.raw"
    kinds = kinds_raw(src, cs, n, tail=3000)
    out = tmp_path / "o.qcow2"
    run_blkjobs("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", src, out,
                check=True)
    check_compressed_image(src, out, kinds, cs, 3000)


@pytest.mark.parametrize("cs", [4096, 65536, 2 << 20])
def test_convert_c_zstd_cluster_sizes(tmp_path, cs):
    n = {4096: 64, 65536: 24, 2 << 20: 6}[cs]
    src = tmp_path / "src.raw"
    kinds = kinds_raw(src, cs, n, tail=3000)
    out = tmp_path / "z.qcow2"
    run_blkjobs("convert", "-c", "-O", "qcow2", "-o",
                f"cluster_size={cs},compression_type=zstd", src, out, check=True)
    assert qemu_info_ctype(out) == "zstd"
    check_compressed_image(src, out, kinds, cs, 3000, deflate=False)


def qemu_info_ctype(path) -> str:
    return json.loads(qemu_img("info", "--output", "json", path).stdout)[
        "format-specific"]["data"]["compression-type"]


def test_convert_c_packs_as_qemu_img(tmp_path, monkeypatch):
    """Compressed clusters are packed as qemu-img packs them: one runs on
    into the next host cluster when that is the next allocated, and a stream
    of up to cs - 1 bytes is stored compressed. With zlib (qemu-img's codec
    and level) the image ends where qemu-img's does, within a cluster (it
    ended 384 KiB later, of 2.1 MiB, when a stream that did not fit in the
    rest of a host cluster started a new one)."""
    monkeypatch.setenv("BLKJOBS_DEFLATE", "zlib")
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    words = [w.encode() for w in "alpha beta gamma delta epsilon zeta eta theta".split()]
    # clusters that compress to 20-60 % of their size: many streams do not
    # fit in what is left of a host cluster
    data = bytearray()
    for _ in range(64):
        share = rnd.uniform(0.1, 0.5)
        k = int(CS * share)
        data += rnd.randbytes(k) + b" ".join(rnd.choices(words, k=CS))[:CS - k]
    src.write_bytes(bytes(data))
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    run_blkjobs("convert", "-c", "-O", "qcow2", src, ours, check=True)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, theirs)
    a, b = check_clean(ours), check_clean(theirs)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, ours)
    assert a["compressed-clusters"] == b["compressed-clusters"] == 64
    assert abs(a["image-end-offset"] - b["image-end-offset"]) <= CS, (a, b)


@pytest.mark.parametrize("ctype,cs", [("zlib", 65536), ("zlib", 4096), ("zlib", 2 << 20),
                                      ("zstd", 65536)])
def test_compressed_backup_cluster_sizes(tmp_path, ctype, cs):
    """A compressed full backup (zlib: igzip; zstd): what the source reads,
    clean, text clusters compressed within the 4 KiB window."""
    from blkjobs.engine import Engine
    n = {4096: 64, 65536: 24, 2 << 20: 6}[cs]
    raw = tmp_path / "src.raw"
    kinds = kinds_raw(raw, cs, n)
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src)
    bk = tmp_path / "bk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},compression_type={ctype}",
             bk, n * cs)
    eng = Engine()
    try:
        eng.open(str(src), node_name="src")
        eng.open(str(bk), node_name="bk")
        job = eng.backup("src", "bk", sync="full", compress=True, job_id="b0")
        assert eng.wait_job(job, 120).value == "completed"
    finally:
        eng.close()
    check_compressed_image(raw, bk, kinds, cs, 0, deflate=ctype == "zlib")


def test_compressed_backup_compresses_outside_the_io_lock(tmp_path, monkeypatch):
    """The backup's loop compresses with the I/O lock let go: while a chunk
    is being compressed another thread takes the lock (a guest write would
    wait for the whole compression before). Stored in order all the same."""
    import threading

    from blkjobs.engine import Engine
    from blkjobs.native import compress as native_compress
    raw = tmp_path / "src.raw"
    kinds = kinds_raw(raw, CS, 96)
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src)
    bk = tmp_path / "bk.qcow2"
    eng = Engine()
    took: list[bool] = []
    real_run = native_compress.Deflater.run

    def run(self, buf):
        # another thread must get the I/O lock now (30 s: a failure, not a wait)
        def other():
            ok = eng.io.lock.acquire(timeout=30)
            took.append(ok)
            if ok:
                eng.io.lock.release()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        return real_run(self, buf)

    monkeypatch.setattr(native_compress.Deflater, "run", run)
    try:
        s = eng.open(str(src), node_name="src")
        eng.create(str(bk), "qcow2", s.size, node_name="bk")
        job = eng.backup("src", "bk", sync="full", compress=True, job_id="b0")
        assert eng.wait_job(job, 120).value == "completed"
    finally:
        eng.close()
    assert took and all(took), took
    check_compressed_image(raw, bk, kinds, CS, 0)
