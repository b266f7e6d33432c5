"""blockdev-reopen's options beyond read-only and backing, against
qemu-storage-daemon reopening the same nodes: which options a qcow2 or
file node may be given anew (discard, detect-zeroes, the cache mode, auto-
read-only, qcow2's lazy-refcounts and cache tuning, file's drop-cache...),
which it refuses and with which text, and what query-named-block-nodes then
shows (detect_zeroes, cache, ro) for the node and its file node."""
from __future__ import annotations

from typing import Any

from qemu.qmp import ExecuteError

from daemon_util import qemu_img, side_by_side

#: (node reopened, options given besides driver/node-name/file or filename)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("n", {"discard": "unmap"}), ("n", {"discard": "ignore"}),
    ("n", {"detect-zeroes": "on"}), ("n", {"detect-zeroes": "unmap"}),
    ("n", {"detect-zeroes": "unmap", "discard": "unmap"}),
    ("n", {"cache": {"direct": True}}), ("n", {"cache": {"no-flush": True}}),
    ("n", {"cache": {"direct": False, "no-flush": False}}),
    ("n", {"auto-read-only": True}), ("n", {"force-share": True}),
    ("n", {"force-share": True, "read-only": True}),
    ("n", {"lazy-refcounts": True}), ("n", {"lazy-refcounts": False}),
    ("n", {"pass-discard-request": True}), ("n", {"pass-discard-other": True}),
    ("n", {"cache-size": 1 << 20}), ("n", {"l2-cache-size": 1 << 20}),
    ("n", {"refcount-cache-size": 65536}), ("n", {"cache-clean-interval": 5}),
    ("n", {"overlap-check": "none"}),
    ("f", {"cache": {"direct": True}}), ("f", {"locking": "off"}), ("f", {"aio": "threads"}),
    ("f", {"auto-read-only": True}), ("f", {"discard": "unmap"}),
    ("f", {"aio-max-batch": 4}), ("f", {"x-check-cache-dropped": True}),
    ("f", {"detect-zeroes": "on"}),
    ("n", {"read-only": True, "auto-read-only": True}), ("f", {"read-only": True}),
    ("n", {"file": {"cache": {"direct": True}}}),
    ("n", {"file": {}, "cache": {"no-flush": True}}),
    ("n", {"file": {}, "detect-zeroes": "unmap", "discard": "unmap"}),
    # once given, drop-cache must be given again
    ("f", {"drop-cache": False}), ("f", {"drop-cache": True}),
]


def test_blockdev_reopen_options_match_qemu(tmp_path):
    async def sc(s, d):
        a = str(d / "a.qcow2")
        assert qemu_img("create", "-f", "qcow2", a, "4M").returncode == 0
        await s.x("blockdev-add", driver="qcow2", **{"node-name": "n"},
                  file={"driver": "file", "filename": a, "node-name": "f"})
        fmt = {"driver": "qcow2", "node-name": "n", "file": "f"}
        proto = {"driver": "file", "node-name": "f", "filename": a}

        async def reopen(o: dict) -> str:
            try:
                await s.x("blockdev-reopen", options=[o])
                return "ok"
            except ExecuteError as e:
                return e.error.error.desc

        out: list[tuple] = []
        for node, extra in CASES:
            o: dict[str, Any] = {**(fmt if node == "n" else proto), **extra}
            if isinstance(extra.get("file"), dict):
                o["file"] = {**proto, **extra["file"]}
            got = await reopen(o)
            q = {x["node-name"]: x for x in await s.x("query-named-block-nodes")}
            out.append((node, extra, got, [(q[k]["detect_zeroes"], q[k]["cache"], q[k]["ro"])
                                           for k in "nf"]))
            # back to the options of blockdev-add (both writable again)
            out.append(("reset", await reopen(dict(fmt)), await reopen(dict(proto))))
        return out
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    entries = [x for x in ours if x[0] != "reset"]
    texts = {(n, str(e)): got for n, e, got, _ in entries}
    assert texts[("n", "{'force-share': True}")] == "Cannot change the option 'force-share'"
    assert texts[("f", "{'aio': 'threads'}")] == "Cannot change the option 'aio'"
    assert texts[("n", "{'detect-zeroes': 'unmap'}")] == (
        "setting detect-zeroes to unmap is not allowed without setting discard operation "
        "to unmap")
    assert ours[-1] == ("reset", "ok", "Option 'drop-cache' cannot be reset to its default value")
    shown = {(n, str(e)): nodes for n, e, _, nodes in entries}
    off = {"writeback": True, "direct": False, "no-flush": False}
    direct = {**off, "direct": True}
    # a cache mode reaches the file node made inline, detect-zeroes does not
    assert shown[("n", "{'cache': {'direct': True}}")] == [("off", direct, False),
                                                            ("off", direct, False)]
    assert shown[("n", "{'detect-zeroes': 'unmap', 'discard': 'unmap'}")] == [
        ("unmap", off, False), ("off", off, False)]


