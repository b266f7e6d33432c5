"""blkdebug over QMP (src/blkjobs/daemon/blkdebug_commands.py): QEMU's
blockdev-add syntax for fault injection, error policies run side by side
with qemu-storage-daemon, QEMU's state rules, and blkjobs' break-point
commands."""
from __future__ import annotations


import pytest
from daemon_util import (brief, compare, drop_transient_pauses, make_images, qcow2_node,
                         qemu_img, qemu_io, run_daemon, side_by_side, start_blkjobs)


def over_blkdebug(name: str, path: str, rules: list[dict], **extra) -> dict:
    """A qcow2 node over a blkdebug node over the file, as QEMU's tests do."""
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "blkdebug", "node-name": "dbg", "inject-error": rules,
                     "image": {"driver": "file", "filename": path}, **extra}}


def without_offsets(events):
    """QEMU copies in parallel chunks: how far a failing job got differs."""
    return [(n, {k: v for k, v in data.items() if k != "offset"}) for n, data in events]


@pytest.mark.parametrize("policy,errno,expect", [
    ("stop", 5, "stop"), ("report", 28, "report"), ("enospc", 28, "stop"),
    ("enospc", 5, "report"), ("ignore", 5, "ignore")])
def test_backup_target_error_policy_matches_qsd(tmp_path, policy, errno, expect):
    """An error injected into the target's first data write (write_aio,
    once): the same events and states as qemu-storage-daemon, and the
    same data in the end when the job goes on."""
    async def sc(s, d):
        src, tgt = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **over_blkdebug("tgt", tgt, [
            {"event": "write_aio", "errno": errno, "once": True}]))
        await s.x("blockdev-backup", **{"job-id": "j", "on-target-error": policy},
                  device="src", target="tgt", sync="full")
        out = {"query": None}
        ev = await s.until("BLOCK_JOB_ERROR")
        if expect == "stop":
            ev += await s.until("JOB_STATUS_CHANGE", id="j", status="paused")
            while ev[-2]["event"] != "BLOCK_JOB_ERROR":     # QEMU's transient pauses
                ev += await s.until("JOB_STATUS_CHANGE", id="j", status="paused")
            [q] = await s.x("query-block-jobs")
            q.pop("offset")
            out["query"] = q
            await s.x("job-resume", id="j")
        ev += await s.until("JOB_STATUS_CHANGE", id="j", status="null")
        out["events"] = without_offsets(drop_transient_pauses(brief(ev)))
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    for name, res in (("qsd", ref), ("blkjobs", ours)):    # the daemons closed the images
        d = tmp_path / name
        res["same"] = compare(str(d / "src.qcow2"), str(d / "tgt.qcow2"))[0] == 0
    assert ref["same"] == ours["same"]
    assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "write", "action": expect}) \
        in ours["events"]
    if expect == "stop":
        assert ours["query"]["io-status"] == ("failed" if errno == 5 else "nospace")
        assert ours["query"]["paused"] is True
    assert ours["same"] is (expect != "report")
    if expect == "report":
        completed = [d for n, d in ours["events"] if n == "BLOCK_JOB_COMPLETED"]
        assert completed[0]["error"] == ("Input/output error" if errno == 5
                                         else "No space left on device")


