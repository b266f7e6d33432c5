"""Encrypted images (issue 16): the luks format, qcow2 encrypt.format=luks
and legacy AES (encryption=on), with qemu-img and qemu-io as the oracle:
images we create are read by QEMU with the same secret and the reverse,
byte for byte; info fields and texts as qemu-img's."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from blkjobs.errors import BlkjobsError
from blkjobs.formats import open_image
from blkjobs.formats.secrets import add_secret_object, remove_secret, secret
from conftest import run_blkjobs
from qemu_oracle import qemu_img

PW = "s3cr3t-pw"
OBJ = f"secret,id=sec0,data={PW}"
MiB = 1 << 20

#: (format, image-opts key option, qemu-img create -o options)
KINDS = {
    "luks": ("luks", "key-secret=sec0", "key-secret=sec0,iter-time=10"),
    "qcow2-luks": ("qcow2", "encrypt.key-secret=sec0",
                   "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"),
    "qcow2-aes": ("qcow2", "encrypt.key-secret=sec0", "encryption=on,encrypt.key-secret=sec0"),
}


@pytest.fixture(autouse=True)
def _sec0():
    remove_secret("sec0")
    add_secret_object(OBJ)
    yield
    remove_secret("sec0")


def image_opts(kind: str, path) -> str:
    fmt, key, _ = KINDS[kind]
    return f"driver={fmt},{key},file.filename={path}"


def qio(kind: str, path, *cmds: str, obj: str = OBJ) -> subprocess.CompletedProcess:
    args = ["qemu-io", "--object", obj, "--image-opts", image_opts(kind, path)]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


_made_once = None


@pytest.fixture(autouse=True)
def _qemu_made(made_once):
    """qemu_create's store of the images qemu-img made (conftest.made_once)."""
    global _made_once
    _made_once = made_once


def qemu_create(kind: str, path, size: int = 4 * MiB,
                extra: str = "") -> subprocess.CompletedProcess:
    """The image qemu-img create makes, at ``path``. qemu-img spends about
    two CPU seconds measuring PBKDF2's speed for each luks create, whatever
    iter-time says, so each (kind, size, options) is created once per
    session (by whichever xdist worker first needs it) and copied: the
    copies share the salts and the master key of one create, which no test
    compares (the tests share the default size where theirs does not
    matter). Its CompletedProcess is returned (exit status, stdout and
    stderr kept beside the image); the name in its "Formatting" line is
    ``path`` as given when ``path`` is a bare file name (created under that
    name), else "pristine.img". Created again when QEMU's PBKDF2 timing
    says "Unable to get accurate CPU usage" (its getrusage() saw no time
    pass: a busy machine)."""
    name = str(path) if os.sep not in str(path) else "pristine.img"
    fmt, _, o = KINDS[kind]
    args = ["qemu-img", "create", "--object", OBJ, "-f", fmt, "-o", o + extra, name, str(size)]

    def make(d: Path) -> None:
        for _ in range(5):
            p = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=d)
            if "Unable to get accurate CPU usage" not in p.stderr:
                break
        assert p.returncode == 0, p.stderr
        (d / "create.json").write_text(json.dumps([p.returncode, p.stdout, p.stderr]))

    key = "luks-" + hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
    assert _made_once is not None
    d = _made_once(key, make)
    shutil.copyfile(d / name, path)
    rc, out, err = json.loads((d / "create.json").read_text())
    return subprocess.CompletedProcess(args, rc, out, err)


def ours_create(kind: str, path, size: int = 4 * MiB, extra: str = ""):
    fmt, _, o = KINDS[kind]
    return run_blkjobs("create", "--object", OBJ, "-f", fmt, "-o", o + extra, path, size,
                       check=True)


def qemu_compare_enc(kind: str, path, raw) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "--object", OBJ, "--image-opts",
                           image_opts(kind, path), f"driver=raw,file.filename={raw}"],
                          capture_output=True, text=True, timeout=120)


