"""blkjobs serve against qemu-storage-daemon: refusal texts and query
fields that used to differ (issue 13), each compared with the reference
doing the same thing over QMP, to the byte."""
from __future__ import annotations

import asyncio

from daemon_util import make_images, qcow2_node, qemu_img, side_by_side


def chain(d) -> tuple[str, str]:
    base, top = str(d / "base.qcow2"), str(d / "top.qcow2")
    assert qemu_img("create", "-f", "qcow2", base, "4M").returncode == 0
    assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top).returncode == 0
    return base, top


async def add_chain(s, d) -> tuple[str, str]:
    base, top = chain(d)
    await s.x("blockdev-add", **qcow2_node("base", base, backing=None))
    await s.x("blockdev-add", **qcow2_node("top", top, backing="base"))
    return base, top


def test_blockdev_del_of_a_backing_node(tmp_path):
    async def sc(s, d):
        await add_chain(s, d)
        return await s.err("blockdev-del", **{"node-name": "base"})
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours == ("GenericError", "Node 'base' is busy: node is used as backing hd "
                                           "of 'top'")


def test_blockdev_del_of_nodes_jobs_use(tmp_path):
    """A backup's target and a mirror's source carry the job's blocker; a
    mirror's target its BlockBackend; a backup's source only a reference."""
    async def sc(s, d):
        src, tgt = make_images(d, "64M")
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        out = {}
        for cmd, jid in (("blockdev-backup", "b"), ("blockdev-mirror", "m")):
            hold = await s.hold("tgt", jid)       # still running while we ask
            await s.x(cmd, **{"job-id": jid}, device="src", target="tgt", sync="full", **hold)
            await s.held(jid)
            out[jid] = [await s.err("blockdev-del", **{"node-name": n}) for n in ("src", "tgt")]
            # a second job on the nodes meets the same blockers
            out[jid + "-backup"] = await s.err("blockdev-backup", **{"job-id": "x"},
                                               device="src", target="tgt", sync="full")
            out[jid + "-mirror"] = await s.err("blockdev-mirror", **{"job-id": "x"},
                                               device="src", target="tgt", sync="full")
            await s.cancel_held(jid, jid)
        # and free again once the job is gone
        await s.x("blockdev-del", **{"node-name": "tgt"})
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["b"] == [("GenericError", "Block device src is in use"),
                         ("GenericError", "Node 'tgt' is busy: block device is in use by "
                                          "block job: backup")]
    assert ours["m"] == [("GenericError", "Node 'src' is busy: block device is in use by "
                                          "block job: mirror"),
                         ("GenericError", "Node tgt is in use")]
    busy = "Node '{}' is busy: block device is in use by block job: {}"
    assert ours["b-backup"] == ("GenericError", busy.format("tgt", "backup"))
    assert ours["m-backup"] == ("GenericError", busy.format("src", "mirror"))
    # a job's filter above the source: not a root node any more
    assert ours["b-mirror"] == ours["m-mirror"] == ("GenericError", "Need a root block node")


def test_stream_and_commit_lookups(tmp_path):
    async def sc(s, d):
        base, _ = await add_chain(s, d)
        out = [
            await s.err("block-stream", device="top", **{"base-node": "nosuch"}),
            await s.err("block-stream", device="top", bottom="nosuch"),
            await s.err("block-commit", device="base"),
            await s.err("block-commit", device="top", top=base, base=base),
            await s.err("block-commit", device="top", **{"top-node": "base",
                                                         "base-node": "base"}),
            await s.err("block-commit", device="top", **{"base-node": "nosuch"}),
            await s.err("block-commit", device="top", **{"top-node": "nosuch"}),
            await s.err("block-commit", device="top", **{"top-node": "base"}),
            await s.err("block-commit", device="base"),
        ]
        return [(c, m.replace(str(d), "DIR")) for c, m in out]
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert [m for _, m in ours] == [
        "Cannot find device='' nor node-name='nosuch'",
        "Cannot find device='' nor node-name='nosuch'",
        "Need a root block node",
        "Can't find 'DIR/base.qcow2' in the backing chain",
        "cannot commit an image into itself",
        "Cannot find device='' nor node-name='nosuch'",
        "Cannot find device='' nor node-name='nosuch'",
        "cannot commit an image into itself",
        "Need a root block node",
    ]


def test_grouped_transaction_with_a_bitmap_action(tmp_path):
    async def sc(s, d):
        src, _ = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        return await s.err("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}}],
            properties={"completion-mode": "grouped"})
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours == ("GenericError", "Action 'block-dirty-bitmap-add' does not support "
                                           "Transaction property completion-mode = grouped")


def test_qcow2_over_a_file_that_is_not_qcow2(tmp_path):
    async def sc(s, d):
        raw, empty = str(d / "raw.img"), str(d / "empty.img")
        assert qemu_img("create", "-f", "raw", raw, "1M").returncode == 0
        open(empty, "wb").close()
        out = [await s.err("blockdev-add", **qcow2_node("r", p)) for p in (raw, empty)]
        out.append(await s.x("query-named-block-nodes"))    # nothing left behind
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours == [("GenericError", "Image is not in qcow2 format")] * 2 + [[]]


def test_named_nodes_carry_format_specific(tmp_path):
    async def sc(s, d):
        await add_chain(s, d)
        lazy = str(d / "lazy.qcow2")
        assert qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=64",
                        lazy, "1M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("lazy", lazy))
        v010 = str(d / "v010.qcow2")
        assert qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", v010, "1M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("v010", v010))
        out = []
        for flat in (True, False):
            for n in await s.x("query-named-block-nodes", flat=flat):
                img, fs = n["image"], []
                while img is not None:
                    fs.append(img.get("format-specific"))
                    img = img.get("backing-image")
                out.append((n["drv"], fs))
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ("qcow2", [{"type": "qcow2", "data": {
        "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": True,
        "refcount-bits": 64, "corrupt": False, "extended-l2": False}}]) in ours


def test_rate_limited_backup_is_not_busy(tmp_path):
    """QEMU's job sleeps in its rate limiter and query-block-jobs says
    ``busy: false`` meanwhile; blkjobs' copy waiting in the C engine's
    limiter reads the same (both wait for that state, then it holds: at
    1 byte/s, after a first cluster the next one is hours away, so no query
    meets the job copying)."""
    async def sc(s, d):
        src, tgt = make_images(d, "64M")
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt",
                  sync="full", speed=1)
        deadline = asyncio.get_running_loop().time() + 60     # a safety net
        while True:
            jobs = await s.x("query-block-jobs")
            assert jobs, "the job ended, busy all along"
            if not jobs[0]["busy"]:
                break
            assert asyncio.get_running_loop().time() < deadline, "always busy"
            await asyncio.sleep(0.01)
        later = [(await s.x("query-block-jobs"))[0] for _ in range(3)]
        await s.x("job-cancel", id="j")
        await s.until("JOB_STATUS_CHANGE", id="j", status="null")
        return [{k: j[k] for k in ("busy", "paused", "status", "speed", "io-status")}
                for j in later]
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours == [{"busy": False, "paused": False, "status": "running",
                            "speed": 1, "io-status": "ok"}] * 3
