"""query-qmp-schema, query-commands, query-version (daemon/introspect.py):
the schema describes exactly what the daemon implements, in QEMU's
SchemaInfo form, and agrees with qemu-storage-daemon's where the two
implement the same thing."""
from __future__ import annotations

import asyncio

from daemon_util import connect, start_blkjobs, start_qsd
from qemu.qmp import ExecuteError

from blkjobs.daemon.schema import COMMANDS

EVENTS = {"JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR",
          "BLOCK_JOB_READY", "BLOCK_JOB_PENDING", "BLOCK_WRITE_THRESHOLD",
          "BLOCK_EXPORT_DELETED"}
#: Commands whose arguments and result are the same in QEMU 7.2 (the
#: qemu-storage-daemon installed here) and in the QEMU 10.1 surface we
#: implement: their schema must be identical, type for type.
SAME_AS_QEMU = [
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
    "blockdev-del", "query-jobs", "job-pause", "job-resume", "job-cancel", "job-complete",
    "job-finalize", "job-dismiss", "block-job-set-speed", "block-job-cancel",
    "block-job-pause", "block-job-resume", "block-job-complete", "block-job-finalize",
    "block-job-dismiss", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge", "x-debug-block-dirty-bitmap-sha256", "blockdev-snapshot",
    "block_resize", "block-set-write-threshold", "x-debug-query-block-graph",
    "nbd-server-stop", "nbd-server-remove", "block-export-del", "query-block-exports",
    "object-del", *sorted(EVENTS)]


def shaper(schema: list[dict]):
    """Type names are masked numbers in both: compare resolved shapes."""
    by_name = {e["name"]: e for e in schema}
    assert len(by_name) == len(schema), "duplicate names"

    def shape(t: str, stack: tuple = ()):
        if t in stack:
            return "<recursive>"
        e, st = by_name[t], stack + (t,)
        mt = e["meta-type"]
        if mt == "builtin":
            return t
        if mt == "array":
            return ("array", shape(e["element-type"], st))
        if mt == "enum":
            assert [m["name"] for m in e["members"]] == e["values"]
            return ("enum", tuple(e["values"]))
        if mt == "alternate":
            return ("alternate", tuple(sorted(repr(shape(m["type"], st))
                                              for m in e["members"])))
        if mt == "object":
            return ("object", tuple((m["name"], "default" in m, shape(m["type"], st))
                                    for m in e["members"]), e.get("tag"),
                    tuple((v["case"], shape(v["type"], st)) for v in e.get("variants", [])))
        return (mt, shape(e["arg-type"], st),
                shape(e["ret-type"], st) if mt == "command" else None)
    return by_name, shape


def compatible(ref, ours, path: str = "", result: bool = False) -> None:
    """Ours implements QEMU 10.1's surface: every member QEMU 7.2 has is
    there (same optionality; in results, optional members blkjobs never
    sends may be absent), enums keep QEMU's values, and each union variant
    we offer is QEMU's."""
    if ref == ours:
        return
    if ref == "str" and isinstance(ours, tuple) and ours[0] == "enum":
        return      # BlockJobInfo.type: a str in 7.2, JobType since QEMU 8.2
    assert isinstance(ref, tuple) and isinstance(ours, tuple) and ref[0] == ours[0], \
        (path, ref, ours)
    kind = ref[0]
    if kind == "array":
        compatible(ref[1], ours[1], path + "[]", result)
    elif kind == "enum":
        assert set(ref[1]) <= set(ours[1]), (path, set(ref[1]) - set(ours[1]))
    elif kind == "object":
        mine = {m[0]: m for m in ours[1]}
        for name, opt, t in ref[1]:
            if result and opt and name not in mine:
                continue
            assert name in mine, f"{path}.{name} missing"
            assert mine[name][1] == opt, f"{path}.{name} optionality"
            compatible(t, mine[name][2], f"{path}.{name}", result)
        # BlockJobInfo: a union on 'type' since QEMU 8.2
        assert ref[2] == ours[2] or (ref[2] is None and path.startswith("query-block-jobs")), \
            path
        theirs = dict(ref[3])
        for case, t in ours[3]:
            if ref[2] is None:
                continue
            assert case in theirs, f"{path}: variant {case} is not QEMU's"
            compatible(theirs[case], t, f"{path}+{case}", result)
    elif kind == "alternate":
        # choices are kept as reprs: the same JSON kinds (the object choice,
        # BlockdevOptions, is compared where blockdev-add has it)
        def kinds(t):
            return sorted(c.split(",")[0] for c in t[1])
        assert kinds(ref) == kinds(ours), (path, ref, ours)
    elif kind == "command":
        compatible(ref[1], ours[1], path + "/arg")
        compatible(ref[2], ours[2], path + "/ret", True)
    elif kind == "event":
        compatible(ref[1], ours[1], path + "/data", True)
    else:
        raise AssertionError((path, ref, ours))


