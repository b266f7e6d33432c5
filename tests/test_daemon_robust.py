"""blkjobs serve survives its clients: huge and deep messages (QEMU's limits
and texts, checked against qemu-storage-daemon 7.2), exceptions inside
commands, bad x-blkjobs-write requests, and a socket only its user can use."""
from __future__ import annotations

import asyncio
import logging
import os

import pytest
from daemon_util import TIMEOUT, Raw, connect, make_images, qcow2_node, start_blkjobs

from blkjobs.daemon.protocol import JsonStreamer, encode, parse

MiB = 1 << 20


@pytest.fixture
def daemon(tmp_path):
    d = start_blkjobs(tmp_path)
    yield d
    assert d.stop() == 0, d.stderr
    assert "Traceback" not in d.stderr, d.stderr


def gen(desc: str, **extra) -> dict:
    return {"error": {"class": "GenericError", "desc": desc}, **extra}


def negotiated(sock: str) -> Raw:
    r = Raw(sock)
    r.line()
    assert r.ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}
    return r


def feed_all(data: bytes, step: int) -> list:
    s = JsonStreamer()
    out = []
    for i in range(0, len(data), step):
        for toks, err in s.feed(data[i:i + step]):
            out.append(parse(toks) if toks is not None else (None, err))
    return out


def test_streamer_split_anywhere():
    """Any split of the input gives the same messages (the state carries over)."""
    data = (b'{"execute": "x", "id": [1, -2.5e3, "a\\u00e9\\ud83d\\ude00\\\\\\"", true, null]}'
            b"{'a': 'it\\'s'} 7 {\"a\": @bc} {\"a\": \"x\x01yz\"}")
    whole = feed_all(data, len(data))
    assert whole == [
        ({"execute": "x", "id": [1, -2500.0, "a\u00e9\U0001F600\\\"", True, None]}, None),
        ({"a": "it's"}, None), (7, None),
        (None, "JSON parse error, stray '@'"), (None, "JSON parse error, expecting value"),
        (None, "JSON parse error, stray '\"x\x01'"), (None, "JSON parse error, expecting value")]
    for step in (1, 2, 3, 7):
        assert feed_all(data, step) == whole


def raw_feed(data: bytes, step: int, bulk: bool) -> list:
    """The streamer's output as it is (tokens, not parsed values)."""
    s = JsonStreamer()
    s.bulk = bulk
    out = []
    for i in range(0, len(data), step):
        out += s.feed(data[i:i + step])
    return out


#: inputs where the bulk tokens meet the byte-wise states: tokens cut by the
#: end of a feed, strays inside and after runs, numbers that do not convert,
#: escapes, single quotes, control bytes, 0xFE/0xFF, keywords glued to numbers
EDGES = [b'{"a": [1, 2.5e3, -7, "x\\"y", \'q\\\'s\', true, false, null, foo]}',
         b"[1e, 1.2.3, -, --1, 0x12, 1true, 12ab] 5 6 ", b'{"a": @bc} 1 {"b": "\x01z"} 3',
         b'["\xfe", "ok"] [\'\xff\'] 9 ', b'  \r\n\t{ "k" :\t"v" }\r\n 42\n',
         b'["\\u00e9\\ud83d\\ude00", "tab\there"] ["\\\x01"] 1',
         b"[1,2,]{,}[:]{}[] -0 -0.0 1E+2 1e-2 2", b'"unterminated', b"[tru", b"[1, 2"]


@pytest.mark.parametrize("data", EDGES)
def test_bulk_tokens_as_byte_wise(data):
    """The bulk path (whole runs of tokens by one regex scan) gives what the
    byte-wise lexer gives, whatever the feeds' sizes: same tokens, values,
    messages and errors, in the same order."""
    want = raw_feed(data, 1, bulk=False)
    assert want == raw_feed(data, len(data), bulk=False)
    for step in (1, 2, 3, 5, 8, 13, len(data)):
        assert raw_feed(data, step, bulk=True) == want, step


def test_bulk_tokens_at_the_limits():
    """The token size limit met in a run of bulk tokens, and a token over it,
    end the message as byte by byte: QEMU's texts, then reading goes on."""
    for data in (b'["' + b"x" * (33 * MiB) + b'", "' + b"y" * (33 * MiB) + b'"] 5 ',
                 b'"' + b"z" * (64 * MiB + 5) + b'" 6 '):
        want = raw_feed(data, 1 << 20, bulk=False)
        assert want[0] == (None, "JSON token size limit exceeded")
        assert raw_feed(data, 1 << 20, bulk=True) == want
        assert raw_feed(data, len(data), bulk=True) == want