def write_random(drv, raw_path, size: int, seed: int) -> None:
    """Unaligned writes of random bytes through ``drv``, mirrored in a raw
    file (holes of the raw file: what a fresh image reads there -- zeroes
    for qcow2; for luks the test writes every byte first)."""
    rng = random.Random(seed)
    with open(raw_path, "r+b") as f:
        for _ in range(12):
            off = rng.randrange(0, size - 70000)
            data = rng.randbytes(rng.randrange(1, 70000))
            drv.write(off, data)
            f.seek(off)
            f.write(data)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ours_written_qemu_reads(kind, tmp_path):
    """An image blkjobs creates and writes (unaligned, partial clusters and
    sectors) is the same disk for qemu-img compare; qemu-img check is clean."""
    img, raw = tmp_path / "a.img", tmp_path / "a.raw"
    size = 4 * MiB
    ours_create(kind, img, size)
    raw.write_bytes(bytes(size))
    fmt = KINDS[kind][0]
    with open_image(str(img), fmt, read_only=False, key_secret="sec0") as drv:
        assert drv.encrypted and drv.size == size
        if fmt == "luks":            # a fresh luks payload decrypts to noise
            drv.write_zeroes(0, size)
        write_random(drv, raw, size, seed=len(kind))
    p = qemu_compare_enc(kind, img, raw)
    assert p.returncode == 0 and p.stdout == "Images are identical.\n", p.stdout + p.stderr
    if fmt == "qcow2":
        p = subprocess.run(["qemu-img", "check", "--object", OBJ, "--image-opts",
                            image_opts(kind, img)], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.startswith("No errors were found"), p.stdout


@pytest.mark.parametrize("kind", list(KINDS))
def test_qemu_written_ours_reads_and_writes(kind, tmp_path):
    """QEMU's image: we read qemu-io's patterns; what we write over them
    (and over its holes) qemu-io reads back; our check of qcow2 is clean."""
    img = tmp_path / "q.img"
    qemu_create(kind, img)
    p = qio(kind, img, "write -P 0xa5 0 1M", "write -P 0x3c 1536k 100k")
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    fmt = KINDS[kind][0]
    with open_image(str(img), fmt, read_only=False, key_secret="sec0") as drv:
        assert drv.read(0, MiB) == b"\xa5" * MiB
        assert drv.read(1536 << 10, 100 << 10) == b"\x3c" * (100 << 10)
        drv.write(1000, b"\x77" * 5000)          # inside qemu's data
        drv.write(3 * MiB + 17, b"\x99" * 70000)  # a hole (two clusters)
        if fmt == "qcow2":
            res = drv.check()
            assert not res.get("corruptions") and not res.get("leaks"), res
    p = qio(kind, img, "read -P 0xa5 0 1000", "read -P 0x77 1000 5000",
            "read -P 0xa5 6000 1042576", "read -P 0x99 3145745 70000",
            "read -P 0x3c 1536k 100k")
    assert p.returncode == 0, p.stderr
    assert "verification failed" not in p.stdout and p.stdout.count("read ") == 5, p.stdout
    if fmt == "qcow2":
        p = qio(kind, img, "read -P 0 3072k 17", "read -P 0 3215761 65519")
        assert "verification failed" not in p.stdout, p.stdout


@pytest.mark.parametrize("kind", list(KINDS))
def test_info_equals_qemu_img(kind, tmp_path):
    """blkjobs info prints what qemu-img info prints, human and JSON, for an
    image QEMU made and for one we made (no key needed)."""
    for who, img in (("qemu", tmp_path / "q.img"), ("ours", tmp_path / "o.img")):
        (qemu_create if who == "qemu" else ours_create)(kind, img)
        for out in ("human", "json"):
            q = qemu_img("info", "--output", out, img).stdout
            o = run_blkjobs("info", "--output", out, img, check=True).stdout
            if out == "json":
                assert json.loads(o) == json.loads(q), who
            assert o == q, who


def test_info_fields_of_non_default_cipher(tmp_path):
    """aes-128 cbc essiv:sha256 with sha1: the header we write names them as
    QEMU does (format-specific fields equal but for uuid and iterations)."""
    extra = (",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,"
             "ivgen-hash-alg=sha256,hash-alg=sha1")
    qemu_create("luks", tmp_path / "q.luks", extra=extra)
    ours_create("luks", tmp_path / "o.luks", extra=extra)
    q = json.loads(qemu_img("info", "--output", "json", tmp_path / "q.luks").stdout)
    o = json.loads(qemu_img("info", "--output", "json", tmp_path / "o.luks").stdout)
    for d in (q, o):
        data = d["format-specific"]["data"]
        del data["uuid"], data["master-key-iters"], data["slots"][0]["iters"]
    assert o["format-specific"] == q["format-specific"]
    with open_image(str(tmp_path / "o.luks"), "luks", read_only=False, key_secret="sec0") as d:
        d.write(512, b"\x42" * 1024)
    p = qio("luks", tmp_path / "o.luks", "read -P 0x42 512 1024")
    assert "verification failed" not in p.stdout and p.returncode == 0


@pytest.mark.parametrize("kind", ["luks", "qcow2-luks"])
def test_wrong_password_text(kind, tmp_path):
    img = tmp_path / "a.img"
    qemu_create(kind, img)
    p = qio(kind, img, "read 0 512", obj="secret,id=sec0,data=wrong")
    assert "Invalid password, cannot unlock any keyslot" in p.stderr
    remove_secret("sec0")
    add_secret_object("secret,id=sec0,data=wrong")
    with pytest.raises(BlkjobsError) as e:
        open_image(str(img), KINDS[kind][0], key_secret="sec0")
    assert str(e.value) == "Invalid password, cannot unlock any keyslot"


@pytest.mark.parametrize("kind,text", [("luks", "Parameter 'key-secret' is required for cipher"),
                                       ("qcow2-luks", "Parameter 'encrypt.key-secret' is "
                                        "required for cipher")])
def test_no_key_texts(kind, text, tmp_path):
    """Without a key: opening for I/O fails with QEMU's text; creating says
    it naming the image, as qemu-img create does."""
    img = tmp_path / "a.img"
    qemu_create(kind, img)
    with pytest.raises(BlkjobsError) as e:
        open_image(str(img), KINDS[kind][0])
    assert str(e.value) == text
    fmt, _, o = KINDS[kind]
    o = ",".join(x for x in o.split(",") if "key-secret" not in x)
    q = subprocess.run(["qemu-img", "create", "-f", fmt, "-o", o, tmp_path / "q2", "1M"],
                       capture_output=True, text=True)
    b = run_blkjobs("create", "-f", fmt, "-o", o, tmp_path / "b2", "1M")
    assert q.returncode != 0 and b.returncode != 0
    assert q.stderr == f"qemu-img: {tmp_path / 'q2'}: {text}\n"
    assert b.stderr == f"blkjobs: {tmp_path / 'b2'}: {text}\n"


@pytest.mark.parametrize("kind", list(KINDS))
def test_formatting_line_as_qemu_img(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fmt, _, o = KINDS[kind]
    q = qemu_create(kind, "x.img", size=MiB).stdout
    os.unlink("x.img")
    b = run_blkjobs("create", "--object", OBJ, "-f", fmt, "-o", o, "x.img", "1M",
                    check=True).stdout
    assert b == q


def test_missing_secret_text(tmp_path):
    q = subprocess.run(["qemu-img", "create", "-f", "luks", "-o", "key-secret=nope",
                        tmp_path / "q.luks", "1M"], capture_output=True, text=True)
    b = run_blkjobs("create", "-f", "luks", "-o", "key-secret=nope", tmp_path / "b.luks", "1M")
    assert q.stderr.endswith("No secret with id 'nope'\n")
    assert b.stderr == f"blkjobs: {tmp_path / 'b.luks'}: No secret with id 'nope'\n"


def test_secret_forms(tmp_path):
    """data=, file=, format=base64, doubled commas (QEMU's option syntax)."""
    (tmp_path / "pw").write_bytes(b"from-file")
    add_secret_object(f"secret,id=f1,file={tmp_path / 'pw'}")
    add_secret_object("secret,id=b1,data=YmFzZTY0,format=base64")
    add_secret_object("secret,id=c1,data=a,,b")
    try:
        assert secret("f1") == b"from-file"
        assert secret("b1") == b"base64"
        assert secret("c1") == b"a,b"
        with pytest.raises(BlkjobsError, match="No secret with id 'x'"):
            secret("x")
        with pytest.raises(BlkjobsError, match="Unable to decode base64 data"):
            add_secret_object("secret,id=b2,data=!!,format=base64")
    finally:
        for s in ("f1", "b1", "c1"):
            remove_secret(s)


def test_probe_and_map_luks(tmp_path):
    """A luks file is probed as luks; its data has no host offset (it is
    ciphertext), as qemu-img map says."""
    from blkjobs.formats import probe_format
    img = tmp_path / "a.luks"
    qemu_create("luks", img)
    assert probe_format(str(img)) == "luks"
    with open_image(str(img), key_secret="sec0") as d:
        m = d.map_host(0, 4 * MiB)
        assert [(x.start, x.length, x.host_offset) for x in m] == [(0, 4 * MiB, None)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_into_encrypted_target(kind, tmp_path):
    """blkjobs convert -O luks / -O qcow2 -o encrypt.*: the data (and the
    holes: a fresh luks payload is noise, so they are written) is what
    qemu-img compare sees with the key; qcow2 check clean."""
    src, dst = tmp_path / "s.qcow2", tmp_path / "d.img"
    qemu_img("create", "-f", "qcow2", src, "8M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c",
                    "write -P 0x62 3M 100k", "-c", "write -P 0x63 7M 1M", src],
                   check=True, capture_output=True)
    fmt, _, o = KINDS[kind]
    run_blkjobs("convert", "--object", OBJ, "-O", fmt, "-o", o, src, dst, check=True)
    p = subprocess.run(["qemu-img", "compare", "--object", OBJ, "--image-opts",
                        image_opts(kind, dst), f"driver=qcow2,file.filename={src}"],
                       capture_output=True, text=True)
    assert p.stdout == "Images are identical.\n", p.stdout + p.stderr
    if fmt == "qcow2":
        p = subprocess.run(["qemu-img", "check", "--object", OBJ, "--image-opts",
                            image_opts(kind, dst)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_encrypted_source(kind, tmp_path):
    """An encrypted source whose key is bound (what --image-opts ...key-secret=
    says) converts through the drivers to the same disk; without a key the
    command says qemu-img's text."""
    from blkjobs.formats.secrets import bind_key
    from blkjobs.imageops.convert import ConvertOptions
    from blkjobs.imageops.convert_entry import convert
    img, out = tmp_path / "e.img", tmp_path / "out.raw"
    qemu_create(kind, img)       # (past 2M, a luks payload never written: noise)
    subprocess.run(["qemu-io", "--object", OBJ, "--image-opts", image_opts(kind, img),
                    "-c", "write -P 0x5e 0 2M", "-c", "write -P 0 64k 64k"],
                   check=True, capture_output=True)
    bind_key(str(img), "sec0")
    try:
        convert(str(img), str(out), ConvertOptions(dst_fmt="raw"))
    finally:
        bind_key(str(img), None)
    p = subprocess.run(["qemu-img", "compare", "--object", OBJ, "--image-opts",
                        image_opts(kind, img), f"driver=raw,file.filename={out}"],
                       capture_output=True, text=True)
    assert p.stdout == "Images are identical.\n", p.stdout + p.stderr
    q = subprocess.run(["qemu-img", "convert", img, tmp_path / "q.raw"],
                       capture_output=True, text=True)
    b = run_blkjobs("convert", img, tmp_path / "b.raw")
    assert q.returncode == 1 and b.returncode == 1
    assert b.stderr == q.stderr.replace("qemu-img:", "blkjobs:", 1)
    assert not (tmp_path / "b.raw").exists()


def test_qcow2_luks_small_clusters(tmp_path):
    """512-byte clusters: the 4040-cluster LUKS area spans many refcount
    blocks and must still be one run (iotest 284's image); QEMU opens it,
    reads what we wrote, and its check is clean."""
    img = tmp_path / "s.qcow2"
    ours_create("qcow2-luks", img, size=MiB, extra=",cluster_size=512")
    with open_image(str(img), "qcow2", read_only=False, key_secret="sec0") as d:
        d.write(700, b"\xc4" * 3000)
    p = qio("qcow2-luks", img, "read -P 0 0 700", "read -P 0xc4 700 3000")
    assert p.returncode == 0 and "verification failed" not in p.stdout, p.stdout + p.stderr
    p = subprocess.run(["qemu-img", "check", "--object", OBJ, "--image-opts",
                        image_opts("qcow2-luks", img)], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("No errors were found"), p.stdout


def test_overlay_over_encrypted_backing_needs_no_key(tmp_path):
    """create -b ENC.qcow2 -F qcow2 reads only the backing file's size (no
    key), as qemu-img create does (iotests 189, 198)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create("qcow2-luks", base)
    q = qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", tmp_path / "q.qcow2")
    b = run_blkjobs("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, check=True)
    assert b.stdout == q.stdout.replace("q.qcow2", "top.qcow2")
    assert json.loads(qemu_img("info", "--output", "json", top).stdout)["virtual-size"] == 4 * MiB


@pytest.mark.parametrize("src_kind,dst_kind", [("qcow2-luks", None), (None, "luks"),
                                               (None, "qcow2-luks"), ("luks", "qcow2-aes")])
def test_backup_job_through_ciphers(src_kind, dst_kind, tmp_path):
    """A full backup job reads an encrypted source and writes an encrypted
    target through their drivers (never ciphertext by host offsets): the
    target is the source's disk for qemu-img compare."""
    from blkjobs import Engine
    from blkjobs.formats.secrets import bind_key
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    if src_kind:
        qemu_create(src_kind, src, size=4 * MiB)
        spec = image_opts(src_kind, src)
    else:
        qemu_img("create", "-f", "qcow2", src, "4M")
        spec = f"driver=qcow2,file.filename={src}"
    subprocess.run(["qemu-io", "--object", OBJ, "--image-opts", spec, "-c", "write -P 0 0 4M",
                    "-c", "write -P 0x41 100k 1M", "-c", "write -P 0x42 3M 64k"],
                   check=True, capture_output=True)
    if src_kind:
        bind_key(str(src), "sec0")
    eng = Engine()
    try:
        s = eng.open(str(src), KINDS[src_kind][0] if src_kind else "qcow2", node_name="src")
        if dst_kind:
            fmt, _, o = KINDS[dst_kind]
            opts = dict(kv.split("=") for kv in o.split(","))
            opts = {k.replace("-", "_") if fmt == "luks" else k:
                    (True if v == "on" else v) for k, v in opts.items()}
            eng.create(str(dst), fmt, s.size, node_name="dst", **opts)
            dspec = image_opts(dst_kind, dst)
        else:
            eng.create(str(dst), "qcow2", s.size, node_name="dst")
            dspec = f"driver=qcow2,file.filename={dst}"
        job = eng.backup("src", "dst", sync="full", job_id="b0")
        assert eng.wait_job(job, timeout=120).name == "COMPLETED"
    finally:
        eng.close()
        bind_key(str(src), None)
        bind_key(str(dst), None)
    p = subprocess.run(["qemu-img", "compare", "--object", OBJ, "--image-opts", spec, dspec],
                       capture_output=True, text=True)
    assert p.stdout == "Images are identical.\n", p.stdout + p.stderr


def test_info_backing_chain_without_key(tmp_path):
    """info --backing-chain over an encrypted backing file needs no key:
    the same JSON as qemu-img's."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create("qcow2-luks", base)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    q = qemu_img("info", "--backing-chain", "--output", "json", top).stdout
    b = run_blkjobs("info", "--backing-chain", "--output", "json", top, check=True).stdout
    assert json.loads(b) == json.loads(q)


@pytest.mark.parametrize("kind", ["qcow2-luks", "qcow2-aes"])
def test_convert_into_encrypted_preallocated_target_reads_zeroes(kind, tmp_path):
    """-o preallocation=metadata into an encrypted qcow2 (iotest 188): the
    preallocated clusters hold no ciphertext of zeroes, so the source's
    zero areas must be written; they used to read as noise (content
    mismatch at offset 0 against the all-zero source)."""
    src, dst = tmp_path / "s.qcow2", tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", src, "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", src],
                   check=True, capture_output=True)
    _, _, o = KINDS[kind]
    run_blkjobs("convert", "--object", OBJ, "-O", "qcow2", "-o", o + ",preallocation=metadata",
                src, dst, check=True)
    p = subprocess.run(["qemu-img", "compare", "--object", OBJ, "--image-opts",
                        image_opts(kind, dst), f"driver=qcow2,file.filename={src}"],
                       capture_output=True, text=True)
    assert p.stdout == "Images are identical.\n", p.stdout + p.stderr


def test_image_opts_key_secret_opens_encrypted_images(tmp_path):
    """--image-opts driver=qcow2,encrypt.key-secret=ID,file.filename=P (and
    luks' key-secret) opens with that secret (iotests 188, 284)."""
    for kind in ("luks", "qcow2-luks"):
        img = tmp_path / f"{kind}.img"
        qemu_create(kind, img)
        qio(kind, img, "write -P 0x5a 0 64k")
        p = run_blkjobs("compare", "--object", OBJ, "--image-opts", image_opts(kind, img),
                        image_opts(kind, img))
        assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr
