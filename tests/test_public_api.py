"""The public API: what ``blkjobs`` exports, the option enumerations, one
exception tree with its exit codes, py.typed, and a quiet end on a closed
stdout pipe."""
from __future__ import annotations

import enum
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import blkjobs
from blkjobs import errors
from conftest import BLKJOBS, run_blkjobs
from daemon_util import compare, make_images, qemu_img

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_exports_are_the_internal_objects():
    from blkjobs import (BitmapMode, CacheMode, CompletionMode, CopyMode, DirtyBitmap, Engine,
                         ErrorPolicy, Event, EventListener, Frontend, Job, JobOutcome,
                         JobStatus, Node, OnCbwError, SyncMode)
    from blkjobs import errors as errs
    from blkjobs.graph.node import Node as N
    from blkjobs.jobmodel import Event as Ev, EventListener as EL, Job as J, JobOutcome as JO, \
        JobStatus as JS
    from blkjobs.engine import Engine as E
    from blkjobs.graph.frontend import Frontend as F
    from blkjobs.graph.io import DirtyBitmap as DB
    from blkjobs import options as o
    assert (Engine, DirtyBitmap, Frontend, Node, Job, JobOutcome, JobStatus, Event,
            EventListener) == (E, DB, F, N, J, JO, JS, Ev, EL)
    assert (SyncMode, CopyMode, BitmapMode, ErrorPolicy, OnCbwError, CacheMode,
            CompletionMode) == (o.SyncMode, o.CopyMode, o.BitmapMode, o.ErrorPolicy,
                                o.OnCbwError, o.CacheMode, o.CompletionMode)
    assert errs is errors and blkjobs.errors is errors
    assert sorted(blkjobs.__all__) == sorted([
        "BitmapMode", "CacheMode", "CompletionMode", "CopyMode", "DirtyBitmap", "Engine",
        "ErrorPolicy", "Event", "EventListener", "Frontend", "Job", "JobOutcome", "JobStatus",
        "Node", "OnCbwError", "SyncMode", "errors", "__version__"])
    assert set(blkjobs.__all__) <= set(dir(blkjobs))
    with pytest.raises(AttributeError, match="module 'blkjobs' has no attribute 'graph_x'"):
        blkjobs.graph_x  # noqa: B018


def _modules_after(code: str) -> list[str]:
    p = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted("
                        "m for m in sys.modules if m == 'blkjobs' or m.startswith('blkjobs.'))))"],
                       capture_output=True, text=True, check=True)
    return p.stdout.split()


def test_import_blkjobs_is_cheap_and_exports_load_on_use():
    assert _modules_after("import blkjobs") == ["blkjobs"]
    assert "typing" not in subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import blkjobs"], capture_output=True,
        text=True, check=True).stderr.split()
    mods = _modules_after("from blkjobs import JobOutcome")
    assert "blkjobs.jobmodel.job" in mods and "blkjobs.engine" not in mods
    assert "blkjobs.engine" in _modules_after("from blkjobs import Engine")


