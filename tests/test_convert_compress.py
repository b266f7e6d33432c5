"""``convert -c``: clusters compressed on ``-m`` threads (zlib in the C core,
zstd on a thread pool) and stored in order. The target is what the source
reads (``qemu-img compare``), clean (``qemu-img check``), with compressed
clusters for compressible data, plain ones for incompressible data, none
for zeroes, and the same image whatever the number of threads."""
from __future__ import annotations

import json
import random

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
