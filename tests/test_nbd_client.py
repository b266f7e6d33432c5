"""The nbd driver against real NBD servers: qemu-nbd (raw and qcow2 images,
persistent) and nbdkit (memory, sparse-random, pattern, data; the error and
delay filters and sh plugins for bad peers). qemu-img on the same URIs is
the oracle."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import run_blkjobs
from daemon_util import run_daemon, start_blkjobs

WAIT = 15.0


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed (make deps): the NBD peers are required")
    return path


class Server:
    """A server process listening on a unix socket; stopped by the fixture."""

    def __init__(self, argv: list[str], sock: str):
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        # its messages go to a file: a pipe nobody reads would stall it
        self.log = open(sock + ".log", "w+")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + WAIT
        while not os.path.exists(sock):
            assert self.proc.poll() is None, f"{argv[0]} exited: {self._said()}"
            assert time.monotonic() < deadline, f"{argv[0]}: no socket"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.log.close()

    def _said(self) -> str:
        self.log.seek(0)
        return self.log.read()


@pytest.fixture
def servers(tmp_path):
    started: list[Server] = []

    def qemu_nbd(image: str, fmt: str, *extra: str, name: str = "q") -> Server:
        sock = str(tmp_path / f"{name}.sock")
        s = Server([_need("qemu-nbd"), "-k", sock, "-f", fmt, "-t", *extra, image], sock)
        started.append(s)
        return s

    def nbdkit(*args: str, name: str = "k") -> Server:
        sock = str(tmp_path / f"{name}.sock")
        s = Server([_need("nbdkit"), "-f", "-U", sock, *args], sock)
        started.append(s)
        return s

    yield qemu_nbd, nbdkit
    for s in started:
        s.stop()


def qimg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_need("qemu-img"), *args], capture_output=True, text=True,
                          timeout=120)


def qio(fmt: str, path: str, *cmds: str) -> None:
    argv = [_need("qemu-io"), "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr


def qcow2_image(tmp_path, name: str = "a.qcow2", size: str = "64M") -> str:
    p = str(tmp_path / name)
    assert qimg("create", "-f", "qcow2", p, size).returncode == 0
    qio("qcow2", p, "write -P 0xab 1M 2M", "write -z 8M 1M", "write -P 0x11 20M 64k",
        "write -P 0x22 63M 1M")
    return p


def same(a: str, b: str, *opts: str) -> None:
    r = qimg("compare", "-U", *opts, a, b)
    assert r.returncode == 0, r.stdout + r.stderr


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# -- qemu-nbd ---------------------------------------------------------------

def test_info_and_map_equal_qemu_img(tmp_path, servers):
    qemu_nbd, _ = servers
    s = qemu_nbd(qcow2_image(tmp_path), "qcow2")
    for out in ("json", "human"):
        ours = run_blkjobs("info", "--output", out, s.uri, check=True)
        assert ours.stdout == qimg("info", "--output", out, s.uri).stdout
    for out in ("json", "human"):
        ours = run_blkjobs("map", "--output", out, s.uri, check=True)
        assert ours.stdout == qimg("map", "--output", out, s.uri).stdout
    assert '"zero": true' in ours.stdout or "0x100000" in ours.stdout


def test_convert_from_a_qcow2_export_to_files(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    s = qemu_nbd(img, "qcow2")
    for fmt in ("raw", "qcow2"):
        dst = str(tmp_path / f"out.{fmt}")
        run_blkjobs("convert", "-O", fmt, s.uri, dst, check=True)
        same(dst, img)
        same(dst, s.uri)
    # holes stay holes: the raw copy has no more than the data blocks
    assert os.stat(tmp_path / "out.raw").st_blocks * 512 <= 4 << 20


def test_convert_files_into_a_raw_export(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    tgt = str(tmp_path / "t.raw")
    with open(tgt, "wb") as f:
        f.write(b"\x5a" * (64 << 20))        # old contents must all be replaced
    s = qemu_nbd(tgt, "raw", name="t")
    run_blkjobs("convert", "-n", img, s.uri, check=True)
    same(s.uri, img)
    # without -n too (the export is never created nor grown)
    qio("raw", s.uri, "write -P 0x77 0 64M")
    run_blkjobs("convert", "-f", "qcow2", img, s.uri, check=True)
    same(s.uri, img)


def test_convert_into_a_smaller_export_is_refused_as_qemu_img_does(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    small = str(tmp_path / "small.raw")
    assert qimg("create", "-f", "raw", small, "1M").returncode == 0
    s = qemu_nbd(small, "raw", name="small")
    p = run_blkjobs("convert", "-n", img, s.uri)
    assert one_line_error(p) == "blkjobs: output file is smaller than input file"
    p = run_blkjobs("convert", img, s.uri)
    assert one_line_error(p) == (f"blkjobs: {s.uri}: error while converting raw: "
                                 "Cannot grow NBD nodes")


def test_compare_through_nbd(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    s = qemu_nbd(img, "qcow2")
    copy = str(tmp_path / "copy.qcow2")
    assert qimg("convert", "-U", "-O", "qcow2", img, copy).returncode == 0
    p = run_blkjobs("compare", s.uri, copy, check=True)
    assert p.stdout == "Images are identical.\n"
    qio("qcow2", copy, "write -P 0x99 30M 4k")
    p = run_blkjobs("compare", s.uri, copy)
    q = qimg("compare", s.uri, copy)
    assert (p.returncode, p.stdout) == (q.returncode, q.stdout) == (1, q.stdout)


def test_backup_and_mirror_with_an_nbd_target(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    tgt = str(tmp_path / "t.raw")
    with open(tgt, "wb") as f:
        f.write(b"\x5a" * (64 << 20))
    s = qemu_nbd(tgt, "raw", name="t")
    run_blkjobs("backup", img, s.uri, check=True)
    same(s.uri, img)
    qio("raw", s.uri, "write -P 0x33 0 64M")
    run_blkjobs("mirror", img, s.uri, check=True)
    same(s.uri, img)


def test_backup_from_an_nbd_source(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    s = qemu_nbd(img, "qcow2")
    bk = str(tmp_path / "bk.qcow2")
    run_blkjobs("backup", s.uri, bk, check=True)
    same(bk, img)


# -- nbdkit -------------------------------------------------------------------

@pytest.mark.parametrize("plugin", [
    ["memory", "16M"],
    ["sparse-random", "64M", "seed=7", "percent=20"],
    ["pattern", "8M"],
    ["data", "data=@1048576 0x55*65536 @4194304 1 2 3 4", "size=8M"],
])
def test_nbdkit_plugins_copied_and_mapped_as_qemu_img(tmp_path, servers, plugin):
    _, nbdkit = servers
    s = nbdkit(*plugin)
    dst = str(tmp_path / "out.raw")
    run_blkjobs("convert", s.uri, dst, check=True)
    same(dst, s.uri)
    ours = run_blkjobs("map", "--output", "json", s.uri, check=True)
    assert ours.stdout == qimg("map", "--output", "json", s.uri).stdout


def test_write_zero_trim_flush_on_a_memory_export(tmp_path, servers):
    from blkjobs.formats import open_image
    _, nbdkit = servers
    s = nbdkit("memory", "8M")
    with open_image(s.uri, read_only=False) as d:
        assert (d.size, d.format_name, d.protocol, d.host_file) == (8 << 20, "raw", "nbd", False)
        base = 2 << 20
        d.write(base + 4096, b"\x11" * 8192)
        d.write_zeroes(base + 8192, 4096)
        d.discard(6 << 20, 1 << 20)
        d.flush()
        assert d.read(base + 4096, 8192) == b"\x11" * 4096 + bytes(4096)
        maps = d.map_host(0, 8 << 20)
        assert [(m.start, m.kind.name) for m in maps[:2]] == [(0, "ZERO"), (base, "DATA")]
        assert sum(m.length for m in maps) == 8 << 20


# -- bad peers ----------------------------------------------------------------

def _env(timeout: str = "1") -> dict:
    return {**os.environ, "BLKJOBS_NBD_TIMEOUT": timeout}


def _run(*args: str, env: dict) -> subprocess.CompletedProcess:
    import sys
    p = subprocess.run([sys.executable, "-m", "blkjobs", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_a_stalled_server_times_out_with_one_line(tmp_path, servers):
    _, nbdkit = servers
    s = nbdkit("--filter=delay", "pattern", "8M", "rdelay=30")
    dst = tmp_path / "out.raw"
    t0 = time.monotonic()
    p = _run("convert", s.uri, str(dst), env=_env("1"))
    assert time.monotonic() - t0 < 20
    line = one_line_error(p, "error reading source", "timed out")
    assert "the incomplete target was removed" in line
    assert not dst.exists()


def test_a_stopped_qemu_nbd_times_out_and_the_target_keeps_its_data(tmp_path, servers):
    """kill -STOP: the kernel still accepts the connection, nobody answers."""
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    s = qemu_nbd(img, "qcow2")
    tgt = tmp_path / "keep.raw"
    tgt.write_bytes(b"\x42" * (64 << 20))
    s.proc.send_signal(signal.SIGSTOP)
    p = _run("convert", "-n", s.uri, str(tgt), env=_env("1"))
    assert one_line_error(p) == (f"blkjobs: Could not open '{s.uri}': the server did not "
                                 "answer in time (timed out)")
    assert tgt.read_bytes() == b"\x42" * (64 << 20)


def test_server_errors_fail_with_one_line(tmp_path, servers):
    _, nbdkit = servers
    s = nbdkit("--filter=error", "pattern", "8M", "error-pread=EIO", "error-pread-rate=1")
    p = _run("convert", s.uri, str(tmp_path / "o.raw"), env=_env("5"))
    one_line_error(p, "error reading source", "Input/output error")
    s2 = nbdkit("--filter=error", "memory", "8M", "error-pwrite=ENOSPC", "error-pwrite-rate=1",
                name="w")
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x07" * (8 << 20))
    p = _run("convert", "-n", str(src), s2.uri, env=_env("5"))
    one_line_error(p, "error writing target", "No space left on device")
    assert src.read_bytes() == b"\x07" * (8 << 20)


def _sh_plugin(tmp_path, body: str) -> str:
    script = tmp_path / "plugin.sh"
    script.write_text("#!/bin/bash\ncase \"$1\" in\n" + body +
                      "  *) exit 2 ;;\nesac\n")
    script.chmod(0o755)
    return str(script)


def test_a_server_that_lies_about_its_size(tmp_path, servers):
    _, nbdkit = servers
    # claims 8 MiB, but has only the first MiB: reads past it fail
    script = _sh_plugin(tmp_path, (
        "  get_size) echo 8388608 ;;\n"
        "  pread) if [ $4 -ge 1048576 ]; then echo 'EIO no such data' >&2; exit 1; fi\n"
        "         head -c $3 /dev/zero ;;\n"))
    s = nbdkit("sh", script)
    p = _run("convert", s.uri, str(tmp_path / "o.raw"), env=_env("10"))
    one_line_error(p, "error reading source")
    assert not (tmp_path / "o.raw").exists()


def test_a_server_that_closes_mid_request(tmp_path, servers):
    _, nbdkit = servers
    said = tmp_path / "tmpdir"
    script = _sh_plugin(tmp_path, (
        "  get_size) echo 8388608 ;;\n"
        f"  pread) printf %s \"$tmpdir\" > {said}; kill -9 $PPID; sleep 1 ;;\n"))
    s = nbdkit("sh", script)
    p = _run("convert", s.uri, str(tmp_path / "o.raw"), env=_env("10"))
    one_line_error(p, "error reading source")
    # nbdkit, killed, left the sh plugin's directory (made in /tmp whatever
    # TMPDIR says): the test removes what it caused
    shutil.rmtree(said.read_text())


def test_a_source_truncated_while_it_is_sent_fails_with_one_line(tmp_path, servers):
    """file -> export sends from the file mapped into memory: a source cut
    short meanwhile (by someone else) makes the copy fail with one line
    (source side, EIO), not die of SIGBUS. The server holds its first write
    until the file is truncated (FIFOs: no timing)."""
    import sys
    _, nbdkit = servers
    started, go = tmp_path / "started", tmp_path / "go"
    os.mkfifo(started)
    os.mkfifo(go)
    script = _sh_plugin(tmp_path, (
        "  get_size) echo 8388608 ;;\n"
        "  can_write) exit 0 ;;\n"
        "  pread) head -c $3 /dev/zero ;;\n"
        f"  pwrite) cat >/dev/null\n"
        f"          if mkdir {tmp_path}/once 2>/dev/null; then\n"
        f"            echo >{started}; read x <{go}; fi ;;\n"))
    s = nbdkit("sh", script)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(8 << 20))
    p = subprocess.Popen([sys.executable, "-m", "blkjobs", "convert", "-n", str(src), s.uri],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env("30"))
    with open(started) as f:        # the first write arrived: the file is mapped
        f.read()
    os.truncate(src, 0)
    with open(go, "w") as f:
        f.write("\n")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, (p.returncode, err)
    assert "Traceback" not in err
    line = one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err),
                          "error reading source", "Input/output error")
    assert "the target was left partially written" in line


def test_an_unreachable_server_and_a_bad_timeout(tmp_path):
    p = _run("info", f"nbd+unix:///?socket={tmp_path}/none.sock", env=_env("1"))
    one_line_error(p, "Could not open", "none.sock")
    p = _run("info", f"nbd+unix:///?socket={tmp_path}/none.sock", env=_env("soon"))
    assert one_line_error(p) == ("blkjobs: BLKJOBS_NBD_TIMEOUT: invalid timeout 'soon' "
                                 "(seconds, > 0)")


# -- the daemon -------------------------------------------------------------------

def test_daemon_blockdev_add_nbd_and_backup_into_it(tmp_path, servers):
    qemu_nbd, _ = servers
    img = qcow2_image(tmp_path)
    tgt = str(tmp_path / "t.raw")
    with open(tgt, "wb") as f:
        f.truncate(64 << 20)
    s = qemu_nbd(tgt, "raw", name="t")

    async def scenario(q, d):
        await q.x("blockdev-add", driver="qcow2", **{"node-name": "src"},
                  file={"driver": "file", "filename": img})
        await q.x("blockdev-add", driver="nbd", **{"node-name": "tgt"},
                  server={"type": "unix", "path": s.sock})
        nodes = await q.x("query-named-block-nodes")
        mine = [n for n in nodes if n["node-name"] == "tgt"]
        await q.x("blockdev-backup", device="src", target="tgt", sync="full",
                  **{"job-id": "b0"})
        await q.until("BLOCK_JOB_COMPLETED", device="b0")
        bad = await q.err("blockdev-add", driver="nbd", **{"node-name": "x"},
                          server={"type": "unix", "path": str(tmp_path / "none.sock")})
        await q.x("blockdev-del", **{"node-name": "tgt"})
        return mine, bad

    mine, bad = run_daemon(lambda d: start_blkjobs(d), tmp_path, scenario)
    assert [(n["drv"], n["file"], n["ro"]) for n in mine] == [
        ("nbd", f"nbd+unix://?socket={s.sock}", False)]
    assert bad[0] == "GenericError" and "none.sock" in bad[1]
    same(s.uri, img)


# -- TLS, formats, a build without libnbd -------------------------------------------

def test_tls_with_the_right_key_only(tmp_path, servers):
    _, nbdkit = servers
    keys, wrong = tmp_path / "keys.psk", tmp_path / "wrong.psk"
    keys.write_text("alice:" + os.urandom(32).hex() + "\n")
    wrong.write_text("alice:" + os.urandom(32).hex() + "\n")
    s = nbdkit("--tls=require", f"--tls-psk={keys}", "pattern", "8M")
    tls = f"nbds+unix://alice@/?socket={s.sock}&tls-psk-file={keys}"
    dst = str(tmp_path / "o.raw")
    run_blkjobs("convert", tls, dst, check=True)
    pattern = b"".join(i.to_bytes(8, "big") for i in range(0, 8 << 20, 8))
    with open(dst, "rb") as f:
        assert f.read() == pattern
    p = run_blkjobs("info", s.uri)                       # plaintext: refused
    one_line_error(p, "Could not open", "requires TLS")
    p = run_blkjobs("info", tls.replace(str(keys), str(wrong)))
    one_line_error(p, "Could not open")


def test_only_raw_is_written_over_nbd(tmp_path, servers):
    """qcow2 over NBD is read-only (tests/test_nbd_qcow2.py); -f qcow2 on an
    export that is no qcow2 image fails as in qemu-img."""
    _, nbdkit = servers
    s = nbdkit("memory", "1M")
    p = run_blkjobs("info", "-f", "qcow2", s.uri)
    assert one_line_error(p) == f"blkjobs: Could not open '{s.uri}': Image is not in qcow2 format"
    src = str(tmp_path / "x")
    assert qimg("create", "-f", "raw", src, "1M").returncode == 0
    p = run_blkjobs("convert", "-O", "qcow2", src, s.uri)
    assert one_line_error(p) == (f"blkjobs: '{s.uri}': only the raw format is written over "
                                 "NBD (qcow2 is read-only there)")


def test_without_libnbd_one_line_says_nbd_is_unavailable(tmp_path):
    import sys
    code = ("import sys; sys.modules['blkjobs._nbd'] = None\n"
            "from blkjobs.cli.main import main\n"
            f"sys.argv = ['blkjobs', 'info', 'nbd+unix:///?socket={tmp_path}/s.sock']\n"
            "sys.exit(main())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr
    assert one_line_error(p) == ("blkjobs: NBD is not available: blkjobs was built without "
                                 "libnbd (install libnbd-dev, then rebuild: make venv)")


@pytest.mark.parametrize("path", ["c", "c-pread", "buffers"])     # -r: the buffer path
def test_raw_files_to_and_from_exports_both_paths(tmp_path, servers, path, monkeypatch):
    """c: file -> export sends from the file mapped into memory (one copy);
    c-pread: from buffers the file is read into (where it cannot be mapped)."""
    from conftest import make_sparse
    qemu_nbd, nbdkit = servers
    rate = ["-r", "8G"] if path == "buffers" else []
    if path == "c-pread":
        monkeypatch.setenv("BLKJOBS_NBD_NO_MMAP", "1")
    src = make_sparse(str(tmp_path / "src.raw"), 48 << 20, [
        (0, 3 << 20, "data"), (5 << 20, 2 << 20, "zero"), (9 << 20, 4096, 0x61),
        (20 << 20, 7 << 20, "data"), ((48 << 20) - 512, 512, 0x7e)])
    mem = nbdkit("memory", "48M")
    run_blkjobs("convert", *rate, "-n", src, mem.uri, check=True)
    same(src, mem.uri)
    # into an export holding old data: zeroes must be written too
    old = str(tmp_path / "old.raw")
    with open(old, "wb") as f:
        f.write(b"\xee" * (48 << 20))
    q = qemu_nbd(old, "raw", name="old")
    run_blkjobs("convert", *rate, "-n", src, q.uri, check=True)
    same(src, q.uri)
    # and back: a fresh file (sparse), and an existing one full of old bytes
    fresh = str(tmp_path / "fresh.raw")
    run_blkjobs("convert", *rate, q.uri, fresh, check=True)
    same(fresh, src)
    assert os.stat(fresh).st_blocks * 512 <= 11 << 20
    full = tmp_path / "full.raw"
    full.write_bytes(b"\xdd" * (48 << 20))
    run_blkjobs("convert", *rate, "-n", q.uri, str(full), check=True)
    same(str(full), src)


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit-memory"])
def test_multi_conn_copies_into_and_out_of_an_export(tmp_path, servers, server):
    """A multi-conn export: one connection per CPU (at most 4), each copy
    worker on its own; writes sent from the mapped file, pieces of
    64 MiB spread over the workers. Data equal (qemu-img compare), a qcow2
    copy of the export clean (qemu-img check)."""
    from conftest import make_sparse

    from blkjobs.formats.nbd import Nbd, default_connections
    qemu_nbd, nbdkit = servers
    size = 160 << 20
    src = make_sparse(str(tmp_path / "src.raw"), size, [
        (0, 9 << 20, "data"), (66 << 20, 5 << 20, "data"), (70 << 20, 1 << 20, "zero"),
        (140 << 20, 10 << 20, "data"), (size - 4096, 4096, 0x5a)])
    if server == "qemu-nbd":
        tgt = tmp_path / "tgt.raw"
        tgt.write_bytes(b"")
        os.truncate(tgt, size)
        s = qemu_nbd(str(tgt), "raw", "-e", "8")
    else:
        s = nbdkit("memory", str(size))
    d = Nbd(s.uri, read_only=True)
    try:
        assert d.connections == default_connections() > 1 or os.cpu_count() == 1
    finally:
        d.close()
    run_blkjobs("convert", "-n", src, s.uri, check=True)
    same(src, s.uri)
    back = str(tmp_path / "back.raw")
    run_blkjobs("convert", s.uri, back, check=True)
    same(back, src)
    q = str(tmp_path / "back.qcow2")
    run_blkjobs("convert", "-O", "qcow2", s.uri, q, check=True)
    r = qimg("check", q)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    same(q, src, "-f", "qcow2", "-F", "raw")


@pytest.mark.parametrize("path", ["c", "buffers"])     # -r: the buffer path
def test_requests_stay_within_the_servers_maximum_block_size(tmp_path, servers, path):
    """A server that advertises a 64 KiB maximum and refuses larger requests
    (nbdkit's blocksize-policy filter): reads and writes are split to it
    (were 256 KiB: 'Invalid argument')."""
    _, nbdkit = servers
    rate = ["-r", "8G"] if path == "buffers" else []
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(1 << 20))
    s = nbdkit("--filter=blocksize-policy", "memory", "5M", "blocksize-maximum=64K",
               "blocksize-error-policy=error")
    run_blkjobs("convert", *rate, "-n", str(src), s.uri, check=True)
    same(str(src), s.uri)
    back = str(tmp_path / "back.raw")
    run_blkjobs("convert", *rate, s.uri, back, check=True)
    same(back, str(src))


def test_the_export_is_flushed_with_t_writeback_only(tmp_path, servers):
    _, nbdkit = servers
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x31" * (4 << 20))
    for cache, flushes in (("unsafe", False), ("writeback", True)):
        log = tmp_path / f"{cache}.log"
        s = nbdkit("--filter=log", "memory", "4M", f"logfile={log}", name=cache)
        run_blkjobs("convert", "-t", cache, "-n", str(src), s.uri, check=True)
        s.stop()            # the log is complete once the server is gone
        text = log.read_text()
        assert "Write" in text and ("Flush" in text) == flushes, text


def test_daemon_nbd_node_as_qemu_storage_daemon_shows_it(tmp_path, servers):
    from daemon_util import side_by_side
    qemu_nbd, _ = servers
    img = str(tmp_path / "d.raw")
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    s = qemu_nbd(img, "raw", name="d")

    async def scenario(q, d):
        await q.x("blockdev-add", driver="nbd", **{"node-name": "n0"},
                  server={"type": "unix", "path": s.sock})
        nodes = await q.x("query-named-block-nodes")
        bad = await q.err("blockdev-add", driver="nbd", **{"node-name": "n1"},
                          server={"type": "unix", "path": str(tmp_path / "none.sock")})
        await q.x("blockdev-del", **{"node-name": "n0"})
        keep = ("node-name", "drv", "file", "ro", "image", "backing_file_depth")
        return [{k: n[k] for k in keep} for n in nodes], bad

    ref, ours = side_by_side(tmp_path, scenario)
    assert ours == ref
    assert ref[1] == ("GenericError", f"Failed to connect to '{tmp_path}/none.sock': "
                                      "No such file or directory")
