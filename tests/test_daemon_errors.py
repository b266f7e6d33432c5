"""The job spec's failure scenarios over QMP, with faults injected by
blkdebug nodes, against qemu-storage-daemon doing the same
(docs/job-model.md §8 and §10): a grouped transaction where one member
fails, and the error policies of backup's source and of mirror's source
and target (backup's target: tests/test_daemon_blkdebug.py)."""
from __future__ import annotations

import pytest
from daemon_util import (brief, compare, drop_transient_pauses, make_images, qcow2_node,
                         side_by_side, status_seq)
from test_daemon_blkdebug import over_blkdebug, without_offsets


def test_grouped_transaction_one_member_fails_matches_qsd(tmp_path):
    """Two backups in a grouped transaction; the second one's target fails
    every write (report): it fails, and the first one, still running
    (rate-limited), is cancelled. Per-job event sequences as QEMU's, and the
    failed member's BLOCK_JOB_COMPLETED comes before the other's
    BLOCK_JOB_CANCELLED."""
    async def sc(s, d):
        src, tgt = make_images(d, "64M")
        (d / "b").mkdir()
        _, tgt2 = make_images(d / "b", "64M")
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("tgt", tgt))
        await s.x("blockdev-add", **over_blkdebug("tgt2", tgt2, [
            {"event": "write_aio", "errno": 5}]))
        await s.x("transaction", actions=[
            {"type": "blockdev-backup", "data": {
                "job-id": "slow", "device": "src", "target": "tgt", "sync": "full",
                "speed": 64 << 10}},
            {"type": "blockdev-backup", "data": {
                "job-id": "bad", "device": "src", "target": "tgt2", "sync": "full"}}],
            properties={"completion-mode": "grouped"})
        ev = await s.until("JOB_STATUS_CHANGE", id="slow", status="null")
        if not any(e["data"].get("id") == "bad" and e["data"].get("status") == "null"
                   for e in ev if e["event"] == "JOB_STATUS_CHANGE"):
            ev += await s.until("JOB_STATUS_CHANGE", id="bad", status="null")
        ev = without_offsets(drop_transient_pauses(brief(ev)))
        seqs = {}
        for jid in ("slow", "bad"):
            # QEMU's transient drain pauses (docs/job-model.md §9), between
            # the other job's events here
            seq = " ".join(status_seq(jid, [{"event": n, "data": dt} for n, dt in ev]))
            seqs[jid] = seq.replace(" paused running", "").split()
        return {**seqs,
                "block": [(n, dt) for n, dt in ev if n.startswith("BLOCK_JOB_")],
                "jobs": await s.x("query-jobs")}
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["bad"] == ["created", "running", "BLOCK_JOB_ERROR", "aborting",
                           "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert ours["slow"] == ["created", "running", "aborting", "BLOCK_JOB_CANCELLED",
                            "concluded", "null"]
    assert [n for n, _ in ours["block"]] == ["BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED",
                                             "BLOCK_JOB_CANCELLED"]
    assert ours["block"][1] == ("BLOCK_JOB_COMPLETED", {
        "type": "backup", "device": "bad", "len": 64 << 20, "speed": 0,
        "error": "Input/output error"})


def source_over_blkdebug(d, rules):
    src, tgt = make_images(d)
    return src, tgt, over_blkdebug("src", src, rules)


