"""blkdebug's events inside the qcow2 driver (formats.qcow2.debug), with
the real qemu-img as the oracle (iotests 098 and 217): an error injected
after ``l1_update``/``empty_image_prepare``/``reftable_update``/
``refblock_alloc`` fails ``qemu-img commit``'s emptying, after
``cluster_free`` a snapshot deletion, with qemu-img's texts, leaving the
very same bytes in the image as qemu-img leaves."""
from __future__ import annotations

import shutil

import pytest

from qemu_oracle import check_clean, qemu_img, qemu_io
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)

EMPTY_EVENTS = ["l1_update", "empty_image_prepare", "reftable_update", "refblock_alloc"]


def conf(d, event, extra=""):
    (d / "blkdebug.conf").write_text(f'[inject-error]\nevent = "{event}"\n{extra}')


def overlay(d):
    qemu_img("create", "-f", "qcow2", d / "t.qcow2.base", "64M")
    qemu_img("create", "-f", "qcow2", "-b", "t.qcow2.base", "-F", "qcow2", d / "t.qcow2", "64M")
    qemu_io(d / "t.qcow2", "write -P 0x5a 0 64k")


@pytest.mark.parametrize("event", EMPTY_EVENTS)
def test_commit_emptying_fails_where_qemu_img_does(twins, event):
    for d in twins:
        overlay(d)
        conf(d, event)
    out = same(twins, "commit", "blkdebug:blkdebug.conf:t.qcow2")
    assert out == (1, "", "qemu-img: Failed to empty blkdebug:blkdebug.conf:t.qcow2: "
                          "Input/output error\n")
    ours, theirs = twins
    # committed (the same data in the base), then stopped at the same step
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours / "t.qcow2.base",
             theirs / "t.qcow2.base")
    check_clean(ours / "t.qcow2.base")
    assert (ours / "t.qcow2").read_bytes() == (theirs / "t.qcow2").read_bytes()
    for d in twins:
        qemu_io(d / "t.qcow2", "close")         # the dirty image is repaired on open
        check_clean(d / "t.qcow2")
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", d / "t.qcow2", d / "t.qcow2.base")
    assert (ours / "t.qcow2").read_bytes() == (theirs / "t.qcow2").read_bytes()


def test_commit_with_an_event_that_never_fires(twins):
    """A rule on an event the emptying does not raise: committed and emptied."""
    for d in twins:
        overlay(d)
        conf(d, "cluster_free")
    assert same(twins, "commit", "blkdebug:blkdebug.conf:t.qcow2") == (
        0, "Image committed.\n", "")
    for d in twins:
        check_clean(d / "t.qcow2")
        assert qemu_img("map", "--output=json", d / "t.qcow2").stdout.count('"depth": 0') == 0
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", d / "t.qcow2", d / "t.qcow2.base")


def test_snapshot_delete_with_cluster_free_error(twins):
    ours, theirs = twins
    qemu_img("create", "-f", "qcow2", theirs / "t.qcow2", "64M")
    qemu_io(theirs / "t.qcow2", "write -P 0x5a 0 64k")
    qemu_img("snapshot", "-c", "foo", theirs / "t.qcow2")
    shutil.copyfile(theirs / "t.qcow2", ours / "t.qcow2")      # the same snapshot date
    for d in twins:
        conf(d, "cluster_free", 'errno = "5"\n')
    assert same(twins, "snapshot", "-d", "foo", "blkdebug:blkdebug.conf:t.qcow2") == (
        1, "", "qcow2_free_clusters failed: Input/output error\n"
               "qemu-img: Could not delete snapshot 'foo': Failed to free the cluster and "
               "L1 table: Input/output error\n")
    assert (ours / "t.qcow2").read_bytes() == (theirs / "t.qcow2").read_bytes()
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 3 and err.splitlines() == [
        "Leaked cluster 4 refcount=2 reference=1", "Leaked cluster 5 refcount=2 reference=1",
        "Leaked cluster 6 refcount=1 reference=0", "Leaked cluster 7 refcount=1 reference=0"]
    assert "4 leaked clusters were found on the image." in out
    assert same(twins, "check", "-r", "leaks", "t.qcow2")[0] == 0
    assert (ours / "t.qcow2").read_bytes() == (theirs / "t.qcow2").read_bytes()


def test_event_names(twins):
    """QEMU's text for a name it does not know; ours (one line, exit 1) for
    one of QEMU's events that blkjobs never raises."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "t.qcow2", "1M")
        conf(d, "bogus")
    assert same(twins, "info", "blkdebug:blkdebug.conf:t.qcow2") == (
        1, "", "qemu-img: Could not open 'blkdebug:blkdebug.conf:t.qcow2': invalid parameter "
               "value: bogus\n")
    ours = twins[0]
    conf(ours, "l2_load")
    rc, out, err = run(ours, "info", "blkdebug:blkdebug.conf:t.qcow2")
    assert (rc, out) == (1, "")
    assert err == ("qemu-img: Could not open 'blkdebug:blkdebug.conf:t.qcow2': blkdebug event "
                   "'l2_load' is not raised by blkjobs (supported: read_aio, pwritev, write_aio, "
                   "pwritev_zero, write_compressed, cluster_alloc, flush_to_os, flush_to_disk, "
                   "l1_update, empty_image_prepare, reftable_update, refblock_alloc, "
                   "cluster_free, none, read_backing_aio, read_compressed)\n")