def test_nesting_limit_as_qemu(daemon):
    """Nesting up to 1024 (objects and arrays together) parses, without
    recursion; one more is QEMU's error, then the rest is read afresh
    (qemu-storage-daemon 7.2 answers exactly this)."""
    r = negotiated(daemon.sock)
    for depth in (600, 1023):
        r.send(b'{"execute": "query-version", "id": ' + b"[" * depth + b"1" + b"]" * depth + b"}")
        line = r.line()
        assert line.endswith(b', "id": ' + b"[" * depth + b"1" + b"]" * depth + b"}"), line[:100]
        assert line.startswith(b'{"return": {"qemu": ')
    r.send(b"[" * 512 + b'{"a":' * 512 + b"1" + b"}" * 512 + b"]" * 512)
    assert r.msg() == gen("QMP input must be a JSON object")
    r.send(b"[" * 1025 + b"]" * 1025)
    assert r.msg() == gen("JSON nesting depth limit exceeded")
    for _ in range(1025):
        assert r.msg() == gen("JSON parse error, expecting value")
    assert r.ask({"execute": "query-version", "id": 2})["id"] == 2
    r.close()


@pytest.mark.slow
@pytest.mark.parametrize("over", [True, False])
def test_token_count_limit(over):
    """QEMU's per-message limit of tokens (2 Mi): 2 Mi + 1 refused, 2 Mi - 1
    fine. (The lexer takes ~2.5 s of CPU for each: two tests, so that both
    xdist workers can take one.)"""
    n = (1 << 20) - 1
    if over:
        out = feed_all(b"[" + b"1," * n + b"1]", 1 << 16)       # 2 Mi + 1 tokens
        assert out[0] == (None, "JSON token count limit exceeded")
    else:
        out = feed_all(b"[" + b"1," * (n - 1) + b"1]", 1 << 16)  # 2 Mi - 1: fine
        assert out == [([1] * n, None)]


def test_token_size_limits():
    """QEMU's per-message limit of bytes (64 MiB), for one token and all."""
    big = b'{"a": "' + b"x" * (60 * MiB) + b'"}'
    [(value, err)] = feed_all(big, 1 << 16)
    assert err is None and len(value["a"]) == 60 * MiB
    # one token over 64 MiB is cut there; the lexer goes on afresh (spaces)
    out = feed_all(b'{"a": "' + b" " * (70 * MiB) + b'"} 5 ', 1 << 16)
    assert out == [(None, "JSON token size limit exceeded")]
    # tokens adding up to 64 MiB
    half = b'"' + b"x" * (32 * MiB) + b'"'
    out = feed_all(b"[" + half + b"," + half + b"] 5 ", 1 << 16)
    assert out == [(None, "JSON token size limit exceeded"),
                   (None, "JSON parse error, expecting value"), (5, None)]


def test_deep_reply_encodes():
    v = 1
    for _ in range(1023):
        v = [v]
    assert encode({"return": {}, "id": v}) == \
        b'{"return": {}, "id": ' + b"[" * 1023 + b"1" + b"]" * 1023 + b"}\r\n"


def test_others_served_during_huge_message(daemon):
    """One client streams a 60 MiB string slowly; another one's commands are
    answered while that message is still incomplete; then it gets its reply."""
    big = negotiated(daemon.sock)
    other = negotiated(daemon.sock)
    head = b'{"execute": "query-version", "arguments": {"x": "'
    big.send(head)
    chunk = b"y" * MiB
    for i in range(60):
        big.send(chunk)
        if i % 10 == 0:     # the big message is incomplete: others still get answers
            assert other.ask({"execute": "query-jobs", "id": i}) == {"return": [], "id": i}
    big.send(b'"}, "id": "big"}')
    assert big.msg() == gen("Parameter 'x' is unexpected", id="big")
    assert other.ask({"execute": "query-jobs", "id": "end"}) == {"return": [], "id": "end"}
    big.close()
    other.close()


