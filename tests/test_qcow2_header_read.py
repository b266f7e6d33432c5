"""Opening a qcow2 image reads its cluster 0 and no more for the header
(``header.read_cluster0``: 64 KiB, then the rest of a larger cluster; it
was 2 MiB, the largest cluster, at every open): the header, its extensions
and the backing file name are read as before at every cluster size, and
the bytes mapped are qemu-img's."""
from __future__ import annotations

import pytest

import blkjobs.native.dio as dio
from blkjobs.errors import BlkjobsError
from blkjobs.formats import open_image
from qemu_oracle import qemu_img, qemu_info, qemu_io, to_raw

KiB, MiB = 1 << 10, 1 << 20


def _reads(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = dio.pread

    def spy(fd, length, offset):
        calls.append((length, offset))
        return real(fd, length, offset)
    monkeypatch.setattr(dio, "pread", spy)
    return calls


@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 128 * KiB, 2 * MiB])
def test_open_reads_cluster0_only(tmp_path, monkeypatch, cluster):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 5 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
             "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 6 512k 1M")
    reads = _reads(monkeypatch)
    img = open_image(str(top))
    try:
        rest = [(cluster - 64 * KiB, 64 * KiB)] if cluster > 64 * KiB else []
        # (the format probe's few bytes aside; the L1 table and the like
        # are smaller than 64 KiB in these images)
        assert [r for r in reads if r[0] >= 64 * KiB] == [(64 * KiB, 0)] + rest
        assert img.cluster_size == cluster
        assert img.backing_filename == base.name
        assert img.backing_format == "qcow2"
        info = qemu_info(top)
        assert img.size == info["virtual-size"]
        ours = img.read(512 * KiB, 1 * MiB)     # this image's own data
    finally:
        img.close()
    assert ours == to_raw(top, tmp_path)[512 * KiB:1536 * KiB]


def test_a_file_cut_inside_a_large_cluster0(tmp_path):
    """A 128 KiB-cluster image cut inside cluster 0 (the second read comes
    back short): the header still parses, and the image is refused for its
    L1 table past the end of the file, as with the single 2 MiB read."""
    img = tmp_path / "cut.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=128k", img, "8M")
    with open(img, "r+b") as f:
        f.truncate(100 * KiB)
    with pytest.raises(BlkjobsError) as e:
        open_image(str(img)).close()
    assert str(e.value) == f"'{img}': invalid L1 table offset 0x60000 (file size 102400)"
