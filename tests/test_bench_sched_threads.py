"""benchmarks/sched_threads.py's reading of ``perf sched timehist --state``:
a thread's wait after a switch-out in a runnable state (R, or perf's W for
the kernel's preempted state) is time waiting for a CPU, after any other
state time asleep; only the given process's threads count."""
from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def sched():
    path = os.path.join(HERE, "..", "benchmarks", "sched_threads.py")
    spec = importlib.util.spec_from_file_location("sched_threads", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# time, cpu, task, wait time, sch delay, run time (ms), state at switch-out
TRACE = """\
           time    cpu  task name                       wait time  sch delay   run time  state
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------  -----
   100.010000 [0000]  perf-exec[500]                      0.000      0.000     10.000      S
   100.020000 [0001]  python3[77]                         0.000      0.000      1.000      R
   100.030000 [0000]  blkjobs[500]                        5.000      0.500      5.000      W
   100.040000 [0001]  blkjobs[501/500]                    0.000      0.000      2.000      S
   100.050000 [0000]  blkjobs[500]                        5.000      0.000      5.000      R
   100.060000 [0001]  blkjobs[501/500]                    8.000      1.000      2.000      D
   100.070000 [0000]  blkjobs[500]                        4.000      0.250      6.000      X
   100.080000 [0001]  blkjobs[501/500]                    7.000      0.000      3.000      S
"""


def test_run_delay_sleep_per_thread(sched):
    th = sched.parse_timehist(TRACE, 500)
    assert sorted(th) == [500, 501]             # not python3[77]: another process
    main, worker = th[500], th[501]
    assert main["name"] == "blkjobs"            # the name after exec
    assert main["n"] == 4
    assert main["run"] == pytest.approx(26.0)
    # 5.0 after S is sleep; 5.0 after W and 4.0 after R wait for a CPU,
    # with the wake-up latencies 0.5 and 0.25
    assert main["sleep"] == pytest.approx(5.0)
    assert main["delay"] == pytest.approx(0.5 + 5.0 + 4.0 + 0.25)
    assert worker["run"] == pytest.approx(7.0)
    assert worker["sleep"] == pytest.approx(8.0 + 7.0)     # after S and after D
    assert worker["delay"] == pytest.approx(1.0)
    assert main["first"] == pytest.approx(100.0)
    assert worker["first"] == pytest.approx(100.038)
    assert worker["last"] == pytest.approx(100.08)


def test_other_process_only_its_own_threads(sched):
    th = sched.parse_timehist(TRACE, 77)
    assert list(th) == [77]
    assert th[77]["run"] == pytest.approx(1.0)
    assert sched.parse_timehist(TRACE, 9999) == {}
