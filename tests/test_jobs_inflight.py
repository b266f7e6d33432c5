"""InFlight (ranges a job is copying; every guest write asks busy()) against
a plain list model: random adds, removes and overlap queries."""
from __future__ import annotations

import random
import threading

import pytest

from blkjobs.graph.io import InFlight


def test_inflight_matches_model():
    cond = threading.Condition()
    f = InFlight(cond)
    model: list[tuple[int, int]] = []
    rnd = random.Random(1)
    with cond:
        for step in range(5000):
            if model and rnd.random() < 0.45:
                r = rnd.choice(model)
                model.remove(r)
                f.remove(r)
            else:
                s, n = rnd.randrange(0, 1000), rnd.randrange(1, 50)
                model.append(f.add(s, n))
            q, ln = rnd.randrange(0, 1050), rnd.randrange(1, 40)
            assert f.busy(q, ln) == any(s < q + ln and q < e for s, e in model), step
            assert f.total == sum(e - s for s, e in model)
            assert sorted(f.ranges) == sorted(model)
        with pytest.raises(ValueError, match=r"range \(5000, 5001\) is not in flight"):
            f.remove((5000, 5001))
