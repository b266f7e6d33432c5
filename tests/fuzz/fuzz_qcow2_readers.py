"""Fuzz the qcow2 readers: ``info --backing-chain``, ``check``, ``map`` and
``convert`` on mutated images.

    python tests/fuzz/fuzz_qcow2_readers.py --count 100000 --seed 1 --jobs 2

Pristine images are made with qemu-img/qemu-io (backing files, persistent
bitmaps, extended L2, compressed and zero clusters, internal snapshots,
refcount widths 1..64, zstd, compat 0.10). Each fuzz image is one of them
with a few mutations aimed at one structure (header fields, extensions, the
backing file name, L1, L2, the refcount table and blocks, the snapshot
table, the bitmap directory and tables, or anywhere), or truncated/extended.
Image ``i`` of seed ``S`` is a pure function of (S, i): ``--only i`` redoes
one.

The operations run in forked worker processes that call the CLI's
``main([...])`` in-process (BLKJOBS_DEBUG=1, so an exception that is not a
BlkjobsError/OSError escapes the CLI's choke point and is caught here), with
``RLIMIT_AS`` at 1 GiB and a 10 s alarm per operation; the parent also kills
a worker that stops answering (a hang in C) and notices one killed by a
signal (a crash). Outcome classes:

* ``ok``          exit 0 (check: 0, 2 corrupt, 3 leaks)
* ``error``       non-zero exit with one line ``blkjobs: ...`` on stderr
* ``bad-error``   non-zero exit but not one such line
* ``traceback``   an exception escaped the CLI's choke point
* ``memory``      MemoryError (the address-space limit was hit)
* ``hang``        the 10 s limit passed
* ``crash``       the worker died of a signal

Exit status 0 when only ok/error happened; failing images are copied to
``--save DIR`` with a note of the operation and what went wrong.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

GiB = 1 << 30
OPS = ("info", "check", "map", "convert")
BAD = ("bad-error", "traceback", "memory", "hang", "crash")
CLASSES = ("ok", "error") + BAD


# ---------------------------------------------------------------------------
# pristine images
def _run(*args):
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))}: {p.stdout}{p.stderr}")


def _io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    _run(*args, path)


SIZE = 1 << 20


def make_pristine(d: str) -> list[str]:
    """The seed images in ``d`` (names relative to ``d``)."""
    j = lambda n: os.path.join(d, n)  # noqa: E731
    out = []

    def qcow(name, opts, *cmds, backing=None):
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
        if backing:
            args += ["-b", backing[0], "-F", backing[1]]
        _run(*args, j(name), SIZE)
        if cmds:
            _io(j(name), *cmds)
        out.append(name)

    data = ["write -P 1 0 40k", "write -P 2 300k 8k", "write -c -P 3 512k 16k",
            "write -P 5 900k 4k", "discard 0 8k"]
    qcow("plain4k.qcow2", "cluster_size=4096", *data, "write -z 600k 32k")
    qcow("extl2.qcow2", "extended_l2=on,cluster_size=16384", *data, "write -z 600k 32k",
         "write -P 6 700k 2k")
    qcow("v2.qcow2", "compat=0.10,cluster_size=4096", *data)
    qcow("rc1.qcow2", "cluster_size=512,refcount_bits=1", "write -P 1 0 8k",
         "write -c -P 2 64k 4k")
    qcow("rc64.qcow2", "cluster_size=4096,refcount_bits=64", *data)
    qcow("rc8.qcow2", "cluster_size=1024,refcount_bits=8", *data)
    qcow("zstd.qcow2", "cluster_size=4096,compression_type=zstd", *data)
    qcow("big64k.qcow2", "cluster_size=65536", "write -P 7 0 128k", "write -c -P 8 256k 64k")
    # backing chains: raw and qcow2 bases, a two-level chain
    _run("qemu-img", "create", "-q", "-f", "raw", j("base.raw"), SIZE)
    _io(j("base.raw"), "write -P 9 0 1M", fmt="raw")
    qcow("base.qcow2", "cluster_size=4096", "write -P 10 0 512k")
    qcow("over_raw.qcow2", "cluster_size=4096", "write -P 11 64k 8k",
         backing=("base.raw", "raw"))
    qcow("over_qcow2.qcow2", "cluster_size=4096,extended_l2=off", "write -P 12 4k 2k",
         backing=("base.qcow2", "qcow2"))
    qcow("over_over.qcow2", "cluster_size=4096", "write -P 13 128k 4k",
         backing=("over_qcow2.qcow2", "qcow2"))
    # persistent bitmaps
    qcow("bitmaps.qcow2", "cluster_size=4096", *data)
    _run("qemu-img", "bitmap", "--add", j("bitmaps.qcow2"), "b0")
    _run("qemu-img", "bitmap", "--add", "-g", "65536", j("bitmaps.qcow2"), "second")
    _io(j("bitmaps.qcow2"), "write -P 14 100k 64k")
    _run("qemu-img", "bitmap", "--add", "--disable", j("bitmaps.qcow2"), "off")
    qcow("bitmaps512.qcow2", "cluster_size=512", "write -P 1 0 4k")
    _run("qemu-img", "bitmap", "--add", "-g", "512", j("bitmaps512.qcow2"), "fine")
    # internal snapshots
    qcow("snap.qcow2", "cluster_size=4096", *data)
    _run("qemu-img", "snapshot", "-c", "s1", j("snap.qcow2"))
    _io(j("snap.qcow2"), "write -P 15 0 16k")
    _run("qemu-img", "snapshot", "-c", "second-snap", j("snap.qcow2"))
    return out


# ---------------------------------------------------------------------------
# structure of a pristine image: the regions the mutators aim at
def regions(path: str) -> dict:
    b = open(path, "rb").read()
    (_, version, bf_off, bf_size, cb, _, _, l1_size, l1_off, rt_off, rt_cl, nb_snap,
     snap_off) = struct.unpack_from(">IIQIIQIIQQIIQ", b, 0)
    cs = 1 << cb
    hlen = struct.unpack_from(">I", b, 100)[0] if version == 3 else 72
    r = {"header": [(0, hlen)], "ext": [], "backing": [], "l1": [], "l2": [], "rt": [],
         "rb": [], "snap": [], "bmdir": [], "bmtab": [], "bmext": [], "any": [(0, len(b))]}
    off = hlen
    while off + 8 <= cs:
        t, n = struct.unpack_from(">II", b, off)
        r["ext"].append((off, 8 + n))
        if t == 0x23852875:
            r["bmext"].append((off + 8, n))
            nb, _, dsz, doff = struct.unpack_from(">IIQQ", b, off + 8)
            r["bmdir"].append((doff, dsz))
            p = doff
            for _ in range(nb):
                toff, tsize, _, _, _, nml, extra = struct.unpack_from(">QIIBBHI", b, p)
                r["bmtab"].append((toff, tsize * 8))
                ln = 24 + nml + extra
                p += ln + (-ln % 8)
        if t == 0:
            break
        off += 8 + n + (-n % 8)
    if bf_off:
        r["backing"].append((bf_off, bf_size))
    r["l1"].append((l1_off, l1_size * 8))
    for i in range(l1_size):
        e = struct.unpack_from(">Q", b, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        if e:
            r["l2"].append((e, cs))
    r["rt"].append((rt_off, rt_cl * cs))
    for i in range(rt_cl * cs // 8):
        e = struct.unpack_from(">Q", b, rt_off + 8 * i)[0]
        if e:
            r["rb"].append((e, cs))
    if nb_snap:
        p = snap_off
        for _ in range(nb_snap):
            s_l1, s_l1n, idl, nml, _, _, _, _, extra = struct.unpack_from(">QIHHIIQII", b, p)
            ln = 40 + extra + idl + nml
            r["snap"].append((p, ln))
            r["l1"].append((s_l1, s_l1n * 8))
            p += ln + (-ln % 8)
    return {k: v for k, v in r.items() if v}


# header fields: (offset, width) -- v2 part and v3 part
HEADER_FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
                 (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4),
                 (104, 1)]
BACKING_NAMES = [b"fifo", b"adir", b"/dev/zero", b"/dev/null", b"/dev/tty", b"/proc/self/fd/0",
                 b"missing", b"base.raw", b"base.qcow2", b"over_over.qcow2", b"img.qcow2",
                 b".", b"..", b"", b"\xff\xfe", b"a" * 300, b"nbd://localhost/x",
                 b"json:{}", b"/dev/stdin"]


def interesting(width: int, rnd: random.Random, file_size: int) -> int:
    top = (1 << (8 * width)) - 1
    return rnd.choice([0, 1, 2, 7, 8, 9, 16, 21, 22, 63, 64, 512, 4096, 65535, 65536,
                       file_size, file_size - 8, file_size + 4096, 1 << 20, 1 << 30,
                       top, top >> 1, top ^ (top >> 1), rnd.getrandbits(8 * width),
                       rnd.randrange(0, max(1, file_size)) & ~511]) & top


def entry64(rnd: random.Random, file_size: int) -> int:
    return rnd.choice([
        rnd.getrandbits(64),
        1 << 63 | (rnd.randrange(0, max(1, file_size)) & ~511),
        1 << 63 | rnd.getrandbits(40) << 9,
        rnd.getrandbits(9),
        1 << 62 | rnd.getrandbits(40),
        1 << 63 | (file_size + rnd.choice([0, 512, 4096, 65536, 1 << 30])),
        (rnd.randrange(0, max(1, file_size)) & ~511) | rnd.choice([0, 1, 1 << 63]),
        0,
    ])


def mutate(data: bytes, regs: dict, rnd: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    kinds = list(regs)
    target = rnd.choice(kinds + ["header", "header", "l2", "bmdir" if "bmdir" in regs else "l1",
                                 "backing" if "backing" in regs else "ext", "size"])
    if target == "size":
        how = rnd.choice(["truncate", "extend", "tail"])
        if how == "truncate":
            n = rnd.randrange(0, len(b))
            return bytes(b[:n]), f"truncate to {n}"
        if how == "extend":
            n = rnd.choice([1, 511, 512, 4096, 65536, 1 << 20])
            return bytes(b) + bytes(n), f"extend by {n}"
        n = rnd.randrange(1, 8192)
        return bytes(b[:-n]), f"cut {n}"
    notes = []
    for _ in range(rnd.choice([1, 1, 1, 2, 3, 5])):
        start, length = rnd.choice(regs[target])
        length = max(1, length)
        if start >= len(b):
            start, length = 0, len(b)
        length = min(length, len(b) - start)
        m = rnd.random()
        if target == "header" and m < 0.6:
            off, w = rnd.choice(HEADER_FIELDS)
            v = interesting(w, rnd, len(b))
            b[off:off + w] = v.to_bytes(w, "big")
            notes.append(f"hdr@{off}={v:#x}")
        elif target == "backing" and m < 0.6:
            name = rnd.choice(BACKING_NAMES)
            hdr_off = 8
            bf_off = struct.unpack_from(">Q", b, hdr_off)[0]
            if 0 < bf_off < 4096 - len(name):
                b[bf_off:bf_off + len(name)] = name
                struct.pack_into(">I", b, 16, len(name))
            notes.append(f"backing={name[:20]!r}")
        elif target in ("l1", "l2", "rt", "rb", "bmtab") and m < 0.6:
            off = start + rnd.randrange(0, max(1, length // 8)) * 8
            if off + 8 <= len(b):
                v = entry64(rnd, len(b))
                struct.pack_into(">Q", b, off, v)
                notes.append(f"{target}@{off:#x}={v:#x}")
        elif target in ("bmext", "bmdir", "snap", "ext") and m < 0.6:
            w = rnd.choice([1, 2, 4, 8])
            off = start + rnd.randrange(0, max(1, length // w)) * w
            if off + w <= len(b):
                v = interesting(w, rnd, len(b))
                b[off:off + w] = v.to_bytes(w, "big")
                notes.append(f"{target}@{off:#x}:{w}={v:#x}")
        elif m < 0.85:
            off = start + rnd.randrange(0, length)
            if off < len(b):
                b[off] ^= 1 << rnd.randrange(8)
                notes.append(f"{target}@{off:#x}^bit")
        else:
            off = start + rnd.randrange(0, length)
            if off < len(b):
                b[off] = rnd.randrange(256)
                notes.append(f"{target}@{off:#x}=byte")
    return bytes(b), " ".join(notes) or target


# ---------------------------------------------------------------------------
# the worker (a forked child): runs operations, one result line per operation
class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _one_op(main, op: str, img: str, work: str) -> tuple[str, str]:
    dst = os.path.join(work, "out.img")
    argv = {"info": ["info", "--backing-chain", "--output", "json", img],
            "check": ["check", "--output", "json", img],
            "map": ["map", "--output", "json", img],
            "convert": ["convert", "-O", "qcow2", img, dst]}[op]
    old = sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        rc = main(argv)
    except _Hang:
        return "hang", ""
    except MemoryError:
        return "memory", traceback.format_exc()[-2000:]
    except Exception:
        return "traceback", traceback.format_exc()[-4000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = old
        if op == "convert":
            try:
                os.unlink(dst)
            except FileNotFoundError:
                pass
    e = err.getvalue()
    if rc == 0 or (op == "check" and rc in (2, 3)):
        if op != "check" and out.getvalue():
            try:
                json.loads(out.getvalue())
            except ValueError:
                return "bad-error", f"rc={rc} stdout is not JSON: {out.getvalue()[:300]!r}"
        return "ok", ""
    lines = e.splitlines()
    if op == "check" and rc == 1:
        # the check could not complete: per-cluster lines may come first
        lines = lines[-1:] if lines and lines[-1].startswith("blkjobs: ") else lines
    if len(lines) == 2 and lines[1].startswith("You can force-remove "):
        lines = lines[:1]           # qemu-img's hint after a refused snapshot table
    if len(lines) == 1 and lines[0].startswith("blkjobs: ") and "internal error" not in e:
        if op in ("map", "info") and out.getvalue():
            return "bad-error", f"rc={rc} but stdout has {out.getvalue()[:200]!r}"
        return "ok" if False else "error", lines[0]
    return "bad-error", f"rc={rc} stderr={e[-1000:]!r}"


def worker(conn_w: int, items: list, pristine: dict, work: str, seed: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (GiB, GiB))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGALRM, _alarm)
    os.environ["BLKJOBS_DEBUG"] = "1"
    from blkjobs.cli.main import main
    img = os.path.join(work, "img.qcow2")
    names = sorted(pristine)
    w = os.fdopen(conn_w, "w", buffering=1)
    for i in items:
        rnd = random.Random(f"{seed}:{i}")
        name = names[rnd.randrange(len(names))]
        data, note = mutate(pristine[name][0], pristine[name][1], rnd)
        with open(img, "wb") as f:
            f.write(data)
        for op in OPS:
            w.write(json.dumps({"i": i, "op": op, "start": True}) + "\n")
            cls, detail = _one_op(main, op, img, work)
            w.write(json.dumps({"i": i, "op": op, "cls": cls, "detail": detail,
                                "seed_image": name, "mutation": note}) + "\n")
            if cls in ("hang", "memory"):
                os._exit(3)   # the state of this process is no longer trusted
    w.close()
    os._exit(0)


def run_items(items: list, pristine: dict, work: str, seed: int, on_result) -> None:
    """Run ``items`` in forked workers (restarted after a crash or hang)."""
    todo = list(items)
    while todo:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                worker(w, todo, pristine, work, seed)
            finally:
                os._exit(1)
        os.close(w)
        rf = os.fdopen(r, "r")
        current = None
        done_upto = None
        buf = ""
        killed = False
        while True:
            ready, _, _ = select.select([rf], [], [], 30.0)
            if not ready:         # no answer for 30 s: hung outside Python
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            chunk = os.read(rf.fileno(), 65536).decode()
            if not chunk:
                break
            buf += chunk
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                m = json.loads(line)
                if m.get("start"):
                    current = m
                    continue
                current = None
                on_result(m)
                if m["op"] == OPS[-1]:
                    done_upto = m["i"]
                if m["cls"] in ("hang", "memory"):
                    done_upto = m["i"]
        _, status = os.waitpid(pid, 0)
        rf.close()
        if current is not None:
            cls = "hang" if killed else "crash"
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            on_result({"i": current["i"], "op": current["op"], "cls": cls,
                       "detail": f"worker killed (signal {sig})" if sig else
                       f"worker exited {os.WEXITSTATUS(status)}",
                       "seed_image": "?", "mutation": "?"})
            done_upto = current["i"]
        if done_upto is None:
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return
            done_upto = todo[0]
        todo = [i for i in todo if i > done_upto]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--first", type=int, default=0, help="index of the first image")
    ap.add_argument("--only", type=int, action="append", help="run only image I (repeatable)")
    ap.add_argument("--save", metavar="DIR", help="copy failing images (and notes) here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    root = tempfile.mkdtemp(prefix="fuzzq2-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    try:
        pdir = os.path.join(root, "pristine")
        os.mkdir(pdir)
        names = make_pristine(pdir)
        pristine = {n: (open(os.path.join(pdir, n), "rb").read(),
                        regions(os.path.join(pdir, n))) for n in names}
        items = a.only or list(range(a.first, a.first + a.count))
        # each job gets an interleaved share and its own directory with the bases
        shares = [items[k::a.jobs] for k in range(a.jobs)]
        counts = {c: 0 for c in CLASSES}
        per_op = {op: {c: 0 for c in CLASSES} for op in OPS}
        findings = []
        pids = []
        rpipe, wpipe = os.pipe()
        for k, share in enumerate(shares):
            if not share:
                continue
            work = os.path.join(root, f"w{k}")
            shutil.copytree(pdir, work, symlinks=True)
            os.mkfifo(os.path.join(work, "fifo"))     # backing names point at these
            os.mkdir(os.path.join(work, "adir"))
            pid = os.fork()
            if pid == 0:
                os.close(rpipe)
                out = os.fdopen(wpipe, "w", buffering=1)
                run_items(share, pristine, work, a.seed,   # the child's own `out`
                          lambda m: out.write(json.dumps(m) + "\n"))  # noqa: B023
                out.close()
                os._exit(0)
            pids.append(pid)
        os.close(wpipe)
        n_ops = 0
        last = time.monotonic()
        with os.fdopen(rpipe, "r") as rf:
            for line in rf:
                m = json.loads(line)
                n_ops += 1
                counts[m["cls"]] += 1
                per_op[m["op"]][m["cls"]] += 1
                if m["cls"] in BAD:
                    findings.append(m)
                    print(f"FINDING image {m['i']} {m['op']}: {m['cls']} "
                          f"({m['seed_image']}: {m['mutation']})\n  {m['detail'][-600:]}",
                          file=sys.stderr, flush=True)
                    if a.save:
                        _save(a, m)
                if not a.quiet and time.monotonic() - last > 60:
                    last = time.monotonic()
                    print(f"... {n_ops} operations, {n_ops // len(OPS)} images, "
                          f"{time.monotonic() - t0:.0f} s: {counts}", file=sys.stderr, flush=True)
        for pid in pids:
            os.waitpid(pid, 0)
        wall = time.monotonic() - t0
        summary = {"command": "python tests/fuzz/fuzz_qcow2_readers.py " + " ".join(
                       argv if argv is not None else sys.argv[1:]),
                   "images": len(items), "operations": n_ops, "outcomes": counts,
                   "per_operation": per_op, "wall_seconds": round(wall, 1),
                   "findings": len(findings)}
        print(json.dumps(summary, indent=1))
        return 1 if findings or n_ops != len(items) * len(OPS) else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _save(a, m):
    """Rebuild the failing image (a pure function of seed and index) into --save."""
    os.makedirs(a.save, exist_ok=True)
    with open(os.path.join(a.save, f"finding-{a.seed}-{m['i']}-{m['op']}.json"), "w") as f:
        json.dump(m, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "src"))
    raise SystemExit(main())
