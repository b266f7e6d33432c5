"""Shared fixtures. qemu-img/qemu-io are the interoperability oracle: a test
that needs them fails (never skips) when they are missing, so CI cannot
pass without really running them."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BLKJOBS = [sys.executable, "-m", "blkjobs"]

# A shell without job control starts its background jobs (`make test &`,
# `nohup .ci/run &`) with SIGINT ignored; Python then installs no
# KeyboardInterrupt handler and every program the tests start inherits the
# ignore: the Ctrl-C tests (test_bench_external's waits on a `sleep 600`)
# then hang for minutes. Ctrl-C is put back as it is in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed (Debian qemu-utils): the oracle is required")
    return path


@pytest.fixture
def shm_path():
    """A directory on a tmpfs (/dev/shm, which every Linux mounts), removed
    after the test: for images qemu-img syncs at every metadata update (tens
    of seconds on a loaded disk, nothing on a tmpfs) and large preallocated
    ones. A tmpfs takes no O_DIRECT: not for cache=none/directsync."""
    if os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize < (1 << 30):
        pytest.fail("/dev/shm (a tmpfs) has less than 1 GiB free")
    d = Path(tempfile.mkdtemp(prefix="blkjobs-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qemu_img():
    return _need("qemu-img")


@pytest.fixture
def qemu_io():
    return _need("qemu-io")


def run_blkjobs(*args, check=False, input=None):
    """Run the real command line; return CompletedProcess with text output."""
    p = subprocess.run(BLKJOBS + [str(a) for a in args], capture_output=True, text=True,
                       input=input, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"blkjobs {' '.join(map(str, args))} failed: {p.stderr}")
    return p


def run_blkjobs_in_process(capsys, *args, cwd=None) -> subprocess.CompletedProcess:
    """``run_blkjobs``, through the command line's main() in this process:
    exit status (its return value, or SystemExit's code), stdout and stderr
    (from capsys) as the process gives them, run in ``cwd`` and put back.
    For the loops of commands whose texts, statuses and images are what is
    tested, not the process (an interpreter start-up costs ~85 ms of CPU,
    more than most commands): signals, start-up, environment and locks
    held by another process keep ``run_blkjobs``."""
    from blkjobs.cli.main import main
    argv = [str(a) for a in args]
    capsys.readouterr()
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(before)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(["blkjobs", *argv], rc, out, err)


def qemu_compare(a, b, fmt_a="raw", fmt_b="raw"):
    p = subprocess.run([_need("qemu-img"), "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                       capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def make_sparse(path, size, chunks, seed=1):
    """Write ``chunks`` [(offset, length, kind)] into a sparse file of
    ``size`` bytes; kind 'data' (pseudo-random), 'zero' (zeroes written as
    data) or a single byte value."""
    import random
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n, kind in chunks:
            f.seek(off)
            if kind == "data":
                f.write(rnd.randbytes(n))
            elif kind == "zero":
                f.write(bytes(n))
            else:
                f.write(bytes([kind]) * n)
    return path


def blocks(path) -> int:
    return os.stat(path).st_blocks * 512


_FIEMAP = 0xC020660B            # FS_IOC_FIEMAP: _IOWR('f', 11, struct fiemap)


def data_bytes(path) -> int:
    """Bytes the file system allocated to the file's data (written or
    preallocated), from FIEMAP. Unlike st_blocks it leaves out the file
    system's own metadata (ext4 counts its extent-tree blocks in
    st_blocks, and how many it needs depends on how fragmented the free
    space happened to be), so two files laid out alike compare equal."""
    import fcntl
    import struct
    total, start, count = 0, 0, 256
    with open(path, "rb") as f:
        while True:
            req = bytearray(struct.pack("=QQIIII", start, 2**64 - 1 - start, 1, 0, count, 0))
            req += bytes(56 * count)                     # FIEMAP_FLAG_SYNC above: delalloc flushed
            try:
                fcntl.ioctl(f.fileno(), _FIEMAP, req)
            except OSError:                                 # no FIEMAP (tmpfs): the block count
                return blocks(path)
            mapped = struct.unpack_from("=I", req, 20)[0]
            last = False
            for i in range(mapped):
                logical, _, length = struct.unpack_from("=QQQ", req, 32 + 56 * i)
                flags = struct.unpack_from("=I", req, 32 + 56 * i + 40)[0]
                total += length
                start = logical + length
                last = bool(flags & 1)                      # FIEMAP_EXTENT_LAST
            if last or mapped == 0:
                return total


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs, for ENOSPC. Needs root (CI runs as root): fails, not skips."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the ENOSPC test (needs root): {r.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def fd_flags(pid: int, path: str) -> list[int]:
    """The open flags (/proc/PID/fdinfo) of every fd of process ``pid`` on
    ``path``; none when the process is gone or not ours to read."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"^flags:\s*([0-7]+)", f.read(), re.M)
        except OSError:
            continue
        assert m
        out.append(int(m.group(1), 8))
    return out


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
    """``made_once(key, make) -> Path``: a directory that ``make(dir)``
    filled, once for the whole session, whichever xdist worker asks first
    (the others wait on its lock, then reuse it). For the images an oracle
    makes identically for several tests, at a cost (qemu-img's PBKDF2
    timing: ~1-2 s of CPU for each LUKS create, whatever iter-time says):
    tests copy them into their own directory, never change them in place.
    The directory is in the session's temporary root (the workers'
    directories' parent), removed with it."""
    import fcntl
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made-once"
    root.mkdir(exist_ok=True)

    def get(key: str, make) -> Path:
        d = root / key
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)            # released when closed
            if not (d / ".made").exists():
                shutil.rmtree(d, ignore_errors=True)    # a make that failed half-way
                d.mkdir()
                make(d)
                (d / ".made").touch()
        return d
    return get


