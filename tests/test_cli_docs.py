"""The man page and the shell completion script ship with the package and
are generated from the parser: they must say what the parser says today."""
from __future__ import annotations

import calendar
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent


def _regenerate(tmp_path: pathlib.Path) -> str:
    """The page as ``make man`` makes it, dated as the committed one is
    (SOURCE_DATE_EPOCH, which argparse-manpage takes for the .TH line's date):
    what is compared is what the page says, not the day it is compared on
    (dated today, it differed from the committed page every day after the
    one it was made)."""
    out = tmp_path / "blkjobs.1"
    import blkjobs
    committed = (ROOT / "docs/man/blkjobs.1").read_text()
    m = re.match(r'\.TH BLKJOBS "1" "(\d{4})\\-(\d\d)\\-(\d\d)"', committed)
    assert m, committed[:100]
    noon = calendar.timegm((int(m[1]), int(m[2]), int(m[3]), 12, 0, 0))
    subprocess.run(
        [str(BIN / "argparse-manpage"), "--module", "blkjobs.cli.main", "--function",
         "build_parser", "--project-name", "blkjobs", "--prog", "blkjobs",
         "--version", blkjobs.__version__, "--description",
         "block jobs (backup, mirror, stream, commit) and qemu-img-style image tools",
         "--manual-title", "blkjobs manual", "--output", str(out)], check=True,
        env=dict(os.environ, SOURCE_DATE_EPOCH=str(noon)))
    return out.read_text()


def test_man_page_is_current(tmp_path):
    committed = (ROOT / "docs/man/blkjobs.1").read_text()
    assert _regenerate(tmp_path) == committed, \
        "docs/man/blkjobs.1 is stale: run `make man` and commit it"


def test_man_page_documents_every_command():
    import blkjobs.cli.main as cli
    page = (ROOT / "docs/man/blkjobs.1").read_text()
    for mod in cli._command_modules():
        name = mod[len("cmd_"):]
        assert f"blkjobs {name}" in page, name
    assert shutil.which("groff") is None or subprocess.run(
        ["groff", "-man", "-Tutf8", "-z", "-Wbreak", str(ROOT / "docs/man/blkjobs.1")],
        capture_output=True, text=True).stderr == ""


def test_completion_script_is_current():
    gen = subprocess.run([str(BIN / "register-python-argcomplete"), "blkjobs"],
                         capture_output=True, text=True, check=True).stdout
    assert gen == (ROOT / "docs/completion/blkjobs").read_text()


def _complete(tmp_path, line: str) -> list[str]:
    out = tmp_path / "completions"
    env = dict(os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_STDOUT_FILENAME=str(out))
    r = subprocess.run([str(BIN / "blkjobs")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out.read_text().split("\n")


def test_completes_commands_and_options(tmp_path):
    assert [c.strip() for c in _complete(tmp_path, "blkjobs con")] == ["convert"]
    opts = _complete(tmp_path, "blkjobs convert --")
    assert "--target-is-zero" in opts and "--force-share" in opts
    assert sorted(c.strip() for c in _complete(tmp_path, "blkjobs ba")) == ["backup"]
