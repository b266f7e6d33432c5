"""LUKS key slot management through ``amend`` (iotest 293): blkjobs
invoked as ``qemu-img`` runs the same command lines as the real qemu-img on
twin images, with the same exit status, stdout and stderr byte for byte;
after each step the same secrets open each twin (qemu-io, QEMU's own
LUKS code, is the judge of what we wrote)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_parity_invocation import twins  # noqa: F401  (the fixture: twin dirs, each with a qemu-img)

SECRETS = [f"secret,id=sec{i},data=hunter{i}" for i in range(5)]
OBJECTS = [a for s in SECRETS for a in ("--object", s)]

#: format -> (prefix of the amend options, create -o options)
KINDS = {
    "luks": ("", "key-secret=sec0,iter-time=10"),
    "qcow2": ("encrypt.", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"),
}


def run(d: Path, *args: str) -> tuple[int, str, str]:
    p = subprocess.run([str(d / "bin" / "qemu-img"), *args], cwd=d, capture_output=True,
                       text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def spec(fmt: str, key: str) -> str:
    prefix = KINDS[fmt][0]
    return f"driver={fmt},file.filename=t.img,{prefix}key-secret={key}"


@pytest.fixture
def create(made_once):
    """create(twins, fmt): the same image in both directories, made by the
    real qemu-img (again when QEMU says its PBKDF2 timing saw no CPU time
    pass), written by qemu-io, then copied to both twins byte for byte. Each
    format is created once per session (conftest.made_once, whichever
    worker first needs it): a create costs qemu-img ~2 s of CPU timing
    PBKDF2, whatever iter-time says."""
    def made(fmt: str, d: Path) -> None:
        for _ in range(5):
            p = subprocess.run(["qemu-img", "create", "-f", fmt, *OBJECTS[:2], "-o",
                                KINDS[fmt][1], "t.img", "4M"], cwd=d, capture_output=True,
                               text=True, timeout=120)
            if "Unable to get accurate CPU usage" not in p.stderr:
                break
        assert p.returncode == 0, p.stderr
        subprocess.run(["qemu-io", *OBJECTS[:2], "--image-opts", spec(fmt, "sec0"), "-c",
                        "write -P 0x5a 0 1M"], cwd=d, check=True, capture_output=True,
                       timeout=120)

    def make(twins, fmt: str) -> None:
        d = made_once(f"luks_keyslots-{fmt}", lambda d: made(fmt, d))
        for t in twins:
            shutil.copyfile(d / "t.img", t / "t.img")
    return make


def amend(twins, fmt: str, key: str, opts: str, *extra: str) -> tuple[int, str, str]:
    """``qemu-img amend`` of both twins: the same outcome, returned."""
    prefix = KINDS[fmt][0]
    o = ",".join(prefix + item for item in opts.split(","))
    args = [*OBJECTS, "--image-opts", spec(fmt, key), "-o", o, *extra]
    ours, theirs = (run(d, "amend", *args) for d in twins)
    assert ours == theirs, (opts, extra)
    return ours


def opens(d: Path, fmt: str) -> list[str]:
    """The secrets that open the image (and read what was written)."""
    out = []
    for i in range(5):
        p = subprocess.run(["qemu-io", *OBJECTS, "--image-opts", spec(fmt, f"sec{i}"),
                            "-c", "read -P 0x5a 0 1M"], cwd=d, capture_output=True,
                           text=True, timeout=120)
        if p.returncode == 0 and "Pattern verification failed" not in p.stdout \
                and p.stdout.startswith("read 1048576/1048576"):
            out.append(f"sec{i}")
        else:
            assert "Invalid password, cannot unlock any keyslot" in p.stderr, p.stderr
    return out


def slots(d: Path, fmt: str) -> list[bool]:
    p = subprocess.run(["qemu-img", "info", "--output=json", "t.img"], cwd=d,
                       capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(p.stdout)["format-specific"]["data"]
    return [s["active"] for s in (data["encrypt"] if fmt == "qcow2" else data)["slots"]]


def same_state(twins, fmt: str, want: list[str]) -> None:
    for d in twins:
        assert opens(d, fmt) == want, d
    assert slots(twins[0], fmt) == slots(twins[1], fmt)


@pytest.mark.slow
def test_keyslot_lifecycle_as_qemu_img(twins, create):
    """Adding (a given slot, the first free one), erasing (by slot, by old
    password), every refusal iotest 293 checks, and --force, as qemu-img
    (qcow2, the iotest's format; the luks format shares the code, below)."""
    fmt = "qcow2"
    create(twins, fmt)
    it = "iter-time=10"
    assert amend(twins, fmt, "sec0", f"state=active,new-secret=sec4,{it},keyslot=4") == \
        (0, "", "")
    amend(twins, fmt, "sec0", f"state=active,new-secret=sec1,{it}")
    amend(twins, fmt, "sec1", f"state=active,new-secret=sec3,{it},keyslot=3")
    amend(twins, fmt, "sec3", f"state=active,new-secret=sec2,{it}")
    amend(twins, fmt, "sec1", "state=inactive,keyslot=4")
    same_state(twins, fmt, ["sec0", "sec1", "sec2", "sec3"])
    assert slots(twins[0], fmt) == [True, True, True, True, False, False, False, False]
    amend(twins, fmt, "sec1", "state=inactive,old-secret=sec0")
    amend(twins, fmt, "sec1", "state=inactive,keyslot=2")
    same_state(twins, fmt, ["sec1", "sec3"])
    for _ in range(4):
        amend(twins, fmt, "sec3", f"state=active,new-secret=sec2,{it}")
    amend(twins, fmt, "sec3", f"state=active,new-secret=sec0,{it}")
    amend(twins, fmt, "sec3", f"state=active,new-secret=sec3,{it}")
    assert amend(twins, fmt, "sec2", f"state=active,new-secret=sec3,{it}") == \
        (1, "", "qemu-img: Can't add a keyslot - all keyslots are in use\n")
    for key, old in (("sec1", "sec2"), ("sec1", "sec1"), ("sec0", "sec0")):
        amend(twins, fmt, key, f"state=inactive,old-secret={old}")
    assert amend(twins, fmt, "sec3", "state=inactive,old-secret=sec3") == \
        (1, "", "qemu-img: All the active keyslots match the (old) password that was given "
         "and erasing them will erase all the data in the image irreversibly - refusing "
         "operation\n")
    same_state(twins, fmt, ["sec3"])
    amend(twins, fmt, "sec3", f"state=active,new-secret=sec0,{it}")
    amend(twins, fmt, "sec0", "state=inactive,old-secret=sec3")
    assert amend(twins, fmt, "sec0", "state=active,new-secret=sec1,keyslot=0") == \
        (1, "", "qemu-img: Refusing to overwrite active keyslot 0 - please erase it first\n")
    amend(twins, fmt, "sec0", f"state=active,new-secret=sec1,{it},keyslot=0", "--force")
    same_state(twins, fmt, ["sec1"])
    assert amend(twins, fmt, "sec1", "state=inactive,keyslot=0")[2] == \
        ("qemu-img: Attempt to erase the only active keyslot 0 which will erase all the data "
         "in the image irreversibly - refusing operation\n")
    assert amend(twins, fmt, "sec1", "state=inactive,old-secret=sec5", "--force")[2] == \
        "qemu-img: No secret with id 'sec5'\n"
    assert amend(twins, fmt, "sec1", "state=inactive,old-secret=sec0", "--force")[2] == \
        "qemu-img: No keyslots match given (old) password for erase operation\n"
    assert amend(twins, fmt, "sec1", "state=inactive,keyslot=1", "--force")[0] == 0
    assert amend(twins, fmt, "sec1", "state=inactive,keyslot=0", "--force")[0] == 0
    same_state(twins, fmt, [])


def test_luks_format_add_and_erase_as_qemu_img(twins, create):
    """The luks format's header at the file's start: a slot added, then the
    original erased by its password, as qemu-img."""
    fmt = "luks"
    create(twins, fmt)
    assert amend(twins, fmt, "sec0", "state=active,new-secret=sec2,iter-time=10") == \
        (0, "", "")
    same_state(twins, fmt, ["sec0", "sec2"])
    assert amend(twins, fmt, "sec2", "state=inactive,old-secret=sec0") == (0, "", "")
    same_state(twins, fmt, ["sec2"])
    assert slots(twins[0], fmt) == [False, True] + [False] * 6


@pytest.mark.parametrize("fmt", list(KINDS))
def test_option_refusals_as_qemu_img(fmt, twins, create):
    """The checks of the options themselves, each with qemu-img's text."""
    create(twins, fmt)
    bad = ["new-secret=sec1", "state=foo", "state=active", "state=inactive",
           "state=active,new-secret=sec1,keyslot=9", "state=active,new-secret=sec1,keyslot=-1",
           "state=inactive,keyslot=-1", "state=inactive,keyslot=3,new-secret=sec1",
           "state=inactive,keyslot=0,iter-time=10", "state=inactive,keyslot=3",
           "state=active,new-secret=sec1,old-secret=sec0",
           "state=inactive,keyslot=0,old-secret=sec1", "state=active,new-secret=sec1,keyslot=x",
           "state=active,new-secret=sec1,iter-time=x", "state=active,new-secret=sec9"]
    for opts in bad:
        rc, out, err = amend(twins, fmt, "sec0", opts)
        assert rc == 1 and out == "" and err.startswith("qemu-img: "), opts
    # a key that opens no slot: the open fails, naming the options
    rc, _, err = amend(twins, fmt, "sec1", "state=active,new-secret=sec1")
    assert err == (f"qemu-img: Could not open '{spec(fmt, 'sec1')}': Invalid password, "
                   "cannot unlock any keyslot\n")
    same_state(twins, fmt, ["sec0"])


def test_amend_help_and_refusals_of_luks(twins, create):
    create(twins, "luks")
    assert run(twins[0], "amend", "-f", "luks", "-o", "help") == \
        run(twins[1], "amend", "-f", "luks", "-o", "help")
    for opts in ("state=active,cipher-alg=aes-128", "state=active,foo=1",
                 "state=active,size=1M"):
        assert amend(twins, "luks", "sec0", opts)[0] == 1
    for d in twins:     # no key at all
        assert run(d, "amend", "-o", "state=active,new-secret=sec1", "t.img") == \
            (1, "", "qemu-img: Could not open 't.img': Parameter 'key-secret' is required "
             "for cipher\n")
    assert run(twins[0], "amend", "-f", "luks", "--image-opts", spec("luks", "sec0"),
               "-o", "state=active") == \
        (1, "", "qemu-img: --image-opts and --format are mutually exclusive\n")


def test_encrypt_options_of_unencrypted_qcow2(twins):
    for d in twins:
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "t.img", "1M"], cwd=d,
                       check=True, capture_output=True)
    for d in twins:
        assert run(d, "amend", "-o", "encrypt.state=active,encrypt.new-secret=sec1",
                   "t.img") == \
            (1, "", "qemu-img: Can't amend encryption options - encryption not present\n")