def test_version_imports_no_command():
    p = subprocess.run(BLKJOBS + ["--version"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert p.returncode == 0 and p.stdout == f"blkjobs {blkjobs.__version__}\n"
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines()}
    assert not {m for m in imported if m.startswith("blkjobs.cli.cmd_")}
    assert "asyncio" not in imported and "blkjobs.jobmodel" not in imported


# -- option enumerations -------------------------------------------------------
def test_options_are_str_enums_with_qmp_values():
    from blkjobs import options as o
    from blkjobs.daemon import schema
    pairs = [(o.SyncMode, schema.SyncMode), (o.CopyMode, schema.CopyMode),
             (o.BitmapMode, schema.BitmapSyncMode), (o.ErrorPolicy, schema.OnError),
             (o.OnCbwError, schema.OnCbwError), (o.CompletionMode, schema.CompletionMode)]
    for ours, qmp in pairs:
        assert issubclass(ours, enum.StrEnum), ours
        assert sorted(m.value for m in ours) == sorted(qmp.values), qmp.name
    assert [m.value for m in o.CacheMode] == ["writeback", "unsafe"]
    assert o.SyncMode.FULL == "full" and str(o.CopyMode.WRITE_BLOCKING) == "write-blocking"
    assert f"{o.BitmapMode.ON_SUCCESS}" == "on-success"


def test_engine_takes_enum_members_or_strings(tmp_path):
    from blkjobs import (BitmapMode, CacheMode, CopyMode, Engine, ErrorPolicy, JobOutcome,
                         OnCbwError, SyncMode)
    src, _ = make_images(tmp_path)
    eng = Engine()
    try:
        eng.open(src, node_name="src", cache=CacheMode.UNSAFE)
        for i, kw in enumerate([
                dict(sync=SyncMode.FULL, on_source_error=ErrorPolicy.STOP,
                     on_target_error=ErrorPolicy.ENOSPC, on_cbw_error=OnCbwError.BREAK_SNAPSHOT),
                dict(sync="full", on_source_error="stop", on_target_error="enospc",
                     on_cbw_error="break-snapshot")]):
            tgt = str(tmp_path / f"b{i}.qcow2")
            eng.create(tgt, "qcow2", 4 << 20, node_name=f"b{i}", cache="unsafe")
            job = eng.backup("src", f"b{i}", job_id=f"b{i}", **kw)
            assert eng.wait_job(job, 30) is JobOutcome.COMPLETED
        eng.block_dirty_bitmap_add("src", "bm")
        eng.create(str(tmp_path / "inc.qcow2"), "qcow2", 4 << 20, node_name="inc")
        job = eng.backup("src", "inc", SyncMode.BITMAP, bitmap="bm",
                         bitmap_mode=BitmapMode.ON_SUCCESS, job_id="inc")
        assert eng.wait_job(job, 30) is JobOutcome.COMPLETED
        m = str(tmp_path / "m.qcow2")
        eng.create(m, "qcow2", 4 << 20, node_name="m")
        job = eng.mirror("src", "m", SyncMode.FULL, copy_mode=CopyMode.WRITE_BLOCKING,
                         job_id="m0")
        eng.wait_status(job, "ready", timeout=30)
        eng.job_complete("m0")
        assert eng.wait_job(job, 30) is JobOutcome.COMPLETED
    finally:
        eng.close()
    for name in ("b0.qcow2", "b1.qcow2", "m.qcow2"):
        assert compare(src, str(tmp_path / name)) == (0, "Images are identical.\n")


@pytest.mark.parametrize("kw, text", [
    (dict(sync="fast"), "Parameter 'sync' does not accept value 'fast'"),
    (dict(sync="full", on_target_error="never"),
     "Parameter 'on-target-error' does not accept value 'never'"),
    (dict(sync="full", on_cbw_error="break"), "Parameter 'on-cbw-error' does not accept value "
                                              "'break'"),
    (dict(sync="full", bitmap="bm", bitmap_mode="sometimes"),
     "Parameter 'bitmap-mode' does not accept value 'sometimes'"),
])
def test_bad_strings_keep_qemus_text(tmp_path, kw, text):
    from blkjobs import Engine
    src, tgt = make_images(tmp_path)
    eng = Engine()
    try:
        eng.open(src, node_name="src")
        eng.open(tgt, node_name="tgt")
        with pytest.raises(errors.JobError) as e:
            eng.backup("src", "tgt", **kw)
        assert str(e.value) == text
        with pytest.raises(errors.JobError) as e:
            eng.mirror("src", "tgt", "full", copy_mode="blocking")
        assert str(e.value) == "Parameter 'copy-mode' does not accept value 'blocking'"
        with pytest.raises(errors.UsageError) as e:
            eng.open(src, cache="none", read_only=True)
        assert str(e.value) == "invalid cache mode 'none' (writeback or unsafe)"
    finally:
        eng.close()


# -- one exception tree ----------------------------------------------------------
OPTIONAL = {"matplotlib", "zstandard"}


def _all_exception_classes():
    found = {}
    for info in pkgutil.walk_packages(blkjobs.__path__, "blkjobs."):
        if info.name.endswith(".__main__"):       # runs the command when imported
            continue
        try:
            mod = importlib.import_module(info.name)
        except ModuleNotFoundError as e:          # optional extras (plot, zstd)
            assert e.name.split(".")[0] in OPTIONAL, e
            continue
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, BaseException) \
                    and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_public_exception_is_in_the_tree():
    classes = _all_exception_classes()
    outside = sorted(q for q, c in classes.items()
                     if not issubclass(c, errors.BlkjobsError) and not q.rsplit(".", 1)[1]
                     .startswith("_"))
    # a KeyboardInterrupt on purpose; -o help's early end of parsing (not an error)
    assert outside == ["blkjobs.cli.opts_help.OptionsHelp", "blkjobs.errors.Terminated"]
    for q in ("blkjobs.graph.perm.PermissionConflict", "blkjobs.jobmodel.manager.DeviceNotActive",
              "blkjobs.jobs.commit.DeviceNotFound", "blkjobs.cli.cmd_backup.JobFailed",
              "blkjobs.jobmodel.status.IllegalTransition", "blkjobs.daemon.protocol.QMPError",
              "blkjobs.diskbench.measure.ToolError"):
        assert issubclass(classes[q], errors.BlkjobsError), q
    # the docstring draws the whole tree
    drawn = set(re.findall(r"(?:── |^    )(\w+)", errors.__doc__, re.M))
    assert drawn == {c.__name__ for c in classes.values() if issubclass(c, errors.BlkjobsError)
                     and not c.__name__.startswith("_")}    # private: caught where raised
    assert issubclass(classes["blkjobs.jobmodel.status.IllegalTransition"], RuntimeError)
    assert issubclass(errors.UsageError, ValueError)


