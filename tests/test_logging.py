"""Logging: the blkjobs.* loggers, -v/-vv/--log-level on the command line,
one logger per QMP monitor, and silence in normal runs."""
from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from conftest import run_blkjobs
from daemon_util import Daemon, Raw, make_images, qemu_img

from blkjobs.jobmodel.testing import Recorder, StepDriver

STATES = ["undefined -> created", "created -> running", "running -> waiting",
          "waiting -> pending", None, "pending -> concluded", "concluded -> null"]


def job_lines(job_id: str, with_debug: bool, with_info: bool) -> list[str]:
    """What a backup job that completes logs, in order."""
    out = []
    for s in STATES:
        if s is None:
            if with_info:
                out.append(f"blkjobs: INFO: blkjobs.jobmodel.manager: backup job {job_id} completed")
        elif with_debug:
            out.append(f"blkjobs: DEBUG: blkjobs.jobmodel.status: job {job_id}: {s}")
    return out


def test_normal_commands_print_nothing_extra(tmp_path):
    src, _ = make_images(tmp_path)
    tgt = str(tmp_path / "bk.qcow2")
    p = run_blkjobs("backup", src, tgt)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    p = run_blkjobs("info", tgt)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith(f"image: {tgt}\nfile format: qcow2\n")
    p = run_blkjobs("check", tgt)
    assert (p.returncode, p.stderr) == (0, "")
    assert p.stdout == qemu_img("check", tgt).stdout


def test_v_shows_job_outcomes_vv_state_changes(tmp_path):
    src, _ = make_images(tmp_path)
    for opts, debug, info in ((["-v"], False, True), (["-vv"], True, True),
                              (["-v", "-v", "-v"], True, True),
                              (["--log-level", "DEBUG"], True, True),
                              (["--log-level=info"], False, True),
                              (["--log-level", "warning"], False, False)):
        tgt = tmp_path / f"bk{len(opts)}{debug}{info}.qcow2"
        tgt.unlink(missing_ok=True)
        p = run_blkjobs(*opts, "backup", "--job-id", "b0", src, tgt)
        assert p.returncode == 0, p.stderr
        assert p.stdout == ""
        assert p.stderr.splitlines() == job_lines("b0", debug, info), opts


def test_bad_log_level_is_one_usage_error():
    p = run_blkjobs("--log-level", "loud", "info", "x.qcow2")
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "blkjobs: argument --log-level: invalid choice: 'loud' "
        "(choose from 'debug', 'info', 'warning', 'error', 'critical')",
        "Try 'blkjobs --help' for more information."]


def _serve(tmp_path, *opts: str, serve_opts: tuple[str, ...] = ()) -> Daemon:
    sock = str(tmp_path / "blkjobs.sock")
    return Daemon([sys.executable, "-m", "blkjobs", *opts, "serve", *serve_opts, "--socket",
                   sock, "--print-ready"], sock, True)


def _talk(sock: str) -> None:
    r = Raw(sock)
    assert "QMP" in r.msg()
    assert r.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    assert r.ask({"execute": "nope", "id": 7})["error"]["class"] == "CommandNotFound"
    r.close()


@pytest.mark.parametrize("opts,serve_opts", [
    (["-vv"], []), ([], ["-vv"]), ([], ["-v", "--verbose"]), ([], ["--log-level", "debug"]),
    (["--log-level", "error"], ["--log-level", "debug"]), (["-v"], ["-vv"])])
def test_daemon_logs_per_monitor(tmp_path, opts, serve_opts):
    """-v/--log-level before the command or after ``serve`` (serve's win)."""
    d = _serve(tmp_path, *opts, serve_opts=tuple(serve_opts))
    try:
        _talk(d.sock)
        _talk(d.sock)
    finally:
        assert d.stop() == 0
    lines = d.stderr.splitlines()
    for n in (0, 1):
        mine = [ln for ln in lines if f" blkjobs.daemon.monitor.{n}: " in ln]
        assert mine == [
            f"blkjobs: INFO: blkjobs.daemon.monitor.{n}: connected on {d.sock}",
            f'blkjobs: DEBUG: blkjobs.daemon.monitor.{n}: <- {{"execute": "qmp_capabilities"}}',
            f'blkjobs: DEBUG: blkjobs.daemon.monitor.{n}: <- {{"execute": "nope", "id": 7}}',
            f"blkjobs: DEBUG: blkjobs.daemon.monitor.{n}: -> error CommandNotFound: "
            "The command nope has not been found",
            f"blkjobs: INFO: blkjobs.daemon.monitor.{n}: disconnected"]
    # the first monitor is done before the second connects
    assert lines.index(f"blkjobs: INFO: blkjobs.daemon.monitor.1: connected on {d.sock}") > \
        lines.index("blkjobs: INFO: blkjobs.daemon.monitor.0: disconnected")


def test_serve_refuses_a_bad_log_level():
    p = run_blkjobs("serve", "--log-level", "bogus", "--socket", "/nonexistent/x.sock")
    assert p.returncode == 1
    assert p.stderr.startswith("usage: blkjobs serve ")     # the command's own usage
    assert p.stderr.splitlines()[-2:] == [
        "blkjobs serve: argument --log-level: invalid choice: 'bogus' "
        "(choose from 'debug', 'info', 'warning', 'error', 'critical')",
        "Try 'blkjobs serve --help' for more information."]