async def fetch(sock: str) -> dict:
    s = await connect(sock)
    try:
        out = {"schema": await s.x("query-qmp-schema"),
               "commands": [c["name"] for c in await s.x("query-commands")],
               "version": await s.x("query-version"),
               "greeting": s.qmp._greeting._raw["QMP"] if s.qmp._greeting else None}
        if "x-blkjobs-write" in out["commands"]:
            out["runs"] = {}
            for name in out["commands"]:
                if name in ("quit", "qmp_capabilities"):
                    continue
                try:
                    await s.x(name)
                    out["runs"][name] = "ok"
                except ExecuteError as e:
                    out["runs"][name] = e.error_class
        return out
    finally:
        await s.close()


def both(tmp_path) -> tuple[dict, dict]:
    res = {}
    for name, start in (("qsd", start_qsd), ("blkjobs", start_blkjobs)):
        d = tmp_path / name
        d.mkdir()
        daemon = start(d)
        try:
            res[name] = asyncio.run(fetch(daemon.sock))
        finally:
            assert daemon.stop() == 0, daemon.stderr
    return res["qsd"], res["blkjobs"]


def test_schema_describes_exactly_what_the_daemon_implements(tmp_path):
    ref, ours = both(tmp_path)
    by_name, shape = shaper(ours["schema"])
    for e in ours["schema"]:            # every reference resolves
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                assert e[key] in by_name, (e, key)
        for m in e.get("members", []):
            assert "type" not in m or m["type"] in by_name, (e, m)
        for v in e.get("variants", []):
            assert v["type"] in by_name and v["case"] in shape(
                [m for m in e["members"] if m["name"] == e["tag"]][0]["type"])[1]
    commands = [e["name"] for e in ours["schema"] if e["meta-type"] == "command"]
    assert commands == ours["commands"] == list(COMMANDS)
    assert {e["name"] for e in ours["schema"] if e["meta-type"] == "event"} == EVENTS
    # every command listed runs (a missing argument at worst), none is unknown
    assert all(r in ("ok", "GenericError", "DeviceNotActive")
               for r in ours["runs"].values()), ours["runs"]
    assert by_name["0"] == {"name": "0", "meta-type": "object", "members": []}
    assert {e["name"]: e["json-type"] for e in ours["schema"]
            if e["meta-type"] == "builtin"} == {"str": "string", "any": "value",
                                                 "bool": "boolean", "int": "int",
                                                 "null": "null"}


def test_schema_matches_qemu_storage_daemon(tmp_path):
    ref, ours = both(tmp_path)
    _, rshape = shaper(ref["schema"])
    _, oshape = shaper(ours["schema"])
    for name in SAME_AS_QEMU:
        assert rshape(name) == oshape(name), name
    for name in ours["commands"]:
        if name in ref["commands"]:
            compatible(rshape(name), oshape(name), name)
    # query-commands: QEMU's names in QEMU's form
    assert set(ours["commands"]) - set(ref["commands"]) == {
        "block-job-change", "x-blkjobs-write", "x-blkjobs-blkdebug-break",
        "x-blkjobs-blkdebug-wait-break", "x-blkjobs-blkdebug-resume",
        "x-blkjobs-blkdebug-remove-break"}


def test_version_is_honest(tmp_path):
    ref, ours = both(tmp_path)
    assert set(ours["version"]) == set(ref["version"]) == {"qemu", "package"}
    assert set(ours["version"]["qemu"]) == {"major", "minor", "micro"}
    assert ours["version"]["qemu"] == {"major": 10, "minor": 1, "micro": 0}
    assert ours["version"]["package"].startswith("blkjobs ")
    assert "not QEMU" in ours["version"]["package"]
    assert ours["greeting"]["version"] == ours["version"]
    assert ref["greeting"]["version"] == ref["version"]
    # QEMU offers out-of-band execution; blkjobs has none (docs/qmp.md)
    assert ref["greeting"]["capabilities"] == ["oob"]
    assert ours["greeting"]["capabilities"] == []