def test_slot_written_by_us_is_qemus_layout(twins, tmp_path, create):
    """A slot we add: active, its PBKDF2 iterations for iter-time (at least
    1000), its key material where the header says, 4000 stripes; the other
    slots untouched (QEMU's key offsets), qemu-img check clean. (iter-time
    10 ms as everywhere here: the default 2 s cost each open that tries the
    slot 2 s of PBKDF2, some 15 s in all, and nothing here asserts it.)"""
    create(twins, "qcow2")
    before = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "t.img"],
                                       cwd=twins[0], capture_output=True, check=True,
                                       text=True).stdout)["format-specific"]["data"]["encrypt"]
    assert run(twins[0], "amend", *OBJECTS, "--image-opts", spec("qcow2", "sec0"), "-o",
               "encrypt.state=active,encrypt.new-secret=sec2,encrypt.keyslot=5,"
               "encrypt.iter-time=10") == (0, "", "")
    after = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "t.img"],
                                      cwd=twins[0], capture_output=True, check=True,
                                      text=True).stdout)["format-specific"]["data"]["encrypt"]
    s5 = after["slots"][5]
    assert s5["active"] and s5["stripes"] == 4000 and s5["iters"] >= 1000
    assert s5["key-offset"] == before["slots"][5]["key-offset"]
    assert after["slots"][:5] == before["slots"][:5]
    assert after["slots"][6:] == before["slots"][6:]
    assert opens(twins[0], "qcow2") == ["sec0", "sec2"]
    assert subprocess.run(["qemu-img", "check", *OBJECTS, "--image-opts",
                           spec("qcow2", "sec2")], cwd=twins[0], capture_output=True,
                          timeout=60).returncode == 0
    assert os.path.getsize(twins[0] / "t.img") == os.path.getsize(twins[1] / "t.img")