def test_lock_conflict_is_logged_at_debug(tmp_path):
    """The lock byte another process holds is said at debug level; the error
    line stays qemu-img's."""
    from blkjobs.formats import open_image
    from blkjobs.graph import Graph
    from blkjobs.graph.perm import Perm
    src, _ = make_images(tmp_path)
    node = Graph().add(open_image(src, "qcow2", read_only=False), fmt="qcow2")
    node.take("holder", Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ)  # shares reads
    try:
        p = run_blkjobs("-vv", "resize", "-f", "qcow2", src, "+1M")
        q = run_blkjobs("resize", "-f", "qcow2", src, "+1M")
    finally:
        node.close()
    assert p.returncode == q.returncode == 1
    assert q.stderr.startswith("blkjobs: Could not open")
    debug = [ln for ln in p.stderr.splitlines() if ln.startswith("blkjobs: DEBUG: ")]
    assert debug == [f"blkjobs: DEBUG: blkjobs.graph.lock: '{src}': lock byte 201 is held by "
                     'another process: it does not share "write"']
    assert [ln for ln in p.stderr.splitlines() if not ln.startswith("blkjobs: DEBUG: ")] == \
        q.stderr.splitlines()


def test_daemon_quiet_by_default(tmp_path):
    d = _serve(tmp_path)
    try:
        _talk(d.sock)
    finally:
        assert d.stop() == 0
    assert d.stderr == ""


def test_monitor_loggers_are_not_kept(tmp_path):
    """A daemon serving many connections keeps no logger per past one."""
    from blkjobs import Engine
    from blkjobs.daemon.server import MONITOR_LOGGER, Server

    def monitor_loggers():
        return {n for n in logging.Logger.manager.loggerDict if n.startswith(MONITOR_LOGGER + ".")}

    before = monitor_loggers()
    sock = str(tmp_path / "m.sock")

    async def session():
        srv = Server(Engine())
        await srv.start([sock])
        try:
            for _ in range(3):
                r, w = await asyncio.open_unix_connection(sock)
                assert b"QMP" in await asyncio.wait_for(r.readline(), 15)
                w.close()
                await w.wait_closed()
            r, w = await asyncio.open_unix_connection(sock)
            await asyncio.wait_for(r.readline(), 15)
            # the three closed ones are gone once the server saw them close
            async def others_closed():
                while len(srv.monitors) > 1:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(others_closed(), 15)
            assert monitor_loggers() - before == {f"{MONITOR_LOGGER}.3"}
            w.close()
            await w.wait_closed()
        finally:
            await srv.shutdown()

    asyncio.run(session())
    assert monitor_loggers() == before


class _Broken(StepDriver):
    def commit(self, job):
        raise RuntimeError("commit hook broke")


def test_internal_errors_are_logged_besides_the_list(caplog):
    rec = Recorder()
    with caplog.at_level(logging.DEBUG, logger="blkjobs"):
        job = rec.job(_Broken(1, gated=False), "j0")
        rec.idle()
    assert job.outcome.value == "completed"
    assert [str(e) for e in rec.mgr.internal_errors] == ["commit hook broke"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [(r.name, r.getMessage()) for r in errors] == [
        ("blkjobs.jobmodel.manager", "internal error in commit of job j0")]
    assert str(errors[0].exc_info[1]) == "commit hook broke"
    states = [r.getMessage() for r in caplog.records if r.name == "blkjobs.jobmodel.status"]
    assert states == [f"job j0: {s}" for s in STATES if s is not None]


def test_failed_job_outcome_at_info(caplog):
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="blkjobs"):
        job = rec.job(StepDriver(2, gated=False, fail_at=1), "j2")
        rec.idle()
    assert job.outcome.value == "failed"
    assert [(r.levelname, r.name, r.getMessage()) for r in caplog.records] == [
        ("INFO", "blkjobs.jobmodel.manager", "backup job j2 failed: Input/output error")]


def test_failing_listener_is_logged_as_warning(caplog):
    rec = Recorder()

    def bad(ev):
        raise ValueError("listener broke")

    rec.mgr.add_listener(bad)
    with caplog.at_level(logging.WARNING, logger="blkjobs"):
        rec.job(StepDriver(1, gated=False), "j1")
        rec.idle()
    assert rec.mgr.events.errors and all(str(e) == "listener broke"
                                         for e in rec.mgr.events.errors)
    warnings = [r for r in caplog.records if r.name == "blkjobs.jobmodel.events"]
    assert len(warnings) == len(rec.mgr.events.errors)
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith("event listener <function ")
    assert warnings[0].getMessage().endswith(" failed on JOB_STATUS_CHANGE")


def test_vv_logs_the_traceback_of_an_internal_error(monkeypatch, capsys):
    """An internal error is still one line (and exit 70); with -vv its
    traceback is logged at debug level before it."""
    import argparse

    from blkjobs.cli import main as cli_main

    def boom(args):
        raise KeyError("nowhere")

    class Fixed:
        def parse_args(self, argv):
            return argparse.Namespace(func=boom, verbose=2, log_level=None)
    monkeypatch.delenv("BLKJOBS_DEBUG", raising=False)
    monkeypatch.setattr(cli_main, "build_parser", lambda argv: Fixed())
    try:
        assert cli_main.main(["x"]) == 70
    finally:
        cli_main._setup_logging(0, "warning")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "blkjobs: DEBUG: blkjobs.cli.main: internal error"
    assert err[1] == "Traceback (most recent call last):"
    assert err[-3:] == ["KeyError: 'nowhere'", "blkjobs: internal error: KeyError: 'nowhere'",
                        "(set BLKJOBS_DEBUG=1 for the traceback; please report it)"]