def test_reopened_discard_and_detect_zeroes_change_the_writes(tmp_path):
    """discard and detect-zeroes, given at blockdev-add or by a reopen,
    change what the next requests through an NBD export do, as in QEMU: with
    discard=ignore (the default) a TRIM does nothing and a write-zeroes keeps
    its clusters; with detect-zeroes a write of zeroes is a write-zeroes
    (unmap: the clusters are freed). The image's map, check and data equal
    qemu-storage-daemon's."""
    import asyncio
    import json

    from daemon_util import qcow2_node, qemu_io
    from nbd_peers import qemu_io_nbd, uri

    def io(u: str, *cmds: str) -> Any:
        return asyncio.to_thread(qemu_io_nbd, u, *cmds)

    async def sc(s, d):
        img = str(d / "a.qcow2")
        assert qemu_img("create", "-f", "qcow2", img, "2M").returncode == 0
        qemu_io(img, "write -P 0xaa 0 1M")
        sock = str(d / "nbd.sock")
        await s.x("blockdev-add", **qcow2_node("n", img, **{"detect-zeroes": "on"}))
        await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        await s.x("block-export-add", type="nbd", id="e", **{"node-name": "n"}, writable=True)
        u = uri(sock, "n")
        # blockdev-add: discard=ignore, detect-zeroes=on
        await io(u, "write -z -u 0 64k", "discard 64k 64k", "write -P 0 128k 64k",
                 "write -P 0 1M 64k")
        async def reopen(**o: str) -> None:
            await s.x("blockdev-reopen", options=[{
                "driver": "qcow2", "node-name": "n",
                "file": {"driver": "file", "filename": img}, **o}])
        await reopen(discard="unmap", **{"detect-zeroes": "unmap"})
        await io(u, "write -P 0 256k 64k", "discard 320k 64k", "write -z -u 384k 64k",
                 "write -P 0 1088k 64k")
        await reopen(discard="unmap")           # detect-zeroes: off again
        await io(u, "write -P 0 448k 64k", "discard 512k 64k")
        await reopen()                          # discard: kept
        await io(u, "discard 576k 64k", "write -z -u 640k 64k")
        await reopen(**{"detect-zeroes": "unmap"})
        await io(u, "write -P 0 704k 64k")
        await reopen(discard="ignore")
        await io(u, "discard 768k 64k")
        await s.x("block-export-del", id="e")
        await s.until("BLOCK_EXPORT_DELETED")
        await s.x("nbd-server-stop")
        await s.x("blockdev-del", **{"node-name": "n"})
        return (json.loads(qemu_img("map", "--output=json", img).stdout),
                qemu_img("check", img).stdout)
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert "No errors were found" in ours[1]
    rc = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(tmp_path / "qsd" / "a.qcow2"),
                  str(tmp_path / "blkjobs" / "a.qcow2"))
    assert rc.returncode == 0, rc.stdout
    m = {r["start"]: (r["data"], r["zero"], "offset" in r) for r in ours[0]}
    assert m[0] == (False, True, False)         # write-zeroes may unmap, whatever discard
    assert m[64 << 10] == (True, False, True)   # discard=ignore: the TRIM did nothing
    assert m[128 << 10] == (False, True, True)  # detect-zeroes=on: zero, cluster kept
    assert m[256 << 10] == (False, True, False)  # detect-zeroes=unmap: freed; then the TRIM
    assert m[448 << 10] == (True, False, True)  # detect-zeroes off again: zeroes written
    assert m[512 << 10] == (False, True, False)  # TRIMs with discard=unmap, kept by reopen
    assert m[768 << 10] == (True, False, True)  # discard=ignore again
