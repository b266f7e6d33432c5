"""After the copy into a new qcow2 target, :func:`convert_zeroes.sparsify`
looks for clusters that stayed holes (a SEEK_HOLE walk of every allocated
run, page by page over the fresh clusters' dirty pages: 3-7 ms of one
thread after a 1 GiB copy). When :func:`convert_zeroes.zero_clusters` read
every cluster of data before allocating it, none can be left: the walk is
skipped. When it could not read a piece, the walk runs and frees the
clusters that read as zeroes, as before. Either way the target maps as
qemu-img's copy, its bytes are the source's and ``check`` is clean."""
from __future__ import annotations

import pytest

import blkjobs.native.extents as native_extents
from blkjobs.imageops.convert import ConvertOptions, convert
from qemu_oracle import check_clean, qemu_img
from test_convert_qcow2_layout import _mapping, _raw, _same_as_qemu_img, _zero_data_chain

MiB = 1 << 20


def _walks(monkeypatch) -> list[tuple[int, int]]:
    """The (offset, length) of every SEEK_DATA/SEEK_HOLE walk asked of
    ``native.extents.extents`` (sparsify's, on the target file)."""
    calls: list[tuple[int, int]] = []
    real = native_extents.extents

    def spy(fd, offset, length, *a, **k):
        calls.append((offset, length))
        return real(fd, offset, length, *a, **k)
    monkeypatch.setattr(native_extents, "extents", spy)
    return calls


def test_raw_to_new_qcow2_skips_the_walk(tmp_path, monkeypatch):
    src, ours, ref = tmp_path / "a.raw", tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    _raw(src, 5 * MiB)
    walks = _walks(monkeypatch)
    convert(str(src), str(ours), ConvertOptions(dst_fmt="qcow2", flush=False))
    assert walks == []
    _same_as_qemu_img(src, ours, ref, "raw", [])


def test_chain_to_new_qcow2_skips_the_walk(tmp_path, monkeypatch):
    top = _zero_data_chain(tmp_path)
    ours, ref = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    walks = _walks(monkeypatch)
    convert(str(top), str(ours), ConvertOptions(dst_fmt="qcow2", flush=False))
    assert walks == []
    _same_as_qemu_img(top, ours, ref, "qcow2", [])


@pytest.mark.parametrize("flush", [False, True])
def test_a_piece_not_read_is_sparsified_after_the_copy(tmp_path, monkeypatch, flush):
    """The zero-cluster read fails for every piece: the clusters of zeroes
    written as data are allocated, found zero by the copy and freed by the
    walk, so the target allocates the guest ranges qemu-img's does (at
    other host offsets, and longer: the freed clusters stay free inside
    the file, as before the scan existed)."""
    src, ours, ref = tmp_path / "a.raw", tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    _raw(src, 5 * MiB)

    def unreadable(*a, **k):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(native_extents, "zero_blocks_at", unreadable)
    walks = _walks(monkeypatch)
    convert(str(src), str(ours), ConvertOptions(dst_fmt="qcow2", flush=flush))
    assert walks
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, ref)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, ours).returncode == 0
    check_clean(ours)
    # the same runs allocated and unallocated (host offsets differ: freed
    # clusters stay free holes inside our file)
    assert _allocated(ours) == _allocated(ref)


def _allocated(path):
    out: list[list] = []
    for start, length, _data, off in _mapping(path):
        if out and out[-1][2] == (off is not None) and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length, off is not None])
    return out