def test_injection_at_a_sector_and_bad_rules_match_qsd(tmp_path):
    """blkdebug over a format node: ``sector`` limits a rule to the request
    covering that byte (the data at 2 MiB; pwritev is raised on the node
    itself by QEMU's generic write path); an unknown event or iotype is
    refused by the schema with QEMU's text."""
    async def sc(s, d):
        src, tgt = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        out = {"bad": await s.err("blockdev-add", **over_blkdebug("x", tgt, [
            {"event": "bogus"}]))}
        out["bad-iotype"] = await s.err("blockdev-add", **over_blkdebug("x", tgt, [
            {"event": "write_aio", "iotype": "nope"}]))
        await s.x("blockdev-add", driver="blkdebug", **{"node-name": "tgt"},
                  image={"driver": "qcow2", "file": {"driver": "file", "filename": tgt}},
                  **{"inject-error": [{"event": "pwritev", "sector": (2 << 20) // 512}]})
        await s.x("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt",
                  sync="full")
        ev = await s.until("JOB_STATUS_CHANGE", id="j", status="null")
        out["events"] = without_offsets(drop_transient_pauses(brief(ev)))
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["bad"] == ("GenericError", "Parameter 'event' does not accept value 'bogus'")
    assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "write", "action": "report"}) \
        in ours["events"]


def test_set_state_rules(tmp_path):
    """QEMU's state machine: the first write moves state 1 -> 2 (the
    state-2 rule is not active yet, it was checked in state 1); the second
    write activates it and fails with ENOSPC, once; the third passes."""
    async def sc(s, d):
        _, tgt = make_images(d)
        await s.x("blockdev-add", **over_blkdebug("tgt", tgt, [
            {"event": "write_aio", "state": 2, "errno": 28, "once": True}],
            **{"set-state": [{"event": "write_aio", "state": 1, "new_state": 2}]}))
        out = []
        for _ in range(3):
            try:
                await s.x("x-blkjobs-write", node="tgt", offset=0, length=4096, pattern=1)
                out.append("ok")
            except Exception as e:      # ExecuteError
                out.append(str(e))
        return out
    out = run_daemon(start_blkjobs, tmp_path, sc)
    assert out[0] == "ok" and out[2] == "ok"
    assert "No space left on device" in out[1]


def test_blkdebug_over_an_inline_format_node(tmp_path):
    """The second layout: blkdebug over a qcow2 defined inline is the node
    jobs use; a read error on the source ends a backup (report)."""
    async def sc(s, d):
        src, tgt = make_images(d)
        await s.x("blockdev-add", driver="blkdebug", **{"node-name": "src"},
                  image={"driver": "qcow2", "file": {"driver": "file", "filename": src}},
                  **{"inject-error": [{"event": "read_aio", "iotype": "read"}]})
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt",
                  sync="full")
        ev = brief(await s.until("JOB_STATUS_CHANGE", id="j", status="null"))
        nodes = [n["node-name"] for n in await s.x("query-named-block-nodes")]
        return ev, nodes
    ev, nodes = run_daemon(start_blkjobs, tmp_path, sc)
    assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "read", "action": "report"}) in ev
    [done] = [d for n, d in ev if n == "BLOCK_JOB_COMPLETED"]
    assert done["error"] == "Input/output error"
    assert "src" in nodes


def test_blkdebug_refusals(tmp_path):
    async def sc(s, d):
        _, tgt = make_images(d)
        return [
            await s.err("blockdev-add", **over_blkdebug("t", tgt, [{"event": "l2_update"}])),
            await s.err("blockdev-add", **over_blkdebug("t", tgt, [], config="/dev/null")),
            await s.err("blockdev-add", **over_blkdebug("t", tgt, [{"event": "write_aio",
                                                                     "errno": 0}])),
            await s.err("blockdev-add", **over_blkdebug("t", tgt, [{"event": "write_aio",
                                                                     "sector": 0}])),
            await s.err("x-blkjobs-blkdebug-resume", tag="none"),
            await s.err("x-blkjobs-blkdebug-wait-break", tag="none", timeout=0),
            await s.x("query-named-block-nodes"),       # nothing left behind
        ]
    out = run_daemon(start_blkjobs, tmp_path, sc)
    assert out[0][1].startswith("blkdebug event 'l2_update' is not raised by blkjobs "
                                "(supported: read_aio, ")
    assert out[1][1] == "blkjobs does not support 'config' for driver 'blkdebug'"
    assert out[2][1] == "blkdebug: errno must be a positive error number, not 0"
    assert out[3][1] == ("blkjobs does not support 'sector' for a blkdebug node under a "
                         "format node (define the format node inside the blkdebug node)")
    assert out[4][1] == "blkdebug: no request is suspended at break point 'none'"
    assert out[5][1] == "Parameter 'timeout' must be positive"
    assert out[6] == []


def test_break_points_over_qmp(tmp_path):
    """x-blkjobs-blkdebug-break/-wait-break/-resume: the backup's first data
    write is held (the job stays running, nothing written), then let go."""
    async def sc(s, d):
        src, tgt = make_images(d)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **over_blkdebug("tgt", tgt, []))
        await s.x("x-blkjobs-blkdebug-break", node="dbg", event="write_aio", tag="w")
        await s.x("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt",
                  sync="full")
        held = await s.x("x-blkjobs-blkdebug-wait-break", tag="w", timeout=60)
        [job] = await s.x("query-jobs")
        await s.x("x-blkjobs-blkdebug-resume", tag="w")
        ev = brief(await s.until("JOB_STATUS_CHANGE", id="j", status="null"))
        return held, job, ev
    held, job, ev = run_daemon(start_blkjobs, tmp_path, sc)
    same = compare(str(tmp_path / "src.qcow2"), str(tmp_path / "tgt.qcow2"))[0]
    assert held == {"tag": "w", "event": "write_aio", "node": "tgt", "offset": 0,
                    "length": 4 << 20}
    assert job["status"] == "running" and job["current-progress"] == 0
    assert [d["status"] for n, d in ev if n == "JOB_STATUS_CHANGE"] == \
        ["created", "running", "waiting", "pending", "concluded", "null"]
    assert same == 0


