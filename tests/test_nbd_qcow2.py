"""qcow2 over NBD: a qcow2 file served raw by qemu-nbd (``qemu-nbd -f raw
img.qcow2``) and opened as ``-f qcow2 nbd+unix:///?socket=S``, as QEMU
stacks its qcow2 driver on an nbd node. qemu-img on the same URI is the
oracle: info, map, check and compare print the same bytes, convert copies
the same data."""
from __future__ import annotations

import pytest

from conftest import run_blkjobs
from test_nbd_client import one_line_error, qimg, qio, same, servers  # noqa: F401

MiB = 1 << 20


def _rich_qcow2(tmp_path) -> str:
    """Data, a zero cluster, a compressed cluster, a snapshot, a bitmap and
    a cluster written after the snapshot (its old data only the snapshot
    uses)."""
    p = str(tmp_path / "rich.qcow2")
    assert qimg("create", "-f", "qcow2", p, "64M").returncode == 0
    qio("qcow2", p, "write -P 0xab 1M 2M", "write -z 8M 1M", "write -c -P 0x33 12M 64k",
        "write -P 0x22 63M 1M")
    assert qimg("snapshot", "-c", "s1", p).returncode == 0
    qio("qcow2", p, "write -P 0x66 1M 64k", "write -P 0x77 30M 192k")
    assert qimg("bitmap", "--add", p, "b0").returncode == 0
    return p


def _extended_qcow2(tmp_path) -> str:
    p = str(tmp_path / "ext.qcow2")
    assert qimg("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k",
                p, "32M").returncode == 0
    qio("qcow2", p, "write -P 0x44 0 100k", "write -P 0x45 1M 4k", "write -z 2M 64k")
    return p


def _plain_qcow2(tmp_path) -> str:
    """No compressed cluster: qemu-img map's human output lists it."""
    p = str(tmp_path / "plain.qcow2")
    assert qimg("create", "-f", "qcow2", p, "16M").returncode == 0
    qio("qcow2", p, "write -P 0x12 0 1M", "write -z 4M 64k", "write -P 0x13 15M 512k")
    return p


def _same_output(*args: str) -> str:
    ref = qimg(*args)
    ours = run_blkjobs(*args)
    assert (ours.returncode, ours.stdout, ours.stderr.replace("blkjobs:", "qemu-img:")) == \
        (ref.returncode, ref.stdout, ref.stderr), (ours, ref)
    return ours.stdout


@pytest.mark.parametrize("make", [_rich_qcow2, _extended_qcow2, _plain_qcow2])
def test_info_map_check_print_what_qemu_img_prints(tmp_path, servers, make):
    qemu_nbd, _ = servers
    s = qemu_nbd(make(tmp_path), "raw", "-r")
    for args in (("info", "-f", "qcow2"), ("info", "--output", "json", "-f", "qcow2"),
                 ("map", "--output", "json", "-f", "qcow2"), ("check", "-f", "qcow2"),
                 ("check", "--output", "json", "-f", "qcow2")):
        _same_output(*args, s.uri)
    if make is _plain_qcow2:
        assert "0x100000" in _same_output("map", "-f", "qcow2", s.uri)


def test_convert_copies_what_qemu_img_copies(tmp_path, servers):
    qemu_nbd, _ = servers
    img = _rich_qcow2(tmp_path)
    s = qemu_nbd(img, "raw", "-r")
    for fmt in ("raw", "qcow2"):
        ours, ref = str(tmp_path / f"ours.{fmt}"), str(tmp_path / f"ref.{fmt}")
        p = run_blkjobs("convert", "-f", "qcow2", "-O", fmt, s.uri, ours)
        assert p.returncode == 0, p.stderr
        assert qimg("convert", "-f", "qcow2", "-O", fmt, s.uri, ref).returncode == 0
        same(ours, ref)
        same(ours, img)
    assert qimg("check", str(tmp_path / "ours.qcow2")).returncode == 0
    # the snapshot's data is not the active layer's
    with open(str(tmp_path / "ours.raw"), "rb") as f:
        f.seek(1 * MiB)
        assert f.read(64 << 10) == b"\x66" * (64 << 10)


def test_compare_says_what_qemu_img_says(tmp_path, servers):
    qemu_nbd, _ = servers
    img = _rich_qcow2(tmp_path)
    s = qemu_nbd(img, "raw", "-r")
    assert "Images are identical." in _same_output("compare", "-f", "qcow2", "-F", "qcow2",
                                                   s.uri, img)
    other = str(tmp_path / "other.qcow2")
    assert qimg("convert", "-O", "qcow2", img, other).returncode == 0
    qio("qcow2", other, "write -P 0x01 30M 512")
    assert "Content mismatch at offset 31457280!" in _same_output(
        "compare", "-f", "qcow2", "-F", "qcow2", s.uri, other)