def copy_sparse(src, dst) -> None:
    """Copy ``src`` to ``dst`` extent by extent (SEEK_DATA/SEEK_HOLE): the
    holes of ``src`` stay holes in ``dst`` and its data stays data, zeroes
    written as data included -- what qemu-img measure, map and convert see
    of a raw file is its allocation, which a plain copy (shutil.copyfile:
    sendfile) would fill. For pristine images made once and copied into
    each test's directory. An unwritten (fallocated) extent becomes a hole:
    not for files that have them where the test compares host layouts
    (qemu-io's write -z on raw, a cluster qcow2 allocates partly written:
    test_convert_n_zeroes' targets then map otherwise)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            try:
                off = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError:                          # ENXIO: only a hole is left
                break
            end = os.lseek(f.fileno(), off, os.SEEK_HOLE)
            while off < end:
                piece = os.pread(f.fileno(), min(end - off, 1 << 20), off)
                assert piece, (src, off)
                os.pwrite(g.fileno(), piece, off)
                off += len(piece)
        g.truncate(size)


def content_digest(path, block=1 << 20) -> str:
    """A digest of the file's bytes: two files have the same digest exactly
    when they hold the same bytes (their sizes included), however each is
    allocated. Each ``block``-sized piece that is all zeroes -- a hole,
    an unwritten (fallocated) extent or zeroes written as data -- counts
    only as such, and a piece that lies wholly in a hole (SEEK_DATA) is
    not read: a multi-GiB preallocated image is digested at the cost of
    its data, not of its size."""
    import hashlib
    h = hashlib.sha256()
    zero = bytes(block)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        off = 0
        while off < size:
            try:
                data = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError:                          # ENXIO: only a hole is left
                data = size
            skip = (data - off) // block * block     # whole pieces inside the hole
            off += skip
            if off >= size:
                break
            n = min(block, size - off)
            piece = os.pread(f.fileno(), n, off)
            assert len(piece) == n, (path, off)
            if piece != zero[:n]:
                h.update(off.to_bytes(8, "little") + piece)
            off += n
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _working_directory_kept():
    """A test that changes the working directory must restore it
    (monkeypatch.chdir does): a passed test's tmp_path is removed at its
    teardown, and the next tests on that worker would run in a directory
    that no longer exists (os.getcwd() raising FileNotFoundError)."""
    before = os.getcwd()
    yield
    try:
        after = os.getcwd()
    except FileNotFoundError:
        after = "(a removed directory)"
    if after != before:
        os.chdir(before)
        pytest.fail(f"the test left the working directory at {after}: use monkeypatch.chdir",
                    pytrace=False)


def pytest_collection_modifyitems(items):
    """The tests marked ``slow`` (the longest, 5-30 s each) run first: under
    xdist's worksteal the suite then ends on short tests, and no worker
    waits at the end for the other's long one. (The order is the same on
    every worker, as xdist requires: a stable sort.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