def test_blkdebug_node_is_listed_and_deleted_with_its_parent(tmp_path):
    async def sc(s, d):
        _, tgt = make_images(d)
        await s.x("blockdev-add", **over_blkdebug("tgt", tgt, []))
        nodes = [(n["node-name"], n["drv"]) for n in await s.x("query-named-block-nodes")]
        await s.x("blockdev-del", **{"node-name": "tgt"})
        return nodes, await s.x("query-named-block-nodes")
    nodes, after = run_daemon(start_blkjobs, tmp_path, sc)
    assert nodes == [("tgt", "qcow2"), ("dbg", "blkdebug")]
    assert after == []
    assert qemu_img("check", str(tmp_path / "tgt.qcow2")).returncode == 0


def test_sigterm_while_a_command_waits_for_a_break_point(tmp_path):
    """SIGTERM while x-blkjobs-blkdebug-wait-break blocks the only command
    worker (a job held at another break point): the wait gives up, the job
    is cancelled, the daemon exits 0 at once -- it used to sit out the
    wait's timeout (here 600 s) before it could close anything."""
    import asyncio
    import signal

    from daemon_util import connect
    d = start_blkjobs(tmp_path)
    src, tgt = make_images(tmp_path)

    async def sc():
        s = await connect(d.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **over_blkdebug("tgt", tgt, []))
        await s.x("x-blkjobs-blkdebug-break", node="dbg", event="write_aio", tag="w")
        await s.x("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt",
                  sync="full")
        await s.x("x-blkjobs-blkdebug-wait-break", tag="w", timeout=60)
        waiting = asyncio.ensure_future(
            s.qmp.execute("x-blkjobs-blkdebug-wait-break", {"tag": "never", "timeout": 600}))
        d.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(waiting, 60)
        except Exception as e:          # the error reply, or the connection closing
            return type(e).__name__
        return "replied"
    try:
        outcome = asyncio.run(sc())
    finally:
        rc = d.stop()
    assert rc == 0, d.stderr
    assert outcome != "TimeoutError"


@pytest.mark.parametrize("rule_event,fails", [("read_backing_aio", True), ("read_aio", False)])
def test_backup_source_with_a_backing_file_raises_read_backing_aio(tmp_path, rule_event, fails):
    """blkdebug under a source qcow2 that has a backing file: the job's reads
    of what the backing file holds raise read_backing_aio on it (QEMU's
    qcow2), not read_aio; a set-state rule on that event arms the error of
    the next own-data read, as in qemu-storage-daemon."""
    async def sc(s, d):
        base, src, tgt = (str(d / n) for n in ("base.qcow2", "src.qcow2", "tgt.qcow2"))
        assert qemu_img("create", "-f", "qcow2", base, "4M").returncode == 0
        qemu_io(base, "write -P 0x11 0 3M")
        assert qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", src).returncode == 0
        qemu_io(src, "write -P 0x22 3M 64k")
        assert qemu_img("create", "-f", "qcow2", tgt, "4M").returncode == 0
        await s.x("blockdev-add", **qcow2_node("base", base, **{"read-only": True}))
        node = {"driver": "qcow2", "node-name": "src", "backing": "base",
                "file": {"driver": "blkdebug", "node-name": "dbg",
                         "image": {"driver": "file", "filename": src},
                         "set-state": [{"event": rule_event, "state": 1, "new_state": 2}],
                         "inject-error": [{"event": "read_aio", "state": 2, "errno": 5}]}}
        await s.x("blockdev-add", **node)
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-backup", **{"job-id": "j", "on-source-error": "report"},
                  device="src", target="tgt", sync="full")
        ev = await s.until("JOB_STATUS_CHANGE", id="j", status="null")
        return [e for e in without_offsets(drop_transient_pauses(brief(ev)))
                if e[0] in ("BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED")]
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert (("BLOCK_JOB_ERROR", {"device": "j", "operation": "read", "action": "report"})
            in ours) == fails
