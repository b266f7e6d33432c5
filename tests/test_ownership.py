"""Never touch what is not ours (issue 10 §2).

* The engine's per-node state lives on the node: a node opened after others
  were freed never inherits their state (ids are reused).
* A node whose close fails still leaves the graph and never uses its fd again.
* An interrupted convert removes only the target file it created.
"""
from __future__ import annotations

import gc
import os

import pytest

from blkjobs.jobs.base import Mover
from blkjobs.jobs.engine import Engine


def _raw(path, size=1 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture
def eng():
    e = Engine()
    yield e
    e.close()


def test_fresh_nodes_do_not_inherit_cache_unsafe(eng, tmp_path, monkeypatch):
    """Nodes opened cache=unsafe and dropped, then fresh default nodes: none
    is cache-unsafe, and a Mover's flush fsyncs each of them."""
    img = _raw(tmp_path / "scratch.raw")
    old = [eng.open(img, "raw", cache="unsafe") for _ in range(200)]
    assert all(eng.cache_unsafe(n) for n in old)
    for n in old:
        n.close()
    del old, n
    gc.collect()        # a node is in reference cycles (its permissions)
    src = eng.open(_raw(tmp_path / "src.raw"), "raw", read_only=True)
    fresh = [eng.open(_raw(tmp_path / f"f{i}.raw"), "raw") for i in range(100)]
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(fd)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    for n in fresh:
        synced.clear()
        mover = Mover(eng, src, n, select=lambda run: "copy")
        try:
            mover.flush()
        finally:
            mover.close()
        assert n.driver.fd in synced, f"{n.name} was not fsync'ed"
    assert [n.name for n in fresh if eng.cache_unsafe(n)] == []
