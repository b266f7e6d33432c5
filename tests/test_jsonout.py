"""cli.jsonout.dumps writes what json.dumps writes, byte for byte, with
and without indent, for any nesting of the values our commands print; and
the JSON outputs of map, info, check and measure load no json module."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from blkjobs.cli.jsonout import dumps

ODD = ["", "plain", "é ü", "\u2603 snow", "\U0001F600", "quote \" back \\ slash /", "\x00\x01\x1f\x7f",
       "tab\tnl\ncr\r", "\ud800 lone"]


def _random_value(rnd: random.Random, depth: int):
    kind = rnd.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return rnd.choice(ODD)
    if kind == 1:
        return rnd.choice([0, 1, -1, 2**63 - 1, -2**63, 2**64 + 5, 10**30])
    if kind == 2:
        return rnd.choice([0.0, -0.0, 1.5, 1e300, -2.5e-300, 0.1, float("inf"), float("-inf"),
                           float("nan")])
    if kind in (3, 4, 5, 6):
        return rnd.choice([True, False, None, "x"])
    if kind == 7:
        return [_random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if kind == 8:
        return tuple(_random_value(rnd, depth + 1) for _ in range(rnd.randrange(3)))
    return {rnd.choice(ODD + ["a", "b"]) if rnd.randrange(5) else rnd.choice([1, 2.5, True, None]):
            _random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))}


@pytest.mark.parametrize("indent", [None, 4, 2, 0])
def test_dumps_is_json_dumps(indent):
    rnd = random.Random(indent)
    for _ in range(2000):
        v = _random_value(rnd, 0)
        assert dumps(v, indent=indent) == json.dumps(v, indent=indent), v


def test_what_json_refuses_is_refused():
    for bad in (object(), {1, 2}, b"bytes", {(1, 2): 3}):
        with pytest.raises(TypeError):
            json.dumps(bad)
        with pytest.raises(TypeError):
            dumps(bad)


PROBE = """
import sys
sys.argv = ["blkjobs"] + sys.argv[1:]
from blkjobs.cli.main import main
rc = main()
sys.stdout.flush()
print(sorted(m for m in ("json", "re", "enum") if m in sys.modules), file=sys.stderr)
raise SystemExit(rc)
"""


def test_json_outputs_load_no_json(tmp_path):
    """map, info, check and measure with --output=json: the same text as
    qemu-img's, and no json loaded (nor re and enum under it: measure's
    argparse loads those)."""
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 64k 64k", img], check=True,
                   capture_output=True)
    for args in (["map", "--output=json", img], ["info", "--output=json", img],
                 ["check", "--output=json", img], ["measure", "--output=json", "-O", "qcow2", img]):
        p = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                           text=True, timeout=60)
        q = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
        want = "['enum', 're']" if args[0] == "measure" else "[]"
        assert (p.returncode, p.stderr.splitlines()[-1]) == (q.returncode, want), args
        assert p.stdout == q.stdout, args
