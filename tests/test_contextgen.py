"""native/contextgen.py against contextlib: a generator context manager
built on both does the same with a block that ends, raises, is swallowed,
re-raises another, and with generators that misbehave."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from blkjobs.native import contextgen


class Boom(Exception):
    pass


def _managers(mod):
    @mod.contextmanager
    def plain(log):
        """doc"""
        log.append("enter")
        try:
            yield 42
        finally:
            log.append("exit")

    @mod.contextmanager
    def swallowing(log):
        try:
            yield
        except Boom:
            log.append("swallowed")

    @mod.contextmanager
    def translating(log):
        try:
            yield
        except Boom as e:
            raise KeyError("other") from e

    @mod.contextmanager
    def no_yield(log):
        if False:
            yield

    @mod.contextmanager
    def two_yields(log):
        yield
        yield

    @mod.contextmanager
    def yields_after_throw(log):
        try:
            yield
        except Boom:
            yield

    return plain, swallowing, translating, no_yield, two_yields, yields_after_throw


def _run(cm, body) -> tuple:
    """What a with statement over cm does with body: (log, value, outcome)."""
    log: list[str] = []
    got = None
    try:
        with cm(log) as v:
            got = v
            body()
    except BaseException as e:
        return log, got, type(e).__name__, str(e), type(e.__cause__).__name__
    return log, got, "ok"


def _bodies():
    def fine():
        pass

    def boom():
        raise Boom("b")

    def stop():
        raise StopIteration("s")

    def interrupt():
        raise KeyboardInterrupt

    def runtime():
        raise RuntimeError("r")
    return fine, boom, stop, interrupt, runtime


def test_same_as_contextlib():
    for ours, theirs in zip(_managers(contextgen), _managers(contextlib), strict=True):
        for body in _bodies():
            assert _run(ours, body) == _run(theirs, body), (ours.__name__, body.__name__)


def test_wrapper_looks_like_the_function():
    plain = _managers(contextgen)[0]
    assert (plain.__name__, plain.__doc__, plain.__qualname__.rsplit(".", 1)[-1]) == \
        ("plain", "doc", "plain")
    assert plain.__wrapped__.__name__ == "plain"


def test_traceback_points_into_the_block():
    plain = _managers(contextgen)[0]
    with pytest.raises(Boom) as e:
        with plain([]):
            raise Boom("here")
    assert "raise Boom(\"here\")" in str(e.traceback[-1])


def test_commands_import_no_contextlib():
    """graph.lock and formats.cache (every command opens an image through
    them) import contextgen, not contextlib (nor functools, collections)."""
    probe = ("import sys; import blkjobs.graph.lock, blkjobs.formats.cache; "
             "print(sorted(m for m in ('contextlib', 'functools', 'collections') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out == "[]\n"
