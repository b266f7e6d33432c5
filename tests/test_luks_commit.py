"""Committing an encrypted overlay into an encrypted base with a different
key (iotest 198): each layer's key-secret in the --image-opts options;
``Image committed.``, the base then reads the overlay's data with its own
key (qemu-io, QEMU's LUKS code, judges), the overlay is emptied in place
and keeps its LUKS area (it still opens with its key and reads through to
the base). And ``info`` of an encrypted image needs no secret, as
qemu-img's no-I/O open."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import run_blkjobs

S0 = "secret,id=sec0,data=astrochicken"
S1 = "secret,id=sec1,data=furby"
OBJ = ["--object", S0, "--object", S1]


def _create(*args: str) -> None:
    for _ in range(5):      # QEMU's PBKDF2 timing may see no CPU time pass: again then
        p = subprocess.run(["qemu-img", "create", "-f", "qcow2", *args], capture_output=True,
                           text=True, timeout=120)
        if "Unable to get accurate CPU usage" not in p.stderr:
            break
    assert p.returncode == 0, p.stderr


def _qio(spec: str, cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", *OBJ, "-c", cmd, "--image-opts", spec],
                          capture_output=True, text=True, timeout=120)


def _make_chain(d) -> None:
    """The chain (qemu-img's PBKDF2 timing costs ~1.8 s of CPU per LUKS
    create); the overlay names its base relative to itself, so the two files
    can be copied together."""
    base, top = d / "t.qcow2.base", d / "t.qcow2"
    _create("--object", S0, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,"
            "encrypt.iter-time=10", str(base), "4M")
    spec_base, _, spec = _specs(d)
    assert _qio(spec_base, "write -P 0xa 0 4M").returncode == 0
    _create("--object", S1, "-o", "encrypt.format=luks,encrypt.key-secret=sec1,"
            "encrypt.iter-time=10", "-b", base.name, "-F", "qcow2", str(top))
    p = _qio(spec, "write -P 0x9 1M 2M")
    assert p.returncode == 0, p.stderr


def _specs(d) -> tuple[str, str, str]:
    base, top = d / "t.qcow2.base", d / "t.qcow2"
    spec_base = f"driver=qcow2,file.filename={base},encrypt.key-secret=sec0"
    spec_top = f"driver=qcow2,file.filename={top},encrypt.key-secret=sec1"
    spec = (f"{spec_top},backing.driver=qcow2,backing.file.filename={base},"
            "backing.encrypt.key-secret=sec0")
    return spec_base, spec_top, spec


@pytest.fixture
def chain(made_once, tmp_path) -> tuple[str, str, str]:
    """(base, overlay, overlay with its backing) as --image-opts, on a copy
    of the chain made once per session (conftest.made_once)."""
    made = made_once("luks_commit-chain", _make_chain)
    for name in ("t.qcow2.base", "t.qcow2"):
        shutil.copyfile(made / name, tmp_path / name)
    return _specs(tmp_path)


def test_commit_encrypted_overlay_into_base_with_another_key(chain):
    spec_base, spec_top, spec = chain
    p = run_blkjobs("commit", *OBJ, "--image-opts", spec)
    assert (p.returncode, p.stdout, p.stderr) == (0, "Image committed.\n", "")
    for cmd in ("read -P 0xa 0 1M", "read -P 0x9 1M 2M", "read -P 0xa 3M 1M"):
        r = _qio(spec_base, cmd)
        assert r.returncode == 0 and "verification failed" not in r.stdout, (cmd, r.stdout)
        r = _qio(spec, cmd)         # the emptied overlay reads through
        assert r.returncode == 0 and "verification failed" not in r.stdout, (cmd, r.stdout)
    # emptied: nothing allocated in the overlay, its LUKS header intact
    m = subprocess.run(["qemu-img", "map", "--output=json", *OBJ, "--image-opts", spec],
                       capture_output=True, text=True, timeout=60)
    assert m.returncode == 0, m.stderr
    assert '"depth": 0' not in m.stdout
    for s in (spec_base, spec):     # (the overlay opens only with its backing's key)
        c = subprocess.run(["qemu-img", "check", *OBJ, "--image-opts", s],
                           capture_output=True, text=True, timeout=60)
        assert c.returncode == 0 and "No errors were found" in c.stdout, c.stdout + c.stderr


def test_info_of_encrypted_image_needs_no_secret(chain):
    """qemu-img info opens without I/O: the key-secret named in the options
    is never looked up (here no --object defines it)."""
    spec_base, spec_top, _ = chain
    for spec in (spec_base, spec_top):
        ours = run_blkjobs("info", "--image-opts", spec)
        theirs = subprocess.run(["qemu-img", "info", "--image-opts", spec],
                                capture_output=True, text=True, timeout=60)
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        ours_lines = [ln for ln in ours.stdout.splitlines() if not ln.startswith("disk size")]
        theirs_lines = [ln for ln in theirs.stdout.splitlines()
                        if not ln.startswith("disk size")]
        # (line 0, the json: name, spells the encrypt options otherwise: not this issue)
        assert ours_lines[0].startswith("image: json:{")
        assert ours_lines[1:] == theirs_lines[1:]
        assert "    encrypt:" in ours_lines