def test_command_exceptions_answered(daemon, tmp_path):
    """block-job-change (it raised TypeError and dropped the connection),
    x-blkjobs-write's bounds (MemoryError, negative length accepted)."""
    src, tgt = make_images(tmp_path)

    async def main():
        s = await connect(daemon.sock)
        await s.x("blockdev-add", **qcow2_node("src", src))
        await s.x("blockdev-add", **qcow2_node("dst", tgt))
        # held at its first write: running while it is changed
        await s.x("x-blkjobs-blkdebug-break", node="dst", event="write_aio", tag="w")
        await s.x("blockdev-mirror", **{"job-id": "m0"}, device="src", target="dst",
                  sync="full")
        await s.x("x-blkjobs-blkdebug-wait-break", tag="w")
        assert await s.x("block-job-change", id="m0", type="mirror",
                         **{"copy-mode": "write-blocking"}) == {}
        assert await s.err("block-job-change", id="m0", type="backup") == \
            ("GenericError", "Job type does not match")
        E = s.err
        assert await E("x-blkjobs-write", node="src", offset=0, length=-5) == \
            ("GenericError", "length is negative: -5")
        assert await E("x-blkjobs-write", node="src", offset=-1, length=5) == \
            ("GenericError", "offset is negative: -1")
        assert await E("x-blkjobs-write", node="src", offset=0, length=1 << 62) == \
            ("GenericError", f"length({1 << 62}) exceeds maximum({64 * MiB})")
        assert await E("x-blkjobs-write", node="src", offset=4 * MiB - 4096, length=8192) == \
            ("GenericError", f"offset({4 * MiB - 4096}) + length(8192) exceeds the size of "
                             f"node 'src' ({4 * MiB})")
        # (its last pass holds guest writes off: let it go on first)
        await s.x("x-blkjobs-blkdebug-resume", tag="w")
        await s.x("x-blkjobs-write", node="src", offset=4 * MiB - 4096, length=4096, pattern=1)
        await s.x("job-cancel", id="m0")
        await s.until("JOB_STATUS_CHANGE", id="m0", status="null")
        await s.close()

    asyncio.run(main())


def test_unexpected_exception_is_an_error_reply(tmp_path, monkeypatch, caplog):
    """Any exception in a command is a GenericError reply; the connection
    stays. The monitor's logger gets the error with its traceback."""
    from blkjobs.daemon.commands import Commands
    from blkjobs.daemon.server import Server
    from blkjobs.engine import Engine

    def boom(self):
        raise RuntimeError("boom")
    monkeypatch.setattr(Commands, "cmd_query_jobs", boom)
    path = str(tmp_path / "s.sock")

    async def main():
        srv = Server(Engine())
        await srv.start([path])
        try:
            rd, wr = await asyncio.open_unix_connection(path)

            async def ask(b: bytes) -> bytes:
                wr.write(b)
                return await asyncio.wait_for(rd.readline(), TIMEOUT)
            await asyncio.wait_for(rd.readline(), TIMEOUT)
            assert await ask(b'{"execute": "qmp_capabilities"}') == b'{"return": {}}\r\n'
            assert await ask(b'{"execute": "query-jobs", "id": 1}') == encode(gen(
                "internal error in command 'query-jobs': RuntimeError: boom", id=1))
            assert (await ask(b'{"execute": "query-block-jobs"}')) == b'{"return": []}\r\n'
            wr.close()
            await wr.wait_closed()
        finally:
            await srv.shutdown()

    with caplog.at_level(logging.ERROR, logger="blkjobs"):
        asyncio.run(main())
    [rec] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rec.name.startswith("blkjobs.daemon.monitor.") and rec.name.rsplit(".", 1)[1].isdigit()
    assert rec.getMessage() == "internal error in command 'query-jobs': RuntimeError: boom"
    assert rec.exc_text is not None and rec.exc_text.startswith("Traceback (most recent call")
    assert rec.exc_text.endswith("RuntimeError: boom") and "in boom" in rec.exc_text


def test_socket_and_pidfile_private(tmp_path):
    """Mode 0600 for the QMP socket and the pid file even under umask 000."""
    pid = tmp_path / "d.pid"
    old = os.umask(0)
    try:
        d = start_blkjobs(tmp_path, "--pidfile", str(pid))
    finally:
        os.umask(old)
    try:
        assert os.stat(d.sock).st_mode & 0o777 == 0o600
        assert os.stat(pid).st_mode & 0o777 == 0o600
        assert pid.read_text() == f"{d.proc.pid}\n"
    finally:
        assert d.stop() == 0, d.stderr