@pytest.mark.parametrize("job,side,policy,errno,expect", [
    ("backup", "source", "report", 5, "report"),
    ("backup", "source", "ignore", 5, "ignore"),
    ("backup", "source", "stop", 28, "stop"),
    ("backup", "source", "enospc", 5, "report"),
    ("mirror", "source", "stop", 5, "stop"),
    ("mirror", "source", "report", 28, "report"),
    ("mirror", "target", "enospc", 28, "stop"),
    ("mirror", "target", "ignore", 5, "ignore"),
])
def test_error_policies_match_qsd(tmp_path, job, side, policy, errno, expect):
    """One error (once) injected into the first read of the source or the
    first write of the target; the policy decides: the same events, the
    same query-block-jobs while stopped, the same data when the job goes on."""
    async def sc(s, d):
        src, tgt = make_images(d)
        event = "read_aio" if side == "source" else "write_aio"
        rule = [{"event": event, "errno": errno, "once": True}]
        await s.x("blockdev-add", **(over_blkdebug("src", src, rule) if side == "source"
                                     else qcow2_node("src", src)))
        await s.x("blockdev-add", **(over_blkdebug("tgt", tgt, rule) if side == "target"
                                     else qcow2_node("tgt", tgt)))
        await s.x(f"blockdev-{job}", **{"job-id": "j", f"on-{side}-error": policy},
                  device="src", target="tgt", sync="full")
        out = {"query": None}
        ev = await s.until("BLOCK_JOB_ERROR")
        if expect == "stop":
            ev += await s.until("JOB_STATUS_CHANGE", id="j", status="paused")
            [q] = await s.x("query-block-jobs")
            q.pop("offset")
            q.pop("actively-synced", None)      # QEMU 7.2 has none
            out["query"] = q
            await s.x("job-resume", id="j")
        if job == "mirror" and expect != "report":
            ev += await s.until("BLOCK_JOB_READY")
            await s.x("job-complete", id="j")
        ev += await s.until("JOB_STATUS_CHANGE", id="j", status="null")
        out["events"] = without_offsets(drop_transient_pauses(brief(ev)))
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    op = "read" if side == "source" else "write"
    assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": op, "action": expect}) \
        in ours["events"]
    same = {}
    for name in ("qsd", "blkjobs"):
        d = tmp_path / name
        same[name] = compare(str(d / "src.qcow2"), str(d / "tgt.qcow2"))[0] == 0
    assert same["qsd"] == same["blkjobs"] == (expect != "report")
    if expect == "stop":
        assert ours["query"]["paused"] is True
        assert ours["query"]["io-status"] == ("failed" if errno == 5 else "nospace")


def test_grouped_transaction_member_fails_after_another_finished(tmp_path):
    """The other order: one member is done (waiting for the group) when the
    other, rate-limited, fails at the data at 2 MiB: the waiting member goes
    waiting -> aborting and is cancelled; drive-backup takes part like
    blockdev-backup."""
    async def sc(s, d):
        src, tgt = make_images(d, "64M")
        (d / "b").mkdir()
        _, tgt2 = make_images(d / "b", "64M")
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", driver="blkdebug", **{"node-name": "tgt2"},
                  image={"driver": "qcow2", "file": {"driver": "file", "filename": tgt2}},
                  **{"inject-error": [{"event": "pwritev", "sector": (2 << 20) // 512}]})
        await s.x("transaction", actions=[
            {"type": "drive-backup", "data": {
                "job-id": "fast", "device": "src", "target": tgt, "sync": "full",
                "mode": "existing", "format": "qcow2"}},
            {"type": "blockdev-backup", "data": {
                "job-id": "bad", "device": "src", "target": "tgt2", "sync": "full",
                "speed": 1 << 20}}],
            properties={"completion-mode": "grouped"})
        ev = await s.until("JOB_STATUS_CHANGE", id="fast", status="waiting")
        ev += await s.until("JOB_STATUS_CHANGE", id="fast", status="null")
        if not any(e["data"].get("id") == "bad" and e["data"].get("status") == "null"
                   for e in ev if e["event"] == "JOB_STATUS_CHANGE"):
            ev += await s.until("JOB_STATUS_CHANGE", id="bad", status="null")
        ev = without_offsets(drop_transient_pauses(brief(ev)))
        out = {}
        for jid in ("fast", "bad"):
            seq = " ".join(status_seq(jid, [{"event": n, "data": dt} for n, dt in ev]))
            out[jid] = seq.replace(" paused running", "").split()
        out["block"] = [(n, dt) for n, dt in ev if n.startswith("BLOCK_JOB_")]
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours
    assert ours["fast"] == ["created", "running", "waiting", "aborting",
                            "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert [n for n, _ in ours["block"]] == ["BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED",
                                             "BLOCK_JOB_CANCELLED"]
