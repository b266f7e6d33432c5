"""blkjobs serve: the wire protocol (docs/qmp.md §1) over a raw socket, and
argument checking, node commands and verb lookups through qemu.qmp."""
from __future__ import annotations

import asyncio

import pytest
from daemon_util import Raw, connect, make_images, qcow2_node, start_blkjobs


@pytest.fixture
def daemon(tmp_path):
    d = start_blkjobs(tmp_path)
    yield d
    assert d.stop() == 0, d.stderr
    assert "Traceback" not in d.stderr, d.stderr


def gen(desc: str, cls: str = "GenericError", **extra) -> dict:
    return {"error": {"class": cls, "desc": desc}, **extra}


def test_greeting_and_negotiation(daemon):
    r = Raw(daemon.sock)
    line = r.line()
    assert line.startswith(b'{"QMP"')
    greet = __import__("json").loads(line)
    assert greet == {"QMP": {"version": {"qemu": {"major": 10, "minor": 1, "micro": 0},
                                         "package": greet["QMP"]["version"]["package"]},
                             "capabilities": []}}
    assert greet["QMP"]["version"]["package"].startswith("blkjobs ")
    neg = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert r.ask({"execute": "query-version", "id": 1}) == gen(neg, "CommandNotFound", id=1)
    assert r.ask({"execute": "nosuch"}) == gen(neg, "CommandNotFound")
    assert r.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == \
        gen("Capability oob not available")
    assert r.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}) == \
        gen("Parameter 'null' does not accept value 'foo'")
    assert r.ask({"execute": "qmp_capabilities", "id": "neg"}) == {"return": {}, "id": "neg"}
    assert r.ask({"execute": "qmp_capabilities"}) == \
        gen("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    v = r.ask({"execute": "query-version"})["return"]
    assert v == greet["QMP"]["version"]
    names = {c["name"] for c in r.ask({"execute": "query-commands"})["return"]}
    assert {"blockdev-backup", "transaction", "job-finalize", "quit"} <= names
    r.close()


def test_request_level_errors(daemon):
    r = Raw(daemon.sock)
    r.line()
    r.ask(b'{"execute": "qmp_capabilities"}')
    cases = [
        (b'[1]', gen("QMP input must be a JSON object")),
        (b'3\n', gen("QMP input must be a JSON object")),
        (b'{"id": 5}', gen("QMP input lacks member 'execute'", id=5)),
        (b'{"execute": 3, "id": 6}', gen("QMP input member 'execute' must be a string", id=6)),
        (b'{"execute": "query-version", "arguments": [], "id": 7}',
         gen("QMP input member 'arguments' must be an object", id=7)),
        (b'{"execute": "query-version", "foo": 1, "id": 8}',
         gen("QMP input member 'foo' is unexpected", id=8)),
        (b'{"execute": "nope", "id": 9}',
         gen("The command nope has not been found", "CommandNotFound", id=9)),
        (b'{"execute": "query-version", "arguments": {"a": 1}, "id": [1, {"x": null}]}',
         gen("Parameter 'a' is unexpected", id=[1, {"x": None}])),
        (b'{"execute" "x"}', gen("JSON parse error, missing : in object pair")),
        (b'{"execute": "x"]', gen("JSON parse error, expected separator in dict")),
        (b'{"a": tru}', gen("JSON parse error, invalid keyword 'tru'")),
        (b'}', gen("JSON parse error, expecting value")),
    ]
    for req, want in cases:
        assert r.ask(req) == want, req
    # a stray character ends the message; the rest is parsed afresh
    r.send(b'{"a": @}')
    assert r.msg() == gen("JSON parse error, stray '@'")
    assert r.msg() == gen("JSON parse error, expecting value")
    # back to back, split across writes, single quotes, non-ASCII echoed as \\u
    r.send(b'{"execute": "query-version", "id": 1}  {"execute": "query-')
    assert r.msg()["id"] == 1
    r.send(b'version", "id": 2}')
    assert r.msg()["id"] == 2
    r.send(b"{'execute': 'query-version', 'id': 'it\\'s \xc3\xa9'}")
    line = r.line()
    assert line.endswith(b'"id": "it\'s \\u00e9"}'), line
    r.close()


def test_arguments_and_nodes(daemon, tmp_path):
    src, tgt = make_images(tmp_path)

    async def main():
        s = await connect(daemon.sock)
        E = s.err
        assert await E("blockdev-add", driver="qcow2") == \
            ("GenericError", "Parameter 'file' is missing")
        assert await E("blockdev-add", driver="qcow2", **{"node-name": "a"},
                       file={"driver": "file"}) == \
            ("GenericError", "Parameter 'file.filename' is missing")
        assert await E("blockdev-add", driver="qcow2", **{"node-name": "a"},
                       file={"driver": "file", "filename": 3}) == \
            ("GenericError", "Invalid parameter type for 'file.filename', expected: string")
        assert await E("blockdev-add", driver="qcow2", **{"node-name": "a"},
                       file={"driver": "bogus"}) == \
            ("GenericError", "Parameter 'driver' does not accept value 'bogus'")
        assert await E("blockdev-add", driver="qcow2", **{"node-name": "a"},
                       file={"driver": "file", "filename": src}, extra=1) == \
            ("GenericError", "Parameter 'extra' is unexpected")
        assert await E("blockdev-add", driver="raw",
                       file={"driver": "file", "filename": src}) == \
            ("GenericError", "'node-name' must be specified for the root node")
        assert await E("blockdev-add", **qcow2_node("9x", src)) == \
            ("GenericError", "Invalid node-name: '9x'")
        assert await E("blockdev-add", **qcow2_node("x" * 32, src)) == \
            ("GenericError", "Node name too long")
        assert await E("blockdev-add", **qcow2_node("a", str(tmp_path / "none"))) == \
            ("GenericError", f"Could not open '{tmp_path / 'none'}': No such file or directory")
        assert await E("blockdev-backup", device="a", target="b", sync="fast") == \
            ("GenericError", "Parameter 'sync' does not accept value 'fast'")
        assert await E("block-dirty-bitmap-merge", node="a", target="b", bitmaps=[3]) == \
            ("GenericError", "Invalid parameter type for 'bitmaps[0]', "
                             "expected: BlockDirtyBitmapOrStr")
        assert await E("transaction", actions=[{"type": "block-dirty-bitmap-add",
                                                "data": {"node": "a"}}]) == \
            ("GenericError", "Parameter 'actions[0].data.name' is missing")

        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", driver="file", **{"node-name": "tf"}, filename=tgt)
        await s.x("blockdev-add", driver="qcow2", **{"node-name": "tgt"}, file="tf",
                  backing=None)
        assert await E("blockdev-add", **qcow2_node("src", src)) == \
            ("GenericError", "Duplicate nodes with node-name='src'")
        nodes = {n["node-name"]: n for n in await s.x("query-named-block-nodes")}
        assert nodes["src"]["drv"] == "qcow2" and nodes["src"]["ro"] is False
        assert nodes["src"]["image"]["virtual-size"] == 4 << 20
        assert nodes["src"]["image"]["cluster-size"] == 65536
        assert nodes["tf"]["drv"] == "file" and nodes["tf"]["file"] == tgt
        assert sum(1 for n in nodes.values() if n["file"] == src) == 2   # + auto-named file
        for n in nodes.values():
            for k in ("bps", "iops", "backing_file_depth", "write_threshold", "cache",
                      "encrypted", "detect_zeroes", "active"):
                assert k in n

        assert await E("blockdev-del", **{"node-name": "zz"}) == \
            ("GenericError", "Failed to find node with node-name='zz'")
        assert await E("blockdev-del", **{"node-name": "tf"}) == \
            ("GenericError", "Block device tf is in use")
        auto = next(k for k, n in nodes.items() if k.startswith("#") and n["file"] == src)
        assert await E("blockdev-del", **{"node-name": auto}) == \
            ("GenericError", f"Node {auto} is not owned by the monitor")

        # unknown jobs: both error classes
        for verb in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize",
                     "job-dismiss"):
            assert await E(verb, id="nojob") == ("GenericError", "Job not found")
        for verb in ("block-job-pause", "block-job-resume", "block-job-cancel",
                     "block-job-complete"):
            assert await E(verb, device="nojob") == \
                ("DeviceNotActive", "Block job 'nojob' not found")
        for verb in ("block-job-finalize", "block-job-dismiss"):
            assert await E(verb, id="nojob") == \
                ("DeviceNotActive", "Block job 'nojob' not found")
        assert await E("block-job-set-speed", device="nojob", speed=1) == \
            ("DeviceNotActive", "Block job 'nojob' not found")
        assert await E("block-commit", device="nojob") == \
            ("DeviceNotFound", "Device 'nojob' not found")
        assert await E("blockdev-backup", device="src", target="nope", sync="full") == \
            ("GenericError", "Cannot find device='nope' nor node-name='nope'")
        assert await E("blockdev-backup", device="src", target="tgt", sync="bitmap") == \
            ("GenericError", "must provide a valid bitmap name for 'bitmap' sync mode")

        await s.x("blockdev-del", **{"node-name": "tgt"})
        await s.x("blockdev-del", **{"node-name": "tf"})
        await s.x("blockdev-del", **{"node-name": "src"})
        assert await s.x("query-named-block-nodes") == []
        await s.close()

    asyncio.run(main())


def test_quit_and_tcp(tmp_path):
    d = start_blkjobs(tmp_path, "--tcp", "127.0.0.1:0")
    port = d.ready["tcp-ports"][0]

    async def main():
        from qemu.qmp import QMPClient
        qmp = QMPClient("tcp")
        await asyncio.wait_for(qmp.connect(("127.0.0.1", port)), 10)
        assert (await qmp.execute("query-version"))["package"].startswith("blkjobs")
        await asyncio.wait_for(qmp.execute("quit"), 10)
        try:
            await qmp.disconnect()
        except EOFError:        # the daemon hung up first, as QEMU does after quit
            pass

    asyncio.run(main())
    assert d.proc.wait(10) == 0
    d.stop()


def test_tcp_loopback_only(tmp_path):
    from conftest import run_blkjobs
    p = run_blkjobs("serve", "--tcp", "0.0.0.0:4444")
    assert p.returncode == 1 and "not a loopback address" in p.stderr
