"""The layout of a new qcow2 target: clusters whose source bytes are zeroes
written as data get no host cluster, as qemu-img decides before it
allocates, so the file is as long as qemu-img's (``check``'s image end
offset, the file's length) and maps as qemu-img's does; the bytes are
qemu-img's and ``check`` is clean. Before, such clusters were allocated,
found zero by the engine and freed after the copy: free holes inside the
file, which made it longer than qemu-img's."""
from __future__ import annotations

import os

import pytest

from blkjobs.imageops.convert import ConvertOptions, convert
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map

KiB, MiB = 1 << 10, 1 << 20


def _raw(path, size):
    """Data, whole clusters of zeroes written as data (64 KiB and 4 KiB
    clusters), a cluster half zero, unaligned runs, holes, a zero tail."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(100 * KiB))                  # data, ends mid-cluster
        f.write(bytes(300 * KiB))                       # zeroes as data, unaligned
        f.write(os.urandom(28 * KiB))
        f.seek(1 * MiB)
        f.write(bytes(256 * KiB) + os.urandom(32 * KiB) + bytes(32 * KiB))  # half-zero cluster
        f.seek(2 * MiB + 4 * KiB)
        f.write(bytes(64 * KiB))                        # zeroes only, unaligned
        f.seek(3 * MiB)
        f.write(os.urandom(8 * KiB) + bytes(520 * KiB) + os.urandom(4 * KiB))
        f.seek(4 * MiB - 8 * KiB)
        f.write(bytes(8 * KiB) + os.urandom(6 * KiB))   # zero head, data tail: one run
        f.seek(size - 70 * KiB)
        f.write(bytes(70 * KiB))                        # zeroes up to the end


def _mapping(path):
    """qemu-img map's runs: allocated (host offset) or not. ("zero" is left
    out: zero blocks inside a data cluster are holes in our file, where
    qemu-img writes zero bytes.)"""
    out: list[list] = []
    for e in qemu_map(path):
        off = e.get("offset")
        if out and out[-1][2] == e["data"] and out[-1][0] + out[-1][1] == e["start"] and \
                (off is None) == (out[-1][3] is None) and \
                (off is None or out[-1][3] + out[-1][1] == off):
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], e["data"], off])
    return out


def _same_as_qemu_img(src, ours, ref, fmt, opts):
    qemu_img("convert", "-f", fmt, "-O", "qcow2", *opts, src, ref)
    assert qemu_img("compare", "-f", fmt, "-F", "qcow2", src, ours).returncode == 0
    mine, theirs = check_clean(ours), check_clean(ref)
    assert mine["image-end-offset"] == theirs["image-end-offset"]
    assert os.path.getsize(ours) == os.path.getsize(ref)
    assert _mapping(ours) == _mapping(ref)


@pytest.mark.parametrize("cluster", [None, 4096])
def test_raw_zeroes_written_as_data_get_no_clusters(tmp_path, cluster):
    size = 5 * MiB - 3 * KiB          # not a multiple of the cluster size
    src, ours, ref = tmp_path / "a.raw", tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    _raw(src, size)
    copts = {} if cluster is None else {"cluster_size": cluster}
    convert(str(src), str(ours), ConvertOptions(dst_fmt="qcow2", flush=False,
                                                create_opts=dict(copts)))
    _same_as_qemu_img(src, ours, ref, "raw",
                      [] if cluster is None else ["-o", f"cluster_size={cluster}"])


def _zero_data_chain(tmp_path):
    """A 2-deep qcow2 chain (8 MiB) whose layers store zeroes as data
    clusters (qemu-io ``write -P 0``) over data and holes: its top."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 7 0 3M", "write -P 0 1M 512k", "write -P 0 5M 1M",
            "write -P 9 7M 64k")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 0 0 192k", "write -P 3 2M 64k", "write -P 0 7M 64k")
    return top


def test_chain_zero_data_clusters_get_no_clusters(tmp_path):
    """A qcow2 chain whose layers store zeroes as data clusters (qemu-io
    ``write -P 0``) over data: the target allocates what qemu-img does."""
    top = _zero_data_chain(tmp_path)
    ours, ref = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    convert(str(top), str(ours), ConvertOptions(dst_fmt="qcow2", flush=False))
    _same_as_qemu_img(top, ours, ref, "qcow2", [])


def test_sparse_size_zero_still_allocates_every_cluster(tmp_path):
    """-S 0 (no zero detection): every cluster is written, as qemu-img's."""
    src, ours, ref = tmp_path / "a.raw", tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    _raw(src, 4 * MiB)
    convert(str(src), str(ours), ConvertOptions(dst_fmt="qcow2", flush=False, sparse_size=0))
    _same_as_qemu_img(src, ours, ref, "raw", ["-S", "0"])