def test_exit_codes_are_class_attributes():
    from blkjobs.cli.cmd_backup import JobFailed
    from blkjobs.jobmodel.status import IllegalTransition
    assert errors.BlkjobsError.exit_code == 1
    assert errors.ImageError.exit_code == 1
    assert errors.CheckNotSupported.exit_code == 63
    assert issubclass(errors.CheckNotSupported, errors.ImageError)
    assert IllegalTransition.exit_code == errors.InternalError.exit_code == 70
    assert JobFailed.exit_code == 1 and JobFailed("x", 2).exit_code == 2
    src = (ROOT / "src/blkjobs").rglob("*.py")
    assert not [p for p in src if 'getattr(e, "exit_code"' in p.read_text()]


def test_check_of_raw_exits_63_like_qemu_img(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(65536))
    p = run_blkjobs("check", raw)
    q = qemu_img("check", str(raw))
    assert (p.returncode, p.stdout) == (q.returncode, q.stdout) == (63, "")
    assert p.stderr == q.stderr.replace("qemu-img: ", "blkjobs: ") == \
        "blkjobs: This image format does not support checks\n"


def test_internal_error_is_one_line_exit_70(monkeypatch, capsys):
    from blkjobs.cli import main as cli_main
    from blkjobs.jobmodel.status import IllegalTransition

    def boom(args):
        raise IllegalTransition("job 'j': illegal transition null -> running")

    monkeypatch.delenv("BLKJOBS_DEBUG", raising=False)
    monkeypatch.setattr(cli_main, "build_parser", lambda argv: _Fixed(boom))
    assert cli_main.main(["x"]) == 70
    assert capsys.readouterr().err == (
        "blkjobs: internal error: job 'j': illegal transition null -> running\n"
        "(set BLKJOBS_DEBUG=1 for the traceback; please report it)\n")


class _Fixed:
    """A parser stand-in whose parse_args gives a command function."""

    def __init__(self, func):
        self.func = func

    def parse_args(self, argv):
        import argparse
        return argparse.Namespace(func=self.func, verbose=0, log_level=None)


# -- a closed stdout pipe ------------------------------------------------------------
def _closed_stdout(argv: list[str]) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)


@pytest.mark.parametrize("cmd", [["info", "--output", "json"], ["map", "--output", "json"],
                                 ["info"], ["check"]])
def test_closed_stdout_ends_quietly_like_qemu_img(tmp_path, cmd):
    src, _ = make_images(tmp_path)
    ours = _closed_stdout(BLKJOBS + cmd + [src])
    theirs = _closed_stdout(["qemu-img"] + cmd + [src])
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr) == (0, "")


# -- py.typed --------------------------------------------------------------------------
def test_py_typed_is_shipped_as_package_data():
    assert (ROOT / "src/blkjobs/py.typed").is_file()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["blkjobs"]