def test_not_qcow2_and_writes_are_one_line(tmp_path, servers):
    qemu_nbd, nbdkit = servers
    k = nbdkit("memory", "1M")
    _same_output("info", "-f", "qcow2", k.uri)
    s = qemu_nbd(_plain_qcow2(tmp_path), "raw", name="w")
    src = str(tmp_path / "src.raw")
    assert qimg("create", "-f", "raw", src, "16M").returncode == 0
    p = run_blkjobs("convert", "-n", "-O", "qcow2", src, s.uri)
    assert one_line_error(p) == (f"blkjobs: '{s.uri}': only the raw format is written over "
                                 "NBD (qcow2 is read-only there)")


def test_a_backup_job_reads_qcow2_over_nbd(tmp_path, servers):
    qemu_nbd, _ = servers
    img = _rich_qcow2(tmp_path)
    s = qemu_nbd(img, "raw", "-r")
    out = str(tmp_path / "b.qcow2")
    p = run_blkjobs("backup", "-f", "qcow2", s.uri, out)
    assert p.returncode == 0, p.stderr
    same(out, img)


async def qcow2_on_an_nbd_node(q, d) -> dict:
    """blockdev-add qcow2 over an nbd node (by name, then inline), a backup
    of each, and the errors: an export that is no qcow2 image, and deleting
    the nbd node under the qcow2 one."""
    import asyncio

    from test_nbd_client import Server, _need
    img = _rich_qcow2(d)
    raw = str(d / "plain.raw")
    assert qimg("create", "-f", "raw", raw, "1M").returncode == 0
    sock, rsock = str(d / "q.sock"), str(d / "r.sock")
    procs = [await asyncio.to_thread(Server, [_need("qemu-nbd"), "-k", p, "-f", "raw", "-t", "-e", "8",
                                              "-r", f], p) for p, f in ((sock, img), (rsock, raw))]
    out: dict = {}
    try:
        for i in (1, 2):
            tgt = str(d / f"t{i}.raw")
            assert qimg("create", "-f", "raw", tgt, "64M").returncode == 0
            await q.x("blockdev-add", driver="raw", **{"node-name": f"t{i}"},
                      file={"driver": "file", "filename": tgt})
        server = {"type": "unix", "path": sock}
        await q.x("blockdev-add", driver="nbd", **{"node-name": "n", "read-only": True},
                  server=server)
        await q.x("blockdev-add", driver="qcow2", **{"node-name": "q1", "read-only": True},
                  file="n")
        out["del-busy"] = await q.err("blockdev-del", **{"node-name": "n"})
        await q.x("blockdev-add", driver="qcow2", **{"node-name": "q2", "read-only": True},
                  file={"driver": "nbd", "server": server})
        out["not-qcow2"] = await q.err(
            "blockdev-add", driver="qcow2", **{"node-name": "q3", "read-only": True},
            file={"driver": "nbd", "server": {"type": "unix", "path": rsock}})
        for i in (1, 2):
            await q.x("blockdev-backup", device=f"q{i}", target=f"t{i}", sync="full",
                      **{"job-id": f"b{i}"})
            ev = (await q.until("BLOCK_JOB_COMPLETED", device=f"b{i}"))[-1]
            out[f"b{i}"] = {k: ev["data"].get(k) for k in ("error", "len", "offset", "type")}
        for node in ("q1", "n", "q2", "t1", "t2"):
            await q.x("blockdev-del", **{"node-name": node})
    finally:
        for s in procs:
            await asyncio.to_thread(s.stop)
    for i in (1, 2):
        same(str(d / f"t{i}.raw"), img, "-f", "raw", "-F", "qcow2")
    return out


def test_daemon_qcow2_over_an_nbd_node_as_qemu_storage_daemon(tmp_path):
    from daemon_util import side_by_side
    ref, ours = side_by_side(tmp_path, qcow2_on_an_nbd_node)
    assert ours == ref, (ours, ref)
    assert ours["not-qcow2"] == ("GenericError", "Image is not in qcow2 format")
    assert ours["b1"] == ours["b2"] == {"error": None, "len": 64 * MiB, "offset": 64 * MiB,
                                        "type": "backup"}
