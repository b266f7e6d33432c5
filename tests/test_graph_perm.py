"""Permissions, QEMU-compatible locks, transactional graph changes."""
from __future__ import annotations

import hashlib

import pytest

from blkjobs.errors import UsageError
from blkjobs.formats import create_image, open_image
from blkjobs.graph import ALL, GraphTransaction, Perm, PermissionConflict, open_chain
from qemu_oracle import check_clean, qemu_img, qemu_info, to_raw

SIZE = 1 << 20


@pytest.fixture
def chain(tmp_path):
    base = tmp_path / "base.qcow2"
    create_image(str(base), "qcow2", SIZE)
    with open_image(str(base), read_only=False) as b:
        b.write(0, b"\x01" * SIZE)
    top = tmp_path / "top.qcow2"
    create_image(str(top), "qcow2", SIZE, backing_file="base.qcow2", backing_format="qcow2")
    return base, top


def test_conflicts_in_process(chain):
    _, top = chain
    node = open_chain(str(top), read_only=False)
    try:
        job = node.take("job0", Perm.WRITE | Perm.CONSISTENT_READ, Perm.CONSISTENT_READ)
        with pytest.raises(PermissionConflict, match="job0"):
            node.take("job1", Perm.WRITE)
        with pytest.raises(PermissionConflict):
            node.take("job1", Perm.CONSISTENT_READ, shared=Perm.CONSISTENT_READ)
        reader = node.take("reader", Perm.CONSISTENT_READ)
        reader.release()
        job.release()
        node.take("job1", Perm.WRITE).release()
        # backing links do not share write: a writer on the base conflicts
        node.backing.reopen(read_only=False)
        with pytest.raises(PermissionConflict, match="backing"):
            node.backing.take("commit", Perm.WRITE)
        node.backing_perm.update(shared=ALL)
        node.backing.take("commit", Perm.WRITE).release()
    finally:
        node.close_chain()


def test_qemu_sees_our_locks(chain):
    """QEMU's qcow2 rule, as qemu-storage-daemon's blockdev-add: a qcow2 node
    opened read-write holds write and resize at once (its metadata is ours
    in memory), so nobody else gets a stable view or writes; read-only it
    holds consistent read and refuses other writers."""
    base, top = chain
    node = open_chain(str(top), read_only=False)
    try:
        info = qemu_img("info", top, check=False)
        assert info.returncode != 0 and 'Failed to get shared "write" lock' in info.stderr
        assert qemu_img("info", "-U", top, check=False).returncode == 0
        # the backing file is read by us and must not be written by qemu
        p = qemu_img("resize", "-f", "qcow2", base, "2M", check=False)
        assert p.returncode != 0 and "lock" in p.stderr
    finally:
        node.close_chain()
    assert qemu_img("resize", "-f", "qcow2", base, "2M", check=False).returncode == 0
    node = open_chain(str(top), read_only=True)
    try:
        assert qemu_img("info", top, check=False).returncode == 0      # we only read
        p = qemu_img("resize", "-f", "qcow2", top, "2M", check=False)
        assert p.returncode != 0 and "lock" in p.stderr
    finally:
        node.close_chain()


def test_qemu_holding_lock_blocks_us(chain, tmp_path):
    import subprocess
    _, top = chain
    # qemu-io keeps the image open (writable) while it waits on stdin
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(top)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()
        # opening it at all is refused, read-write or read-only (qemu-img's texts)
        with pytest.raises(PermissionConflict, match='Failed to get "write" lock'):
            open_chain(str(top), read_only=False)
        with pytest.raises(PermissionConflict, match='Failed to get shared "write" lock'):
            open_chain(str(top), read_only=True)
    finally:
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait(timeout=10)


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_set_backing_commit_and_abort(chain, tmp_path):
    base, top = chain
    other = tmp_path / "other.qcow2"
    create_image(str(other), "qcow2", SIZE)
    with open_image(str(other), read_only=False) as o:
        o.write(0, b"\x07" * SIZE)
    node = open_chain(str(top), read_only=False)
    g = node.graph
    new = open_chain(str(other), graph=g)
    before = _digest(top)
    old_backing = node.backing
    with pytest.raises(RuntimeError):
        with GraphTransaction() as tx:
            tx.set_backing(node, new)
            assert node.backing is new and node.read(0, 4) == b"\x07" * 4
            assert open_image(str(top)).backing_filename == "other.qcow2"
            raise RuntimeError("abort please")
    assert node.backing is old_backing and _digest(top) == before
    assert node.read(0, 4) == b"\x01" * 4
    tx = GraphTransaction()
    tx.set_backing(node, new)
    tx.drop_node(old_backing)
    tx.commit()
    assert old_backing.name not in g.nodes and node.backing is new
    node.close_chain()
    info = qemu_info(top)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("other.qcow2", "qcow2")
    check_clean(top)
    assert to_raw(top, tmp_path) == b"\x07" * SIZE


def test_set_backing_none_and_replace(chain, tmp_path):
    base, top = chain
    node = open_chain(str(top), read_only=False)
    g = node.graph
    copy = tmp_path / "copy.qcow2"
    qemu_img("convert", "-U", "-O", "qcow2", base, copy)
    newbase = open_chain(str(copy), graph=g)
    oldbase = node.backing
    tx = GraphTransaction()
    tx.replace_node(oldbase, newbase)
    assert node.backing is newbase
    tx.abort()
    assert node.backing is oldbase
    assert [p.owner for p in oldbase.users()] == [f"node '{node.name}' (backing)"]
    assert newbase.users()[0].owner == "open"
    with GraphTransaction() as tx:
        tx.replace_node(oldbase, newbase)
    assert node.backing is newbase and oldbase.users() == []
    with pytest.raises(UsageError):
        GraphTransaction().drop_node(newbase)
    with GraphTransaction() as tx:
        tx.set_backing(node, None)
    assert node.backing is None
    node.close()
    assert open_image(str(top)).backing_filename is None
    check_clean(top)
