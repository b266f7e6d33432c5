"""The NBD server's threads (blkjobs.nbd.threads): a connection's function
runs in a thread kept from an earlier connection, ``join`` waits for it,
and one that raises ends its thread only."""
from __future__ import annotations

import threading

from blkjobs.nbd import threads


def test_a_finished_thread_serves_the_next_connection(monkeypatch):
    started: list[object] = []
    real = threads._thread.start_new_thread
    monkeypatch.setattr(threads._thread, "start_new_thread",
                        lambda fn, args: (started.append(fn), real(fn, args))[1])
    pool = threads._pool
    first = threads.Thread(lambda: None)
    first.start()
    first.join(30)
    assert not first.is_alive()
    # the thread is back in the pool once its function returned (join returns
    # just before): wait for that
    with pool.back:
        assert pool.back.wait_for(lambda: pool.idle() > 0, 30)
    n = len(started)            # (1, or 0 if a thread of another test was idle)
    for _ in range(3):          # one after the other: never a new thread
        t = threads.Thread(lambda: None)
        t.start()
        t.join(30)
        with pool.back:
            assert pool.back.wait_for(lambda: pool.idle() > 0, 30)
    assert len(started) == n <= 1


def test_join_waits_for_the_function():
    go, out = threading.Event(), []
    t = threads.Thread(lambda: (go.wait(30), out.append(1)))
    t.start()
    assert t.is_alive()
    go.set()
    t.join(30)
    assert out == [1] and not t.is_alive()


def test_a_function_that_raises_ends_its_thread_only(caplog):
    def boom() -> None:
        raise RuntimeError("bug")
    t = threads.Thread(boom)
    t.start()
    t.join(30)
    assert not t.is_alive()
    # said by the time join returns, with its traceback
    assert [(r.name, r.levelname, r.getMessage(), str(r.exc_info[1]))
            for r in caplog.records] == [
        ("blkjobs.nbd.threads", "ERROR", "NBD server thread failed", "bug")]
    ok = threads.Thread(lambda: None)
    ok.start()
    ok.join(30)
    assert not ok.is_alive()
